//! The high-level call: give a directory, mounted at a target, the ownership
//! view a mapping describes — by an idmapped mount, by shifting ownership on
//! disk, or by whichever of the two works here.
//!
//! The caller chooses the [`Strategy`]; the [`Outcome`] says what was done
//! and, when `Auto` fell back to shifting on disk, why. Shifting on disk is
//! never done silently: it changes the source for everyone who sees it.
#![forbid(unsafe_code)]

use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::chown::{shift_tree, ShiftOptions, ShiftReport};
use crate::error::{Error, ErrorKind, FileKind, Result};
use crate::map::Mapping;
use crate::mount::{
    check_mount_point, file_kind, AttachOptions, Attached, CloneFlags, CloneMethod, DetachedMount,
    MountAttr, MountAttrFlags, Propagation,
};
use crate::probe::{self, Reason};
use crate::userns::UserNamespace;

/// How to give a tree its ownership view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// An idmapped mount, O(1); fail if the kernel or filesystem cannot.
    #[default]
    Idmap,
    /// Shift ownership on disk (O(n)), then bind-mount the source at the target.
    Chown,
    /// Idmap where the probe says every mount of the tree can be idmapped;
    /// otherwise, when the kernel or filesystem lacks support (and only
    /// then), shift on disk. With [`Plan::recursive`] this is decided per
    /// mount: every mount that can be idmapped is, only the others are
    /// shifted ([`Outcome::PerMount`]). Missing privilege is an error, not a
    /// reason to chown.
    Auto,
}

impl Strategy {
    /// The name used on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Idmap => "idmap",
            Strategy::Chown => "chown",
            Strategy::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Strategy> {
        match s {
            "idmap" => Ok(Strategy::Idmap),
            "chown" => Ok(Strategy::Chown),
            "auto" => Ok(Strategy::Auto),
            _ => Err(Error::new(ErrorKind::InvalidInput(format!(
                "strategy {s:?}: expected idmap, chown or auto"
            )))),
        }
    }
}

/// What [`mount_with_ownership`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target is an idmapped mount of the source; nothing on disk changed.
    Idmapped {
        /// The system calls that made it.
        method: CloneMethod,
    },
    /// The source's ownership was shifted on disk, and the target is a bind
    /// mount of it.
    Chowned {
        /// What the walk did.
        report: ShiftReport,
        /// Why an idmapped mount was not used (`None` when the caller asked
        /// for [`Strategy::Chown`]).
        because: Option<Fallback>,
    },
    /// [`Strategy::Auto`] with [`Plan::recursive`] on a tree of several
    /// mounts, not all of which can be idmapped: each mount was idmapped or
    /// shifted on its own, and the clones attached in place at the target.
    PerMount {
        /// Every mount of the tree (the top first) and what was done with it.
        mounts: Vec<MountOutcome>,
        /// What the walks of the shifted mounts did, summed.
        report: ShiftReport,
    },
}

/// What [`Strategy::Auto`] did with one mount of a recursive tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOutcome {
    /// The mount, under the source.
    pub mount: PathBuf,
    /// Idmapped, or shifted and why.
    pub way: MountWay,
}

/// See [`MountOutcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountWay {
    /// Idmapped by these system calls; nothing on disk changed.
    Idmapped(CloneMethod),
    /// Shifted on disk, because it cannot be idmapped.
    Shifted(Reason),
}

/// Why [`Strategy::Auto`] shifted on disk instead of idmapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The mount of the tree that cannot be idmapped.
    pub mount: PathBuf,
    /// Why not.
    pub reason: Reason,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.mount.display(), self.reason)
    }
}

/// What to mount and how; see [`mount_with_ownership`].
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    strategy: Strategy,
    /// `None` for a namespace whose maps cannot be read: idmapping only.
    mapping: Option<&'a Mapping>,
    userns: Option<&'a UserNamespace>,
    recursive: bool,
    flags: MountAttrFlags,
    propagation: Option<Propagation>,
    shift: ShiftOptions,
}

