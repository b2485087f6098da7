//! User namespaces as owned file descriptors: made from a [`Mapping`], opened
//! from a path such as `/proc/PID/ns/user`, taken from a pidfd, or adopted
//! from an fd.
//!
//! There is no system call that makes a user namespace from a mapping: a
//! process has to live in the new namespace while its parent writes its
//! `uid_map` and `gid_map`, then the parent takes a namespace fd and the
//! process can go. We create that process with `clone(CLONE_NEWUSER |
//! CLONE_VM | CLONE_PIDFD)` on a 16 KiB stack, so the cost does not grow
//! with the caller's resident memory the way `fork()` does; it dies with its
//! caller (`PR_SET_PDEATHSIG`), and we kill and reap it through its pidfd
//! before returning, on every path. Every procfs file is reached through the
//! crate's verified procfs handle, and checked to belong to our helper (its
//! pidfd says it has not been reaped, so its pid was not recycled).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result};
use crate::features::{self, Availability};
use crate::map::{IdMap, Mapping};
use crate::procfs::{self, Base, Procfs};
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

fn helper_error(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Process(what.into()))
}

impl UserNamespace {
    /// Create a new user namespace whose uid and gid maps are `mapping`.
    ///
    /// Writes `setgroups` = `deny` only when the kernel requires it (a caller
    /// without `CAP_SETGID` over the parent namespace). Safe to call from
    /// many threads at once. Needs `CAP_SETUID` and `CAP_SETGID` (or a
    /// mapping of the caller's own ids only).
    ///
    /// If the caller is killed at any point, the helper process dies with it
    /// (`PR_SET_PDEATHSIG(SIGKILL)`, with the race against a parent that
    /// dies first closed): nothing is left holding the caller's memory or the
    /// namespace.
    ///
    /// # References
    /// - [`user_namespaces(7)`](https://man7.org/linux/man-pages/man7/user_namespaces.7.html)
    #[doc(alias = "CLONE_NEWUSER")]
    pub fn from_mapping(mapping: &Mapping) -> Result<UserNamespace> {
        let proc = procfs::handle()?;
        let f = features::features();
        let child = sys::ParkedChild::spawn(
            f.pidfd_send_signal == Availability::Available,
            f.waitid_pidfd == Availability::Available,
        )
        .map_err(|e| {
            Error::sys("clone", "CLONE_NEWUSER|CLONE_VM|CLONE_PIDFD", e).with_kind(match e {
                Errno::PERM | Errno::ACCESS => ErrorKind::PermissionDenied,
                _ => ErrorKind::Process(format!("cannot create a user namespace: {e}")),
            })
        })?;
        let pid = child.pid() as u32;
        // Open, then check the helper is unreaped: what we opened is its.
        let open_checked = |name: &str| -> Result<OwnedFd> {
            let fd = proc.open(Base::Pid(pid), name, OFlags::WRONLY)?;
            if !child.is_unreaped() {
                return Err(helper_error(format!(
                    "the namespace helper (pid {pid}) was reaped by another waiter of this process"
                )));
            }
            Ok(fd)
        };
        write_map(&open_checked("uid_map")?, pid, "uid_map", mapping.uids())?;
        match write_map(&open_checked("gid_map")?, pid, "gid_map", mapping.gids()) {
            Err(e) if e.errno() == Some(Errno::PERM) => {
                // Without CAP_SETGID in the parent namespace the kernel
                // accepts a gid map only after setgroups(2) is disabled.
                write_once(&open_checked("setgroups")?, pid, "setgroups", b"deny")?;
                write_map(&open_checked("gid_map")?, pid, "gid_map", mapping.gids())?;
            }
            other => other?,
        }
        let fd = match child.pidfd() {
            Some(pidfd)
                if features::features().pidfd_get_user_namespace == Availability::Available =>
            {
                sys::pidfd_get_user_namespace(pidfd).map_err(|e| {
                    Error::sys(
                        "ioctl",
                        format!("pidfd of {pid}, PIDFD_GET_USER_NAMESPACE"),
                        e,
                    )
                })?
            }
            _ => {
                let fd = proc.open_ns(Base::Pid(pid), "user")?;
                if !child.is_unreaped() {
                    return Err(helper_error(format!(
                        "the namespace helper (pid {pid}) was reaped by another waiter of this process"
                    )));
                }
                fd
            }
        };
        drop(child);
        Ok(UserNamespace {
            fd,
            maps: Maps::Known(mapping.clone()),
        })
    }

