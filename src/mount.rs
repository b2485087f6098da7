//! Detached mounts: clone a tree (`open_tree`), set its attributes and idmap
//! (`mount_setattr`, or `open_tree_attr` in one call on Linux >= 6.15), and
//! attach it (`move_mount`).
//!
//! A [`DetachedMount`] owns the fd of a mount tree that is not attached
//! anywhere; dropping it unmounts the tree. [`DetachedMount::attach`]
//! consumes it, so a mount cannot be attached twice or changed after.
//!
//! For a runtime: [`DetachedMount::attach_beneath`] attaches inside an
//! untrusted root (resolved by [`crate::resolve`]),
//! [`DetachedMount::attach_to`] onto an fd, [`DetachedMount::replace`]
//! atomically over a mount, [`DetachedMount::attach_in_namespace`] inside
//! another mount namespace; [`DetachedMount::send`] / [`DetachedMount::recv`]
//! hand a mount to another process.
#![forbid(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bitflags::bitflags;
use rustix::fs::CWD;
use rustix::io::Errno;
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use crate::error::{Error, ErrorKind, FileKind, Result};
use crate::features::{self, Availability};
use crate::map::Mapping;
use crate::mounttable;
use crate::resolve::{self, Create, ResolveOptions, Resolver};
use crate::sys::{self, RawMountAttr};
use crate::userns::UserNamespace;

bitflags! {
    /// Mount attributes (`MOUNT_ATTR_*`), 64 bits wide like `struct mount_attr`.
    ///
    /// Named apart from `rustix::mount::MountFlags` (the `mount(2)` flags),
    /// which the same callers import. The idmap and the atime mode have their
    /// own setters on [`MountAttr`] because they are not plain on/off bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[doc(alias = "MOUNT_ATTR")]
    pub struct MountAttrFlags: u64 {
        /// `MOUNT_ATTR_RDONLY`: read-only (OCI `ro`, or `rro` recursively).
        const RDONLY = libc::MOUNT_ATTR_RDONLY;
        /// `MOUNT_ATTR_NOSUID`: ignore setuid/setgid bits and file capabilities.
        const NOSUID = libc::MOUNT_ATTR_NOSUID;
        /// `MOUNT_ATTR_NODEV`: no access to device files.
        const NODEV = libc::MOUNT_ATTR_NODEV;
        /// `MOUNT_ATTR_NOEXEC`: no program execution.
        const NOEXEC = libc::MOUNT_ATTR_NOEXEC;
        /// `MOUNT_ATTR_NODIRATIME`: no access-time updates on directories.
        const NODIRATIME = libc::MOUNT_ATTR_NODIRATIME;
        /// `MOUNT_ATTR_NOSYMFOLLOW`: do not follow symlinks (Linux 5.14).
        const NOSYMFOLLOW = libc::MOUNT_ATTR_NOSYMFOLLOW;
    }
}

/// Bits a caller may not put in [`MountAttrFlags`]: they have dedicated setters.
const RESERVED_BITS: u64 = libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR__ATIME;

bitflags! {
    /// How [`DetachedMount::clone_tree`] looks up and copies its source
    /// (`open_tree(2)` flags; `OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC` are always
    /// given).
    ///
    /// The clone's recursion is independent of the recursion of attribute
    /// changes: OCI's `rbind` + `idmap` is [`CloneFlags::RECURSIVE`] with
    /// [`MountAttr::idmap`] (top mount only), `rbind` + `ridmap` the same
    /// clone with [`MountAttr::idmap_recursive`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CloneFlags: u32 {
        /// `AT_RECURSIVE`: copy the submounts too (OCI `rbind`; without it, `bind`).
        const RECURSIVE = libc::AT_RECURSIVE as u32;
        /// `AT_SYMLINK_NOFOLLOW`: a source that is a symlink is cloned as the
        /// link itself, not what it points to (OCI `src-nofollow`).
        const NO_FOLLOW = libc::AT_SYMLINK_NOFOLLOW as u32;
        /// `AT_NO_AUTOMOUNT`: do not trigger an automount at the source's
        /// last component.
        const NO_AUTOMOUNT = libc::AT_NO_AUTOMOUNT as u32;
    }
}

impl CloneFlags {
    /// The `open_tree` flags, spelled as in C, for error messages.
    fn names(self) -> String {
        let mut s = String::from("OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC");
        for (flag, name) in [
            (CloneFlags::RECURSIVE, "AT_RECURSIVE"),
            (CloneFlags::NO_FOLLOW, "AT_SYMLINK_NOFOLLOW"),
            (CloneFlags::NO_AUTOMOUNT, "AT_NO_AUTOMOUNT"),
        ] {
            if self.contains(flag) {
                s.push('|');
                s.push_str(name);
            }
        }
        s
    }
}

/// Access-time mode (`MOUNT_ATTR__ATIME` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Atime {
    /// `MOUNT_ATTR_RELATIME`: update atime only when older than mtime/ctime
    /// (OCI `relatime`).
    Relatime,
    /// `MOUNT_ATTR_NOATIME`: never update atime (OCI `noatime`).
    NoAtime,
    /// `MOUNT_ATTR_STRICTATIME`: always update atime (OCI `strictatime`).
    StrictAtime,
}

impl Atime {
    fn bits(self) -> u64 {
        match self {
            Atime::Relatime => libc::MOUNT_ATTR_RELATIME,
            Atime::NoAtime => libc::MOUNT_ATTR_NOATIME,
            Atime::StrictAtime => libc::MOUNT_ATTR_STRICTATIME,
        }
    }
}

/// Mount propagation type (`mount_attr.propagation`).
///
/// # References
/// - [`mount_namespaces(7)`](https://man7.org/linux/man-pages/man7/mount_namespaces.7.html)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Propagation {
    /// `MS_PRIVATE`: no events in or out.
    Private,
    /// `MS_SHARED`: events both ways with peers.
    Shared,
    /// `MS_SLAVE`: events in from the master only.
    Slave,
    /// `MS_UNBINDABLE`: private, and cannot be bind-mounted.
    Unbindable,
}

impl Propagation {
    fn bits(self) -> u64 {
        match self {
            Propagation::Private => libc::MS_PRIVATE,
            Propagation::Shared => libc::MS_SHARED,
            Propagation::Slave => libc::MS_SLAVE,
            Propagation::Unbindable => libc::MS_UNBINDABLE,
        }
    }

    /// The name used on command lines (`private`, `shared`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Propagation::Private => "private",
            Propagation::Shared => "shared",
            Propagation::Slave => "slave",
            Propagation::Unbindable => "unbindable",
        }
    }
}

impl std::str::FromStr for Propagation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Propagation> {
        match s {
            "private" => Ok(Propagation::Private),
            "shared" => Ok(Propagation::Shared),
            "slave" => Ok(Propagation::Slave),
            "unbindable" => Ok(Propagation::Unbindable),
            _ => Err(Error::new(ErrorKind::InvalidInput(format!(
                "propagation {s:?}: expected private, shared, slave or unbindable"
            )))),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
enum IdmapChange<'a> {
    #[default]
    Keep,
    Set(&'a UserNamespace),
    Clear,
}

/// One `struct mount_attr` worth of change: what a single `mount_setattr`
/// call applies.
#[derive(Debug, Clone, Copy, Default)]
struct AttrChange<'a> {
    set: MountAttrFlags,
    clear: MountAttrFlags,
    atime: Option<Atime>,
    propagation: Option<Propagation>,
    idmap: IdmapChange<'a>,
}

impl<'a> AttrChange<'a> {
    fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.clear.is_empty()
            && self.atime.is_none()
            && self.propagation.is_none()
            && matches!(self.idmap, IdmapChange::Keep)
    }

    fn changes_idmap(&self) -> bool {
        !matches!(self.idmap, IdmapChange::Keep)
    }

