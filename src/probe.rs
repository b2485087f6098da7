//! What this kernel can do, and whether a given path can be idmapped — and
//! if not, why.
//!
//! Kernel features are probed once per process by calling each system call
//! with arguments it must reject, and telling ENOSYS (missing), EPERM
//! (blocked, e.g. by seccomp) and anything else (present) apart. Per-path
//! support is probed for real: clone the mount and idmap the never-attached
//! clone. The verdict of a filesystem instance cannot change, so it is cached
//! per superblock; a refusal for lack of privilege is never cached.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustix::fs::{AtFlags, StatxFlags, CWD};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result};
use crate::features::{features, Availability};
use crate::map::{IdMap, Mapping};
use crate::mount::{CloneFlags, DetachedMount};
use crate::sys;
use crate::userns::UserNamespace;

/// Whether a path can be idmapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// A clone of the mount was idmapped successfully.
    Supported,
    /// It cannot be; the reason says why.
    Unsupported(Reason),
}

/// Why a path cannot be idmapped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// The kernel lacks `mount_setattr` (Linux < 5.12).
    KernelTooOld {
        /// The missing system call.
        feature: &'static str,
        /// First release that has it.
        since: &'static str,
    },
    /// The filesystem does not allow idmapped mounts on this kernel.
    Filesystem {
        /// Its type, e.g. `tmpfs`.
        fs: String,
    },
    /// The caller lacks `CAP_SYS_ADMIN`, or a policy blocks the calls.
    PermissionDenied,
    /// The mount is idmapped already (cloning it with a new idmap needs `open_tree_attr`).
    AlreadyIdmapped,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::KernelTooOld { feature, since } => {
                write!(f, "the kernel lacks {feature} (Linux {since} or later)")
            }
            Reason::Filesystem { fs } => {
                write!(f, "filesystem type {fs} does not support idmapped mounts on this kernel")
            }
            Reason::PermissionDenied => {
                f.write_str("permission denied (CAP_SYS_ADMIN needed, or blocked by a security policy)")
            }
            Reason::AlreadyIdmapped => f.write_str(
                "the mount is idmapped already and this kernel cannot replace an idmap (Linux 6.15)",
            ),
        }
    }
}

impl From<Reason> for ErrorKind {
    fn from(r: Reason) -> ErrorKind {
        match r {
            Reason::KernelTooOld { feature, since } => ErrorKind::KernelTooOld { feature, since },
            Reason::Filesystem { fs } => ErrorKind::NotSupported { fs },
            Reason::PermissionDenied => ErrorKind::PermissionDenied,
            Reason::AlreadyIdmapped => ErrorKind::AlreadyIdmapped,
        }
    }
}

/// Filesystem instance key: the superblock's device number and its magic
/// (`statfs.f_type`). Anonymous device numbers (tmpfs, proc, ...) are
/// recycled after an unmount; with the magic in the key a recycled number
/// can only meet a filesystem of the same type, whose verdict is the same
/// (`FS_ALLOW_IDMAP` is a property of the type). FUSE is the exception —
/// each daemon opts in or not — so FUSE verdicts are not cached.
type SuperblockKey = (u32, u32, u64);

/// `FUSE_SUPER_MAGIC`.
const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;

fn cache() -> &'static Mutex<HashMap<SuperblockKey, Support>> {
    static CACHE: OnceLock<Mutex<HashMap<SuperblockKey, Support>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The namespace the probes idmap with: made once, kept for the process.
fn probe_userns() -> Result<Arc<UserNamespace>> {
    static NS: Mutex<Option<Arc<UserNamespace>>> = Mutex::new(None);
    let mut slot = NS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ns) = slot.as_ref() {
        return Ok(Arc::clone(ns));
    }
    let map = IdMap::identity(0, 65536)?;
    let ns = Arc::new(UserNamespace::from_mapping(&Mapping::new(
        map.clone(),
        map,
    ))?);
    *slot = Some(Arc::clone(&ns));
    Ok(ns)
}

/// Can the mount at `path` be idmapped? A real probe: clone the mount (not
/// its submounts) and idmap the clone, which is never attached and is
/// dropped at once. Needs `CAP_SYS_ADMIN`; without it the answer is
/// `Unsupported(PermissionDenied)`.
///
/// Errors only when `path` itself cannot be looked up.
pub fn idmap_support(path: impl AsRef<Path>) -> Result<Support> {
    support_of(path.as_ref(), None)
}

