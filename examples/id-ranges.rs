//! `id-ranges`: per-pod id ranges, kubelet-style, from a state directory any
//! number of runtimes on a node can share. A thin client of
//! [`idmapped::ranges`].
//!
//! `allocate KEY` prints KEY's range as a `mount-idmapped --map-mount` value,
//! `b:0:FIRST:COUNT`: a file stored on disk as 0 is seen as FIRST (the pod's
//! root on the host) through the mount.
//!
//! Exit status: 0 done; 1 failed (pool exhausted, state invalid or written
//! with other settings, subids missing or mismatched); 2 usage error (bad
//! option, bad KEY, a pool or size that breaks a rule).

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use idmapped::ranges::{self, Allocation, Allocator, Config, Pool};
use idmapped::ErrorKind;

const USAGE: &str = "\
Usage: id-ranges --state=DIR [--pool=FIRST:COUNT | --subids=USER] [--ids-per-pod=N]
                 [--max-pods=N] [--json] COMMAND

Per-pod id ranges, as the kubelet hands them out: the ids are cut into
blocks of IDS_PER_POD, each KEY (a pod) gets one block, uid = gid =
[0 -> FIRST, COUNT], written durably to DIR (created if missing) before it
is printed. Any number of processes may share DIR.

Commands:
  allocate KEY       print KEY's range as a --map-mount value, \"b:0:FIRST:COUNT\",
                     allocating one if KEY has none
  release KEY        free KEY's range (no error if it has none)
  list               one line per allocation, \"KEY FIRST COUNT\", sorted by FIRST
  reconcile KEY...   release every allocation whose KEY is not listed

Options:
  --state=DIR          the state directory (required)
  --pool=FIRST:COUNT   hand out blocks of the COUNT ids starting at FIRST
  --subids=USER        the pool is USER's range in /etc/subuid and /etc/subgid
                       (through getsubids when installed); the two must be one
                       identical range
  --ids-per-pod=N      ids per block, a multiple of 65536 (default 65536)
  --max-pods=N         the pool must hold at least N usable blocks (default 110)
  --json               print one JSON object (list: an array)
  -h, --help           print this help
  --version            print the version

Defaults: --ids-per-pod=65536, --max-pods=110,
          --pool=IDS_PER_POD:(2^32-IDS_PER_POD). A block containing 4294967295
          is never handed out (the kernel cannot map it).
KEY: 1-253 characters of [A-Za-z0-9._-], except \".\" and \"..\"; a KEY
     that starts with '-' goes after \"--\" (id-ranges ... allocate -- -k).

Every command opens and validates the whole state first.

Exit status: 0 done; 1 failed (pool exhausted, state invalid or written with
other settings, subids missing or mismatched); 2 usage error (bad option, bad
KEY, a pool or size that breaks a rule).
";

fn main() -> ExitCode {
    match run(std::env::args_os().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let (code, message) = match failure {
                Failure::Usage(m) => (2, m),
                Failure::Failed(m) => (1, m),
            };
            eprintln!("id-ranges: {}", one_line(&message));
            ExitCode::from(code)
        }
    }
}

/// `text` with control characters escaped, so a message takes one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Why the program stops: decides the exit status.
enum Failure {
    /// Exit 2.
    Usage(String),
    /// Exit 1.
    Failed(String),
}

impl From<idmapped::Error> for Failure {
    fn from(e: idmapped::Error) -> Failure {
        match e.kind() {
            ErrorKind::RangeRule(_) | ErrorKind::InvalidKey { .. } => Failure::Usage(e.to_string()),
            _ => Failure::Failed(e.to_string()),
        }
    }
}

fn usage(message: impl std::fmt::Display) -> Failure {
    Failure::Usage(format!("{message} (see --help)"))
}

#[derive(Default)]
struct Options {
    state: Option<PathBuf>,
    pool: Option<Pool>,
    subids: Option<String>,
    ids_per_pod: Option<u64>,
    max_pods: Option<u64>,
    json: bool,
    help: bool,
    version: bool,
    operands: Vec<String>,
}

fn parse_options(args: Vec<OsString>) -> Result<Options, Failure> {
    let mut opts = Options::default();
    let mut args = args.into_iter();
    let mut only_operands = false;
    while let Some(arg) = args.next() {
        let text = arg
            .into_string()
            .map_err(|a| usage(format!("argument {a:?} is not UTF-8")))?;
        if only_operands || !text.starts_with('-') || text == "-" {
            opts.operands.push(text);
            continue;
        }
        if text == "--" {
            only_operands = true;
            continue;
        }
        let (name, inline) = match text.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (text.clone(), None),
        };
        match name.as_str() {
            "--json" | "-h" | "--help" | "--version" => {
                if inline.is_some() {
                    return Err(usage(format!("{name} takes no value")));
                }
                match name.as_str() {
                    "--json" => opts.json = true,
                    "--version" => opts.version = true,
                    _ => opts.help = true,
                }
            }
            "--state" | "--pool" | "--subids" | "--ids-per-pod" | "--max-pods" => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .and_then(|v| v.into_string().ok())
                        .ok_or_else(|| usage(format!("{name} needs a value")))?,
                };
                apply(&mut opts, &name, value)?;
            }
            _ => return Err(usage(format!("unknown option {name}"))),
        }
    }
    Ok(opts)
}

