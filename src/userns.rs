//! User namespaces as owned file descriptors: made from a [`Mapping`], opened
//! from a path such as `/proc/PID/ns/user`, or adopted from an fd.
//!
//! There is no system call that makes a user namespace from a mapping: a
//! process has to live in the new namespace while its parent writes
//! `/proc/PID/uid_map` and `gid_map`, then the parent opens
//! `/proc/PID/ns/user` and the process can go. We create that process with
//! `clone(CLONE_NEWUSER | CLONE_VM)` on a 16 KiB stack, so the cost does not
//! grow with the caller's resident memory the way `fork()` does, and we kill
//! and reap it before returning, on every path.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result};
use crate::map::{IdMap, Mapping};
use crate::sys;

/// What we know about a namespace's maps.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Maps {
    /// Both maps, as written by us or read from `/proc/PID/{uid,gid}_map`.
    Known(Mapping),
    /// The uid map or the gid map is empty (not written yet).
    Missing,
    /// Adopted from an fd: the kernel offers no way to read the maps back.
    Unknown,
}

/// An owned handle to a user namespace (an fd of `/proc/PID/ns/user` kind).
///
/// Pass it to [`MountAttr::idmap`](crate::MountAttr::idmap) to idmap a mount.
/// The namespace lives as long as this handle (or a mount idmapped with it).
#[derive(Debug)]
pub struct UserNamespace {
    fd: OwnedFd,
    maps: Maps,
}

impl UserNamespace {
    /// Create a new user namespace whose uid and gid maps are `mapping`.
    ///
    /// Writes `/proc/PID/setgroups` = `deny` only when the kernel requires it
    /// (a caller without `CAP_SETGID` over the parent namespace). Safe to call
    /// from many threads at once. Needs `CAP_SETUID` and `CAP_SETGID` (or a
    /// mapping of the caller's own ids only).
    ///
    /// # References
    /// - [`user_namespaces(7)`](https://man7.org/linux/man-pages/man7/user_namespaces.7.html)
    #[doc(alias = "CLONE_NEWUSER")]
    pub fn from_mapping(mapping: &Mapping) -> Result<UserNamespace> {
        let child = sys::ParkedChild::spawn().map_err(|e| {
            Error::sys("clone", "CLONE_NEWUSER|CLONE_VM", e).with_kind(match e {
                Errno::PERM | Errno::ACCESS => ErrorKind::PermissionDenied,
                _ => ErrorKind::Process(format!("cannot create a user namespace: {e}")),
            })
        })?;
        let proc_dir = PathBuf::from(format!("/proc/{}", child.pid()));
        write_map(&proc_dir.join("uid_map"), mapping.uids())?;
        match write_map(&proc_dir.join("gid_map"), mapping.gids()) {
            Err(e) if e.errno() == Some(Errno::PERM) => {
                // Without CAP_SETGID in the parent namespace the kernel
                // accepts a gid map only after setgroups(2) is disabled.
                write_once(&proc_dir.join("setgroups"), b"deny")?;
                write_map(&proc_dir.join("gid_map"), mapping.gids())?;
            }
            other => other?,
        }
        let ns_path = proc_dir.join("ns/user");
        let fd = open_ns(&ns_path)?;
        drop(child);
        Ok(UserNamespace {
            fd,
            maps: Maps::Known(mapping.clone()),
        })
    }

    /// Open an existing user namespace by path, e.g. `/proc/PID/ns/user` or a
    /// bind mount of one. Fails with [`ErrorKind::NotUserns`] for any other file.
    ///
    /// For a `/proc/PID/ns/user` path the maps are read from
    /// `/proc/PID/{uid,gid}_map`, so [`mapping`](Self::mapping) can report them.
    pub fn open(path: impl AsRef<Path>) -> Result<UserNamespace> {
        let path = path.as_ref();
        let fd = open_ns(path)?;
        check_is_userns(fd.as_fd()).map_err(|e| e.with_path(path))?;
        let maps = match proc_pid_dir(path) {
            Some(dir) => read_maps(&dir, fd.as_fd()),
            None => Maps::Unknown,
        };
        Ok(UserNamespace { fd, maps })
    }

    /// Adopt an fd that must refer to a user namespace (checked with
    /// `ioctl(NS_GET_NSTYPE)`; [`ErrorKind::NotUserns`] otherwise).
    pub fn from_fd(fd: OwnedFd) -> Result<UserNamespace> {
        check_is_userns(fd.as_fd())?;
        Ok(UserNamespace {
            fd,
            maps: Maps::Unknown,
        })
    }

    /// The mapping, when known: always for namespaces made by
    /// [`from_mapping`](Self::from_mapping), for `/proc/PID/ns/user` paths
    /// when both maps were written, never for adopted fds.
    pub fn mapping(&self) -> Option<&Mapping> {
        match &self.maps {
            Maps::Known(m) => Some(m),
            _ => None,
        }
    }

    /// True when the namespace is known to lack a uid or a gid map.
    pub fn lacks_map(&self) -> bool {
        self.maps == Maps::Missing
    }

    /// True for the initial user namespace (which cannot idmap a mount).
    pub fn is_initial(&self) -> bool {
        rustix::fs::fstat(&self.fd)
            .map(|st| st.st_ino == sys::PROC_USER_INIT_INO)
            .unwrap_or(false)
    }
}