    /// Open an existing user namespace by path, e.g. `/proc/PID/ns/user` or a
    /// bind mount of one.
    ///
    /// The path is opened with `O_PATH` first, so that nothing is *opened*
    /// before it is known to be a namespace: a FIFO would block, a device's
    /// driver would run. Only a file on nsfs is then re-opened (through the
    /// verified procfs' `fd/` directory) for use. Any other file fails with
    /// [`ErrorKind::NotUserns`], naming the path and what it is: a FIFO, a
    /// device, a regular file, a directory, or a namespace of another type.
    ///
    /// For a `/proc/PID/ns/user` path the maps are read (through the
    /// verified procfs) from that process, so [`mapping`](Self::mapping) can
    /// report them.
    pub fn open(path: impl AsRef<Path>) -> Result<UserNamespace> {
        let path = path.as_ref();
        let opath =
            rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
                Error::sys("open", format!("{path:?}, O_PATH|O_CLOEXEC"), e).with_path(path)
            })?;
        let proc = procfs::handle()?;
        let fd = usable_ns_fd(proc, opath.as_fd(), &format!("{path:?}"))
            .map_err(|e| e.with_path(path))?;
        let maps = match proc_pid_of(path) {
            Some(pid) => read_maps(proc, pid, fd.as_fd(), None),
            None => Maps::Unknown,
        };
        Ok(UserNamespace { fd, maps })
    }

    /// The user namespace of the process `pidfd` refers to (a pidfd from
    /// `pidfd_open(2)` or `CLONE_PIDFD`).
    ///
    /// Linux >= 6.11: `ioctl(PIDFD_GET_USER_NAMESPACE)`. Before: the
    /// process's `ns/user` through the verified procfs, by the pid its
    /// pidfd's fdinfo names, then checked against the pidfd
    /// (`pidfd_send_signal(pidfd, 0)` succeeds only while the process is
    /// unreaped, so the pid was not recycled between). A process that has
    /// exited gives [`ErrorKind::NotFound`] (`ESRCH`).
    ///
    /// The maps are read as for [`open`](Self::open), and checked the same way.
    pub fn from_pidfd(pidfd: impl AsFd) -> Result<UserNamespace> {
        let pidfd = pidfd.as_fd();
        let proc = procfs::handle()?;
        let raw = rustix::fd::AsRawFd::as_raw_fd(&pidfd);
        let pid = pidfd_pid(proc, pidfd)?;
        let fd = if features::features().pidfd_get_user_namespace == Availability::Available {
            sys::pidfd_get_user_namespace(pidfd).map_err(|e| {
                let err = Error::sys("ioctl", format!("pidfd {raw}, PIDFD_GET_USER_NAMESPACE"), e);
                if e == Errno::SRCH {
                    // The process has exited (even if not yet reaped).
                    err.with_kind(ErrorKind::NotFound)
                } else {
                    err
                }
            })?
        } else {
            let fd = proc.open_ns(Base::Pid(pid), "user")?;
            check_unreaped(pidfd, pid)?;
            fd
        };
        check_is_userns(fd.as_fd())?;
        let maps = read_maps(proc, pid, fd.as_fd(), Some(pidfd));
        Ok(UserNamespace { fd, maps })
    }

    /// Adopt an fd that must refer to a user namespace (checked with
    /// `ioctl(NS_GET_NSTYPE)`; [`ErrorKind::NotUserns`] otherwise). An
    /// `O_PATH` fd is accepted too: it is checked to be nsfs and re-opened
    /// as [`open`](Self::open) does.
    pub fn from_fd(fd: OwnedFd) -> Result<UserNamespace> {
        let is_opath = rustix::fs::fcntl_getfl(&fd).is_ok_and(|f| f.contains(OFlags::PATH));
        let fd = if is_opath {
            let raw = rustix::fd::AsRawFd::as_raw_fd(&fd);
            usable_ns_fd(procfs::handle()?, fd.as_fd(), &format!("fd {raw}"))?
        } else {
            check_is_userns(fd.as_fd())?;
            fd
        };
        Ok(UserNamespace {
            fd,
            maps: Maps::Unknown,
        })
    }

    /// The mapping, when known: always for namespaces made by
    /// [`from_mapping`](Self::from_mapping), for `/proc/PID/ns/user` paths
    /// and pidfds when both maps were written, never for adopted fds.
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