impl<'a> Plan<'a> {
    /// Give the tree the view `mapping` describes, by `strategy`.
    pub fn new(strategy: Strategy, mapping: &'a Mapping) -> Plan<'a> {
        Plan {
            strategy,
            mapping: Some(mapping),
            userns: None,
            recursive: false,
            flags: MountAttrFlags::empty(),
            propagation: None,
            shift: ShiftOptions::default(),
        }
    }

    /// Give the tree the view of an existing user namespace (e.g. opened
    /// from `/proc/PID/ns/user`), by `strategy`: idmap with `userns` itself;
    /// shift on disk by its maps. A namespace whose maps cannot be read
    /// ([`UserNamespace::mapping`] is `None`) can only idmap: a shift on disk
    /// is refused with [`ErrorKind::UsernsMapsUnknown`] before anything changes.
    pub fn with_userns(strategy: Strategy, userns: &'a UserNamespace) -> Plan<'a> {
        Plan {
            strategy,
            mapping: userns.mapping(),
            userns: Some(userns),
            recursive: false,
            flags: MountAttrFlags::empty(),
            propagation: None,
            shift: ShiftOptions::default(),
        }
    }

    /// The mapping the view follows; `None` for a [`Plan::with_userns`]
    /// namespace whose maps cannot be read.
    pub fn mapping(&self) -> Option<&'a Mapping> {
        self.mapping
    }

    /// The mapping to shift on disk by (or to make a namespace from).
    fn shift_mapping(&self) -> Result<&'a Mapping> {
        self.mapping
            .ok_or_else(|| Error::new(ErrorKind::UsernsMapsUnknown))
    }

    /// Idmap with this namespace (whose maps must be `mapping`) instead of
    /// creating one; e.g. one from a [`UsernsCache`](crate::UsernsCache).
    pub fn userns(mut self, userns: &'a UserNamespace) -> Self {
        self.userns = Some(userns);
        self
    }

    /// Include submounts: [`Strategy::Idmap`] idmaps them all (all or
    /// nothing), [`Strategy::Chown`] shifts every directory mount (each
    /// with its own record) and binds the tree, [`Strategy::Auto`] decides
    /// per mount ([`Outcome::PerMount`]).
    pub fn recursive(mut self, recursive: bool) -> Self {
        self.recursive = recursive;
        self
    }

    /// Mount flags for the target (read-only, nosuid, ...).
    pub fn flags(mut self, flags: MountAttrFlags) -> Self {
        self.flags = flags;
        self
    }

    /// Propagation of the target mount.
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = Some(propagation);
        self
    }

    /// How to walk when shifting on disk ([`ShiftOptions::cross_mounts`] is
    /// taken from [`recursive`](Self::recursive)).
    pub fn shift_options(mut self, options: ShiftOptions) -> Self {
        self.shift = options;
        self
    }

    fn clone_flags(&self) -> CloneFlags {
        if self.recursive {
            CloneFlags::RECURSIVE
        } else {
            CloneFlags::empty()
        }
    }

    /// With [`recursive`](Self::recursive) every attribute (the idmap
    /// included) applies to every mount of the tree (OCI `rbind`, `ridmap`,
    /// `rro`); without, the clone has no submounts.
    /// The attributes for one mount of a per-mount tree (its own idmap).
    fn attr_top<'b>(&self, userns: Option<&'b UserNamespace>) -> MountAttr<'b> {
        let mut attr = MountAttr::new().set(self.flags);
        if let Some(p) = self.propagation {
            attr = attr.propagation(p);
        }
        if let Some(ns) = userns {
            attr = attr.idmap(ns);
        }
        attr
    }

    fn attr<'b>(&self, userns: Option<&'b UserNamespace>) -> MountAttr<'b> {
        let mut attr = MountAttr::new().set_recursive(self.flags);
        if let Some(p) = self.propagation {
            attr = attr.propagation_recursive(p);
        }
        if let Some(ns) = userns {
            attr = attr.idmap_recursive(ns);
        }
        attr
    }
}

