//! The command line: options, operands, `--help`, and deciding what to do
//! (every combination that makes no sense is a usage error, exit 2).

use std::ffi::OsString;
use std::path::PathBuf;

use idmapped::chown::{OutOfRange, OutsideLinks};
use idmapped::rootfs::Overlay;
use idmapped::strategy::Strategy;
use idmapped::{Mapping, MountAttrFlags, NewFilesystem, Propagation};

use crate::Failure;

pub const USAGE: &str = "\
Usage: mount-idmapped [OPTIONS] --map-mount=MAP... SOURCE TARGET
       mount-idmapped [OPTIONS] --map-mount=MAP... --tmpfs[=OPTIONS] TARGET
       mount-idmapped [OPTIONS] --map-mount=MAP... \\
           --overlay=lowerdir=L1:L2[:...][,upperdir=U,workdir=W] TARGET
       mount-idmapped --check [--recursive] [--json] SOURCE
       mount-idmapped --check [--json] --overlay=lowerdir=...
       mount-idmapped --unshift [--recursive] [--json] SOURCE
       mount-idmapped --demo

Make an idmapped mount of SOURCE at TARGET: a file whose on-disk id is FROM+n
is seen through it as TO+n; ids no mapping covers are seen as 65534. Nothing
is mounted unless every step succeeds.

Mapping (at least one; repeatable, also written --map-mount VALUE):
  --map-mount=<b|u|g>:FROM:TO:RANGE
                    on-disk ids FROM..FROM+RANGE-1 are seen as TO..TO+RANGE-1;
                    b: uids and gids, u: uids only, g: gids only
  --map-mount=FROM:TO:RANGE
                    util-linux's syntax (X-mount.idmap=): the same as b:
  --map-mount=PATH  the mapping of an existing user namespace, such as
                    /proc/PID/ns/user; cannot be mixed with the forms above

What to mount:
  SOURCE            a directory, or a regular file to mount onto a file
                    (not a FIFO, socket or device node)
  --recursive       include the submounts of SOURCE (idmap: all or nothing;
                    auto: each mount idmapped if it can be, shifted if not)

Where:
  TARGET            an existing directory for a directory SOURCE, an existing
                    file for a file; a symlink as TARGET is followed, as
                    mount(8) does, and the mount is made where it points
  --beneath=ROOT    resolve TARGET inside ROOT as if ROOT were \"/\" (symlinks,
                    \"..\", absolute links stay inside ROOT; magic links
                    refused); TARGET may be written with or without a
                    leading \"/\". SOURCE stays a path of the caller's namespace
  --mkdir           create TARGET if missing (parents too, mode 0755): a
                    directory, or an empty file when SOURCE is a file;
                    confined to ROOT with --beneath
  --replace         TARGET has a mount on it: attach beneath it, then detach
                    the old one, so TARGET never shows the directory under
                    both (Linux 6.5); nothing mounted there: a plain attach

Attributes (of the new mount; with --recursive, of each of its mounts):
  --read-only       make the mount read-only
  --nosuid          ignore setuid/setgid bits and file capabilities
  --nodev           deny access to device files
  --noexec          deny program execution
  --nosymfollow     do not follow symlinks
  --propagation=private|shared|slave|unbindable
                    propagation type of the new mount

Strategy:
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

New filesystems (instead of SOURCE; --strategy, --out-of-range and
--recursive do not apply):
  --tmpfs[=OPTIONS] make a new tmpfs with the comma-separated filesystem
                    OPTIONS (e.g. size=16m,mode=0750,nr_inodes=1k,uid=0,gid=0),
                    idmap it with --map-mount, attach it at TARGET (Linux 6.3)
  --overlay=lowerdir=L1:L2[:...][,upperdir=U,workdir=W][,OPTION...]
                    mount at TARGET an overlay of the layers (L1 on top), each
                    seen through --map-mount; without upperdir and workdir
                    (on one mount) the overlay is read-only and needs two or
                    more layers. \\: \\, \\\\ escape those characters in a path.
                    The overlay mount itself is not idmapped; no helper mount
                    is ever visible (Linux 5.19; layer fds 6.13)