    /// `self` then `later` on one mount: what `later` says wins.
    fn then(self, later: AttrChange<'a>) -> AttrChange<'a> {
        AttrChange {
            set: (self.set - later.clear) | later.set,
            clear: (self.clear - later.set) | later.clear,
            atime: later.atime.or(self.atime),
            propagation: later.propagation.or(self.propagation),
            idmap: match later.idmap {
                IdmapChange::Keep => self.idmap,
                other => other,
            },
        }
    }

    fn to_raw(self) -> Result<RawMountAttr> {
        let bad = (self.set.bits() | self.clear.bits()) & RESERVED_BITS;
        if bad != 0 {
            return Err(Error::new(ErrorKind::InvalidInput(format!(
                "mount flags {bad:#x} include the idmap or atime bits; use MountAttr::idmap / MountAttr::atime"
            ))));
        }
        if self.set.intersects(self.clear) {
            return Err(Error::new(ErrorKind::InvalidInput(format!(
                "mount flags {:?} are both set and cleared",
                self.set & self.clear
            ))));
        }
        let mut raw = RawMountAttr {
            attr_set: self.set.bits(),
            attr_clr: self.clear.bits(),
            propagation: self.propagation.map_or(0, Propagation::bits),
            userns_fd: 0,
        };
        if let Some(a) = self.atime {
            raw.attr_set |= a.bits();
            raw.attr_clr |= libc::MOUNT_ATTR__ATIME;
        }
        match self.idmap {
            IdmapChange::Keep => {}
            IdmapChange::Set(ns) => {
                raw.attr_set |= libc::MOUNT_ATTR_IDMAP;
                raw.userns_fd = rustix::fd::AsRawFd::as_raw_fd(&ns.as_fd()) as u64;
            }
            IdmapChange::Clear => raw.attr_clr |= libc::MOUNT_ATTR_IDMAP,
        }
        Ok(raw)
    }
}

/// The attributes to change on a mount tree: a builder over
/// `struct mount_attr`, in two scopes.
///
/// Each setter applies to the **top mount** only (OCI `ro`, `idmap`,
/// `nosuid`, ...); its `_recursive` twin applies to every mount of a
/// recursive clone (OCI `rro`, `ridmap`, ...). The recursive part is applied
/// first, then the top-mount part, so `set_recursive(RDONLY)` with
/// `clear(RDONLY)` gives a writable top over read-only submounts. On a clone
/// without submounts both scopes mean the same mount.
///
/// ```
/// use idmapped::{MountAttr, MountAttrFlags, Propagation};
/// // OCI ["rbind", "rro", "nosuid", "nodev"], propagation "rprivate":
/// let attr = MountAttr::new()
///     .set_recursive(MountAttrFlags::RDONLY)
///     .set(MountAttrFlags::NOSUID | MountAttrFlags::NODEV)
///     .propagation_recursive(Propagation::Private);
/// # let _ = attr;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MountAttr<'a> {
    top: AttrChange<'a>,
    tree: AttrChange<'a>,
}

impl<'a> MountAttr<'a> {
    /// No change.
    pub fn new() -> MountAttr<'a> {
        MountAttr::default()
    }

    /// Turn `flags` on, on the top mount.
    pub fn set(mut self, flags: MountAttrFlags) -> Self {
        self.top.set |= flags;
        self
    }

    /// Turn `flags` on, on every mount of the tree (`AT_RECURSIVE`).
    pub fn set_recursive(mut self, flags: MountAttrFlags) -> Self {
        self.tree.set |= flags;
        self
    }

    /// Turn `flags` off, on the top mount.
    pub fn clear(mut self, flags: MountAttrFlags) -> Self {
        self.top.clear |= flags;
        self
    }

    /// Turn `flags` off, on every mount of the tree.
    pub fn clear_recursive(mut self, flags: MountAttrFlags) -> Self {
        self.tree.clear |= flags;
        self
    }

    /// Set the access-time mode of the top mount.
    pub fn atime(mut self, atime: Atime) -> Self {
        self.top.atime = Some(atime);
        self
    }

    /// Set the access-time mode of every mount of the tree.
    pub fn atime_recursive(mut self, atime: Atime) -> Self {
        self.tree.atime = Some(atime);
        self
    }

    /// Set the propagation type of the top mount (OCI `private`, `shared`, ...).
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.top.propagation = Some(propagation);
        self
    }

    /// Set the propagation type of every mount of the tree (OCI `rprivate`, ...).
    pub fn propagation_recursive(mut self, propagation: Propagation) -> Self {
        self.tree.propagation = Some(propagation);
        self
    }

    /// Idmap the top mount with `userns`'s mapping (`MOUNT_ATTR_IDMAP`, OCI
    /// `idmap`): a file stored as on-disk id A+n is seen as B+n for each
    /// line `A B N` of the namespace's maps. Submounts of a recursive clone
    /// keep showing their ids unmapped (as 65534 inside a container). On a
    /// source that is idmapped already this *replaces* the idmap, which only
    /// [`DetachedMount::clone_with`] can do (Linux 6.15), and for a recursive
    /// clone only with [`idmap_recursive`](Self::idmap_recursive).
    pub fn idmap(mut self, userns: &'a UserNamespace) -> Self {
        self.top.idmap = IdmapChange::Set(userns);
        self
    }

    /// Idmap every mount of the tree (OCI `ridmap`). The kernel does it all
    /// or nothing: one submount that cannot be idmapped fails the call.
    pub fn idmap_recursive(mut self, userns: &'a UserNamespace) -> Self {
        self.tree.idmap = IdmapChange::Set(userns);
        self
    }

    /// Remove the idmap of an idmapped source's top mount, so the clone
    /// shows on-disk ids again. Only [`DetachedMount::clone_with`] can do
    /// this (Linux 6.15), and only for a clone without submounts.
    pub fn clear_idmap(mut self) -> Self {
        self.top.idmap = IdmapChange::Clear;
        self
    }

    /// Remove the idmap of every mount of the tree (Linux 6.15, through
    /// [`DetachedMount::clone_with`]).
    pub fn clear_idmap_recursive(mut self) -> Self {
        self.tree.idmap = IdmapChange::Clear;
        self
    }

    /// True when applying this would change nothing.
    pub fn is_empty(&self) -> bool {
        self.top.is_empty() && self.tree.is_empty()
    }

    /// True when this sets or clears an idmap (in either scope).
    pub fn changes_idmap(&self) -> bool {
        self.top.changes_idmap() || self.tree.changes_idmap()
    }

    /// The changes as `mount_setattr` calls, in order, each with whether it
    /// takes `AT_RECURSIVE`; `recursive` says whether the tree has
    /// submounts. Both raw structs are validated before any call is made.
    fn calls(&self, recursive: bool) -> Result<Vec<(AttrChange<'a>, bool)>> {
        if self.top.changes_idmap() && self.tree.changes_idmap() {
            return Err(Error::new(ErrorKind::InvalidInput(
                "an idmap change both for the top mount and recursively: the recursive one covers the top mount".into(),
            )));
        }
        let calls = if !recursive {
            vec![(self.tree.then(self.top), false)]
        } else {
            vec![(self.tree, true), (self.top, false)]
        };
        let calls: Vec<_> = calls.into_iter().filter(|(c, _)| !c.is_empty()).collect();
        for (c, _) in &calls {
            c.to_raw()?;
        }
        Ok(calls)
    }
}

/// Render a raw attr for error messages: `{attr_set: 0x100000, userns_fd: 7}`.
fn describe(raw: &RawMountAttr) -> String {
    let mut parts = vec![format!("attr_set: {:#x}", raw.attr_set)];
    if raw.attr_clr != 0 {
        parts.push(format!("attr_clr: {:#x}", raw.attr_clr));
    }
    if raw.propagation != 0 {
        parts.push(format!("propagation: {:#x}", raw.propagation));
    }
    if raw.attr_set & libc::MOUNT_ATTR_IDMAP != 0 {
        parts.push(format!("userns_fd: {}", raw.userns_fd));
    }
    format!("{{{}}}", parts.join(", "))
}

pub(crate) fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::new(ErrorKind::InvalidInput(format!(
            "path {:?} contains a NUL byte",
            path
        )))
    })
}

fn at_flags(recursive: bool) -> u32 {
    if recursive {
        libc::AT_RECURSIVE as u32
    } else {
        0
    }
}

fn flag_names(recursive: bool, base: &str) -> String {
    if recursive {
        format!("{base}|AT_RECURSIVE")
    } else {
        base.to_string()
    }
}

/// Which system calls made a [`DetachedMount`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloneMethod {
    /// `open_tree(OPEN_TREE_CLONE)`, attributes (if any) by `mount_setattr`.
    OpenTree,
    /// `open_tree_attr(OPEN_TREE_CLONE)`: cloned with its attributes in one call (Linux 6.15).
    OpenTreeAttr,
    /// Made elsewhere and adopted from an fd ([`DetachedMount::from_fd`],
    /// [`DetachedMount::recv`]): how is not known.
    Adopted,
    /// `fsopen`+`fsconfig`+`fsmount`: a new filesystem instance, attributes by `mount_setattr`.
    FsMount,
}

impl CloneMethod {
    /// The calls, as a runtime would log them: `open_tree_attr` or `open_tree+mount_setattr`.
    pub fn syscalls(self) -> &'static str {
        match self {
            CloneMethod::OpenTree => "open_tree+mount_setattr",
            CloneMethod::OpenTreeAttr => "open_tree_attr",
            CloneMethod::Adopted => "adopted fd",
            CloneMethod::FsMount => "fsopen+fsmount+mount_setattr",
        }
    }
}