/// Make `target` show the tree at `source` with the ownership `plan`'s
/// mapping describes (on-disk id A+n seen as B+n), by the plan's strategy.
///
/// Nothing is attached at `target` unless every step before succeeded. With
/// [`Strategy::Chown`] (or `Auto` falling back), the *source* is changed on
/// disk — only after `target` was checked (it exists, is a directory, and is
/// in this mount namespace) and every mount to shift passed
/// [`check_shiftable`](crate::chown::check_shiftable); if attaching still
/// fails, the error ([`ErrorKind::SourceShifted`]) says so and gives the
/// command that undoes the shift ([`unshift_tree`](crate::chown::unshift_tree)).
///
/// Before anything else, [`check_operands`] says why `source` and `target`
/// do not fit together, if they do not.
pub fn mount_with_ownership(source: &Path, target: &Path, plan: &Plan<'_>) -> Result<Outcome> {
    mount_with_ownership_at(source, Destination::Path(target), plan).map(|(outcome, _)| outcome)
}

/// Where [`mount_with_ownership_at`] attaches the result.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// A path of the caller's namespace, symlinks followed
    /// ([`DetachedMount::attach`]): not for a root a container can write to.
    Path(&'a Path),
    /// `path` resolved inside the directory `root` as if it were `/`
    /// ([`DetachedMount::attach_beneath`]), created if asked, a mount on it
    /// replaced if asked ([`AttachOptions`]).
    Beneath {
        /// The root (e.g. a container's rootfs), as a directory fd.
        root: BorrowedFd<'a>,
        /// The target inside it, with or without a leading `/`.
        path: &'a Path,
        /// Create the target, replace a mount on it.
        options: AttachOptions,
    },
}

/// [`mount_with_ownership`] to any [`Destination`]. The operands are
/// checked and the target is resolved (and, if asked, created) **before**
/// anything else is done, so a target that cannot be resolved or does not
/// fit the source fails the call with nothing shifted on disk and nothing
/// mounted. Returns what the attach did for [`Destination::Beneath`].
pub fn mount_with_ownership_at(
    source: &Path,
    destination: Destination<'_>,
    plan: &Plan<'_>,
) -> Result<(Outcome, Option<Attached>)> {
    match destination {
        Destination::Path(target) => check_operands(source, target, plan.strategy)?,
        Destination::Beneath { .. } => {
            let kind = file_kind(source, true)?;
            require_source(source, kind, plan.strategy == Strategy::Chown)?;
        }
    }
    if plan.strategy == Strategy::Chown {
        plan.shift_mapping()?;
    }
    let landing = Landing::prepare(source, destination)?;
    let (outcome, attached) = match plan.strategy {
        Strategy::Idmap => idmap(source, landing, plan)?,
        Strategy::Chown => chown(source, landing, plan, None)?,
        Strategy::Auto if plan.recursive => auto_per_mount(source, landing, plan)?,
        Strategy::Auto => match probe::first_unsupported(source, plan.recursive)? {
            None => idmap(source, landing, plan)?,
            Some((mount, reason @ (Reason::Filesystem { .. } | Reason::KernelTooOld { .. }))) => {
                chown(source, landing, plan, Some(Fallback { mount, reason }))?
            }
            Some((mount, reason)) => return Err(Error::new(reason.into()).with_path(mount)),
        },
    };
    Ok((outcome, attached))
}

/// A destination made ready before the mount exists.
enum Landing<'a> {
    Path(&'a Path),
    Fd {
        resolved: crate::resolve::Resolved,
        replace: bool,
    },
}

