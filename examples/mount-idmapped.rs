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

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idmapped::chown::{
    unshift_tree, OutOfRange, OutsideLinks, Progress, ProgressFn, ShiftOptions, ShiftReport,
};
use idmapped::probe;
use idmapped::strategy::{mount_with_ownership, MountWay, Outcome, Plan, Strategy};
use idmapped::{
    CloneFlags, CloneMethod, DetachedMount, IdMap, Mapping, MountAttr, MountAttrFlags, Propagation,
    UserNamespace,
};

const USAGE: &str = "\
Usage: mount-idmapped [OPTIONS] SOURCE TARGET
       mount-idmapped --check [--recursive] [--json] SOURCE
       mount-idmapped --unshift [--recursive] [--json] SOURCE
       mount-idmapped --demo

Make an idmapped mount of SOURCE at TARGET. SOURCE is a directory, or a file
to mount onto the file TARGET.

Options:
  --map-mount=<b|u|g>:FROM:TO:RANGE
                    files whose on-disk ids are FROM..FROM+RANGE-1 are seen
                    through the mount as TO..TO+RANGE-1; b: uids and gids,
                    u: uids only, g: gids only. Ids no value covers are seen as
                    65534. Repeatable; also written --map-mount VALUE
  --map-mount=PATH  use the mapping of an existing user namespace, such as
                    /proc/PID/ns/user; cannot be mixed with the form above
  --recursive       include the submounts of SOURCE (idmap: all or nothing;
                    auto: each mount idmapped if it can be, shifted if not)
  --read-only       make the mount read-only
  --nosuid          ignore setuid/setgid bits and file capabilities
  --nodev           deny access to device files
  --noexec          deny program execution
  --nosymfollow     do not follow symlinks
  --propagation=private|shared|slave|unbindable
                    propagation type of the new mount
  --strategy=idmap|chown|auto
                    idmap (default): idmapped mount, nothing on disk changes;
                    chown: shift the ownership of SOURCE on disk (FROM..
                    becomes TO..), then bind-mount it at TARGET; auto: idmap
                    where the kernel and filesystem can, chown otherwise
  --out-of-range=keep|fail|overflow
                    chown: what to do with on-disk ids no value covers: leave
                    them (default), fail (checked first: nothing changes),
                    or write 65534 like the idmapped view
  --outside-links=skip|shift|fail
                    chown: a file also hard-linked from outside SOURCE is
                    left unchanged and reported (skip, default), shifted
                    anyway, or makes the command fail before any change
  --unshift         undo the shift recorded on SOURCE (exactly the recorded
                    mapping, inverted) and remove the record; takes SOURCE only
  --check           say whether SOURCE can be idmapped and, if not, why;
                    mount nothing; takes SOURCE only
  --json            print one JSON object on stdout saying what was done
  --demo            idmap a small tree on a scratch filesystem in a private
                    mount namespace, print on-disk and seen owners, clean up
  -h, --help        print this help
  --version         print the version

Example: on-disk 1000 is seen as 11000 and on-disk 15000 as 65534 through
  mount-idmapped --map-mount=b:0:10000:10000 /srv/volume /mnt/volume

Exit status: 0 done; 1 the operation failed (--check: SOURCE cannot be
idmapped); 2 usage error.
";

