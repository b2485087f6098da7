//! `/proc`, only through a verified handle.
//!
//! A container controls what it can mount or plant where a runtime expects
//! procfs (runc's CVE-2025-31133, -52565, -52881 were `/proc` paths
//! redirected to files of the attacker's choosing). So this crate never
//! names a `/proc` path: it opens procfs once per process, checks it, and
//! looks everything up below that handle.
//!
//! **The handle** ([`handle`]), in order of preference:
//! 1. a private procfs instance: `fsopen("proc")` with `subset=pid` (Linux
//!    5.8; without `subset` where the kernel lacks it), `fsmount`. Nobody
//!    else can see, let alone mount over, anything inside it.
//! 2. the procfs mounted at `/proc`, accepted only when `fstatfs` says it is
//!    procfs (`PROC_SUPER_MAGIC`), it is the root of a procfs (inode 1) and
//!    the root of its mount (`STATX_ATTR_MOUNT_ROOT`, Linux 5.8), and its
//!    `self` names our pid (a procfs of another pid namespace does not).
//!    Used where `fsopen` is missing or refused (no `CAP_SYS_ADMIN` over the
//!    pid namespace, seccomp) or `IDMAPPED_FORCE_FALLBACK=fsopen_proc`.
//!
//! **Lookups below it** use `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
//! | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` (Linux 5.6): no symlink, no
//! magic link, no mount crossing — a file bind-mounted over a procfs file
//! is refused (`EXDEV`). `self` and `thread-self` are symlinks, so paths are
//! built from our own pid and tid instead. Where `openat2` is missing or
//! blocked (or `IDMAPPED_FORCE_FALLBACK=openat2`), each component is opened
//! with `openat(O_PATH | O_NOFOLLOW)` and checked to be procfs on the
//! handle's mount (mount id from `statx`, Linux 5.8; before that the device
//! number), the last one likewise after it is opened.
//!
//! **Magic links** are followed in exactly two places, both deliberate and
//! both checked after: [`Procfs::reopen`] (an fd of ours re-opened through
//! the handle's `fd/` directory, the way to turn an `O_PATH` fd into a usable
//! one) and [`Procfs::open_ns`] (`PID/ns/user` of a process whose pid we
//! verify through its pidfd), whose result must be on nsfs.
//!
//! What is still named by a `/proc/self/fd/N` *path string* in the crate:
//! the [`chown`](crate::chown) walker's xattr calls on `O_PATH` descriptors
//! (the kernel has no fd-relative xattr call for them before `getxattrat`,
//! Linux 6.13). [`Procfs::fd_dir`] gives that code a verified `fd/` directory
//! to work relative to instead.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};

use crate::error::{Error, ErrorKind, Result};
use crate::features::{self, Availability};
use crate::sys;

/// Where a [`Procfs`] handle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcfsKind {
    /// A private instance (`fsopen("proc")`), with `subset=pid` when `pid_only`.
    Private {
        /// `subset=pid` was accepted (Linux 5.8).
        pid_only: bool,
    },
    /// The procfs mounted at `/proc`, checked.
    Mounted,
}

/// A verified procfs root. See the [module](self) documentation.
#[derive(Debug)]
pub(crate) struct Procfs {
    root: OwnedFd,
    kind: ProcfsKind,
    /// The mount id of `root` (`STATX_MNT_ID`), when the kernel reports it.
    mnt_id: Option<u64>,
    /// The device number of `root`.
    dev: u64,
    /// Our pid when the handle was checked.
    pid: u32,
}

/// Which procfs directory a lookup starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Base {
    /// `/proc/PID` of the given process.
    Pid(u32),
    /// Our own `/proc/TGID` (for the walker's and other callers' use).
    #[allow(dead_code)]
    SelfProcess,
    /// Our thread's `/proc/TGID/task/TID` (what `thread-self` names).
    ThreadSelf,
}

impl Base {
    fn prefix(self) -> String {
        match self {
            Base::Pid(pid) => pid.to_string(),
            Base::SelfProcess => std::process::id().to_string(),
            Base::ThreadSelf => format!(
                "{}/task/{}",
                std::process::id(),
                rustix::thread::gettid().as_raw_nonzero()
            ),
        }
    }
}