Output:
  --json            print one JSON object on stdout saying what was done (if
                    it cannot be written: exit 1, and nothing stays mounted)
  --check           say whether SOURCE (or, with --overlay, each layer) can
                    be idmapped and, if not, why; mount nothing; needs no
                    --map-mount
  --demo            idmap a small tree on a scratch filesystem in a private
                    mount namespace, print on-disk and seen owners; then two
                    pods with ranges from an allocator, each with its own
                    user namespace and idmapped mount of one volume, write
                    a file each: print who owns what, on disk, in each pod
                    and on the host; clean up
  -h, --help        print this help
  --version         print the version

Examples, one per form:
  # on-disk 1000 is seen as 11000, on-disk 15000 as 65534
  mount-idmapped --map-mount=b:0:10000:10000 /srv/volume /mnt/volume
  # the same, in util-linux's syntax
  mount-idmapped --map-mount=0:10000:10000 /srv/volume /mnt/volume
  # uids and gids apart: on-disk 1000:1000 is seen as 11000:21000
  mount-idmapped --map-mount=u:0:10000:10000 --map-mount=g:0:20000:10000 \\
      /srv/volume /mnt/volume
  # the ids as process 1234's user namespace maps them
  mount-idmapped --map-mount=/proc/1234/ns/user /srv/volume /mnt/volume
  # a file onto a file
  mount-idmapped --map-mount=b:0:10000:10000 /srv/app.conf /mnt/app.conf
  # with the submounts, each of them read-only, nosuid and nodev
  mount-idmapped --map-mount=b:0:10000:10000 --recursive --read-only \\
      --nosuid --nodev /srv/volume /mnt/volume
  # shift on disk where idmapping cannot work, and report it as JSON
  mount-idmapped --map-mount=b:0:10000:10000 --strategy=auto \\
      --out-of-range=overflow --json /srv/volume /mnt/volume
  # inside a container's root: TARGET resolved there (links stay inside),
  # created if missing, a mount already on it replaced atomically
  mount-idmapped --map-mount=b:0:10000:10000 --beneath=/run/ctr/rootfs \\
      --mkdir --replace /srv/volume /data
  # can SOURCE and its submounts be idmapped, and if not, why
  mount-idmapped --check --recursive /srv/volume
  # the effect on a scratch filesystem, cleaned up after (root)
  mount-idmapped --demo
  # a pod's root filesystem: every layer seen through the mapping
  mount-idmapped --map-mount=b:0:100000:65536 \\
      --overlay=lowerdir=/img/2:/img/1,upperdir=/pod/up,workdir=/pod/work \\
      /pod/rootfs
  # can each layer be idmapped, and if not, why
  mount-idmapped --check --overlay=lowerdir=/img/2:/img/1
  # a new tmpfs with its options, idmapped
  mount-idmapped --map-mount=b:0:100000:65536 --nodev \\
      --tmpfs=size=16m,mode=0750 /pod/secrets

Exit status: 0 done; 1 the operation failed, with one line on stderr naming
the cause (--check: SOURCE, or a layer of --overlay, cannot be idmapped);
2 usage error.
";

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
    beneath: Option<PathBuf>,
    mkdir: bool,
    replace: bool,
    help: bool,
    version: bool,
    /// Options that only make sense when mounting, in the order given.
    mount_only: Vec<String>,
    /// `--tmpfs[=OPTIONS]`: the options (empty for a bare `--tmpfs`).
    tmpfs: Option<String>,
    /// `--overlay=OPTIONS`.
    overlay: Option<String>,
    operands: Vec<PathBuf>,
}