fn main() -> ExitCode {
    match run(std::env::args_os().skip(1).collect()) {
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
    match command(parse_options(args)?)? {
        Command::Help => emit(USAGE).map(|()| ExitCode::SUCCESS),
        Command::Version => emit(&format!("mount-idmapped {}\n", env!("CARGO_PKG_VERSION")))
            .map(|()| ExitCode::SUCCESS),
        Command::Check(request) => check(&request),
        Command::Unshift(request) => unshift(&request),
        Command::Demo => demo::run(),
        Command::Mount(request) => mount(&request),
    }
}

// ---------------------------------------------------------------------------
// Failures and exit status

/// Why the program stops early; decides the exit status.
#[derive(Debug)]
enum Failure {
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
    fn usage(message: impl Display) -> Failure {
        Failure::Usage(message.to_string())
    }

    /// An I/O failure while doing `what`.
    fn io(what: impl Display) -> impl FnOnce(std::io::Error) -> Failure {
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

/// Write `text` to stdout, reporting (not panicking on) a closed stdout.
fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Failure::io("cannot write to stdout"))
}

// ---------------------------------------------------------------------------
// Command line

/// The command line as given, before deciding what to do.
#[derive(Debug, Default)]
struct Options {
    maps: Vec<String>,
    recursive: bool,
    flags: MountAttrFlags,
    propagation: Option<Propagation>,
    strategy: Strategy,
    out_of_range: OutOfRange,
    outside_links: OutsideLinks,
    check: bool,
    unshift: bool,
    json: bool,
    demo: bool,
    help: bool,
    version: bool,
    /// Options that only make sense when mounting, in the order given.
    mount_only: Vec<String>,
    operands: Vec<PathBuf>,
}

/// What to do.
#[derive(Debug)]
enum Command {
    Help,
    Version,
    Check(CheckRequest),
    Unshift(CheckRequest),
    Demo,
    Mount(MountRequest),
}

#[derive(Debug)]
struct CheckRequest {
    source: PathBuf,
    recursive: bool,
    json: bool,
}

/// Where the idmap comes from.
#[derive(Debug)]
enum IdSource {
    /// `--map-mount=<b|u|g>:FROM:TO:RANGE` values.
    Mapping(Mapping),
    /// `--map-mount=PATH`: an existing user namespace.
    Userns(PathBuf),
}

#[derive(Debug)]
struct MountRequest {
    source: PathBuf,
    target: PathBuf,
    ids: IdSource,
    recursive: bool,
    flags: MountAttrFlags,
    propagation: Option<Propagation>,
    strategy: Strategy,
    out_of_range: OutOfRange,
    outside_links: OutsideLinks,
    json: bool,
}

fn parse_options(args: Vec<OsString>) -> Result<Options, Failure> {
    let mut opts = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(text) = option_text(&arg)? else {
            opts.operands.push(PathBuf::from(arg));
            continue;
        };
        if text == "--" {
            opts.operands.extend(args.by_ref().map(PathBuf::from));
            break;
        }
        let (name, inline) = match text.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (text, None),
        };
        if takes_value(name) {
            let value = match inline {
                Some(value) => value,
                None => next_value(&mut args, name)?,
            };
            apply_valued(&mut opts, name, value)?;
        } else if inline.is_some() {
            return Err(Failure::usage(format_args!("option {name} takes no value")));
        } else {
            apply_flag(&mut opts, name)?;
        }
    }
    Ok(opts)
}

/// `Some(text)` when `arg` is an option (starts with `-` and is not `-`).
fn option_text(arg: &OsString) -> Result<Option<&str>, Failure> {
    let bytes = arg.as_encoded_bytes();
    if bytes.len() < 2 || bytes.first() != Some(&b'-') {
        return Ok(None);
    }
    arg.to_str()
        .map(Some)
        .ok_or_else(|| Failure::usage(format_args!("unknown option {}", arg.to_string_lossy())))
}

fn takes_value(name: &str) -> bool {
    matches!(
        name,
        "--map-mount" | "--propagation" | "--strategy" | "--out-of-range" | "--outside-links"
    )
}

fn next_value(args: &mut impl Iterator<Item = OsString>, name: &str) -> Result<String, Failure> {
    let value = args
        .next()
        .ok_or_else(|| Failure::usage(format_args!("option {name} needs a value")))?;
    value.into_string().map_err(|v| {
        Failure::usage(format_args!(
            "option {name}: value `{}` is not valid UTF-8",
            v.to_string_lossy()
        ))
    })
}

fn apply_valued(opts: &mut Options, name: &str, value: String) -> Result<(), Failure> {
    match name {
        "--map-mount" => opts.maps.push(value),
        "--propagation" => {
            let propagation = value.parse().map_err(|_| {
                Failure::usage(format_args!(
                    "--propagation `{value}`: expected private, shared, slave or unbindable"
                ))
            })?;
            opts.propagation = Some(propagation);
        }
        "--strategy" => {
            opts.strategy = value.parse().map_err(|_| {
                Failure::usage(format_args!(
                    "--strategy `{value}`: expected idmap, chown or auto"
                ))
            })?;
        }
        "--outside-links" => {
            opts.outside_links = value.parse().map_err(|_| {
                Failure::usage(format_args!(
                    "--outside-links `{value}`: expected skip, shift or fail"
                ))
            })?;
        }
        _ => {
            opts.out_of_range = match value.as_str() {
                "keep" => OutOfRange::Keep,
                "fail" => OutOfRange::Fail,
                "overflow" => OutOfRange::Overflow,
                _ => {
                    return Err(Failure::usage(format_args!(
                        "--out-of-range `{value}`: expected keep, fail or overflow"
                    )))
                }
            };
        }
    }
    opts.mount_only.push(name.to_owned());
    Ok(())
}