fn apply(opts: &mut Options, name: &str, value: String) -> Result<(), Failure> {
    let once = |set: bool| {
        if set {
            Err(usage(format!("{name} given twice")))
        } else {
            Ok(())
        }
    };
    match name {
        "--state" => {
            once(opts.state.is_some())?;
            if value.is_empty() {
                return Err(usage("--state needs a directory"));
            }
            opts.state = Some(PathBuf::from(value));
        }
        "--pool" => {
            once(opts.pool.is_some())?;
            let (first, count) = value
                .split_once(':')
                .ok_or_else(|| usage(format!("--pool={value}: expected FIRST:COUNT")))?;
            opts.pool = Some(Pool::new(
                number("--pool FIRST", first)?,
                number("--pool COUNT", count)?,
            ));
        }
        "--subids" => {
            once(opts.subids.is_some())?;
            if value.is_empty() || value.starts_with('-') {
                return Err(usage(format!("--subids={value}: expected a user name")));
            }
            opts.subids = Some(value);
        }
        "--ids-per-pod" => {
            once(opts.ids_per_pod.is_some())?;
            opts.ids_per_pod = Some(number(name, &value)?);
        }
        _ => {
            once(opts.max_pods.is_some())?;
            opts.max_pods = Some(number(name, &value)?);
        }
    }
    Ok(())
}

fn number(what: &str, text: &str) -> Result<u64, Failure> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(usage(format!("{what} {text:?} is not a decimal number")));
    }
    text.parse()
        .map_err(|_| usage(format!("{what} {text} is too large")))
}

enum Command {
    Allocate(String),
    Release(String),
    List,
    Reconcile(Vec<String>),
}

fn command(operands: &[String]) -> Result<Command, Failure> {
    let Some((name, args)) = operands.split_first() else {
        return Err(usage(
            "no COMMAND given (allocate, release, list, reconcile)",
        ));
    };
    let one = |what: &str| match args {
        [key] => Ok(key.clone()),
        _ => Err(usage(format!("{what} takes exactly one KEY"))),
    };
    let cmd = match name.as_str() {
        "allocate" => Command::Allocate(one("allocate")?),
        "release" => Command::Release(one("release")?),
        "list" if args.is_empty() => Command::List,
        "list" => return Err(usage("list takes no operand")),
        "reconcile" => Command::Reconcile(args.to_vec()),
        other => return Err(usage(format!("unknown command {other:?}"))),
    };
    // Keys are checked before anything is read or created.
    let keys: &[String] = match &cmd {
        Command::Allocate(k) | Command::Release(k) => std::slice::from_ref(k),
        Command::Reconcile(keys) => keys,
        Command::List => &[],
    };
    for key in keys {
        ranges::check_key(key)?;
    }
    Ok(cmd)
}

fn run(args: Vec<OsString>) -> Result<(), Failure> {
    let opts = parse_options(args)?;
    if opts.help {
        return emit(USAGE);
    }
    if opts.version {
        return emit(&format!("id-ranges {}\n", env!("CARGO_PKG_VERSION")));
    }
    let cmd = command(&opts.operands)?;
    let state = opts
        .state
        .clone()
        .ok_or_else(|| usage("--state=DIR is required"))?;
    if opts.pool.is_some() && opts.subids.is_some() {
        return Err(usage("--pool and --subids cannot be used together"));
    }
    let mut config = Config::new();
    if let Some(n) = opts.ids_per_pod {
        config = config.ids_per_pod(n);
    }
    if let Some(n) = opts.max_pods {
        config = config.max_pods(n);
    }
    if let Some(pool) = opts.pool {
        config = config.pool(pool);
    }
    // The settings' own rules first (exit 2), before anything is looked up
    // or created; a pool from --subids is checked once it is known.
    config.layout()?;
    if let Some(user) = &opts.subids {
        config = config.pool(Pool::from_subids(user)?);
    }
    let mut alloc = Allocator::open(&state, &config)?;
    match cmd {
        Command::Allocate(key) => {
            let a = alloc.allocate(&key)?;
            if opts.json {
                emit(&format!("{}\n", allocation_json(&a)))
            } else {
                emit(&format!("{}\n", a.map_mount()))
            }
        }
        Command::Release(key) => {
            let released = alloc.release(&key)?;
            if !opts.json {
                return Ok(());
            }
            let body = match released {
                Some(a) => format!(
                    "{{\"key\":{},\"released\":true,\"first\":{},\"count\":{},\"map_mount\":{}}}",
                    json_string(&key),
                    a.first(),
                    a.count(),
                    json_string(&a.map_mount())
                ),
                None => format!("{{\"key\":{},\"released\":false}}", json_string(&key)),
            };
            emit(&format!("{body}\n"))
        }
        Command::List => {
            let all = alloc.list()?;
            if opts.json {
                let items: Vec<String> = all.iter().map(allocation_json).collect();
                emit(&format!("[{}]\n", items.join(",")))
            } else {
                let mut out = String::new();
                for a in &all {
                    out.push_str(&format!("{} {} {}\n", a.key(), a.first(), a.count()));
                }
                emit(&out)
            }
        }
        Command::Reconcile(keys) => {
            let released = alloc.reconcile(keys.iter().map(String::as_str))?;
            if opts.json {
                let items: Vec<String> = released.iter().map(allocation_json).collect();
                emit(&format!("{{\"released\":[{}]}}\n", items.join(",")))
            } else {
                Ok(())
            }
        }
    }
}

fn allocation_json(a: &Allocation) -> String {
    format!(
        "{{\"key\":{},\"first\":{},\"count\":{},\"map_mount\":{}}}",
        json_string(a.key()),
        a.first(),
        a.count(),
        json_string(&a.map_mount())
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Failed(format!("writing to stdout: {e}")))
}
