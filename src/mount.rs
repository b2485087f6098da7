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

use crate::error::{Error, ErrorKind, Result};
use crate::map::Mapping;
use crate::mountinfo;
use crate::probe::{self, Availability};
use crate::sys::{self, RawMountAttr};
use crate::userns::UserNamespace;

bitflags! {
    /// Mount attributes (`MOUNT_ATTR_*`), 64 bits wide like `struct mount_attr`.
    ///
    /// The idmap and the atime mode have their own setters on [`MountAttr`]
    /// because they are not plain on/off bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MountFlags: u64 {
        /// `MOUNT_ATTR_RDONLY`: read-only.
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

/// Bits a caller may not put in [`MountFlags`]: they have dedicated setters.
const RESERVED_BITS: u64 = libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR__ATIME;

/// Access-time mode (`MOUNT_ATTR__ATIME` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Atime {
    /// `MOUNT_ATTR_RELATIME`: update atime only when older than mtime/ctime.
    Relative,
    /// `MOUNT_ATTR_NOATIME`: never update atime.
    None,
    /// `MOUNT_ATTR_STRICTATIME`: always update atime.
    Strict,
}

impl Atime {
    fn bits(self) -> u64 {
        match self {
            Atime::Relative => libc::MOUNT_ATTR_RELATIME,
            Atime::None => libc::MOUNT_ATTR_NOATIME,
            Atime::Strict => libc::MOUNT_ATTR_STRICTATIME,
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

/// The attributes to set on a mount: a builder over `struct mount_attr`.
///
/// ```
/// use idmapped::{MountAttr, MountFlags, Propagation};
/// let attr = MountAttr::new()
///     .set(MountFlags::NOSUID | MountFlags::NODEV)
///     .propagation(Propagation::Private);
/// # let _ = attr;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MountAttr<'a> {
    set: MountFlags,
    clear: MountFlags,
    atime: Option<Atime>,
    propagation: Option<Propagation>,
    idmap: IdmapChange<'a>,
}

impl<'a> MountAttr<'a> {
    /// No change.
    pub fn new() -> MountAttr<'a> {
        MountAttr::default()
    }

    /// Turn `flags` on.
    pub fn set(mut self, flags: MountFlags) -> Self {
        self.set |= flags;
        self
    }

    /// Turn `flags` off.
    pub fn clear(mut self, flags: MountFlags) -> Self {
        self.clear |= flags;
        self
    }

    /// Set the access-time mode.
    pub fn atime(mut self, atime: Atime) -> Self {
        self.atime = Some(atime);
        self
    }

    /// Set the propagation type.
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = Some(propagation);
        self
    }

    /// Idmap the mount with `userns`'s mapping (`MOUNT_ATTR_IDMAP`): a file
    /// stored as on-disk id A+n is seen as B+n for each line `A B N` of the
    /// namespace's maps. On a source that is idmapped already this
    /// *replaces* the idmap, which only [`DetachedMount::clone_with`] can do
    /// (Linux 6.15).
    pub fn idmap(mut self, userns: &'a UserNamespace) -> Self {
        self.idmap = IdmapChange::Set(userns);
        self
    }

    /// Remove the idmap of an idmapped source, so the clone shows on-disk
    /// ids again. Only [`DetachedMount::clone_with`] can do this (Linux 6.15).
    pub fn clear_idmap(mut self) -> Self {
        self.idmap = IdmapChange::Clear;
        self
    }