fn apply_flag(opts: &mut Options, name: &str) -> Result<(), Failure> {
    let switch = match name {
        "-h" | "--help" => &mut opts.help,
        "--version" => &mut opts.version,
        "--check" => &mut opts.check,
        "--unshift" => &mut opts.unshift,
        "--json" => &mut opts.json,
        "--demo" => &mut opts.demo,
        "--recursive" => &mut opts.recursive,
        _ => {
            opts.flags |= mount_flag(name)?;
            opts.mount_only.push(name.to_owned());
            return Ok(());
        }
    };
    *switch = true;
    Ok(())
}

fn mount_flag(name: &str) -> Result<MountAttrFlags, Failure> {
    match name {
        "--read-only" => Ok(MountAttrFlags::RDONLY),
        "--nosuid" => Ok(MountAttrFlags::NOSUID),
        "--nodev" => Ok(MountAttrFlags::NODEV),
        "--noexec" => Ok(MountAttrFlags::NOEXEC),
        "--nosymfollow" => Ok(MountAttrFlags::NOSYMFOLLOW),
        _ => Err(Failure::usage(format_args!("unknown option {name}"))),
    }
}

/// Decide what to do, rejecting every combination that makes no sense.
fn command(opts: Options) -> Result<Command, Failure> {
    if opts.help {
        return Ok(Command::Help);
    }
    if opts.version {
        return Ok(Command::Version);
    }
    if opts.demo {
        let stray = opts.mount_only.first().map(String::as_str);
        let stray = stray.or(opts.check.then_some("--check"));
        let stray = stray.or(opts.json.then_some("--json"));
        if let Some(option) = stray {
            return Err(Failure::usage(format_args!(
                "--demo cannot be combined with {option}"
            )));
        }
        no_more_operands(&opts.operands, 0)?;
        return Ok(Command::Demo);
    }
    if opts.check && opts.unshift {
        return Err(Failure::usage("--check cannot be combined with --unshift"));
    }
    if opts.check {
        return check_command(opts);
    }
    if opts.unshift {
        if let Some(option) = opts.mount_only.first() {
            return Err(Failure::usage(format_args!(
                "--unshift cannot be combined with {option} (the record says how to undo)"
            )));
        }
        no_more_operands(&opts.operands, 1)?;
        let source = opts
            .operands
            .into_iter()
            .next()
            .ok_or_else(|| Failure::usage("--unshift: missing SOURCE"))?;
        return Ok(Command::Unshift(CheckRequest {
            source,
            recursive: opts.recursive,
            json: opts.json,
        }));
    }
    mount_command(opts)
}

fn check_command(opts: Options) -> Result<Command, Failure> {
    if let Some(option) = opts.mount_only.first() {
        return Err(Failure::usage(format_args!(
            "--check cannot be combined with {option}"
        )));
    }
    no_more_operands(&opts.operands, 1)?;
    let source = opts
        .operands
        .into_iter()
        .next()
        .ok_or_else(|| Failure::usage("--check: missing SOURCE"))?;
    Ok(Command::Check(CheckRequest {
        source,
        recursive: opts.recursive,
        json: opts.json,
    }))
}

fn mount_command(opts: Options) -> Result<Command, Failure> {
    no_more_operands(&opts.operands, 2)?;
    let mut operands = opts.operands.into_iter();
    let (source, target) = match (operands.next(), operands.next()) {
        (Some(source), Some(target)) => (source, target),
        (Some(_), None) => return Err(Failure::usage("missing TARGET")),
        _ => return Err(Failure::usage("missing SOURCE and TARGET")),
    };
    Ok(Command::Mount(MountRequest {
        source,
        target,
        ids: id_source(&opts.maps)?,
        recursive: opts.recursive,
        flags: opts.flags,
        propagation: opts.propagation,
        strategy: opts.strategy,
        out_of_range: opts.out_of_range,
        outside_links: opts.outside_links,
        json: opts.json,
    }))
}

fn no_more_operands(operands: &[PathBuf], allowed: usize) -> Result<(), Failure> {
    match operands.get(allowed) {
        Some(extra) => Err(Failure::usage(format_args!(
            "unexpected operand `{}`",
            extra.display()
        ))),
        None => Ok(()),
    }
}