/// What a file of mode `mode` is, for messages.
fn file_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symlink",
        libc::S_IFREG => "a regular file",
        _ => "a file of unknown type",
    }
}

/// What namespace a `CLONE_NEW*` type is, for messages.
fn ns_kind(t: libc::c_int) -> String {
    match t {
        libc::CLONE_NEWNS => "a mount namespace".into(),
        libc::CLONE_NEWNET => "a network namespace".into(),
        libc::CLONE_NEWPID => "a pid namespace".into(),
        libc::CLONE_NEWIPC => "an IPC namespace".into(),
        libc::CLONE_NEWUTS => "a UTS namespace".into(),
        libc::CLONE_NEWCGROUP => "a cgroup namespace".into(),
        libc::CLONE_NEWTIME => "a time namespace".into(),
        libc::CLONE_NEWUSER => "a user namespace".into(),
        t => format!("a namespace of type {t:#x}"),
    }
}

fn not_userns(call: &'static str, what: String) -> Error {
    Error::new(ErrorKind::NotUserns).with_call(call, what)
}

/// Turn an `O_PATH` fd into a usable user-namespace fd for the same inode,
/// opening nothing that is not a namespace file.
fn usable_ns_fd(proc: &Procfs, opath: BorrowedFd<'_>, name: &str) -> Result<OwnedFd> {
    let st = rustix::fs::fstat(opath).map_err(|e| Error::sys("fstat", name.to_string(), e))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let magic = rustix::fs::fstatfs(opath)
        .map_err(|e| Error::sys("fstatfs", name.to_string(), e))?
        .f_type as u64;
    if kind != FileType::RegularFile || magic != sys::NSFS_MAGIC {
        return Err(not_userns(
            "fstat",
            format!(
                "{name} (opened O_PATH): {}{}",
                file_kind(st.st_mode as libc::mode_t),
                if kind == FileType::RegularFile {
                    format!(" (statfs f_type {magic:#x}, not nsfs)")
                } else {
                    String::new()
                }
            ),
        ));
    }
    // An nsfs inode has no open side effects: re-open it for use.
    let fd = proc.reopen(opath, OFlags::RDONLY)?;
    match sys::ns_get_nstype(fd.as_fd()) {
        Ok(libc::CLONE_NEWUSER) => Ok(fd),
        Ok(t) => Err(not_userns(
            "ioctl",
            format!("{name}, NS_GET_NSTYPE: {}", ns_kind(t)),
        )),
        Err(e) => Err(Error::sys("ioctl", format!("{name}, NS_GET_NSTYPE"), e)
            .with_kind(ErrorKind::NotUserns)),
    }
}

fn check_is_userns(fd: BorrowedFd<'_>) -> Result<()> {
    match sys::ns_get_nstype(fd) {
        Ok(t) if t == libc::CLONE_NEWUSER => Ok(()),
        // Another namespace type: report which, for the confused caller.
        Ok(t) => Err(not_userns(
            "ioctl",
            format!("NS_GET_NSTYPE: {}", ns_kind(t)),
        )),
        // ENOTTY: not a namespace file at all.
        Err(e) => Err(Error::sys("ioctl", "NS_GET_NSTYPE", e).with_kind(ErrorKind::NotUserns)),
    }
}

/// The pid a pidfd names, from its fdinfo (`Pid:` line, Linux 5.4) read
/// through the verified procfs.
fn pidfd_pid(proc: &Procfs, pidfd: BorrowedFd<'_>) -> Result<u32> {
    let raw = rustix::fd::AsRawFd::as_raw_fd(&pidfd);
    let text = proc.read(Base::ThreadSelf, &format!("fdinfo/{raw}"))?;
    let text = String::from_utf8_lossy(&text);
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .map(|v| v.trim().parse::<i64>());
    match pid {
        Some(Ok(p)) if p > 0 => u32::try_from(p).map_err(|_| helper_error("pid out of range")),
        // -1: the process has exited; 0: it is in no pid namespace of ours.
        Some(Ok(-1)) => Err(
            Error::sys("fdinfo", format!("pidfd {raw}: Pid -1"), Errno::SRCH)
                .with_kind(ErrorKind::NotFound),
        ),
        Some(Ok(p)) => Err(Error::new(ErrorKind::InvalidInput(format!(
            "pidfd {raw} names a process outside our pid namespace (Pid: {p})"
        )))),
        _ => Err(Error::new(ErrorKind::InvalidInput(format!(
            "fd {raw} is not a pidfd (its fdinfo has no Pid line)"
        )))),
    }
}