    /// True when applying this would change nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.clear.is_empty()
            && self.atime.is_none()
            && self.propagation.is_none()
            && matches!(self.idmap, IdmapChange::Keep)
    }

    fn userns(&self) -> Option<&'a UserNamespace> {
        match self.idmap {
            IdmapChange::Set(ns) => Some(ns),
            _ => None,
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
    /// `recursive`, submounts too (`AT_RECURSIVE`), and every later attribute
    /// change applies to all of them.
    ///
    /// # References
    /// - [`open_tree(2)`](https://man7.org/linux/man-pages/man2/open_tree.2.html)
    #[doc(alias = "open_tree")]
    pub fn clone_tree(path: impl AsRef<Path>, recursive: bool) -> Result<DetachedMount> {
        Self::clone_tree_at(CWD, path, recursive)
    }

    /// [`clone_tree`](Self::clone_tree) relative to `dirfd`; an empty `path`
    /// clones the mount `dirfd` itself refers to (`AT_EMPTY_PATH`).
    pub fn clone_tree_at(
        dirfd: impl AsFd,
        path: impl AsRef<Path>,
        recursive: bool,
    ) -> Result<DetachedMount> {
        let path = path.as_ref();
        let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
        if recursive {
            flags |= OpenTreeFlags::AT_RECURSIVE;
        }
        if path.as_os_str().is_empty() {
            flags |= OpenTreeFlags::AT_EMPTY_PATH;
        }
        let fd = rustix::mount::open_tree(dirfd.as_fd(), path, flags).map_err(|e| {
            let err = Error::sys(
                "open_tree",
                format!(
                    "{:?}, {}",
                    path,
                    flag_names(recursive, "OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC")
                ),
                e,
            )
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
            recursive,
            source: path.to_path_buf(),
        })
    }

    /// Clone `path` and apply `attr` to the clone in one step.
    ///
    /// On Linux >= 6.15 this is one `open_tree_attr` call: the fd never exists
    /// without its attributes, and an idmap can *replace* or *clear* the idmap
    /// of a source that is idmapped already. Older kernels get `open_tree`
    /// followed by `mount_setattr` (with `AT_RECURSIVE` in both calls when
    /// `recursive`); which one is used is probed once and cached.
    #[doc(alias = "open_tree_attr")]
    pub fn clone_with(
        path: impl AsRef<Path>,
        recursive: bool,
        attr: &MountAttr<'_>,
    ) -> Result<DetachedMount> {
        let path = path.as_ref();
        let raw = attr.to_raw()?;
        // A plain bind-style clone needs neither newer call: Linux 5.2 suffices.
        if attr.is_empty() {
            return DetachedMount::clone_tree(path, recursive);
        }
        if probe::features().open_tree_attr == Availability::Available {
            let cp = cpath(path)?;
            let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | at_flags(recursive);
            return match sys::open_tree_attr(CWD, &cp, flags, Some(&raw)) {
                Ok(fd) => Ok(DetachedMount {
                    fd,
                    method: CloneMethod::OpenTreeAttr,
                    recursive,
                    source: path.to_path_buf(),
                }),
                Err(e) => {
                    let err = Error::sys(
                        "open_tree_attr",
                        format!(
                            "{:?}, {}, {}",
                            path,
                            flag_names(recursive, "OPEN_TREE_CLONE|OPEN_TREE_CLOEXEC"),
                            describe(&raw)
                        ),
                        e,
                    )
                    .with_path(path);
                    Err(diagnose(err, e, path, recursive, attr, true))
                }
            };
        }
        if matches!(attr.idmap, IdmapChange::Clear) {
            return Err(Error::new(ErrorKind::KernelTooOld {
                feature: "open_tree_attr (clearing an idmap)",
                since: "6.15",
            })
            .with_path(path));
        }
        let mut mount = DetachedMount::clone_tree(path, recursive)?;
        mount.set_attr(attr)?;
        Ok(mount)
    }

    /// Change the attributes of this detached tree (`mount_setattr` with
    /// `AT_EMPTY_PATH`, plus `AT_RECURSIVE` when the tree was cloned recursively).
    ///
    /// # References
    /// - [`mount_setattr(2)`](https://man7.org/linux/man-pages/man2/mount_setattr.2.html)
    #[doc(alias = "mount_setattr")]
    pub fn set_attr(&mut self, attr: &MountAttr<'_>) -> Result<()> {
        let raw = attr.to_raw()?;
        if attr.is_empty() {
            return Ok(());
        }
        let flags = libc::AT_EMPTY_PATH as u32 | at_flags(self.recursive);
        sys::mount_setattr(self.fd.as_fd(), c"", flags, &raw).map_err(|e| {
            let err = Error::sys(
                "mount_setattr",
                format!(
                    "fd {}, \"\", {}, {}",
                    rustix::fd::AsRawFd::as_raw_fd(&self.fd),
                    flag_names(self.recursive, "AT_EMPTY_PATH"),
                    describe(&raw)
                ),
                e,
            )
            .with_path(&self.source);
            diagnose(err, e, &self.source, self.recursive, attr, true)
        })
    }

    /// Attach the tree at `target` (`move_mount(MOVE_MOUNT_F_EMPTY_PATH)`).
    /// `target` must be a directory for a directory tree, a file for a file.
    /// On failure nothing is mounted: the tree is dropped and unmounted.
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

    /// Whether submounts were cloned (and attribute changes are recursive).
    pub fn is_recursive(&self) -> bool {
        self.recursive
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

/// Apply `attr` to the mount attached at `path` (`mount_setattr` on a path).
/// Useful for read-only/nosuid/propagation changes in place; an idmap is
/// always refused here ([`ErrorKind::NotDetached`]): the kernel idmaps only
/// detached mounts.
pub fn set_attr_at_path(
    path: impl AsRef<Path>,
    recursive: bool,
    attr: &MountAttr<'_>,
) -> Result<()> {
    let path = path.as_ref();
    let raw = attr.to_raw()?;
    let cp = cpath(path)?;
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
        diagnose(err, e, path, recursive, attr, false)
    })
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
    if probe::features().statmount_idmap == Availability::Available {
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
/// hit. The kernel says EINVAL or EPERM for many reasons; we re-check the
/// candidates in the kernel's own order (DESIGN: "When MOUNT_ATTR_IDMAP is
/// refused").
fn diagnose(
    err: Error,
    errno: Errno,
    source: &Path,
    recursive: bool,
    attr: &MountAttr<'_>,
    detached: bool,
) -> Error {
    let userns = attr.userns();
    let idmapping = !matches!(attr.idmap, IdmapChange::Keep);
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
                return err.with_kind(ErrorKind::NotDetached);
            }
            if userns.is_some_and(UserNamespace::lacks_map) {
                return err.with_kind(ErrorKind::UsernsMissingMap);
            }
            // Which mount of the tree cannot be idmapped? Probe each one on
            // its own with a namespace known to be good.
            if let Ok(Some((mount, probe::Reason::Filesystem { fs }))) =
                probe::first_unsupported(source, recursive)
            {
                return err
                    .with_path(mount)
                    .with_kind(ErrorKind::NotSupported { fs });
            }
            match userns {
                // Every mount can be idmapped with our namespace, so the
                // caller's namespace is the problem.
                Some(ns) if ns.mapping().is_some() => {
                    err.with_kind(ErrorKind::UsernsOwnsFilesystem)
                }
                Some(_) => err.with_kind(ErrorKind::UsernsMissingMap),
                None => err,
            }
        }
        _ => err,
    }
}

/// Whether the mount `path` is on is idmapped already.
fn source_is_idmapped(path: &Path) -> bool {
    matches!(read_idmap(path), Ok(IdmapReadback::Idmapped(_)))
}