impl<'a> Landing<'a> {
    /// Resolve (and create) a [`Destination::Beneath`] target, and check it
    /// fits the source: a directory onto a directory, anything else onto a
    /// non-directory ([`ErrorKind::MountPointMismatch`]).
    fn prepare(source: &Path, destination: Destination<'a>) -> Result<Landing<'a>> {
        use crate::resolve::{resolve_in_root, Create, ResolveOptions};
        match destination {
            Destination::Path(p) => Ok(Landing::Path(p)),
            Destination::Beneath {
                root,
                path,
                options,
            } => {
                let source_kind = file_kind(source, true)?;
                let mut ropts = ResolveOptions::new();
                if options.creates() {
                    ropts = ropts.create(if source_kind.is_dir() {
                        Create::Directory
                    } else {
                        Create::File
                    });
                }
                if let Some(r) = options.forced_resolver() {
                    ropts = ropts.resolver(r);
                }
                let resolved = resolve_in_root(root, path, &ropts)?;
                let st = rustix::fs::statx(
                    &resolved,
                    "",
                    rustix::fs::AtFlags::EMPTY_PATH,
                    rustix::fs::StatxFlags::TYPE,
                )
                .map_err(|e| Error::sys("statx", "resolved target, \"\", AT_EMPTY_PATH", e))?;
                let target_kind = FileKind::from_mode(st.stx_mode.into());
                if source_kind.is_dir() != target_kind.is_dir() {
                    let shown = match resolved.path() {
                        p if p.as_os_str().is_empty() => Path::new("."),
                        p => p,
                    };
                    return Err(Error::new(ErrorKind::MountPointMismatch {
                        source: source.to_path_buf(),
                        source_kind,
                        target_kind,
                    })
                    .with_path(shown));
                }
                Ok(Landing::Fd {
                    resolved,
                    replace: options.replaces(),
                })
            }
        }
    }

    fn attach(self, mount: DetachedMount) -> Result<Option<Attached>> {
        match self {
            Landing::Path(p) => mount.attach(p).map(|()| None),
            Landing::Fd { resolved, replace } => {
                let replaced = if replace {
                    mount.replace(&resolved)?
                } else {
                    mount.attach_to(&resolved)?;
                    false
                };
                Ok(Some(Attached {
                    target: resolved.path().to_path_buf(),
                    replaced,
                    created: resolved.created(),
                    resolver: resolved.resolver(),
                }))
            }
        }
    }
}

/// The command that undoes a shift of `source`.
fn undo_command(source: &Path, recursive: bool) -> String {
    format!(
        "mount-idmapped --unshift{} {}",
        if recursive { " --recursive" } else { "" },
        source.display()
    )
}

/// Check the landing before anything is shifted. A path target exists, is
/// a directory, and its mount is in this mount namespace (else `move_mount`
/// fails); a target resolved beneath a root was checked when it was resolved.
fn check_target(landing: &Landing<'_>) -> Result<()> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let target = match landing {
        Landing::Path(p) => *p,
        Landing::Fd { .. } => return Ok(()),
    };
    let st = statx(CWD, target, AtFlags::empty(), StatxFlags::TYPE).map_err(|e| {
        Error::sys("statx", format!("{target:?}"), e)
            .with_path(target)
            .with_kind(match e {
                rustix::io::Errno::NOENT => ErrorKind::NotFound,
                _ => ErrorKind::InvalidInput(
                    "the target cannot be looked up; nothing was shifted".into(),
                ),
            })
    })?;
    if u32::from(st.stx_mode) & 0o170000 != 0o040000 {
        return Err(Error::new(ErrorKind::InvalidInput(
            "the target is not a directory (a directory tree is mounted on a directory); nothing was shifted".into(),
        ))
        .with_path(target));
    }
    crate::mounttable::mount_of(target).map_err(|e| {
        Error::new(ErrorKind::InvalidInput(format!(
            "the target's mount is not one of this mount namespace's ({e}), so nothing can be attached there; nothing was shifted"
        )))
        .with_path(target)
    })?;
    Ok(())
}

/// Attach `clone` at `landing` after `source` was shifted: a failure says so.
fn attach_shifted(
    clone: DetachedMount,
    landing: Landing<'_>,
    source: &Path,
    recursive: bool,
) -> Result<Option<Attached>> {
    landing.attach(clone).map_err(|e| {
        let cause = e.to_string();
        e.with_kind(ErrorKind::SourceShifted {
            cause,
            undo: undo_command(source, recursive),
        })
    })
}

