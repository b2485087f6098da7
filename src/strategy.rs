//! The high-level call: give a directory, mounted at a target, the ownership
//! view a mapping describes — by an idmapped mount, by shifting ownership on
//! disk, or by whichever of the two works here.
//!
//! The caller chooses the [`Strategy`]; the [`Outcome`] says what was done
//! and, when `Auto` fell back to shifting on disk, why. Shifting on disk is
//! never done silently: it changes the source for everyone who sees it.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use crate::chown::{shift_tree, ShiftOptions, ShiftReport};
use crate::error::{Error, ErrorKind, Result};
use crate::map::Mapping;
use crate::mount::{
    CloneFlags, CloneMethod, DetachedMount, MountAttr, MountAttrFlags, Propagation,
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
    match plan.strategy {
        Strategy::Idmap => idmap(source, target, plan),
        Strategy::Chown => chown(source, target, plan, None),
        Strategy::Auto => match probe::first_unsupported(source, plan.recursive)? {
            None => idmap(source, target, plan),
            Some((mount, reason @ (Reason::Filesystem { .. } | Reason::KernelTooOld { .. }))) => {
                chown(source, target, plan, Some(Fallback { mount, reason }))
            }
            Some((mount, reason)) => Err(Error::new(reason.into()).with_path(mount)),
        },
    }
}

fn idmap(source: &Path, target: &Path, plan: &Plan<'_>) -> Result<Outcome> {
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
    clone.attach(target)?;
    Ok(Outcome::Idmapped { method })
}

fn chown(
    source: &Path,
    target: &Path,
    plan: &Plan<'_>,
    because: Option<Fallback>,
) -> Result<Outcome> {
    refuse_overlay(source, plan.recursive)?;
    let options = ShiftOptions {
        cross_mounts: plan.recursive,
        ..plan.shift.clone()
    };
    let report = shift_tree(source, plan.mapping, &options)?;
    DetachedMount::clone_with(source, plan.clone_flags(), &plan.attr(None))?.attach(target)?;
    Ok(Outcome::Chowned { report, because })
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
        if let Some(m) = crate::mountinfo::tree_of(source)
            .into_iter()
            .find(|m| m.fs_type == "overlay")
        {
            return Err(Error::new(ErrorKind::ShiftThroughOverlay).with_path(m.mount_point));
        }
    }
    Ok(())
}
