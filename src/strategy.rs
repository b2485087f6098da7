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
use crate::error::{Error, ErrorKind, Result};
use crate::map::Mapping;
use crate::mount::{
    AttachOptions, Attached, CloneFlags, CloneMethod, DetachedMount, MountAttr, MountAttrFlags,
    Propagation,
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
    mapping: &'a Mapping,
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
            mapping,
            userns: None,
            recursive: false,
            flags: MountAttrFlags::empty(),
            propagation: None,
            shift: ShiftOptions::default(),
        }
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

/// [`mount_with_ownership`] to any [`Destination`]. The target is resolved
/// (and, if asked, created) **before** anything else is done, so a target
/// that cannot be resolved fails the call with nothing shifted on disk and
/// nothing mounted. Returns what the attach did for [`Destination::Beneath`].
pub fn mount_with_ownership_at(
    source: &Path,
    destination: Destination<'_>,
    plan: &Plan<'_>,
) -> Result<(Outcome, Option<Attached>)> {
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
    fn prepare(source: &Path, destination: Destination<'a>) -> Result<Landing<'a>> {
        use crate::resolve::{resolve_in_root, Create, ResolveOptions};
        match destination {
            Destination::Path(p) => Ok(Landing::Path(p)),
            Destination::Beneath {
                root,
                path,
                options,
            } => {
                let mut ropts = ResolveOptions::new();
                if options.creates() {
                    let is_dir = std::fs::metadata(source)
                        .map_err(|e| {
                            let errno = rustix::io::Errno::from_io_error(&e)
                                .unwrap_or(rustix::io::Errno::IO);
                            Error::sys("stat", format!("{source:?}"), errno).with_path(source)
                        })?
                        .is_dir();
                    ropts = ropts.create(if is_dir {
                        Create::Directory
                    } else {
                        Create::File
                    });
                }
                if let Some(r) = options.forced_resolver() {
                    ropts = ropts.resolver(r);
                }
                Ok(Landing::Fd {
                    resolved: resolve_in_root(root, path, &ropts)?,
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

fn idmap(
    source: &Path,
    landing: Landing<'_>,
    plan: &Plan<'_>,
) -> Result<(Outcome, Option<Attached>)> {
    let owned;
    let ns = match plan.userns {
        Some(ns) => ns,
        None => {
            owned = UserNamespace::from_mapping(plan.mapping)?;
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
    let options = ShiftOptions {
        cross_mounts: plan.recursive,
        ..plan.shift.clone()
    };
    let report = shift_tree(source, plan.mapping, &options)?;
    let clone = DetachedMount::clone_with(source, plan.clone_flags(), &plan.attr(None))?;
    let attached = landing.attach(clone)?;
    Ok((Outcome::Chowned { report, because }, attached))
}