/// `pidfd_send_signal(pidfd, 0)`: the process is unreaped (EPERM means it
/// exists but we may not signal it).
fn check_unreaped(pidfd: BorrowedFd<'_>, pid: u32) -> Result<()> {
    match sys::pidfd_send_signal(pidfd, 0) {
        Ok(()) | Err(Errno::PERM) => Ok(()),
        Err(e) => Err(
            Error::sys("pidfd_send_signal", format!("pidfd of pid {pid}, 0"), e)
                .with_kind(ErrorKind::NotFound),
        ),
    }
}

/// Write one map in a single `write(2)`, as the kernel requires.
fn write_map(fd: &OwnedFd, pid: u32, name: &str, map: &IdMap) -> Result<()> {
    write_once(fd, pid, name, map.to_proc_string().as_bytes())
}

fn write_once(fd: &OwnedFd, pid: u32, name: &str, data: &[u8]) -> Result<()> {
    let path = format!("/proc/{pid}/{name}");
    let fail = |errno: Errno| {
        Error::sys(
            "write",
            format!("{path:?}, {:?}", String::from_utf8_lossy(data)),
            errno,
        )
        .with_path(&path)
    };
    let n = rustix::io::write(fd, data).map_err(fail)?;
    if n != data.len() {
        return Err(fail(Errno::IO));
    }
    Ok(())
}

/// The pid of a path of the form `/proc/PID/ns/user` or `/proc/self/ns/user`.
fn proc_pid_of(path: &Path) -> Option<u32> {
    let parts: Vec<_> = path.components().collect();
    let [Component::RootDir, Component::Normal(p), Component::Normal(pid), Component::Normal(ns), Component::Normal(user)] =
        parts.as_slice()
    else {
        return None;
    };
    if *p != "proc" || *ns != "ns" || *user != "user" {
        return None;
    }
    let pid = pid.to_str()?;
    if pid == "self" {
        return Some(std::process::id());
    }
    pid.parse::<u32>().ok()
}

/// Read the maps of process `pid`, then check its namespace is still the
/// one we opened (the pid could have been recycled in between); with a
/// pidfd, also that the process is unreaped.
fn read_maps(
    proc: &Procfs,
    pid: u32,
    opened: BorrowedFd<'_>,
    pidfd: Option<BorrowedFd<'_>>,
) -> Maps {
    let read = |name: &str| -> Option<String> {
        proc.read(Base::Pid(pid), name)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let (Some(u), Some(g)) = (read("uid_map"), read("gid_map")) else {
        return Maps::Unknown;
    };
    let same_ns = match (
        proc.open_ns(Base::Pid(pid), "user"),
        rustix::fs::fstat(opened),
    ) {
        (Ok(now), Ok(b)) => {
            rustix::fs::fstat(&now).is_ok_and(|a| a.st_ino == b.st_ino && a.st_dev == b.st_dev)
        }
        _ => false,
    };
    if !same_ns || pidfd.is_some_and(|p| check_unreaped(p, pid).is_err()) {
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
    fn proc_pid_of_shapes() {
        let me = std::process::id();
        assert_eq!(proc_pid_of(Path::new("/proc/42/ns/user")), Some(42));
        assert_eq!(proc_pid_of(Path::new("/proc/self/ns/user")), Some(me));
        assert_eq!(proc_pid_of(Path::new("/proc/thread-self/ns/user")), None);
        assert_eq!(proc_pid_of(Path::new("/proc/42/ns/mnt")), None);
        assert_eq!(proc_pid_of(Path::new("/run/ns/user")), None);
        assert_eq!(proc_pid_of(Path::new("proc/42/ns/user")), None);
        assert_eq!(proc_pid_of(Path::new("/proc/x/ns/user")), None);
    }

    #[test]
    fn file_kinds_are_named() {
        assert_eq!(file_kind(libc::S_IFIFO), "a FIFO");
        assert_eq!(file_kind(libc::S_IFCHR), "a character device");
        assert_eq!(file_kind(libc::S_IFDIR), "a directory");
        assert_eq!(ns_kind(libc::CLONE_NEWNS), "a mount namespace");
    }
}