/// The process's verified procfs handle, made on first use. A failure is
/// not cached (it may be transient, e.g. `EMFILE`). A process forked into
/// another pid namespace (its pid changed) checks the inherited handle's
/// `self` again and makes a new one if that procfs no longer shows it.
pub(crate) fn handle() -> Result<&'static Procfs> {
    static HANDLE: Mutex<Option<&'static Procfs>> = Mutex::new(None);
    let mut slot = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = *slot {
        if h.pid == std::process::id() || h.shows_us() {
            return Ok(h);
        }
    }
    let h: &'static Procfs = Box::leak(Box::new(Procfs::new()?));
    *slot = Some(h);
    Ok(h)
}

fn procfs_error(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput(what.into()))
}

impl Procfs {
    /// A private instance where the kernel allows it, else the checked `/proc`.
    pub(crate) fn new() -> Result<Procfs> {
        if !features::forced_fallback("fsopen_proc") {
            if let Ok(p) = Self::private() {
                return Ok(p);
            }
        }
        Self::mounted()
    }

    fn private() -> std::result::Result<Procfs, Errno> {
        let open = || rustix::mount::fsopen("proc", FsOpenFlags::FSOPEN_CLOEXEC);
        let (ctx, pid_only) = {
            let ctx = open()?;
            match rustix::mount::fsconfig_set_string(&ctx, "subset", "pid") {
                Ok(()) => (ctx, true),
                // Before 5.8 procfs has no subset= option: a full instance.
                Err(_) => (open()?, false),
            }
        };
        rustix::mount::fsconfig_create(&ctx)?;
        let root = rustix::mount::fsmount(
            &ctx,
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV
                | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        )?;
        let p = Self::verified(root, ProcfsKind::Private { pid_only })
            .map_err(|e| e.errno().unwrap_or(Errno::INVAL))?;
        Ok(p)
    }