/// What to do.
#[derive(Debug)]
pub enum Command {
    Help,
    Version,
    Check(CheckRequest),
    Unshift(CheckRequest),
    Demo,
    Mount(MountRequest),
    /// `--tmpfs` or `--overlay`: a new filesystem at TARGET.
    NewFs(NewFsRequest),
    /// `--check --overlay`: per layer.
    CheckOverlay(OverlayCheckRequest),
}

/// What `--tmpfs` or `--overlay` makes.
#[derive(Debug)]
pub enum NewFs {
    Tmpfs(NewFilesystem),
    Overlay(Overlay<'static>),
}

#[derive(Debug)]
pub struct NewFsRequest {
    pub fs: NewFs,
    pub target: PathBuf,
    /// `--beneath=ROOT`, `--mkdir`, `--replace`: as for a bind mount.
    pub beneath: Option<PathBuf>,
    pub mkdir: bool,
    pub replace: bool,
    pub ids: IdSource,
    pub flags: MountAttrFlags,
    pub propagation: Option<Propagation>,
    pub json: bool,
}

#[derive(Debug)]
pub struct OverlayCheckRequest {
    pub overlay: Overlay<'static>,
    pub json: bool,
}

#[derive(Debug)]
pub struct CheckRequest {
    pub source: PathBuf,
    pub recursive: bool,
    pub json: bool,
}

/// Where the idmap comes from.
#[derive(Debug)]
pub enum IdSource {
    /// `--map-mount=<b|u|g>:FROM:TO:RANGE` values.
    Mapping(Mapping),
    /// `--map-mount=PATH`: an existing user namespace.
    Userns(PathBuf),
}

#[derive(Debug)]
pub struct MountRequest {
    pub source: PathBuf,
    pub target: PathBuf,
    pub ids: IdSource,
    pub recursive: bool,
    pub flags: MountAttrFlags,
    pub propagation: Option<Propagation>,
    pub strategy: Strategy,
    pub out_of_range: OutOfRange,
    pub outside_links: OutsideLinks,
    pub json: bool,
    /// `--beneath=ROOT`: TARGET is resolved inside ROOT.
    pub beneath: Option<PathBuf>,
    /// `--mkdir`: create TARGET if missing.
    pub mkdir: bool,
    /// `--replace`: replace a mount on TARGET atomically.
    pub replace: bool,
}

/// What the command line `args` (without the program name) asks for.
pub fn parse(args: Vec<OsString>) -> Result<Command, Failure> {
    command(parse_options(args)?)
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
        // Its value is optional, so only ever inline: `--tmpfs TARGET`
        // must not take TARGET for options.
        if name == "--tmpfs" {
            if opts.tmpfs.replace(inline.unwrap_or_default()).is_some() {
                return Err(Failure::usage("--tmpfs given twice"));
            }
            continue;
        }
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
        "--map-mount"
            | "--propagation"
            | "--strategy"
            | "--out-of-range"
            | "--beneath"
            | "--overlay"
            | "--outside-links"
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
        "--beneath" => {
            if value.is_empty() {
                return Err(Failure::usage("--beneath needs a directory (ROOT)"));
            }
            if opts.beneath.is_some() {
                return Err(Failure::usage("--beneath may be given only once"));
            }
            opts.beneath = Some(PathBuf::from(value));
        }
        "--overlay" => {
            if opts.overlay.replace(value).is_some() {
                return Err(Failure::usage("--overlay given twice"));
            }
            // Allowed with --check: not a mount-only option.
            return Ok(());
        }
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
        "--mkdir" | "--replace" => {
            let switch = if name == "--mkdir" {
                &mut opts.mkdir
            } else {
                &mut opts.replace
            };
            *switch = true;
            opts.mount_only.push(name.to_owned());
            return Ok(());
        }
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
        let stray = stray.or(opts.tmpfs.as_ref().map(|_| "--tmpfs"));
        let stray = stray.or(opts.overlay.as_ref().map(|_| "--overlay"));
        if let Some(option) = stray {
            return Err(Failure::usage(format_args!(
                "--demo cannot be combined with {option}"
            )));
        }
        no_more_operands(&opts.operands, 0)?;
        return Ok(Command::Demo);
    }
    if opts.tmpfs.is_some() && opts.overlay.is_some() {
        return Err(Failure::usage("--tmpfs and --overlay cannot be combined"));
    }
    if opts.check && opts.unshift {
        return Err(Failure::usage("--check cannot be combined with --unshift"));
    }
    if opts.unshift && (opts.tmpfs.is_some() || opts.overlay.is_some()) {
        return Err(Failure::usage(
            "--unshift cannot be combined with --tmpfs or --overlay (a new filesystem is never shifted)",
        ));
    }
    if opts.check {
        if opts.tmpfs.is_some() {
            return Err(Failure::usage(
                "--check takes SOURCE or --overlay=..., not --tmpfs (a new tmpfs has no layers to check)",
            ));
        }
        if opts.overlay.is_some() {
            return check_overlay_command(opts);
        }
        return check_command(opts);
    }
    if opts.tmpfs.is_some() || opts.overlay.is_some() {
        return new_fs_command(opts);
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

/// `--overlay=...` as the library reads it; a malformed value is a usage error.
fn parse_overlay(text: &str) -> Result<Overlay<'static>, Failure> {
    Overlay::parse_options(text).map_err(|e| Failure::usage(format_args!("--overlay: {e}")))
}

fn check_overlay_command(opts: Options) -> Result<Command, Failure> {
    if let Some(option) = opts.mount_only.first() {
        return Err(Failure::usage(format_args!(
            "--check cannot be combined with {option}"
        )));
    }
    if opts.recursive {
        return Err(Failure::usage("--check --overlay takes no --recursive"));
    }
    no_more_operands(&opts.operands, 0)?;
    Ok(Command::CheckOverlay(OverlayCheckRequest {
        overlay: parse_overlay(opts.overlay.as_deref().unwrap_or_default())?,
        json: opts.json,
    }))
}

fn new_fs_command(opts: Options) -> Result<Command, Failure> {
    let what = if opts.tmpfs.is_some() {
        "--tmpfs"
    } else {
        "--overlay"
    };
    if opts.recursive {
        return Err(Failure::usage(format_args!(
            "{what} cannot be combined with --recursive"
        )));
    }
    if let Some(option) = opts
        .mount_only
        .iter()
        .find(|o| matches!(o.as_str(), "--strategy" | "--out-of-range"))
    {
        return Err(Failure::usage(format_args!(
            "{what} cannot be combined with {option}: a new filesystem is idmapped, never shifted on disk"
        )));
    }
    no_more_operands(&opts.operands, 1)?;
    let target = opts
        .operands
        .first()
        .cloned()
        .ok_or_else(|| Failure::usage(format_args!("{what}: missing TARGET")))?;
    let fs = match (&opts.tmpfs, &opts.overlay) {
        (Some(options), _) => NewFs::Tmpfs(
            NewFilesystem::tmpfs()
                .parse_options(options)
                .map_err(|e| Failure::usage(format_args!("--tmpfs: {e}")))?,
        ),
        (None, Some(text)) => NewFs::Overlay(parse_overlay(text)?),
        (None, None) => return Err(Failure::usage("missing --tmpfs or --overlay")),
    };
    Ok(Command::NewFs(NewFsRequest {
        fs,
        target,
        beneath: opts.beneath,
        mkdir: opts.mkdir,
        replace: opts.replace,
        ids: id_source(&opts.maps)?,
        flags: opts.flags,
        propagation: opts.propagation,
        json: opts.json,
    }))
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
        beneath: opts.beneath,
        mkdir: opts.mkdir,
        replace: opts.replace,
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