/// `Auto` with `recursive`: idmap each mount that can be, shift the rest.
fn auto_per_mount(
    source: &Path,
    landing: Landing<'_>,
    plan: &Plan<'_>,
) -> Result<(Outcome, Option<Attached>)> {
    let tree = crate::mounttable::subtree(source)?;
    if tree.len() <= 1 {
        return match probe::first_unsupported(source, false)? {
            None => idmap(source, landing, plan),
            Some((mount, reason @ (Reason::Filesystem { .. } | Reason::KernelTooOld { .. }))) => {
                chown(source, landing, plan, Some(Fallback { mount, reason }))
            }
            Some((mount, reason)) => Err(Error::new(reason.into()).with_path(mount)),
        };
    }
    let canon = std::fs::canonicalize(source)
        .map_err(|e| Error::new(ErrorKind::InvalidInput(format!("{e}"))).with_path(source))?;
    // Decide every mount first; refuse before anything changes.
    let mut ways = Vec::new();
    let mut all_idmap = true;
    for (i, m) in tree.iter().enumerate() {
        let path = if i == 0 {
            source.to_path_buf()
        } else {
            m.mount_point.clone()
        };
        let way = match probe::idmap_support(&path)? {
            probe::Support::Supported => None,
            probe::Support::Unsupported(
                reason @ (Reason::Filesystem { .. } | Reason::KernelTooOld { .. }),
            ) => {
                all_idmap = false;
                Some(reason)
            }
            probe::Support::Unsupported(reason) => {
                return Err(Error::new(reason.into()).with_path(path))
            }
        };
        let rel = if i == 0 {
            PathBuf::new()
        } else {
            match m.mount_point.strip_prefix(&canon) {
                Ok(r) => r.to_path_buf(),
                Err(_) => continue,
            }
        };
        ways.push((path, rel, way));
    }
    if all_idmap {
        return idmap(source, landing, plan);
    }
    for (path, _, way) in &ways {
        if way.is_some() {
            refuse_overlay(path, false)?;
            crate::chown::check_shiftable(path, false)?;
        }
    }
    check_target(&landing)?;
    let owned;
    let ns = match plan.userns {
        Some(ns) => ns,
        None => {
            owned = UserNamespace::from_mapping(plan.shift_mapping()?)?;
            &owned
        }
    };
    // Shift what must be, parents first; each mount is a tree of its own.
    let mut report = ShiftReport::default();
    let options = ShiftOptions {
        cross_mounts: false,
        ..plan.shift.clone()
    };
    for (path, _, way) in &ways {
        if way.is_some() {
            let r = shift_tree(path, plan.shift_mapping()?, &options)?;
            report.absorb(r);
        }
    }
    // Clone each mount on its own (idmapped or not) and attach it in place,
    // top first; a submount goes on its mount point inside the attached top
    // mount, reached from the top clone's own fd (which names the mount once
    // it is attached) without following symlinks.
    let mut outcomes = Vec::new();
    let mut landing = Some(landing);
    let mut top: Option<rustix::fd::OwnedFd> = None;
    let mut top_attached = None;
    for (path, rel, way) in ways {
        let attr = match way {
            None => plan.attr_top(Some(ns)),
            Some(_) => plan.attr_top(None),
        };
        let clone = DetachedMount::clone_with(&path, CloneFlags::empty(), &attr)
            .map_err(|e| probe::diagnose(e, &path, false))?;
        let method = clone.method();
        let attached = match (&top, landing.take()) {
            (None, Some(landing)) => {
                let root = std::os::fd::AsFd::as_fd(&clone)
                    .try_clone_to_owned()
                    .map_err(|e| {
                        Error::sys(
                            "dup",
                            "mount fd",
                            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
                        )
                    })?;
                attach_shifted(clone, landing, source, true).map(|a| {
                    top_attached = a;
                    top = Some(root);
                })
            }
            (Some(root), _) => {
                let parent = rel.parent().unwrap_or(Path::new(""));
                let name = rel.file_name().unwrap_or_default();
                beneath_fd(root, parent).and_then(|fd| {
                    clone.attach_at(&fd, Path::new(name)).map_err(|e| {
                        let cause = e.to_string();
                        e.with_kind(ErrorKind::SourceShifted {
                            cause,
                            undo: undo_command(source, true),
                        })
                    })
                })
            }
            (None, None) => unreachable!("the top mount is attached first"),
        };
        if let Err(e) = attached {
            if let Some(root) = &top {
                let _ = crate::mount::detach_top(std::os::fd::AsFd::as_fd(root));
            }
            return Err(e);
        }
        outcomes.push(MountOutcome {
            mount: path,
            way: match way {
                None => MountWay::Idmapped(method),
                Some(reason) => MountWay::Shifted(reason),
            },
        });
    }
    Ok((
        Outcome::PerMount {
            mounts: outcomes,
            report,
        },
        top_attached,
    ))
}