/// A detached mount tree, owned: nothing in any namespace can see it until
/// [`attach`](Self::attach). Dropping it unmounts the tree.
#[derive(Debug)]
pub struct DetachedMount {
    fd: OwnedFd,
    method: CloneMethod,
    recursive: bool,
    /// The path it was cloned from, for diagnosing refusals.
    source: PathBuf,
}

impl DetachedMount {
    /// Clone the mount at `path` (`open_tree(OPEN_TREE_CLONE)`); with
    /// [`CloneFlags::RECURSIVE`], its submounts too (`AT_RECURSIVE`).
    ///
    /// # References
    /// - [`open_tree(2)`](https://man7.org/linux/man-pages/man2/open_tree.2.html)
    #[doc(alias = "open_tree")]
    pub fn clone_tree(path: impl AsRef<Path>, flags: CloneFlags) -> Result<DetachedMount> {
        Self::clone_tree_at(CWD, path, flags)
    }

    /// [`clone_tree`](Self::clone_tree) relative to `dirfd`; an empty `path`
    /// clones the mount `dirfd` itself refers to (`AT_EMPTY_PATH`), which is
    /// how a runtime clones a source it resolved safely itself.
    pub fn clone_tree_at(
        dirfd: impl AsFd,
        path: impl AsRef<Path>,
        flags: CloneFlags,
    ) -> Result<DetachedMount> {
        let path = path.as_ref();
        let mut raw = OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::from_bits_retain(flags.bits());
        if path.as_os_str().is_empty() {
            raw |= OpenTreeFlags::AT_EMPTY_PATH;
        }
        let fd = rustix::mount::open_tree(dirfd.as_fd(), path, raw).map_err(|e| {
            let err = Error::sys("open_tree", format!("{:?}, {}", path, flags.names()), e)
                .with_path(path);
            if e == Errno::NOSYS {
                err.with_kind(ErrorKind::KernelTooOld {
                    feature: "open_tree",
                    since: "5.2",
                })
            } else {
                err
            }
        })?;
        Ok(DetachedMount {
            fd,
            method: CloneMethod::OpenTree,
            recursive: flags.contains(CloneFlags::RECURSIVE),
            source: path.to_path_buf(),
        })
    }

    /// Clone `path` and apply `attr` to the clone in one step.
    ///
    /// On Linux >= 6.15 this is one `open_tree_attr` call: the fd never exists
    /// without its attributes, and an idmap can *replace* or *clear* the idmap
    /// of a source that is idmapped already. Older kernels get `open_tree`
    /// followed by `mount_setattr`; which one is used is probed once and
    /// cached. For a recursive clone, `open_tree_attr` applies only the
    /// recursive part of `attr` (the kernel applies its attributes to the
    /// whole tree); the top-mount part follows by `mount_setattr`.
    ///
    /// A refusal is classified without side effects ([`ErrorKind`]); an
    /// [`ErrorKind::IdmapRefused`] can be narrowed down to the mount and
    /// filesystem that caused it with [`crate::probe::diagnose`].
    #[doc(alias = "open_tree_attr")]
    pub fn clone_with(
        path: impl AsRef<Path>,
        flags: CloneFlags,
        attr: &MountAttr<'_>,
    ) -> Result<DetachedMount> {
        let path = path.as_ref();
        let recursive = flags.contains(CloneFlags::RECURSIVE);
        let calls = attr.calls(recursive)?;
        // A plain bind-style clone needs neither newer call: Linux 5.2 suffices.
        if calls.is_empty() {
            return DetachedMount::clone_tree(path, flags);
        }
        // The change open_tree_attr can carry: all of it without submounts,
        // the recursive part with them.
        let (first, rest) = match calls.split_first() {
            Some(((c, rec), rest)) if *rec == recursive => (Some(*c), rest),
            _ => (None, &calls[..]),
        };
        if let (Some(first), Availability::Available) = (first, features::features().open_tree_attr)
        {
            let raw = first.to_raw()?;
            let cp = cpath(path)?;
            let at = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | flags.bits();
            let fd = sys::open_tree_attr(CWD, &cp, at, Some(&raw)).map_err(|e| {
                let err = Error::sys(
                    "open_tree_attr",
                    format!("{:?}, {}, {}", path, flags.names(), describe(&raw)),
                    e,
                )
                .with_path(path);
                classify(err, e, path, &first, true)
            })?;
            let mut mount = DetachedMount {
                fd,
                method: CloneMethod::OpenTreeAttr,
                recursive,
                source: path.to_path_buf(),
            };
            for (change, rec) in rest {
                mount.apply(change, *rec)?;
            }
            return Ok(mount);
        }
        if calls
            .iter()
            .any(|(c, _)| matches!(c.idmap, IdmapChange::Clear))
        {
            if features::features().open_tree_attr == Availability::Available {
                return Err(Error::new(ErrorKind::InvalidInput(
                    "the idmap of only the top mount of a recursive clone cannot be cleared (open_tree_attr applies to the whole tree): use MountAttr::clear_idmap_recursive".into(),
                ))
                .with_path(path));
            }
            return Err(Error::new(ErrorKind::KernelTooOld {
                feature: "open_tree_attr (clearing an idmap)",
                since: "6.15",
            })
            .with_path(path));
        }
        let mut mount = DetachedMount::clone_tree(path, flags)?;
        for (change, rec) in &calls {
            mount.apply(change, *rec)?;
        }
        Ok(mount)
    }

    /// Change the attributes of this detached tree (`mount_setattr` with
    /// `AT_EMPTY_PATH`; the recursive part of `attr` with `AT_RECURSIVE`).
    ///
    /// # References
    /// - [`mount_setattr(2)`](https://man7.org/linux/man-pages/man2/mount_setattr.2.html)
    #[doc(alias = "mount_setattr")]
    pub fn set_attr(&mut self, attr: &MountAttr<'_>) -> Result<()> {
        for (change, rec) in attr.calls(self.recursive)? {
            self.apply(&change, rec)?;
        }
        Ok(())
    }

    fn apply(&mut self, change: &AttrChange<'_>, recursive: bool) -> Result<()> {
        let raw = change.to_raw()?;
        let flags = libc::AT_EMPTY_PATH as u32 | at_flags(recursive);
        sys::mount_setattr(self.fd.as_fd(), c"", flags, &raw).map_err(|e| {
            let err = Error::sys(
                "mount_setattr",
                format!(
                    "fd {}, \"\", {}, {}",
                    rustix::fd::AsRawFd::as_raw_fd(&self.fd),
                    flag_names(recursive, "AT_EMPTY_PATH"),
                    describe(&raw)
                ),
                e,
            )
            .with_path(&self.source);
            if self.method == CloneMethod::FsMount {
                return classify_new_fs(err, e, &self.source, change);
            }
            classify(err, e, &self.source, change, true)
        })
    }

    /// Attach the tree at `target` (`move_mount(MOVE_MOUNT_F_EMPTY_PATH)`).
    /// `target` must be a directory for a directory tree, a file for a file.
    /// On failure nothing is mounted: the tree is dropped and unmounted.
    ///
    /// `target` is resolved in the caller's mount namespace and symlinks in
    /// its components are followed: never use it for a path inside a root
    /// filesystem a container can write to; use
    /// [`attach_beneath`](Self::attach_beneath) there.
    ///
    /// # References
    /// - [`move_mount(2)`](https://man7.org/linux/man-pages/man2/move_mount.2.html)
    #[doc(alias = "move_mount")]
    pub fn attach(self, target: impl AsRef<Path>) -> Result<()> {
        self.attach_at(CWD, target)
    }

    /// [`attach`](Self::attach) with `target` relative to `dirfd`. Symlinks,
    /// `..` and absolute paths in `target` are followed out of `dirfd`: to
    /// stay inside a root use [`attach_beneath`](Self::attach_beneath), or
    /// [`attach_to`](Self::attach_to) on an fd you resolved.
    pub fn attach_at(self, dirfd: impl AsFd, target: impl AsRef<Path>) -> Result<()> {
        let target = target.as_ref();
        rustix::mount::move_mount(
            self.fd.as_fd(),
            "",
            dirfd.as_fd(),
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| {
            Error::sys(
                "move_mount",
                format!(
                    "fd {}, \"\", {:?}, MOVE_MOUNT_F_EMPTY_PATH",
                    rustix::fd::AsRawFd::as_raw_fd(&self.fd),
                    target
                ),
                e,
            )
            .with_path(target)
        })
    }

    /// Which system calls made this clone.
    pub fn method(&self) -> CloneMethod {
        self.method
    }

    /// Whether submounts were cloned.
    pub fn is_recursive(&self) -> bool {
        self.recursive
    }

