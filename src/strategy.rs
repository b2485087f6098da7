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
    /// then), shift on disk. Missing privilege is an error, not a reason to chown.
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

    /// Include submounts: idmap them all (all or nothing), or walk and bind them all.
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
/// disk; undo it by shifting with [`Mapping::inverse`].
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
    let report = shift_tree(source, plan.shift_mapping()?, &options)?;
    let clone = DetachedMount::clone_with(source, plan.clone_flags(), &plan.attr(None))?;
    let attached = landing.attach(clone)?;
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