/// [`idmap_support`], with whether the mount is idmapped already when the
/// caller read it from the mount table (so it is not looked up again).
fn support_of(path: &Path, known_idmapped: Option<bool>) -> Result<Support> {
    let st = rustix::fs::statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS)
        .map_err(|e| Error::sys("statx", format!("{path:?}"), e).with_path(path))?;
    let magic = rustix::fs::statfs(path)
        .map_err(|e| Error::sys("statfs", format!("{path:?}"), e).with_path(path))?
        .f_type as u64;
    let key = (st.stx_dev_major, st.stx_dev_minor, magic);
    let replace_idmap = features().open_tree_attr == Availability::Available;
    // Whether the mount is idmapped already is a property of the mount, not
    // of the filesystem: checked every time, never cached. Only
    // `open_tree_attr` can give an idmapped source a new idmap.
    // A mount table that cannot be read is an error, not "not idmapped".
    if !replace_idmap {
        let idmapped = match known_idmapped {
            Some(b) => b,
            None => crate::mount::read_idmap(path)?.is_idmapped(),
        };
        if idmapped {
            return Ok(Support::Unsupported(Reason::AlreadyIdmapped));
        }
    }
    if let Some(s) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(s.clone());
    }
    if features().mount_setattr == Availability::Missing {
        return Ok(Support::Unsupported(Reason::KernelTooOld {
            feature: "mount_setattr",
            since: "5.12",
        }));
    }
    let ns = match probe_userns() {
        Ok(ns) => ns,
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied) => {
            return Ok(Support::Unsupported(Reason::PermissionDenied))
        }
        Err(e) => return Err(e),
    };
    let raw = sys::RawMountAttr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: rustix::fd::AsRawFd::as_raw_fd(&rustix::fd::AsFd::as_fd(&*ns)) as u64,
    };
    // The same rung of the ladder `DetachedMount::clone_with` would take,
    // made with the raw calls: the library's own calls diagnose a refusal
    // by probing, which would recurse.
    let (call, result) = if replace_idmap {
        let cp = crate::mount::cpath(path)?;
        let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
        let r = sys::open_tree_attr(CWD, &cp, flags, Some(&raw)).map(drop);
        ("open_tree_attr", r)
    } else {
        let clone = match DetachedMount::clone_tree(path, CloneFlags::empty()) {
            Ok(m) => m,
            Err(e) if e.errno() == Some(Errno::PERM) => {
                return Ok(Support::Unsupported(Reason::PermissionDenied))
            }
            Err(e) => return Err(e),
        };
        let fd = rustix::fd::AsFd::as_fd(&clone);
        let r = sys::mount_setattr(fd, c"", libc::AT_EMPTY_PATH as u32, &raw);
        ("mount_setattr", r)
    };
    let verdict = match result {
        Ok(()) => Support::Supported,
        Err(Errno::NOSYS) => Support::Unsupported(Reason::KernelTooOld {
            feature: "mount_setattr",
            since: "5.12",
        }),
        Err(Errno::INVAL) => Support::Unsupported(Reason::Filesystem { fs: fs_type(path) }),
        Err(Errno::PERM | Errno::ACCESS) => {
            return Ok(Support::Unsupported(Reason::PermissionDenied))
        }
        Err(e) => {
            return Err(
                Error::sys(call, format!("clone of {path:?}, {{attr_set: IDMAP}}"), e)
                    .with_path(path),
            )
        }
    };
    if magic != FUSE_SUPER_MAGIC {
        cache()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, verdict.clone());
    }
    Ok(verdict)
}