/// A directory `rel` beneath `root`, never through a symlink or `..`.
fn beneath_fd(root: &rustix::fd::OwnedFd, rel: &Path) -> Result<rustix::fd::OwnedFd> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    openat2(
        root,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| {
        Error::sys(
            "openat2",
            format!("{rel:?}, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS"),
            e,
        )
        .with_path(rel)
    })
}

/// Check, with `stat` alone, that `source` can be given new owners at
/// `target` by `strategy`: `source` is a directory, or a regular file to
/// mount onto a non-directory; [`Strategy::Chown`] needs a directory
/// ([`ErrorKind::UnsupportedSource`]); then [`check_mount_point`]: the two
/// are both directories or both not, and `target` is not a symlink. A FIFO,
/// socket or device node is refused: giving it new owners is not what this
/// call is for (bind-mount it with [`DetachedMount`] if need be).
///
/// [`mount_with_ownership`] calls it first, so that a shift on disk never
/// starts for a mount that cannot be attached.
pub fn check_operands(source: &Path, target: &Path, strategy: Strategy) -> Result<()> {
    let kind = file_kind(source, true)?;
    require_source(source, kind, strategy == Strategy::Chown)?;
    check_mount_point(source, CloneFlags::empty(), target).map(|_| ())
}

/// `kind`, the kind of `source`, is one a shift on disk (`chown`) or an
/// idmapped mount can take.
fn require_source(source: &Path, kind: FileKind, chown: bool) -> Result<()> {
    let fits = match kind {
        FileKind::Directory => true,
        FileKind::RegularFile => !chown,
        _ => false,
    };
    if fits {
        return Ok(());
    }
    Err(Error::new(ErrorKind::UnsupportedSource {
        kind,
        needs_directory: chown && kind == FileKind::RegularFile,
    })
    .with_path(source))
}

fn idmap(
    source: &Path,
    landing: Landing<'_>,
    plan: &Plan<'_>,
) -> Result<(Outcome, Option<Attached>)> {
    let owned;
    let ns = match plan.userns {
        Some(ns) => ns,
        None => {
            owned = UserNamespace::from_mapping(plan.shift_mapping()?)?;
            &owned
        }
    };
    let clone = DetachedMount::clone_with(source, plan.clone_flags(), &plan.attr(Some(ns)))
        .map_err(|e| probe::diagnose(e, source, plan.recursive))?;
    let method = clone.method();
    let attached = landing.attach(clone)?;
    Ok((Outcome::Idmapped { method }, attached))
}

fn chown(
    source: &Path,
    landing: Landing<'_>,
    plan: &Plan<'_>,
    because: Option<Fallback>,
) -> Result<(Outcome, Option<Attached>)> {
    // Auto may fall back here for a regular file, which only idmaps.
    require_source(source, file_kind(source, true)?, true)?;
    refuse_overlay(source, plan.recursive)?;
    let options = ShiftOptions {
        cross_mounts: plan.recursive,
        ..plan.shift.clone()
    };
    // Everything that can be checked is, before the disk changes.
    crate::chown::check_shiftable(source, plan.recursive)?;
    check_target(&landing)?;
    let clone = DetachedMount::clone_with(source, plan.clone_flags(), &plan.attr(None))?;
    let report = shift_tree(source, plan.shift_mapping()?, &options)?;
    let attached = attach_shifted(clone, landing, source, plan.recursive)?;
    Ok((Outcome::Chowned { report, because }, attached))
}

/// `OVERLAYFS_SUPER_MAGIC`.
const OVERLAYFS_SUPER_MAGIC: u64 = 0x794c_7630;