impl AsFd for UserNamespace {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<UserNamespace> for OwnedFd {
    fn from(ns: UserNamespace) -> OwnedFd {
        ns.fd
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
        Error::sys("open", format!("{:?}, O_RDONLY|O_CLOEXEC", path), e).with_path(path)
    })
}

fn check_is_userns(fd: BorrowedFd<'_>) -> Result<()> {
    match sys::ns_get_nstype(fd) {
        Ok(t) if t == libc::CLONE_NEWUSER => Ok(()),
        // Another namespace type: report which, for the confused caller.
        Ok(t) => Err(
            Error::sys("ioctl", format!("NS_GET_NSTYPE = {t:#x}"), Errno::INVAL)
                .with_kind(ErrorKind::NotUserns),
        ),
        // ENOTTY: not a namespace file at all.
        Err(e) => Err(Error::sys("ioctl", "NS_GET_NSTYPE", e).with_kind(ErrorKind::NotUserns)),
    }
}

/// Write one map in a single `write(2)`, as the kernel requires.
fn write_map(path: &Path, map: &IdMap) -> Result<()> {
    write_once(path, map.to_proc_string().as_bytes())
}

fn write_once(path: &Path, data: &[u8]) -> Result<()> {
    let fail = |e: std::io::Error| {
        let errno = Errno::from_io_error(&e).unwrap_or(Errno::IO);
        Error::sys(
            "write",
            format!("{:?}, {:?}", path, String::from_utf8_lossy(data)),
            errno,
        )
        .with_path(path)
    };
    let mut f = File::options().write(true).open(path).map_err(fail)?;
    let n = f.write(data).map_err(fail)?;
    if n != data.len() {
        return Err(fail(std::io::Error::from(IoErrorKind::WriteZero)));
    }
    Ok(())
}

/// `/proc/PID` for a path of the form `/proc/PID/ns/user`.
fn proc_pid_dir(path: &Path) -> Option<PathBuf> {
    let mut parts = path.components().map(|c| c.as_os_str().to_str());
    let (root, proc_, pid, ns, user) = (
        parts.next()??,
        parts.next()??,
        parts.next()??,
        parts.next()??,
        parts.next()??,
    );
    let shape_ok = root == "/" && proc_ == "proc" && ns == "ns" && user == "user";
    (shape_ok && parts.next().is_none() && (pid == "self" || pid.parse::<u32>().is_ok()))
        .then(|| PathBuf::from(format!("/proc/{pid}")))
}

/// Read `/proc/PID/{uid,gid}_map`, then check the namespace is still the one
/// we opened (the pid could have been recycled in between).
fn read_maps(dir: &Path, opened: BorrowedFd<'_>) -> Maps {
    let read = |name: &str| -> Option<String> {
        let mut s = String::new();
        File::open(dir.join(name))
            .ok()?
            .read_to_string(&mut s)
            .ok()?;
        Some(s)
    };
    let (Some(u), Some(g)) = (read("uid_map"), read("gid_map")) else {
        return Maps::Unknown;
    };
    let same_ns = match (
        rustix::fs::stat(dir.join("ns/user")),
        rustix::fs::fstat(opened),
    ) {
        (Ok(a), Ok(b)) => a.st_ino == b.st_ino && a.st_dev == b.st_dev,
        _ => false,
    };
    if !same_ns {
        return Maps::Unknown;
    }
    if u.trim().is_empty() || g.trim().is_empty() {
        return Maps::Missing;
    }
    match (IdMap::parse_proc(&u), IdMap::parse_proc(&g)) {
        (Ok(u), Ok(g)) => Maps::Known(Mapping::new(u, g)),
        _ => Maps::Unknown,
    }
}

/// A cache of user namespaces keyed by mapping, so a runtime that makes many
/// mounts for one pod creates one namespace. Keys compare mappings in
/// canonical form: the order of extents does not matter.
#[derive(Debug, Default)]
pub struct UsernsCache {
    entries: Mutex<HashMap<Mapping, Arc<UserNamespace>>>,
}

impl UsernsCache {
    /// An empty cache.
    pub fn new() -> UsernsCache {
        UsernsCache::default()
    }

    /// The namespace for `mapping`, created on first use.
    ///
    /// Creation happens under the cache's lock, so two threads asking for the
    /// same mapping at once get the same namespace.
    pub fn get(&self, mapping: &Mapping) -> Result<Arc<UserNamespace>> {
        let key = mapping.canonical();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ns) = entries.get(&key) {
            return Ok(Arc::clone(ns));
        }
        let ns = Arc::new(UserNamespace::from_mapping(&key)?);
        entries.insert(key, Arc::clone(&ns));
        Ok(ns)
    }

    /// How many namespaces the cache holds.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// True when the cache holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop every cached namespace (mounts idmapped with them keep theirs alive).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_pid_dir_shapes() {
        assert_eq!(
            proc_pid_dir(Path::new("/proc/42/ns/user")),
            Some(PathBuf::from("/proc/42"))
        );
        assert_eq!(
            proc_pid_dir(Path::new("/proc/self/ns/user")),
            Some(PathBuf::from("/proc/self"))
        );
        assert_eq!(proc_pid_dir(Path::new("/proc/42/ns/mnt")), None);
        assert_eq!(proc_pid_dir(Path::new("/run/ns/user")), None);
        assert_eq!(proc_pid_dir(Path::new("proc/42/ns/user")), None);
        assert_eq!(proc_pid_dir(Path::new("/proc/x/ns/user")), None);
    }
}