    fn mounted() -> Result<Procfs> {
        let root = rustix::fs::open(
            "/proc",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            Error::sys("open", "\"/proc\", O_PATH|O_DIRECTORY|O_NOFOLLOW", e).with_path("/proc")
        })?;
        Self::verified(root, ProcfsKind::Mounted).map_err(|e| e.with_path("/proc"))
    }

    /// Check that `root` is the root of a procfs mount of our pid namespace.
    fn verified(root: OwnedFd, kind: ProcfsKind) -> Result<Procfs> {
        let magic = rustix::fs::fstatfs(&root)
            .map_err(|e| Error::sys("fstatfs", "procfs root", e))?
            .f_type as u64;
        if magic != sys::PROC_SUPER_MAGIC {
            return Err(procfs_error(format!(
                "not procfs (statfs f_type {magic:#x}, expected PROC_SUPER_MAGIC {:#x}): refusing to use it",
                sys::PROC_SUPER_MAGIC
            )));
        }
        let st = rustix::fs::statx(
            &root,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::INO | StatxFlags::MNT_ID,
        )
        .map_err(|e| Error::sys("statx", "procfs root, AT_EMPTY_PATH", e))?;
        if st.stx_ino != sys::PROC_ROOT_INO {
            return Err(procfs_error(format!(
                "a procfs directory (inode {}) that is not the procfs root: refusing to use it",
                st.stx_ino
            )));
        }
        // STATX_ATTR_MOUNT_ROOT (Linux 5.8).
        const MOUNT_ROOT: u64 = 0x2000;
        if st.stx_attributes_mask.bits() & MOUNT_ROOT != 0
            && st.stx_attributes.bits() & MOUNT_ROOT == 0
        {
            return Err(procfs_error(
                "the procfs root is not the root of its mount: refusing to use it",
            ));
        }
        let mnt_id = (st.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(st.stx_mnt_id);
        let dev = rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor);
        let p = Procfs {
            root,
            kind,
            mnt_id,
            dev,
            pid: std::process::id(),
        };
        // A procfs of another pid namespace names other processes.
        let link = rustix::fs::readlinkat(&p.root, "self", Vec::new())
            .map_err(|e| Error::sys("readlinkat", "procfs root, \"self\"", e))?;
        let me = std::process::id().to_string();
        if link.as_bytes() != me.as_bytes() {
            return Err(procfs_error(format!(
                "procfs of another pid namespace (its self is {:?}, our pid is {me}): refusing to use it",
                link
            )));
        }
        Ok(p)
    }

    /// This procfs's `self` is our pid (it shows our pid namespace).
    fn shows_us(&self) -> bool {
        rustix::fs::readlinkat(&self.root, "self", Vec::new())
            .is_ok_and(|l| l.as_bytes() == std::process::id().to_string().as_bytes())
    }

    /// Where this handle came from.
    #[allow(dead_code)]
    pub(crate) fn kind(&self) -> ProcfsKind {
        self.kind
    }

    /// Open `sub` (relative, no `..`) below `base`, with no symlink, magic
    /// link or mount crossing on the way (see the module documentation).
    pub(crate) fn open(&self, base: Base, sub: &str, flags: OFlags) -> Result<OwnedFd> {
        let path = join(base, sub)?;
        self.open_beneath(&path, flags)
    }

    fn open_beneath(&self, path: &str, flags: OFlags) -> Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let fail = |call: &'static str, e: Errno| {
            let err = Error::sys(
                call,
                format!("procfs, {path:?}, {flags:?}, RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV"),
                e,
            )
            .with_path(format!("/proc/{path}"));
            if e == Errno::XDEV {
                // A mount over a procfs path: what a planted fake looks like.
                err.with_kind(ErrorKind::InvalidInput(format!(
                    "/proc/{path} is covered by another mount: refusing to use it"
                )))
            } else {
                err
            }
        };
        if features::features().openat2 == Availability::Available {
            let resolve = ResolveFlags::BENEATH
                | ResolveFlags::NO_MAGICLINKS
                | ResolveFlags::NO_SYMLINKS
                | ResolveFlags::NO_XDEV;
            return rustix::fs::openat2(&self.root, path, flags, Mode::empty(), resolve)
                .map_err(|e| fail("openat2", e));
        }
        // Fallback: one component at a time, never following, each checked
        // to be procfs on our mount.
        let mut parts = path.split('/').filter(|c| !c.is_empty()).peekable();
        let mut dir: Option<OwnedFd> = None;
        while let Some(name) = parts.next() {
            let at = dir.as_ref().map_or(self.root.as_fd(), |d| d.as_fd());
            let last = parts.peek().is_none();
            let f = if last {
                flags
            } else {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            let fd =
                rustix::fs::openat(at, name, f, Mode::empty()).map_err(|e| fail("openat", e))?;
            self.check_same_mount(fd.as_fd())
                .map_err(|e| fail("statx", e))?;
            dir = Some(fd);
        }
        dir.ok_or_else(|| procfs_error("empty procfs path"))
    }

    /// `fd` is on procfs, on this handle's mount.
    fn check_same_mount(&self, fd: BorrowedFd<'_>) -> std::result::Result<(), Errno> {
        if rustix::fs::fstatfs(fd)?.f_type as u64 != sys::PROC_SUPER_MAGIC {
            return Err(Errno::XDEV);
        }
        let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
        let same = match self.mnt_id {
            Some(id) if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 => st.stx_mnt_id == id,
            _ => rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor) == self.dev,
        };
        if same {
            Ok(())
        } else {
            Err(Errno::XDEV)
        }
    }

    /// Our thread's `fd/` directory, verified: for `*at()` calls on the
    /// magic links of our own descriptors.
    pub(crate) fn fd_dir(&self) -> Result<OwnedFd> {
        self.open(Base::ThreadSelf, "fd", OFlags::PATH | OFlags::DIRECTORY)
    }

    /// Open the file `fd` refers to anew, with `flags` (e.g. an `O_PATH` fd
    /// as `O_RDONLY`): through our `fd/N` magic link, the one magic link
    /// lookups follow. The result is checked to be the same inode.
    ///
    /// Never call it on an fd that may be a FIFO or a device: the open runs
    /// the file's open (a FIFO blocks, a driver acts). Check the type first.
    pub(crate) fn reopen(&self, fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd> {
        let dir = self.fd_dir()?;
        let name = rustix::fd::AsRawFd::as_raw_fd(&fd).to_string();
        let flags = (flags | OFlags::CLOEXEC) - OFlags::NOFOLLOW - OFlags::CREATE;
        let new = rustix::fs::openat(&dir, &name, flags, Mode::empty()).map_err(|e| {
            Error::sys(
                "openat",
                format!("procfs fd dir, {name:?}, {flags:?} (re-open)"),
                e,
            )
        })?;
        let (a, b) = (
            rustix::fs::fstat(fd).map_err(|e| Error::sys("fstat", "original fd", e))?,
            rustix::fs::fstat(&new).map_err(|e| Error::sys("fstat", "re-opened fd", e))?,
        );
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return Err(procfs_error(
                "re-opening an fd through procfs gave another file: refusing to use it",
            ));
        }
        Ok(new)
    }

    /// `base/ns/user`, following that one magic link after the directory
    /// `base/ns` was found with [`open`](Self::open)'s rules and `user` was
    /// checked not to be covered by a mount. The result is on nsfs.
    pub(crate) fn open_ns(&self, base: Base, ns: &str) -> Result<OwnedFd> {
        let dir = self.open(base, "ns", OFlags::PATH | OFlags::DIRECTORY)?;
        // The link itself, not followed: a mount over it is refused here.
        let link_path = join(base, &format!("ns/{ns}"))?;
        self.open_beneath(&link_path, OFlags::PATH)?;
        let fd = rustix::fs::openat(&dir, ns, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| {
                Error::sys("openat", format!("procfs {link_path:?}, O_RDONLY"), e)
                    .with_path(format!("/proc/{link_path}"))
            })?;
        let magic = rustix::fs::fstatfs(&fd)
            .map_err(|e| Error::sys("fstatfs", format!("procfs {link_path:?}"), e))?
            .f_type as u64;
        if magic != sys::NSFS_MAGIC {
            return Err(procfs_error(format!(
                "/proc/{link_path} did not lead to a namespace (statfs f_type {magic:#x}): refusing to use it"
            )));
        }
        Ok(fd)
    }

    /// Read a whole (small, text) procfs file below `base`.
    pub(crate) fn read(&self, base: Base, sub: &str) -> Result<Vec<u8>> {
        let fd = self.open(base, sub, OFlags::RDONLY)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rustix::io::read(&fd, &mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(Errno::INTR) => continue,
                Err(e) => {
                    return Err(Error::sys("read", format!("procfs {sub:?}"), e)
                        .with_path(format!("/proc/{}", join(base, sub)?)))
                }
            }
        }
    }
}