/// Shifting ownership through overlayfs copies every file up into the
/// upper directory (the shared image duplicated per container): refuse an
/// overlay source, or with `recursive` an overlay submount, before anything
/// changes ([`ErrorKind::ShiftThroughOverlay`], naming the overlay mount).
fn refuse_overlay(source: &Path, recursive: bool) -> Result<()> {
    let magic = rustix::fs::statfs(source)
        .map_err(|e| Error::sys("statfs", format!("{source:?}"), e).with_path(source))?
        .f_type as u64;
    if magic == OVERLAYFS_SUPER_MAGIC {
        return Err(Error::new(ErrorKind::ShiftThroughOverlay).with_path(source));
    }
    if recursive {
        if let Some(m) = crate::mounttable::subtree(source)?
            .into_iter()
            .find(|m| m.fs_type == "overlay")
        {
            return Err(Error::new(ErrorKind::ShiftThroughOverlay).with_path(m.mount_point));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch tree: `dir/`, `dir2/`, `file`, `fifo`, `link -> dir`.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("dir")).unwrap();
        std::fs::create_dir(t.path().join("dir2")).unwrap();
        std::fs::write(t.path().join("file"), b"").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            t.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink("dir", t.path().join("link")).unwrap();
        t
    }

    #[test]
    fn operands_are_checked_by_kind_before_any_mount_call() {
        let t = tree();
        let p = |n: &str| t.path().join(n);
        let kind = |source: &str, target: &str, strategy: Strategy| {
            check_operands(&p(source), &p(target), strategy).map_err(|e| e.kind().clone())
        };
        assert_eq!(kind("dir", "dir2", Strategy::Idmap), Ok(()));
        assert_eq!(kind("file", "file", Strategy::Idmap), Ok(()));
        assert_eq!(kind("dir", "dir2", Strategy::Chown), Ok(()));
        assert_eq!(
            kind("file", "dir", Strategy::Idmap),
            Err(ErrorKind::MountPointMismatch {
                source: p("file"),
                source_kind: FileKind::RegularFile,
                target_kind: FileKind::Directory,
            })
        );
        assert_eq!(
            kind("dir", "file", Strategy::Auto),
            Err(ErrorKind::MountPointMismatch {
                source: p("dir"),
                source_kind: FileKind::Directory,
                target_kind: FileKind::RegularFile,
            })
        );
        assert_eq!(
            kind("fifo", "file", Strategy::Idmap),
            Err(ErrorKind::UnsupportedSource {
                kind: FileKind::Fifo,
                needs_directory: false,
            })
        );
        assert_eq!(
            kind("file", "file", Strategy::Chown),
            Err(ErrorKind::UnsupportedSource {
                kind: FileKind::RegularFile,
                needs_directory: true,
            })
        );
        assert_eq!(
            kind("dir", "link", Strategy::Idmap),
            Err(ErrorKind::TargetIsSymlink {
                points_to: "dir".into()
            })
        );
        // A symlinked SOURCE is followed, as open_tree follows it.
        assert_eq!(kind("link", "dir2", Strategy::Idmap), Ok(()));
        assert_eq!(
            kind("missing", "dir", Strategy::Idmap),
            Err(ErrorKind::NotFound)
        );
        assert_eq!(
            kind("dir", "missing", Strategy::Idmap),
            Err(ErrorKind::NotFound)
        );
    }

    #[test]
    fn kind_errors_name_both_paths_and_what_would_work() {
        let t = tree();
        let p = |n: &str| t.path().join(n);
        let e = check_operands(&p("file"), &p("dir"), Strategy::Idmap).unwrap_err();
        assert_eq!(e.path(), Some(p("dir").as_path()));
        let text = e.to_string();
        for part in [
            "the mount point is a directory",
            "the source",
            "/file is a regular file",
            "mount a file onto a file",
        ] {
            assert!(text.contains(part), "{part:?} missing: {text}");
        }
        let text = check_operands(&p("fifo"), &p("dir"), Strategy::Idmap)
            .unwrap_err()
            .to_string();
        assert!(text.contains("fifo: the source is a FIFO"), "{text}");
        assert!(
            text.contains("only a directory, or a regular file"),
            "{text}"
        );
    }
}