    /// The path this was cloned from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

impl AsFd for DetachedMount {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<DetachedMount> for OwnedFd {
    fn from(m: DetachedMount) -> OwnedFd {
        m.fd
    }
}

/// Apply `attr` to the mount attached at `path` (`mount_setattr` on a path;
/// the recursive part of `attr` with `AT_RECURSIVE`). Useful for
/// read-only/nosuid/propagation changes in place; an idmap is always refused
/// here ([`ErrorKind::NotDetached`]): the kernel idmaps only detached mounts.
pub fn set_attr_at_path(path: impl AsRef<Path>, attr: &MountAttr<'_>) -> Result<()> {
    let path = path.as_ref();
    let cp = cpath(path)?;
    for (change, recursive) in attr.calls(true)? {
        let raw = change.to_raw()?;
        sys::mount_setattr(CWD, &cp, at_flags(recursive), &raw).map_err(|e| {
            let err = Error::sys(
                "mount_setattr",
                format!(
                    "AT_FDCWD, {:?}, {}, {}",
                    path,
                    if recursive { "AT_RECURSIVE" } else { "0" },
                    describe(&raw)
                ),
                e,
            )
            .with_path(path);
            classify(err, e, path, &change, false)
        })?;
    }
    Ok(())
}

/// What [`read_idmap`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdmapReadback {
    /// The mount shows on-disk ids.
    NotIdmapped,
    /// The mount is idmapped; the mapping is known on Linux >= 6.15
    /// (`statmount`), `None` before (mountinfo only says *that* it is).
    Idmapped(Option<Mapping>),
}

impl IdmapReadback {
    /// True for [`IdmapReadback::Idmapped`].
    pub fn is_idmapped(&self) -> bool {
        matches!(self, IdmapReadback::Idmapped(_))
    }
}

/// Read back the idmap of the mount attached at `path`.
///
/// Linux >= 6.15: `statmount(STATMOUNT_MNT_UIDMAP | STATMOUNT_MNT_GIDMAP)`
/// gives the mapping itself. Older kernels tell only *whether* it is
/// idmapped: `statmount`'s `MOUNT_ATTR_IDMAP` (6.8), else the `idmapped`
/// option in our mountinfo, read through a verified procfs handle. A mount
/// table that cannot be read or parsed is an error, not "not idmapped".
pub fn read_idmap(path: impl AsRef<Path>) -> Result<IdmapReadback> {
    let path = path.as_ref();
    if features::features().statmount_idmap == Availability::Available {
        let st = rustix::fs::statx(
            CWD,
            path,
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE),
        )
        .map_err(|e| {
            Error::sys("statx", format!("{path:?}, STATX_MNT_ID_UNIQUE"), e).with_path(path)
        })?;
        let sm = sys::statmount(
            st.stx_mnt_id,
            sys::STATMOUNT_MNT_BASIC | sys::STATMOUNT_MNT_UIDMAP | sys::STATMOUNT_MNT_GIDMAP,
        )
        .map_err(|e| {
            Error::sys(
                "statmount",
                format!(
                    "mnt_id {}, STATMOUNT_MNT_UIDMAP|STATMOUNT_MNT_GIDMAP",
                    st.stx_mnt_id
                ),
                e,
            )
            .with_path(path)
        })?;
        if sm.mnt_attr & libc::MOUNT_ATTR_IDMAP == 0 {
            return Ok(IdmapReadback::NotIdmapped);
        }
        let parse = |lines: &[String]| crate::map::IdMap::parse_proc(&lines.join("\n"));
        let mapping = match (parse(&sm.uidmap), parse(&sm.gidmap)) {
            (Ok(u), Ok(g)) => Some(Mapping::new(u, g)),
            _ => None,
        };
        return Ok(IdmapReadback::Idmapped(mapping));
    }
    // Linux 6.8..6.14: statmount's attributes; older: mountinfo, through
    // the verified procfs. Either way a table that cannot be read is an error.
    Ok(if mounttable::mount_of(path)?.idmapped {
        IdmapReadback::Idmapped(None)
    } else {
        IdmapReadback::NotIdmapped
    })
}

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): the 64-bit id `statmount` takes.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// Turn a bare errno from an attribute change into the kernel rule that was
/// hit, from what can be checked without side effects: the errno, the
/// namespace given, and whether the source is idmapped already (read from
/// the mount table, no mount made). The kernel's check order is in DESIGN
/// ("When MOUNT_ATTR_IDMAP is refused"). What would take probing (which
/// submount's filesystem refused) is left to [`crate::probe::diagnose`].
fn classify(
    err: Error,
    errno: Errno,
    source: &Path,
    change: &AttrChange<'_>,
    detached: bool,
) -> Error {
    let userns = match change.idmap {
        IdmapChange::Set(ns) => Some(ns),
        _ => None,
    };
    let idmapping = change.changes_idmap();
    match errno {
        Errno::NOSYS => err.with_kind(ErrorKind::KernelTooOld {
            feature: "mount_setattr",
            since: "5.12",
        }),
        Errno::BUSY => err.with_kind(ErrorKind::Busy),
        Errno::PERM if idmapping => {
            if userns.is_some_and(UserNamespace::is_initial) {
                err.with_kind(ErrorKind::InitialUserns)
            } else if detached && !source.as_os_str().is_empty() && source_is_idmapped(source) {
                err.with_kind(ErrorKind::AlreadyIdmapped)
            } else {
                err.with_kind(ErrorKind::PermissionDenied)
            }
        }
        Errno::INVAL if idmapping => {
            if !detached {
                err.with_kind(ErrorKind::NotDetached)
            } else if userns.is_some_and(UserNamespace::lacks_map) {
                err.with_kind(ErrorKind::UsernsMissingMap)
            } else {
                err.with_kind(ErrorKind::IdmapRefused)
            }
        }
        _ => err,
    }
}

/// Whether the mount `path` is on is idmapped already.
fn source_is_idmapped(path: &Path) -> bool {
    matches!(read_idmap(path), Ok(IdmapReadback::Idmapped(_)))
}

// ---- runtime: attach to an fd, beneath a root, in another namespace; replace; hand over ----

/// How [`DetachedMount::attach_beneath`] and
/// [`DetachedMount::attach_in_namespace`] find and treat their target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    create: bool,
    replace: bool,
    resolver: Option<Resolver>,
}

impl AttachOptions {
    /// Resolve the target, which must exist; attach on top of whatever is there.
    pub fn new() -> AttachOptions {
        AttachOptions::default()
    }

    /// Create the target if it is missing, confined to the root like the
    /// resolution: parents as directories (0755), the target itself as a
    /// directory for a directory mount or an empty file for a file mount.
    pub fn create(mut self, yes: bool) -> AttachOptions {
        self.create = yes;
        self
    }

    /// A mount on the target is replaced atomically
    /// ([`DetachedMount::replace`]); with nothing mounted there, a plain attach.
    pub fn replace(mut self, yes: bool) -> AttachOptions {
        self.replace = yes;
        self
    }

    /// Force a resolver instead of probing (for tests; see [`crate::resolve`]).
    pub fn resolver(mut self, resolver: Resolver) -> AttachOptions {
        self.resolver = Some(resolver);
        self
    }

    /// Whether [`create`](Self::create) was asked for.
    pub fn creates(&self) -> bool {
        self.create
    }

    /// Whether [`replace`](Self::replace) was asked for.
    pub fn replaces(&self) -> bool {
        self.replace
    }

    /// The resolver forced with [`resolver`](Self::resolver), if any.
    pub fn forced_resolver(&self) -> Option<Resolver> {
        self.resolver
    }
}

/// What [`DetachedMount::attach_beneath`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Attached {
    /// The target as resolved, relative to the root, symlinks expanded.
    pub target: PathBuf,
    /// Whether a mount on the target was replaced.
    pub replaced: bool,
    /// Whether the target (or a parent) was created.
    pub created: bool,
    /// Which resolver found the target.
    pub resolver: Resolver,
}

/// A mount namespace to attach in ([`DetachedMount::attach_in_namespace`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum MountNamespace<'a> {
    /// The mount namespace of this process (in our pid namespace), through
    /// `pidfd_open` (Linux 5.3) and `setns(pidfd, CLONE_NEWNS)` (Linux 5.8).
    Pid(i32),
    /// The mount namespace of the process of this pidfd (Linux 5.8).
    Pidfd(BorrowedFd<'a>),
    /// A mount-namespace fd, e.g. `/proc/PID/ns/mnt` opened, or a bind mount of one.
    Fd(BorrowedFd<'a>),
}

impl MountNamespace<'_> {
    /// For errors: "in the mount namespace of pid 42".
    fn describe(&self) -> String {
        match self {
            MountNamespace::Pid(pid) => format!("in the mount namespace of pid {pid}"),
            MountNamespace::Pidfd(fd) => format!(
                "in the mount namespace of pidfd {}",
                rustix::fd::AsRawFd::as_raw_fd(fd)
            ),
            MountNamespace::Fd(fd) => format!(
                "in mount namespace fd {}",
                rustix::fd::AsRawFd::as_raw_fd(fd)
            ),
        }
    }
}