impl AsFd for Procfs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }
}

/// `base/sub`, refusing absolute paths and `..` (we build these ourselves).
fn join(base: Base, sub: &str) -> Result<String> {
    if sub.starts_with('/') || sub.split('/').any(|c| c == "..") {
        return Err(procfs_error(format!("bad procfs path {sub:?}")));
    }
    Ok(if sub.is_empty() {
        base.prefix()
    } else {
        format!("{}/{sub}", base.prefix())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_built_from_ids() {
        assert_eq!(join(Base::Pid(42), "uid_map").unwrap(), "42/uid_map");
        let me = std::process::id();
        assert_eq!(join(Base::SelfProcess, "").unwrap(), me.to_string());
        assert!(join(Base::ThreadSelf, "fd")
            .unwrap()
            .starts_with(&format!("{me}/task/")));
        assert!(join(Base::Pid(1), "../x").is_err());
        assert!(join(Base::Pid(1), "/etc").is_err());
    }

    #[test]
    fn handle_reads_our_own_status() {
        // Works unprivileged too: the /proc fallback.
        let Ok(h) = handle() else { return };
        let status = h.read(Base::SelfProcess, "status").unwrap();
        let text = String::from_utf8_lossy(&status);
        assert!(
            text.contains(&format!("\nPid:\t{}\n", std::process::id())),
            "{text}"
        );
        // A symlink component is refused (self is one).
        assert!(h.open_beneath("self/status", OFlags::RDONLY).is_err());
    }
}
