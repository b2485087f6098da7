//! Detached mounts: clone a tree (`open_tree`), set its attributes and idmap
//! (`mount_setattr`, or `open_tree_attr` in one call on Linux >= 6.15), and
//! attach it (`move_mount`).
//!
//! A [`DetachedMount`] owns the fd of a mount tree that is not attached
//! anywhere; dropping it unmounts the tree. [`DetachedMount::attach`]
//! consumes it, so a mount cannot be attached twice or changed after.
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
use crate::mountinfo;
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
}

impl CloneMethod {
    /// The calls, as a runtime would log them: `open_tree_attr` or `open_tree+mount_setattr`.
    pub fn syscalls(self) -> &'static str {
        match self {
            CloneMethod::OpenTree => "open_tree+mount_setattr",
            CloneMethod::OpenTreeAttr => "open_tree_attr",
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
            classify(err, e, &self.source, change, true)
        })
    }

    /// Attach the tree at `target` (`move_mount(MOVE_MOUNT_F_EMPTY_PATH)`).
    /// `target` must be a directory for a directory tree, a file for a file.
    /// On failure nothing is mounted: the tree is dropped and unmounted.
    ///
    /// `target` is resolved in the caller's mount namespace and symlinks in
    /// its components are followed: never use it for a path inside a root
    /// filesystem a container can write to.
    ///
    /// # References
    /// - [`move_mount(2)`](https://man7.org/linux/man-pages/man2/move_mount.2.html)
    #[doc(alias = "move_mount")]
    pub fn attach(self, target: impl AsRef<Path>) -> Result<()> {
        self.attach_at(CWD, target)
    }

    /// [`attach`](Self::attach) with `target` relative to `dirfd`.
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
/// gives the mapping itself. Older kernels: the `idmapped` option in
/// `/proc/self/mountinfo` tells only *whether* it is idmapped.
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
    let entry = mountinfo::entry_of(path).ok_or_else(|| {
        Error::new(ErrorKind::InvalidInput(format!(
            "{path:?} is not on a mount listed in /proc/self/mountinfo"
        )))
        .with_path(path)
    })?;
    Ok(if entry.is_idmapped() {
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
            } else if detached && source_is_idmapped(source) {
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
    fn clone_flags_are_the_open_tree_bits() {
        assert_eq!(CloneFlags::RECURSIVE.bits(), libc::AT_RECURSIVE as u32);
        assert_eq!(
            (CloneFlags::NO_FOLLOW | CloneFlags::NO_AUTOMOUNT).names(),
            "OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC|AT_SYMLINK_NOFOLLOW|AT_NO_AUTOMOUNT"
        );
    }
}