/// The byte sent along with a mount fd: stream sockets need one byte of data
/// to carry ancillary data; exactly one is read, so nothing after it is consumed.
const SCM_TAG: &[u8] = b"M";

fn raw(fd: BorrowedFd<'_>) -> i32 {
    rustix::fd::AsRawFd::as_raw_fd(&fd)
}

/// Whether `fd` is the root of a mount (`STATX_ATTR_MOUNT_ROOT`, Linux 5.8;
/// `None` when the kernel cannot say).
fn is_mount_root(fd: BorrowedFd<'_>) -> Result<Option<bool>> {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::TYPE).map_err(|e| {
        Error::sys(
            "statx",
            format!("fd {}, \"\", AT_EMPTY_PATH, STATX_TYPE", raw(fd)),
            e,
        )
    })?;
    Ok(st
        .stx_attributes_mask
        .contains(StatxAttributes::MOUNT_ROOT)
        .then(|| st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)))
}

/// Whether the mount `fd` is the root of is attached in the caller's mount
/// namespace: `statmount` (Linux 6.8) finds only those by id. `false` when
/// the kernel cannot tell.
fn attached_here(fd: BorrowedFd<'_>) -> bool {
    use rustix::fs::{AtFlags, StatxFlags};
    let Ok(st) = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE),
    ) else {
        return false;
    };
    st.stx_mask & STATX_MNT_ID_UNIQUE != 0
        && sys::statmount(st.stx_mnt_id, sys::STATMOUNT_MNT_BASIC).is_ok()
}

/// Run `f` on a new thread with its own fs context (`unshare(CLONE_FS)`),
/// so a `chdir`/`setns` there moves no other thread; the thread exits when
/// `f` returns and is never reused.
fn on_own_fs_thread<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            sys::unshare_fs().map_err(|e| Error::sys("unshare", "CLONE_FS", e))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::new(ErrorKind::Process(
                "the attach thread panicked".into(),
            )))
        })
    })
}

impl DetachedMount {
    /// Adopt an fd that refers to a detached mount, e.g. one received from
    /// another process or made by `fsmount`/`open_tree` outside this crate.
    ///
    /// Checked: the fd is the root of a mount (`STATX_ATTR_MOUNT_ROOT`,
    /// Linux 5.8; [`ErrorKind::NotAMount`] otherwise), and, on Linux >= 6.8
    /// (`statmount`), that the mount is not attached in the caller's mount
    /// namespace ([`ErrorKind::NotDetached`] otherwise). **Not checked**,
    /// because no kernel call says so for an fd: that a mount attached in
    /// *another* namespace (or, before 6.8, in any) is not one. Attaching an
    /// attached mount's fd *moves* that mount; accept fds only from a
    /// process you trust to send detached ones. Whether it has submounts is
    /// not known either: attribute changes are made as for a recursive clone
    /// (the `_recursive` part with `AT_RECURSIVE`), which is right for both.
    pub fn from_fd(fd: OwnedFd) -> Result<DetachedMount> {
        if is_mount_root(fd.as_fd())? == Some(false) {
            return Err(Error::new(ErrorKind::NotAMount));
        }
        if attached_here(fd.as_fd()) {
            return Err(Error::new(ErrorKind::NotDetached));
        }
        Ok(DetachedMount {
            fd,
            method: CloneMethod::Adopted,
            recursive: true,
            source: PathBuf::new(),
        })
    }

    /// Attach the tree onto the file or directory `target` refers to
    /// (`move_mount(fd, "", target, "", MOVE_MOUNT_F_EMPTY_PATH |
    /// MOVE_MOUNT_T_EMPTY_PATH)`); an `O_PATH` fd is enough. This is how a
    /// mount lands on a target resolved safely, e.g. by
    /// [`crate::resolve::resolve_in_root`]. On failure nothing is mounted.
    #[doc(alias = "MOVE_MOUNT_T_EMPTY_PATH")]
    pub fn attach_to(self, target: impl AsFd) -> Result<()> {
        let target = target.as_fd();
        rustix::mount::move_mount(
            self.fd.as_fd(),
            "",
            target,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| {
            Error::sys(
                "move_mount",
                format!(
                    "fd {}, \"\", fd {}, \"\", MOVE_MOUNT_F_EMPTY_PATH|MOVE_MOUNT_T_EMPTY_PATH",
                    raw(self.fd.as_fd()),
                    raw(target)
                ),
                e,
            )
            .with_path(&self.source)
        })
    }

    /// Replace the mount on `target` atomically: attach this tree *beneath*
    /// the top mount there (`MOVE_MOUNT_BENEATH`, Linux 6.5), then detach the
    /// old top (`umount2(MNT_DETACH)`), so a reader of the target sees the
    /// old mount, then the new one, and never the directory underneath.
    /// Returns `true` when a mount was replaced; with nothing mounted on
    /// `target` (it is not a mount root) this is a plain
    /// [`attach_to`](Self::attach_to) and returns `false`.
    ///
    /// `target` must be the root of the top mount, as a resolved fd of the
    /// mount point is. With a mount there and a kernel without
    /// `MOVE_MOUNT_BENEATH` (found by probing): [`ErrorKind::KernelTooOld`],
    /// nothing changed. The kernel may refuse (`EINVAL`): where propagation
    /// would put a copy of the new mount on top, and (Linux 6.18 and earlier
    /// here; 7.3 allows it) beneath the caller's root. Unlike systemd's
    /// `mount_exchange_graceful` this does not then
    /// mount on top (that would leave the old mount stacked under the new
    /// one, not replaced): it fails and changes nothing. The old top is
    /// detached through the fd (`fchdir` to it on a thread of its own, then
    /// `umount2(".")`), never by a path.
    #[doc(alias = "MOVE_MOUNT_BENEATH")]
    pub fn replace(self, target: impl AsFd) -> Result<bool> {
        let target = target.as_fd();
        match is_mount_root(target)? {
            Some(false) => {
                self.attach_to(target)?;
                return Ok(false);
            }
            Some(true) => {}
            // Before 5.8 the kernel cannot say whether a mount is there;
            // a plain attach might stack on one instead of replacing it.
            None => {
                return Err(Error::new(ErrorKind::KernelTooOld {
                    feature: "statx(STATX_ATTR_MOUNT_ROOT)",
                    since: "5.8",
                }))
            }
        }
        if features::features().move_mount_beneath != Availability::Available {
            return Err(Error::new(ErrorKind::KernelTooOld {
                feature: "move_mount(MOVE_MOUNT_BENEATH)",
                since: "6.5",
            }));
        }
        let flags = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
            | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH
            | MoveMountFlags::MOVE_MOUNT_BENEATH;
        rustix::mount::move_mount(self.fd.as_fd(), "", target, "", flags).map_err(|e| {
            let err = Error::sys(
                "move_mount",
                format!(
                    "fd {}, \"\", fd {}, \"\", MOVE_MOUNT_F_EMPTY_PATH|MOVE_MOUNT_T_EMPTY_PATH|MOVE_MOUNT_BENEATH",
                    raw(self.fd.as_fd()),
                    raw(target)
                ),
                e,
            )
            .with_path(&self.source);
            if e == Errno::INVAL {
                err.with_kind(ErrorKind::InvalidInput(
                    "the kernel refused to mount beneath the target (propagation would put the new mount on top, or the target is the caller's root)".into(),
                ))
            } else {
                err
            }
        })?;
        detach_top(target)?;
        Ok(true)
    }

    /// Attach at `path` resolved inside the directory `root` as if `root`
    /// were `/` ([`crate::resolve`]): `..` stops at `root`, symlinks (the
    /// last component's too) are expanded inside it, magic links refused.
    /// Optionally create the target ([`AttachOptions::create`]) and replace a
    /// mount on it ([`AttachOptions::replace`]).
    ///
    /// **Attach into a root a container can write to only this way**: the
    /// target is resolved to an fd and the mount attached to that fd
    /// ([`attach_to`](Self::attach_to)), so a symlink exchanged for a path
    /// component at any moment cannot send the mount outside `root`.
    pub fn attach_beneath(
        self,
        root: impl AsFd,
        path: impl AsRef<Path>,
        options: &AttachOptions,
    ) -> Result<Attached> {
        let mut ropts = ResolveOptions::new();
        if options.create {
            ropts = ropts.create(if self.is_dir()? {
                Create::Directory
            } else {
                Create::File
            });
        }
        if let Some(r) = options.resolver {
            ropts = ropts.resolver(r);
        }
        let resolved = resolve::resolve_in_root(root, path, &ropts)?;
        // A failure from here on concerns the target, named as resolved.
        let at = |e: Error| match resolved.path() {
            p if p.as_os_str().is_empty() => e.with_path("."),
            p => e.with_path(p),
        };
        let replaced = if options.replace {
            self.replace(&resolved).map_err(at)?
        } else {
            self.attach_to(&resolved).map_err(at)?;
            false
        };
        Ok(Attached {
            target: resolved.path().to_path_buf(),
            replaced,
            created: resolved.created(),
            resolver: resolved.resolver(),
        })
    }