/// `--map-mount` values: one user-namespace path, or id extents.
fn id_source(values: &[String]) -> Result<IdSource, Failure> {
    let (paths, extents): (Vec<&String>, Vec<&String>) =
        values.iter().partition(|v| v.trim_start().starts_with('/'));
    match (paths.as_slice(), extents.as_slice()) {
        ([], []) => Err(Failure::usage(
            "no --map-mount given: nothing to idmap with",
        )),
        ([], extents) => Mapping::parse_map_mount(extents.iter().map(|v| v.as_str()))
            .map(IdSource::Mapping)
            .map_err(Failure::usage),
        ([path], []) => Ok(IdSource::Userns(PathBuf::from(path.trim()))),
        ([path], [extent, ..]) => Err(Failure::usage(format_args!(
            "--map-mount: the user-namespace path `{path}` cannot be mixed with id extents (`{extent}`)"
        ))),
        ([_, second, ..], _) => Err(Failure::usage(format_args!(
            "--map-mount: only one user-namespace path may be given (`{second}` is a second one)"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Mounting

fn mount(request: &MountRequest) -> Result<ExitCode, Failure> {
    let (outcome, mapping) = give_ownership(request)?;
    if let Outcome::Chowned {
        because: Some(why), ..
    } = &outcome
    {
        eprintln!("mount-idmapped: cannot idmap ({why}); shifted ownership on disk instead");
    }
    match &outcome {
        Outcome::Chowned { report, .. } => {
            tell_report(&request.source, report, request.outside_links)
        }
        Outcome::PerMount { mounts, report } => {
            for m in mounts {
                match &m.way {
                    MountWay::Idmapped(_) => {
                        eprintln!("mount-idmapped: {}: idmapped", m.mount.display())
                    }
                    MountWay::Shifted(why) => eprintln!(
                        "mount-idmapped: {}: shifted ownership on disk ({why})",
                        m.mount.display()
                    ),
                }
            }
            tell_report(&request.source, report, request.outside_links);
        }
        Outcome::Idmapped { .. } => {}
    }
    if request.json {
        // The mount is in place: if the report cannot be written, take the
        // mount away again rather than exit 1 with something left mounted.
        if let Err(failure) = emit(&mount_json(request, &outcome, mapping.as_ref())) {
            let _ = rustix::mount::unmount(&request.target, rustix::mount::UnmountFlags::DETACH);
            return Err(failure);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a walk did that a user must hear of, on stderr.
fn tell_report(source: &Path, r: &ShiftReport, outside: OutsideLinks) {
    let outside_verb = match outside {
        OutsideLinks::Shift => "shifted anyway (--outside-links=shift)",
        _ => "left unchanged",
    };
    if r.completed_before {
        eprintln!(
            "mount-idmapped: {}: already shifted with this mapping and policy (recorded on the tree); nothing walked",
            source.display()
        );
    }
    if r.resumed {
        eprintln!(
            "mount-idmapped: {}: finished an interrupted shift ({} entries done before, {} half-done entries completed)",
            source.display(),
            r.already_shifted,
            r.recovered
        );
    }
    if !r.kept_in_seen_range.is_empty() {
        eprintln!(
            "mount-idmapped: {} id(s) outside the mapping were kept although they lie inside a seen range (they now look like container ids); first:",
            r.kept_in_seen_range.len()
        );
        for k in r.kept_in_seen_range.iter().take(5) {
            eprintln!("  {}: {} {}", k.path.display(), k.kind, k.id);
        }
    }
    if !r.outside_links.is_empty() {
        eprintln!(
            "mount-idmapped: {} file(s) are also hard-linked from outside the tree and were {}; first:",
            r.outside_links.len(),
            outside_verb
        );
        for p in r.outside_links.iter().take(5) {
            eprintln!("  {}", p.display());
        }
    }
    if r.tree_changed {
        eprintln!(
            "mount-idmapped: the tree changed during the walk (entries moved); the directories concerned were walked again"
        );
    }
}

fn unshift(request: &CheckRequest) -> Result<ExitCode, Failure> {
    let options = ShiftOptions {
        cross_mounts: request.recursive,
        ..ShiftOptions::default()
    };
    let report = unshift_tree(&request.source, &options)?;
    if request.json {
        emit(
            &json::Object::new()
                .raw("source", json::path(&absolute(&request.source)))
                .raw("unshifted", "true")
                .raw("report", report_json(&report))
                .finish(),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Run the library's strategy: everything that can fail happens before the
/// mount is attached at TARGET. Returns the mapping used, when known.
fn give_ownership(request: &MountRequest) -> Result<(Outcome, Option<Mapping>), Failure> {
    let ns;
    let mapping = match &request.ids {
        IdSource::Mapping(mapping) => mapping.clone(),
        IdSource::Userns(path) => {
            ns = UserNamespace::open(path)?;
            match (ns.mapping(), request.strategy) {
                (Some(m), _) => m.clone(),
                // Its maps cannot be read: only an idmapped mount can use it.
                (None, Strategy::Idmap) => {
                    let (flags, attr) = if request.recursive {
                        (CloneFlags::RECURSIVE, attr(request).idmap_recursive(&ns))
                    } else {
                        (CloneFlags::empty(), attr(request).idmap(&ns))
                    };
                    let clone = DetachedMount::clone_with(&request.source, flags, &attr)
                        .map_err(|e| probe::diagnose(e, &request.source, request.recursive))?;
                    let method = clone.method();
                    clone.attach(&request.target)?;
                    return Ok((Outcome::Idmapped { method }, None));
                }
                (None, s) => {
                    return Err(Failure::usage(format_args!(
                        "--strategy={}: the maps of {} cannot be read, so ownership cannot be shifted on disk",
                        s.name(),
                        path.display()
                    )))
                }
            }
        }
    };
    let printed = Arc::new(AtomicBool::new(false));
    let mut plan = Plan::new(request.strategy, &mapping)
        .recursive(request.recursive)
        .flags(request.flags)
        .shift_options(ShiftOptions {
            out_of_range: request.out_of_range,
            outside_links: request.outside_links,
            progress: progress_line(Arc::clone(&printed)),
            ..ShiftOptions::default()
        });
    if let Some(p) = request.propagation {
        plan = plan.propagation(p);
    }
    let outcome = mount_with_ownership(&request.source, &request.target, &plan);
    if printed.load(Ordering::Relaxed) {
        eprintln!();
    }
    let outcome = outcome?;
    Ok((outcome, Some(mapping)))
}

/// The mount attributes asked for, without an idmap; with --recursive they
/// apply to every mount of the tree.
fn attr(request: &MountRequest) -> MountAttr<'static> {
    let attr = MountAttr::new().set_recursive(request.flags);
    match request.propagation {
        Some(p) => attr.propagation_recursive(p),
        None => attr,
    }
}

/// A progress line on stderr while a walk runs, when stderr is a terminal:
/// updated at most every half second, only once the walk has taken 2 s.
/// `printed` tells the caller a line is on screen (to end it).
fn progress_line(printed: Arc<AtomicBool>) -> Option<ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let start = Instant::now();
    let last = Mutex::new(start);
    Some(Arc::new(move |p: &Progress| {
        let now = Instant::now();
        let Ok(mut last) = last.lock() else { return };
        if now.duration_since(start) < Duration::from_secs(2)
            || now.duration_since(*last) < Duration::from_millis(500)
        {
            return;
        }
        *last = now;
        printed.store(true, Ordering::Relaxed);
        eprint!(
            "\rshifting ownership: {} entries visited, {} changed",
            p.visited, p.changed
        );
    }))
}

fn mount_json(request: &MountRequest, outcome: &Outcome, mapping: Option<&Mapping>) -> String {
    let userns = match &request.ids {
        IdSource::Userns(path) => json::path(path),
        IdSource::Mapping(_) => json::NULL.to_owned(),
    };
    let mapping = mapping.map_or_else(|| json::NULL.to_owned(), mapping_json);
    let mut per_mount = json::NULL.to_owned();
    let (strategy, kernel_path, fallback, report) = match outcome {
        Outcome::Idmapped { method } => ("idmap", json::string(method.syscalls()), None, None),
        Outcome::Chowned { report, because } => (
            "chown",
            json::NULL.to_owned(),
            because.as_ref(),
            Some(report),
        ),
        Outcome::PerMount { mounts, report } => {
            let items: Vec<String> = mounts
                .iter()
                .map(|m| {
                    let (way, reason) = match &m.way {
                        MountWay::Idmapped(method) => ("idmap", json::string(method.syscalls())),
                        MountWay::Shifted(why) => ("chown", json::string(&why.to_string())),
                    };
                    json::Object::new()
                        .raw("mount", json::path(&absolute(&m.mount)))
                        .raw("strategy", json::string(way))
                        .raw(
                            if way == "idmap" {
                                "kernel_path"
                            } else {
                                "reason"
                            },
                            reason,
                        )
                        .finish_inline()
                })
                .collect();
            per_mount = format!("[{}]", items.join(", "));
            ("per-mount", json::NULL.to_owned(), None, Some(report))
        }
    };
    let fallback = fallback.map_or_else(
        || json::NULL.to_owned(),
        |f| {
            json::Object::new()
                .raw("mount", json::path(&absolute(&f.mount)))
                .raw("reason", json::string(&f.reason.to_string()))
                .finish_inline()
        },
    );
    json::Object::new()
        .raw("source", json::path(&absolute(&request.source)))
        .raw("target", json::path(&absolute(&request.target)))
        .raw("strategy", json::string(strategy))
        .raw("requested_strategy", json::string(request.strategy.name()))
        .raw("recursive", request.recursive.to_string())
        .raw("mapping", mapping)
        .raw("userns", userns)
        .raw("attributes", attributes_json(request))
        .raw("kernel_path", kernel_path)
        .raw("fallback", fallback)
        .raw("mounts", per_mount)
        .raw(
            "report",
            report.map_or_else(|| json::NULL.to_owned(), report_json),
        )
        .finish()
}

fn report_json(r: &ShiftReport) -> String {
    json::Object::new()
        .raw("visited", r.visited.to_string())
        .raw("changed", r.changed.to_string())
        .raw("already_shifted", r.already_shifted.to_string())
        .raw(
            "hardlinks_deduplicated",
            r.hardlinks_deduplicated.to_string(),
        )
        .raw("acls_rewritten", r.acls_rewritten.to_string())
        .raw(
            "capabilities_rewritten",
            r.capabilities_rewritten.to_string(),
        )
        .raw("out_of_range", r.out_of_range.to_string())
        .raw("skipped_mounts", r.skipped_mounts.to_string())
        .raw("recovered", r.recovered.to_string())
        .raw("completed_before", r.completed_before.to_string())
        .raw("resumed", r.resumed.to_string())
        .raw("tree_changed", r.tree_changed.to_string())
        .raw(
            "kept_in_seen_range",
            format!(
                "[{}]",
                r.kept_in_seen_range
                    .iter()
                    .map(|k| json::Object::new()
                        .raw("path", json::path(&k.path))
                        .raw("kind", json::string(k.kind))
                        .raw("id", k.id.to_string())
                        .finish_inline())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .raw(
            "outside_links",
            format!(
                "[{}]",
                r.outside_links
                    .iter()
                    .map(|p| json::path(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .raw(
            "mounts_shifted",
            format!(
                "[{}]",
                r.mounts_shifted
                    .iter()
                    .map(|p| json::path(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .raw("elapsed_s", format!("{:.6}", r.elapsed.as_secs_f64()))
        .finish_inline()
}

fn mapping_json(mapping: &Mapping) -> String {
    json::Object::new()
        .raw("uid", extents_json(mapping.uids()))
        .raw("gid", extents_json(mapping.gids()))
        .finish_inline()
}

fn extents_json(map: &IdMap) -> String {
    let items: Vec<String> = map
        .extents()
        .iter()
        .map(|e| {
            json::Object::new()
                .raw("on_disk", e.on_disk().to_string())
                .raw("seen", e.seen().to_string())
                .raw("count", e.count().to_string())
                .finish_inline()
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn attributes_json(request: &MountRequest) -> String {
    let flag = |f: MountAttrFlags| request.flags.contains(f).to_string();
    json::Object::new()
        .raw("read_only", flag(MountAttrFlags::RDONLY))
        .raw("nosuid", flag(MountAttrFlags::NOSUID))
        .raw("nodev", flag(MountAttrFlags::NODEV))
        .raw("noexec", flag(MountAttrFlags::NOEXEC))
        .raw("nosymfollow", flag(MountAttrFlags::NOSYMFOLLOW))
        .raw(
            "propagation",
            request
                .propagation
                .map_or_else(|| json::NULL.to_owned(), |p| json::string(p.name())),
        )
        .finish_inline()
}

/// `path` made absolute against the current directory, without resolving
/// symlinks (falls back to `path` itself if the directory is gone).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

// ---------------------------------------------------------------------------
// --check

/// The mount that decides a `--check` verdict against SOURCE.
struct Blocker {
    mount_point: PathBuf,
    fs: String,
    reason: probe::Reason,
}

fn check(request: &CheckRequest) -> Result<ExitCode, Failure> {
    // Look the path up first, so a missing SOURCE is an error, not a verdict.
    std::fs::symlink_metadata(&request.source)
        .map_err(Failure::io(format_args!("{}", request.source.display())))?;
    let fs = probe::fs_type(&request.source);
    let blocker = probe::first_unsupported(&request.source, request.recursive)?.map(
        |(mount_point, reason)| Blocker {
            fs: probe::fs_type(&mount_point),
            mount_point,
            reason,
        },
    );
    let text = if request.json {
        check_json(request, Some(&fs), blocker.as_ref())
    } else {
        check_text(request, Some(&fs), blocker.as_ref())
    };
    emit(&text)?;
    Ok(match blocker {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(1),
    })
}

fn check_text(request: &CheckRequest, fs: Option<&str>, blocker: Option<&Blocker>) -> String {
    let source = request.source.display();
    let fs = fs.unwrap_or("unknown");
    match blocker {
        None => format!("{source}: can be idmapped (filesystem type {fs})\n"),
        Some(b) if b.mount_point == request.source => {
            format!("{source}: cannot be idmapped: {}\n", b.reason)
        }
        Some(b) => format!(
            "{source}: cannot be idmapped: submount {}: {}\n",
            b.mount_point.display(),
            b.reason
        ),
    }
}

fn check_json(request: &CheckRequest, fs: Option<&str>, blocker: Option<&Blocker>) -> String {
    let reason = blocker.map_or_else(
        || json::NULL.to_owned(),
        |b| json::string(&b.reason.to_string()),
    );
    let blocked_by = blocker.map_or_else(
        || json::NULL.to_owned(),
        |b| {
            json::Object::new()
                .raw("path", json::path(&absolute(&b.mount_point)))
                .raw("fs", json::string(&b.fs))
                .finish_inline()
        },
    );
    json::Object::new()
        .raw("source", json::path(&absolute(&request.source)))
        .raw("supported", blocker.is_none().to_string())
        .raw("reason", reason)
        .raw("fs", fs.map_or_else(|| json::NULL.to_owned(), json::string))
        .raw("recursive", request.recursive.to_string())
        .raw("blocked_by", blocked_by)
        .finish()
}

// ---------------------------------------------------------------------------
// JSON, by hand

mod json {
    use std::fmt::Write as _;
    use std::path::Path;

    pub const NULL: &str = "null";

    /// `s` as a JSON string literal.
    pub fn string(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A path as a JSON string (bytes that are not UTF-8 become U+FFFD).
    pub fn path(p: &Path) -> String {
        string(&p.to_string_lossy())
    }

    /// An object built from already-rendered values.
    #[derive(Default)]
    pub struct Object {
        body: String,
    }

    impl Object {
        pub fn new() -> Object {
            Object::default()
        }

        pub fn raw(mut self, key: &str, value: impl AsRef<str>) -> Object {
            if !self.body.is_empty() {
                self.body.push(',');
            }
            self.body.push_str(&string(key));
            self.body.push(':');
            self.body.push_str(value.as_ref());
            self
        }

        /// The object as a value inside another.
        pub fn finish_inline(self) -> String {
            format!("{{{}}}", self.body)
        }

        /// The object as a whole output line.
        pub fn finish(self) -> String {
            format!("{{{}}}\n", self.body)
        }
    }
}

// ---------------------------------------------------------------------------
// --demo

mod demo {
    use super::*;

    use rustix::mount::{MountPropagationFlags, UnmountFlags};
    use rustix::thread::UnshareFlags;

    /// The mapping the demo applies (DESIGN §2's example).
    const MAP: &str = "b:0:10000:10000";

    /// The files the demo creates, with their on-disk owner (uid = gid).
    const TREE: &[(&str, bool, u32)] = &[
        ("root-file", false, 0),
        ("user-dir", true, 1000),
        ("user-dir/file", false, 1000),
        ("outside-file", false, 15000),
    ];

    pub fn run() -> Result<ExitCode, Failure> {
        enter_private_mount_namespace()?;
        let dir = tempfile::Builder::new()
            .prefix("mount-idmapped-demo-")
            .tempdir()
            .map_err(Failure::io("cannot create a temporary directory"))?;
        let scratch = Scratch::mount(dir.path())?;
        make_tree(&scratch.root)?;
        let target = dir.path().join("idmapped");
        std::fs::create_dir(&target).map_err(Failure::io(target.display()))?;
        let mapping =
            Mapping::parse_map_mount([MAP]).map_err(|e| Failure::Failed(e.to_string()))?;
        let ns = UserNamespace::from_mapping(&mapping)?;
        let clone = DetachedMount::clone_with(
            &scratch.root,
            CloneFlags::empty(),
            &MountAttr::new().idmap(&ns),
        )?;
        let method = clone.method();
        clone.attach(&target)?;
        let idmapped = Mounted::new(target);
        let table = table(&scratch, &idmapped.path, method)?;
        idmapped.unmount()?;
        scratch.unmount()?;
        dir.close()
            .map_err(Failure::io("cannot remove the temporary directory"))?;
        emit(&table)?;
        Ok(ExitCode::SUCCESS)
    }

    /// A mount namespace of our own, with nothing propagating out of it.
    fn enter_private_mount_namespace() -> Result<(), Failure> {
        // SAFETY: CLONE_NEWNS gives this thread its own mount namespace and
        // fs context (cwd, root, umask). The process has one thread at this
        // point and keeps no cached paths, so no state Rust relies on changes.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }
            .map_err(|e| Failure::Failed(format!("unshare(CLONE_NEWNS): {e}")))?;
        rustix::mount::mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(|e| Failure::Failed(format!("cannot make / recursively private: {e}")))
    }

    /// A mount that is unmounted when dropped, unless unmounted explicitly.
    struct Mounted {
        path: PathBuf,
        active: bool,
    }

    impl Mounted {
        fn new(path: PathBuf) -> Mounted {
            Mounted { path, active: true }
        }

        fn unmount(mut self) -> Result<(), Failure> {
            self.active = false;
            rustix::mount::unmount(&self.path, UnmountFlags::empty()).map_err(|e| {
                Failure::Failed(format!("cannot unmount {}: {e}", self.path.display()))
            })
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            if self.active {
                let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
            }
        }
    }

    /// The scratch filesystem: ext4 on a loop image when `mkfs.ext4` is
    /// there (tmpfs cannot be idmapped before Linux 6.3), tmpfs otherwise.
    struct Scratch {
        root: PathBuf,
        kind: &'static str,
        mount: Mounted,
    }

    impl Scratch {
        fn mount(dir: &Path) -> Result<Scratch, Failure> {
            let root = dir.join("fs");
            std::fs::create_dir(&root).map_err(Failure::io(root.display()))?;
            let image = dir.join("fs.img");
            let kind = if make_ext4_image(&image)? {
                // util-linux sets up the loop device with autoclear: it goes
                // away with the last unmount.
                let mount = find_tool("mount").unwrap_or_else(|| PathBuf::from("mount"));
                run_tool(
                    Process::new(mount)
                        .args(["-t", "ext4", "-o", "loop"])
                        .arg(&image)
                        .arg(&root),
                )?;
                "ext4 on a loop device"
            } else {
                rustix::mount::mount(
                    "tmpfs",
                    &root,
                    "tmpfs",
                    rustix::mount::MountFlags::empty(),
                    None,
                )
                .map_err(|e| Failure::Failed(format!("cannot mount tmpfs: {e}")))?;
                "tmpfs"
            };
            Ok(Scratch {
                mount: Mounted::new(root.clone()),
                root,
                kind,
            })
        }

        fn unmount(self) -> Result<(), Failure> {
            self.mount.unmount()
        }
    }

    /// Make an ext4 image at `image`; `Ok(false)` when there is no mkfs.ext4.
    fn make_ext4_image(image: &Path) -> Result<bool, Failure> {
        let Some(mkfs) = find_tool("mkfs.ext4") else {
            return Ok(false);
        };
        let file = std::fs::File::create(image).map_err(Failure::io(image.display()))?;
        file.set_len(32 << 20)
            .map_err(Failure::io(image.display()))?;
        run_tool(Process::new(mkfs).args(["-q", "-F"]).arg(image))?;
        Ok(true)
    }

    /// `name` on `PATH`, or in the sbin directories, which are not on every
    /// user's `PATH`.
    fn find_tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|tool| tool.is_file())
    }

    fn run_tool(cmd: &mut Process) -> Result<(), Failure> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let out = cmd.output().map_err(Failure::io(&name))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(Failure::Failed(format!(
            "{name} failed ({}): {}",
            out.status,
            stderr.trim()
        )))
    }

    fn make_tree(root: &Path) -> Result<(), Failure> {
        std::os::unix::fs::chown(root, Some(0), Some(0)).map_err(Failure::io(root.display()))?;
        for &(name, is_dir, id) in TREE {
            let path = root.join(name);
            let made = if is_dir {
                std::fs::create_dir(&path)
            } else {
                std::fs::write(&path, name)
            };
            made.and_then(|()| std::os::unix::fs::chown(&path, Some(id), Some(id)))
                .map_err(Failure::io(path.display()))?;
        }
        Ok(())
    }

    fn table(scratch: &Scratch, idmapped: &Path, method: CloneMethod) -> Result<String, Failure> {
        let owner = |p: &Path| {
            std::fs::symlink_metadata(p)
                .map(|m| format!("{}:{}", m.uid(), m.gid()))
                .map_err(Failure::io(p.display()))
        };
        let mut out = format!(
            "Scratch filesystem: {}; idmapped with --map-mount={MAP} via {}\n\
             (on-disk 0..9999 are seen as 10000..19999, every other id as 65534)\n\n",
            scratch.kind,
            method.syscalls()
        );
        out.push_str(&row("PATH", "ON DISK (uid:gid)", "SEEN (uid:gid)"));
        let names = std::iter::once(".").chain(TREE.iter().map(|&(name, _, _)| name));
        for name in names {
            let on_disk = owner(&scratch.root.join(name))?;
            let seen = owner(&idmapped.join(name))?;
            out.push_str(&row(name, &on_disk, &seen));
        }
        Ok(out)
    }

    fn row(path: &str, on_disk: &str, seen: &str) -> String {
        format!("{path:<16} {on_disk:<20} {seen}\n")
    }
}