/// The filesystem type of the mount `path` is on, as the mount table names
/// it (`ext4`, `tmpfs`, `fuse.sshfs`, ...); `unknown` when it cannot be
/// found. A label for messages: decisions never rest on it.
pub fn fs_type(path: impl AsRef<Path>) -> String {
    crate::mounttable::mount_of(path.as_ref())
        .map(|e| e.fs_type)
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The first mount of the tree at `path` that cannot be idmapped, with the
/// reason: `path`'s own mount, then (with `recursive`) every submount below
/// `path`, parents first — what a recursive idmap would trip over, since the
/// kernel idmaps a tree all or nothing. `None` when every mount can be.
///
/// With `recursive`, the whole tree is probed first with one recursive
/// clone, idmapped recursively (what the real call does; the kernel copies
/// only the subtree, so this costs the same however many other mounts the
/// namespace holds). Only if that is refused is the subtree listed
/// (`listmount`/`statmount` on Linux >= 6.8, else mountinfo) to name the
/// mount that blocks it; a table that cannot be read is then an error,
/// never "no submounts".
pub fn first_unsupported(
    path: impl AsRef<Path>,
    recursive: bool,
) -> Result<Option<(PathBuf, Reason)>> {
    let path = path.as_ref();
    if let Support::Unsupported(reason) = idmap_support(path)? {
        return Ok(Some((path.to_path_buf(), reason)));
    }
    if !recursive || whole_tree_idmaps(path)? {
        return Ok(None);
    }
    let tree = crate::mounttable::subtree(path)?;
    for m in tree.into_iter().skip(1) {
        if let Support::Unsupported(reason) = support_of(&m.mount_point, Some(m.idmapped))? {
            return Ok(Some((m.mount_point, reason)));
        }
    }
    Ok(None)
}

/// One probe of the whole tree at `path`: a recursive clone idmapped
/// recursively with the probe namespace, never attached, dropped at once.
/// `false` when the kernel refused (the caller then finds out which mount).
fn whole_tree_idmaps(path: &Path) -> Result<bool> {
    let ns = match probe_userns() {
        Ok(ns) => ns,
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied) => return Ok(false),
        Err(e) => return Err(e),
    };
    let raw = sys::RawMountAttr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: rustix::fd::AsRawFd::as_raw_fd(&rustix::fd::AsFd::as_fd(&*ns)) as u64,
    };
    let result = if features().open_tree_attr == Availability::Available {
        let cp = crate::mount::cpath(path)?;
        let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
        sys::open_tree_attr(CWD, &cp, flags, Some(&raw)).map(drop)
    } else {
        let clone = match DetachedMount::clone_tree(path, CloneFlags::RECURSIVE) {
            Ok(m) => m,
            Err(e) if e.errno() == Some(Errno::PERM) => return Ok(false),
            Err(e) => return Err(e),
        };
        let fd = rustix::fd::AsFd::as_fd(&clone);
        let flags = libc::AT_EMPTY_PATH as u32 | libc::AT_RECURSIVE as u32;
        sys::mount_setattr(fd, c"", flags, &raw)
    };
    Ok(result.is_ok())
}

/// Whether the idmap attribute can be set on `path`'s mount, as an
/// [`Error`] for callers that want `?`: `Ok(())` when supported.
pub fn require_idmap_support(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    match idmap_support(path)? {
        Support::Supported => Ok(()),
        Support::Unsupported(reason) => Err(Error::new(reason.into()).with_path(path)),
    }
}

/// Narrow down a refusal from the mount calls: for
/// [`ErrorKind::IdmapRefused`] (the kernel's bare `EINVAL`), find the first
/// mount of the tree at `source` (with `recursive`, its submounts too) that
/// cannot be idmapped and return [`ErrorKind::NotSupported`] naming it and
/// its filesystem type; if every mount can be idmapped with a namespace of
/// our own, the caller's namespace owns the filesystem
/// ([`ErrorKind::UsernsOwnsFilesystem`]). Other errors are returned as they are.
///
/// Side effects, which is why the mount calls never do this themselves: it
/// makes (once per process) a user namespace of its own for probing, and
/// clones each mount of the tree, idmaps the clone and drops it — nothing is
/// ever attached. Verdicts are cached per filesystem as in [`idmap_support`].
pub fn diagnose(err: Error, source: impl AsRef<Path>, recursive: bool) -> Error {
    if !matches!(err.kind(), ErrorKind::IdmapRefused) {
        return err;
    }
    match first_unsupported(source.as_ref(), recursive) {
        Ok(Some((mount, Reason::Filesystem { fs }))) => err
            .with_path(mount)
            .with_kind(ErrorKind::NotSupported { fs }),
        Ok(None) => err.with_kind(ErrorKind::UsernsOwnsFilesystem),
        _ => err,
    }
}