    /// [`attach_beneath`](Self::attach_beneath) in another mount namespace,
    /// with `path` resolved beneath that namespace's root.
    ///
    /// A dedicated thread does `unshare(CLONE_FS)` (`setns` refuses while
    /// the fs context is shared), `setns(CLONE_NEWNS)` (its root and cwd
    /// become the namespace's root), resolves, attaches and exits; it is
    /// never reused and the calling thread's namespace does not change.
    /// Needs `CAP_SYS_ADMIN` over the namespace's owner and `CAP_SYS_CHROOT`.
    /// Errors say which namespace ([`Error::context`]) and the path.
    #[doc(alias = "setns")]
    pub fn attach_in_namespace(
        self,
        ns: MountNamespace<'_>,
        path: impl AsRef<Path>,
        options: &AttachOptions,
    ) -> Result<Attached> {
        let path = path.as_ref();
        let context = ns.describe();
        let opened: OwnedFd;
        let (ns_fd, is_pidfd) = match ns {
            MountNamespace::Pid(pid) => {
                opened = open_pidfd(pid).map_err(|e| e.with_context(context.clone()))?;
                (opened.as_fd(), true)
            }
            MountNamespace::Pidfd(fd) => (fd, true),
            MountNamespace::Fd(fd) => (fd, false),
        };
        let path_owned = path.to_path_buf();
        on_own_fs_thread(move || {
            let r = if is_pidfd {
                rustix::thread::move_into_thread_name_spaces(
                    ns_fd,
                    rustix::thread::ThreadNameSpaceType::MOUNT,
                )
            } else {
                rustix::thread::move_into_link_name_space(
                    ns_fd,
                    Some(rustix::thread::LinkNameSpaceType::Mount),
                )
            };
            r.map_err(|e| Error::sys("setns", format!("fd {}, CLONE_NEWNS", raw(ns_fd)), e))?;
            let root = rustix::fs::open(
                "/",
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| Error::sys("open", "\"/\", O_PATH|O_DIRECTORY|O_CLOEXEC", e))?;
            self.attach_beneath(&root, &path_owned, options)
        })
        .map_err(|e| {
            let e = if e.path().is_none() {
                e.with_path(path)
            } else {
                e
            };
            e.with_context(context)
        })
    }

    /// Send this mount to the process at the other end of a Unix socket
    /// (`sendmsg` with one `SCM_RIGHTS` fd and one byte of data); the peer
    /// gets it with [`recv`](Self::recv). Consumes the mount: our copy of the
    /// fd is closed once sent, so only the receiver can attach it (the tree
    /// lives as long as any process holds an fd to it).
    #[doc(alias = "SCM_RIGHTS")]
    pub fn send(self, socket: impl AsFd) -> Result<()> {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let fds = [self.fd.as_fd()];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(Error::sys(
                "sendmsg",
                "SCM_RIGHTS: control buffer too small",
                Errno::NOBUFS,
            ));
        }
        let iov = [std::io::IoSlice::new(SCM_TAG)];
        loop {
            match rustix::net::sendmsg(socket.as_fd(), &iov, &mut control, SendFlags::NOSIGNAL) {
                Err(Errno::INTR) => continue,
                Err(e) => {
                    return Err(Error::sys(
                        "sendmsg",
                        format!(
                            "fd {}, 1 byte, SCM_RIGHTS [fd {}], MSG_NOSIGNAL",
                            raw(socket.as_fd()),
                            raw(self.fd.as_fd())
                        ),
                        e,
                    ))
                }
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Receive a mount sent by [`send`](Self::send) (or by any process that
    /// sends one fd with `SCM_RIGHTS`): `recvmsg` of one byte with
    /// `MSG_CMSG_CLOEXEC`, then [`from_fd`](Self::from_fd). Exactly one fd
    /// must arrive; any extra fds are closed and the message refused.
    pub fn recv(socket: impl AsFd) -> Result<DetachedMount> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let args = || format!("fd {}, 1 byte, MSG_CMSG_CLOEXEC", raw(socket.as_fd()));
        let msg = loop {
            let mut iov = [std::io::IoSliceMut::new(&mut byte)];
            match rustix::net::recvmsg(
                socket.as_fd(),
                &mut iov,
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Err(Errno::INTR) => continue,
                Err(e) => return Err(Error::sys("recvmsg", args(), e)),
                Ok(m) => break m,
            }
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Err(Error::new(ErrorKind::InvalidInput(
                "the peer closed the socket without sending a mount".into(),
            )));
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() != 1 {
            return Err(Error::new(ErrorKind::InvalidInput(format!(
                "expected exactly one file descriptor, got {}{}",
                fds.len(),
                if msg.flags.contains(ReturnFlags::CTRUNC) {
                    " and more that did not fit (MSG_CTRUNC)"
                } else {
                    ""
                }
            ))));
        }
        let fd = fds.pop().ok_or_else(|| Error::new(ErrorKind::NotAMount))?;
        DetachedMount::from_fd(fd)
    }

    /// Whether the tree's root is a directory (else a file).
    fn is_dir(&self) -> Result<bool> {
        use rustix::fs::{AtFlags, FileType, StatxFlags};
        let st = rustix::fs::statx(&self.fd, "", AtFlags::EMPTY_PATH, StatxFlags::TYPE).map_err(
            |e| {
                Error::sys(
                    "statx",
                    format!(
                        "fd {}, \"\", AT_EMPTY_PATH, STATX_TYPE",
                        raw(self.fd.as_fd())
                    ),
                    e,
                )
            },
        )?;
        Ok(FileType::from_raw_mode(st.stx_mode.into()) == FileType::Directory)
    }
}

fn open_pidfd(pid: i32) -> Result<OwnedFd> {
    let p = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput(format!("pid {pid}"))))?;
    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).map_err(|e| {
        let err = Error::sys("pidfd_open", format!("{pid}, 0"), e);
        if e == Errno::NOSYS {
            err.with_kind(ErrorKind::KernelTooOld {
                feature: "pidfd_open",
                since: "5.3",
            })
        } else {
            err
        }
    })
}

/// Detach the mount whose root `top` is, by fd: a thread of its own
/// `fchdir`s to it and unmounts `"."`, which names the mount the fd refers
/// to even where another is mounted on top (no path is looked up).
pub(crate) fn detach_top(top: BorrowedFd<'_>) -> Result<()> {
    on_own_fs_thread(|| {
        rustix::process::fchdir(top)
            .map_err(|e| Error::sys("fchdir", format!("fd {}", raw(top)), e))?;
        match rustix::mount::unmount(
            ".",
            rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
        ) {
            // Someone unmounted it first: the new mount is in place all the same.
            Ok(()) | Err(Errno::INVAL) => Ok(()),
            Err(e) => Err(Error::sys(
                "umount2",
                "\".\", MNT_DETACH|UMOUNT_NOFOLLOW",
                e,
            )),
        }
    })
}

// ---- mount point checks ----

/// Check, before any mount call, that a clone of `source` (cloned with
/// `flags`: [`CloneFlags::NO_FOLLOW`] does not follow a final symlink, as
/// `open_tree` does not) can be attached at `target` by
/// [`DetachedMount::attach`]; returns what the two are.
///
/// `move_mount` refuses a directory onto a non-directory, a non-directory
/// onto a directory and a `target` whose last component is a symlink, each
/// with a bare `EINVAL`; this says which ([`ErrorKind::MountPointMismatch`],
/// [`ErrorKind::TargetIsSymlink`]), and a missing path as
/// [`ErrorKind::NotFound`]. It is a diagnosis, not a guarantee: the paths
/// can change between this `stat` and the mount, and the kernel checks again.
pub fn check_mount_point(
    source: impl AsRef<Path>,
    flags: CloneFlags,
    target: impl AsRef<Path>,
) -> Result<(FileKind, FileKind)> {
    let (source, target) = (source.as_ref(), target.as_ref());
    let source_kind = if flags.contains(CloneFlags::NO_FOLLOW) {
        file_kind(source, false)?
    } else {
        file_kind(source, true)?
    };
    let target_kind = file_kind(target, false)?;
    if target_kind == FileKind::Symlink {
        let points_to = std::fs::read_link(target).unwrap_or_default();
        return Err(Error::new(ErrorKind::TargetIsSymlink { points_to }).with_path(target));
    }
    if source_kind.is_dir() != target_kind.is_dir() {
        return Err(Error::new(ErrorKind::MountPointMismatch {
            source: source.to_path_buf(),
            source_kind,
            target_kind,
        })
        .with_path(target));
    }
    Ok((source_kind, target_kind))
}

