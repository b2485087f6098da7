//! `mount-idmapped`: make an idmapped mount of a directory (or of a file onto
//! a file), compatible with the command of the same name that xfstests uses.
//!
//! `--map-mount=b:FROM:TO:RANGE` means: a file whose on-disk id is `FROM + n`
//! is seen through the new mount as `TO + n`, for `n < RANGE`; ids no value
//! covers are seen as 65534. The mount is built detached (clone, idmap, set
//! attributes) and attached only once everything that can fail has
//! succeeded, so a failure leaves nothing mounted.
//!
//! Exit status: 0 done; 1 the operation failed (or `--check`: cannot be
//! idmapped); 2 usage error.
//!
//! One file per concern: `args` (the command line and `--help`), `commands`
//! (mounting, `--tmpfs`, `--overlay` and `--check`), `output` (what goes to stdout, JSON by hand),
//! `demo` (`--demo`). What a runtime would also need lives in the library.

mod args;
mod commands;
mod demo;
mod output;

use std::ffi::OsString;
use std::fmt::Display;
use std::process::ExitCode;

use args::Command;
use output::emit;

fn main() -> ExitCode {
    // The --demo's pod processes re-run this program (not a user option).
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == demo::pods::HELPER) {
        return demo::pods::helper(&args[1..]);
    }
    match run(args) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("mount-idmapped: {}", one_line(&failure.to_string()));
            failure.exit_code()
        }
    }
}

/// `text` with control characters escaped, so that a message quoting a
/// value or path holding a newline still takes exactly one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn run(args: Vec<OsString>) -> Result<ExitCode, Failure> {
    match args::parse(args)? {
        Command::Help => emit(args::USAGE).map(|()| ExitCode::SUCCESS),
        Command::Version => emit(&format!("mount-idmapped {}\n", env!("CARGO_PKG_VERSION")))
            .map(|()| ExitCode::SUCCESS),
        Command::Check(request) => commands::check(&request),
        Command::Unshift(request) => commands::unshift(&request),
        Command::Demo => demo::run(),
        Command::Mount(request) => commands::mount(&request),
        Command::NewFs(request) => commands::new_fs(&request),
        Command::CheckOverlay(request) => commands::check_overlay(&request),
    }
}

// ---------------------------------------------------------------------------
// Failures and exit status

/// Why the program stops early; decides the exit status.
#[derive(Debug)]
pub enum Failure {
    /// A bad option, operand or mapping: exit 2.
    Usage(String),
    /// The operation itself failed: exit 1.
    Failed(String),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) => ExitCode::from(2),
            Failure::Failed(_) => ExitCode::from(1),
        }
    }

    /// A usage error.
    pub fn usage(message: impl Display) -> Failure {
        Failure::Usage(message.to_string())
    }

    /// An I/O failure while doing `what`.
    pub fn io(what: impl Display) -> impl FnOnce(std::io::Error) -> Failure {
        move |e| Failure::Failed(format!("{what}: {e}"))
    }
}

impl Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) => write!(f, "{m} (see --help)"),
            Failure::Failed(m) => f.write_str(m),
        }
    }
}

impl From<idmapped::Error> for Failure {
    fn from(e: idmapped::Error) -> Failure {
        Failure::Failed(e.to_string())
    }
}