/// What `path` is (`stat`, or `lstat` when not following a final symlink).
pub(crate) fn file_kind(path: &Path, follow: bool) -> Result<FileKind> {
    let (name, stat) = if follow {
        ("stat", rustix::fs::stat(path))
    } else {
        ("lstat", rustix::fs::lstat(path))
    };
    stat.map(|st| FileKind::from_mode(st.st_mode))
        .map_err(|e| Error::sys(name, format!("{path:?}"), e).with_path(path))
}

// ---- new filesystems: fsopen / fsconfig / fsmount ----

/// An open filesystem context (`fsopen(2)`): a new instance of a filesystem
/// being configured, one `fsconfig(2)` call per option, then created
/// (`FSCONFIG_CMD_CREATE`) and turned into a [`DetachedMount`] (`fsmount(2)`).
///
/// Every refusal is an [`ErrorKind::FsRefused`] that names the option and
/// quotes the filesystem's own message from the context's log (the `e ...`
/// lines a `read()` of the fd returns, as util-linux reads them) when it
/// logged one. Dropping the context without [`mount`](Self::mount) creates
/// nothing (or releases what [`create`](Self::create) made).
///
/// [`NewFilesystem`] is the builder most callers want; the context is for
/// options that are file descriptors (overlay layers).
///
/// # References
/// - [`fsopen(2)`](https://man7.org/linux/man-pages/man2/fsopen.2.html),
///   [`fsconfig(2)`](https://man7.org/linux/man-pages/man2/fsconfig.2.html),
///   [`fsmount(2)`](https://man7.org/linux/man-pages/man2/fsmount.2.html)
#[derive(Debug)]
pub struct FsContext {
    fd: OwnedFd,
    fs_type: String,
}

impl FsContext {
    /// `fsopen(fs_type, FSOPEN_CLOEXEC)`.
    #[doc(alias = "fsopen")]
    pub fn open(fs_type: &str) -> Result<FsContext> {
        if fs_type.is_empty() || fs_type.contains('\0') {
            return Err(Error::new(ErrorKind::InvalidInput(format!(
                "filesystem type {fs_type:?}"
            ))));
        }
        let fd = rustix::mount::fsopen(fs_type, rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(|e| {
                let err = Error::sys("fsopen", format!("{fs_type:?}, FSOPEN_CLOEXEC"), e);
                match e {
                    Errno::NODEV => err.with_kind(ErrorKind::NoFilesystem {
                        fs: fs_type.to_string(),
                    }),
                    Errno::NOSYS => err.with_kind(ErrorKind::KernelTooOld {
                        feature: "fsopen",
                        since: "5.2",
                    }),
                    _ => err,
                }
            })?;
        Ok(FsContext {
            fd,
            fs_type: fs_type.to_string(),
        })
    }

    /// The filesystem type this context makes.
    pub fn fs_type(&self) -> &str {
        &self.fs_type
    }

    /// `fsconfig(FSCONFIG_SET_FLAG, key)`: an option without a value (`noswap`, `ro`).
    pub fn set_flag(&self, key: &str) -> Result<()> {
        nul_free(key, key)?;
        let r = rustix::mount::fsconfig_set_flag(&self.fd, key);
        self.check(r, "FSCONFIG_SET_FLAG", &format!("{key:?}"), key.to_string())
    }

    /// `fsconfig(FSCONFIG_SET_STRING, key, value)`: `size=16m` is
    /// `set_string("size", "16m")`. The kernel takes at most 255 bytes of value.
    pub fn set_string(&self, key: &str, value: &str) -> Result<()> {
        let option = format!("{key}={value}");
        nul_free(key, &option)?;
        nul_free(value, &option)?;
        let r = rustix::mount::fsconfig_set_string(&self.fd, key, value);
        self.check(
            r,
            "FSCONFIG_SET_STRING",
            &format!("{key:?}, {value:?}"),
            option,
        )
    }

    /// `fsconfig(FSCONFIG_SET_FD, key, fd)`: an option that is a file
    /// descriptor (overlay's `lowerdir+`, `upperdir`, ... on Linux 6.13).
    /// `describe` is what error messages call the value (e.g. the path the fd was opened from).
    pub fn set_fd(&self, key: &str, fd: BorrowedFd<'_>, describe: &str) -> Result<()> {
        let option = format!("{key}=<fd of {describe}>");
        nul_free(key, &option)?;
        let r = rustix::mount::fsconfig_set_fd(&self.fd, key, fd);
        self.check(
            r,
            "FSCONFIG_SET_FD",
            &format!("{key:?}, fd {}", rustix::fd::AsRawFd::as_raw_fd(&fd)),
            option,
        )
    }

    /// `fsconfig(FSCONFIG_CMD_CREATE)`: make the filesystem instance.
    /// `options` is what error messages say was being created from (e.g.
    /// the options given, comma separated).
    pub fn create(&self, options: &str) -> Result<()> {
        let r = rustix::mount::fsconfig_create(&self.fd);
        let what = if options.is_empty() {
            "to create a filesystem".to_string()
        } else {
            format!("to create a filesystem from {options}")
        };
        self.check(r, "FSCONFIG_CMD_CREATE", "", what)
    }

    /// `fsmount(FSMOUNT_CLOEXEC, 0)` on the created instance: a detached
    /// mount of it, in no mount table until attached. Attributes (the idmap
    /// included) are set on it with [`DetachedMount::set_attr`].
    #[doc(alias = "fsmount")]
    pub fn mount(self) -> Result<DetachedMount> {
        let fd = rustix::mount::fsmount(
            &self.fd,
            rustix::mount::FsMountFlags::FSMOUNT_CLOEXEC,
            rustix::mount::MountAttrFlags::empty(),
        )
        .map_err(|e| {
            let err = Error::sys(
                "fsmount",
                format!(
                    "fd {}, FSMOUNT_CLOEXEC, 0",
                    rustix::fd::AsRawFd::as_raw_fd(&self.fd)
                ),
                e,
            );
            let message = self.messages();
            err.with_kind(ErrorKind::FsRefused {
                fs: self.fs_type.clone(),
                option: "to be mounted (fsmount)".into(),
                message,
            })
        })?;
        Ok(DetachedMount {
            fd,
            method: CloneMethod::FsMount,
            recursive: false,
            source: PathBuf::from(&self.fs_type),
        })
    }

    /// Read what the filesystem logged to this context (`read()` of the fd
    /// until ENODATA) and return its errors (`e ` lines) joined by `; `, or
    /// its other lines when it logged no error; `None` when it logged nothing.
    pub fn messages(&self) -> Option<String> {
        let mut errors = Vec::new();
        let mut others = Vec::new();
        let mut buf = [0u8; 1024];
        // The kernel keeps at most 8 messages; bound the loop anyway.
        for _ in 0..64 {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let line = String::from_utf8_lossy(&buf[..n]);
                    let line = line.trim_end();
                    match line.split_once(' ') {
                        Some(("e", m)) => errors.push(m.to_string()),
                        Some((_, m)) => others.push(m.to_string()),
                        None => others.push(line.to_string()),
                    }
                }
            }
        }
        let lines = if errors.is_empty() { others } else { errors };
        (!lines.is_empty()).then(|| lines.join("; "))
    }

    fn check(
        &self,
        r: std::result::Result<(), Errno>,
        cmd: &str,
        args: &str,
        option: String,
    ) -> Result<()> {
        r.map_err(|e| {
            let fd = rustix::fd::AsRawFd::as_raw_fd(&self.fd);
            let args = if args.is_empty() {
                format!("fd {fd}, {cmd}")
            } else {
                format!("fd {fd}, {cmd}, {args}")
            };
            Error::sys("fsconfig", args, e).with_kind(ErrorKind::FsRefused {
                fs: self.fs_type.clone(),
                option,
                message: self.messages(),
            })
        })
    }
}

impl AsFd for FsContext {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn nul_free(s: &str, option: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(Error::new(ErrorKind::InvalidInput(format!(
            "option {option:?} contains a NUL byte"
        ))));
    }
    Ok(())
}

/// A new filesystem instance to create as a detached mount: its type and
/// options, each given to the filesystem as it is (`fsconfig` per option) —
/// `size=`, `mode=`, `nr_inodes=`, `uid=`, `gid=` of a tmpfs included.
///
/// ```no_run
/// use idmapped::{Mapping, MountAttr, MountAttrFlags, NewFilesystem, UserNamespace};
/// let userns = UserNamespace::from_mapping(&Mapping::parse_map_mount(["b:0:100000:65536"])?)?;
/// // A pod's secrets volume: 16 MiB, mode 0750, seen as owned by 100000.
/// let fs = NewFilesystem::tmpfs().size(16 << 20).mode(0o750).nr_inodes(1024);
/// let mount = fs.create(&MountAttr::new().idmap(&userns).set(MountAttrFlags::NODEV))?;
/// mount.attach("/run/pod/secrets")?;
/// # Ok::<(), idmapped::Error>(())
/// ```
///
/// tmpfs can be idmapped since Linux 6.3; on older kernels
/// [`create`](Self::create) with an idmap fails with
/// [`ErrorKind::NotSupported`] and nothing is left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFilesystem {
    fs_type: String,
    options: Vec<(String, Option<String>)>,
}

impl NewFilesystem {
    /// A filesystem of type `fs_type` with no options yet.
    pub fn new(fs_type: impl Into<String>) -> NewFilesystem {
        NewFilesystem {
            fs_type: fs_type.into(),
            options: Vec::new(),
        }
    }

    /// A tmpfs.
    pub fn tmpfs() -> NewFilesystem {
        NewFilesystem::new("tmpfs")
    }

    /// Add `key=value` (or the flag `key` with `None`). Later options of the
    /// same key are given later, so the filesystem's own rule (usually: the
    /// last wins) applies.
    pub fn option(mut self, key: impl Into<String>, value: Option<String>) -> Self {
        self.options.push((key.into(), value));
        self
    }

    /// Add the comma-separated options of a mount command line
    /// (`size=16m,mode=0750,nr_inodes=1k,noswap`). Empty items are refused.
    pub fn parse_options(mut self, text: &str) -> Result<Self> {
        if text.is_empty() {
            return Ok(self);
        }
        for item in text.split(',') {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (item, None),
            };
            if key.is_empty() {
                return Err(Error::new(ErrorKind::InvalidInput(format!(
                    "empty option in {text:?}"
                ))));
            }
            self.options.push((key.to_string(), value));
        }
        Ok(self)
    }

    /// `size=BYTES` (tmpfs: the most it may hold).
    pub fn size(self, bytes: u64) -> Self {
        self.option("size", Some(bytes.to_string()))
    }

    /// `mode=OCTAL`: the permissions of the root directory.
    pub fn mode(self, mode: u32) -> Self {
        self.option("mode", Some(format!("0{mode:o}")))
    }

    /// `nr_inodes=N` (tmpfs: the most files it may hold).
    pub fn nr_inodes(self, n: u64) -> Self {
        self.option("nr_inodes", Some(n.to_string()))
    }

    /// `uid=UID`: the on-disk owner of the root directory (seen through an
    /// idmap as its mapped id).
    pub fn uid(self, uid: u32) -> Self {
        self.option("uid", Some(uid.to_string()))
    }

    /// `gid=GID`: the on-disk group of the root directory.
    pub fn gid(self, gid: u32) -> Self {
        self.option("gid", Some(gid.to_string()))
    }

    /// The filesystem type.
    pub fn fs_type(&self) -> &str {
        &self.fs_type
    }

    /// The options, in order.
    pub fn options(&self) -> &[(String, Option<String>)] {
        &self.options
    }

    /// The options as a mount command line would give them (`a=b,c`).
    pub fn options_text(&self) -> String {
        self.options
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Create the filesystem and apply `attr` (idmap included) to its
    /// detached mount: `fsopen`, one `fsconfig` per option,
    /// `FSCONFIG_CMD_CREATE`, `fsmount`, `mount_setattr`. Nothing exists
    /// anywhere until the result is attached; on any error nothing is left.
    pub fn create(&self, attr: &MountAttr<'_>) -> Result<DetachedMount> {
        let ctx = FsContext::open(&self.fs_type)?;
        for (key, value) in &self.options {
            match value {
                Some(v) => ctx.set_string(key, v)?,
                None => ctx.set_flag(key)?,
            }
        }
        ctx.create(&self.options_text())?;
        let mut mount = ctx.mount()?;
        mount.set_attr(attr)?;
        Ok(mount)
    }
}

/// [`classify`] for a filesystem instance made by `fsmount`: it was never
/// attached and cannot be idmapped already, so a bare EINVAL for an idmap
/// means the filesystem type does not allow idmapped mounts here.
fn classify_new_fs(err: Error, errno: Errno, fs: &Path, change: &AttrChange<'_>) -> Error {
    let userns = match change.idmap {
        IdmapChange::Set(ns) => Some(ns),
        _ => None,
    };
    match errno {
        Errno::NOSYS => err.with_kind(ErrorKind::KernelTooOld {
            feature: "mount_setattr",
            since: "5.12",
        }),
        Errno::BUSY => err.with_kind(ErrorKind::Busy),
        Errno::PERM if userns.is_some_and(UserNamespace::is_initial) => {
            err.with_kind(ErrorKind::InitialUserns)
        }
        Errno::INVAL if change.changes_idmap() => {
            if userns.is_some_and(UserNamespace::lacks_map) {
                err.with_kind(ErrorKind::UsernsMissingMap)
            } else {
                err.with_kind(ErrorKind::NotSupported {
                    fs: fs.display().to_string(),
                })
            }
        }
        _ => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(calls: &[(AttrChange<'_>, bool)]) -> Vec<(u64, u64, bool)> {
        calls
            .iter()
            .map(|(c, rec)| {
                let raw = c.to_raw().unwrap();
                (raw.attr_set, raw.attr_clr, *rec)
            })
            .collect()
    }

    #[test]
    fn scopes_become_calls_recursive_first() {
        let ro = MountAttrFlags::RDONLY.bits();
        let nosuid = MountAttrFlags::NOSUID.bits();
        // OCI rbind + rro + nosuid: one recursive call, one for the top.
        let attr = MountAttr::new()
            .set_recursive(MountAttrFlags::RDONLY)
            .set(MountAttrFlags::NOSUID);
        assert_eq!(
            bits(&attr.calls(true).unwrap()),
            vec![(ro, 0, true), (nosuid, 0, false)]
        );
        // Without submounts both scopes are one mount: one call, top wins.
        let attr = MountAttr::new()
            .set_recursive(MountAttrFlags::RDONLY)
            .clear(MountAttrFlags::RDONLY);
        assert_eq!(bits(&attr.calls(false).unwrap()), vec![(0, ro, false)]);
        // Only one scope used: only one call.
        let attr = MountAttr::new().set(MountAttrFlags::RDONLY);
        assert_eq!(bits(&attr.calls(true).unwrap()), vec![(ro, 0, false)]);
        assert!(MountAttr::new().calls(true).unwrap().is_empty());
    }

    #[test]
    fn idmap_twice_and_reserved_bits_are_refused_before_any_call() {
        let attr = MountAttr::new().clear_idmap().clear_idmap_recursive();
        assert!(matches!(
            attr.calls(true).unwrap_err().kind(),
            ErrorKind::InvalidInput(_)
        ));
        let bad = MountAttrFlags::from_bits_retain(libc::MOUNT_ATTR_IDMAP);
        let attr = MountAttr::new().set_recursive(bad);
        assert!(matches!(
            attr.calls(true).unwrap_err().kind(),
            ErrorKind::InvalidInput(_)
        ));
    }

    #[test]
    fn new_filesystem_options_keep_order_and_values() {
        let fs = NewFilesystem::tmpfs()
            .parse_options("size=16m,noswap,mode=0750")
            .unwrap()
            .nr_inodes(1024)
            .uid(0)
            .gid(100)
            .mode(0o1777);
        assert_eq!(
            fs.options_text(),
            "size=16m,noswap,mode=0750,nr_inodes=1024,uid=0,gid=100,mode=01777"
        );
        assert_eq!(fs.options()[1], ("noswap".to_string(), None));
        assert!(NewFilesystem::tmpfs().parse_options("a,,b").is_err());
        assert!(NewFilesystem::tmpfs().parse_options("=x").is_err());
        assert!(NewFilesystem::tmpfs()
            .parse_options("")
            .unwrap()
            .options()
            .is_empty());
    }

    #[test]
    fn clone_flags_are_the_open_tree_bits() {
        assert_eq!(CloneFlags::RECURSIVE.bits(), libc::AT_RECURSIVE as u32);
        assert_eq!(
            (CloneFlags::NO_FOLLOW | CloneFlags::NO_AUTOMOUNT).names(),
            "OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC|AT_SYMLINK_NOFOLLOW|AT_NO_AUTOMOUNT"
        );
    }
}
