//! The crate's only `unsafe` code: thin shims over system calls that neither
//! rustix nor libc wrap, each returning owned types and an [`Errno`].
//!
//! Everything here is deliberately dumb: no diagnosis, no fallbacks. The
//! modules above turn an errno into an [`ErrorKind`](crate::ErrorKind).

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::Errno;

/// `struct mount_attr` (`MOUNT_ATTR_SIZE_VER0`, 32 bytes), as libc 0.2 defines it.
pub(crate) type RawMountAttr = libc::mount_attr;

/// Size of [`RawMountAttr`] passed to the kernel (`MOUNT_ATTR_SIZE_VER0`).
pub(crate) const MOUNT_ATTR_SIZE_VER0: usize = 32;

// libc 0.2 lacks the numbers of the newer calls on most targets. On every
// architecture Linux numbers these calls in one block, so derive them from
// `SYS_mount_setattr` (442 on x86_64 and asm-generic, offset on mips).
const NR_BASE: libc::c_long = libc::SYS_mount_setattr - 442;
/// `statmount(2)`, Linux 6.8.
const SYS_STATMOUNT: libc::c_long = NR_BASE + 457;
/// `open_tree_attr(2)`, Linux 6.15.
const SYS_OPEN_TREE_ATTR: libc::c_long = NR_BASE + 467;

/// `getxattrat(2)`, Linux 6.13.
const SYS_GETXATTRAT: libc::c_long = NR_BASE + 464;
/// `listxattrat(2)`, Linux 6.13.
const SYS_LISTXATTRAT: libc::c_long = NR_BASE + 465;

/// `NS_GET_NSTYPE` ioctl (`_IO(0xb7, 0x3)`), Linux 4.11.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The inode number of the initial user namespace (`PROC_USER_INIT_INO`):
/// fixed by the kernel, so it identifies the initial namespace from any fd.
pub(crate) const PROC_USER_INIT_INO: u64 = 0xEFFF_FFFD;

fn errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

/// `mount_setattr(dirfd, path, flags, attr, sizeof attr)`.
///
/// # References
/// - [`mount_setattr(2)`](https://man7.org/linux/man-pages/man2/mount_setattr.2.html)
pub(crate) fn mount_setattr(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    attr: &RawMountAttr,
) -> Result<(), Errno> {
    // SAFETY: `path` is a valid NUL-terminated string and `attr` a valid
    // `struct mount_attr` of the size we pass; the kernel only reads both.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            flags,
            attr as *const RawMountAttr,
            MOUNT_ATTR_SIZE_VER0,
        )
    };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// `open_tree_attr(dirfd, path, flags, attr, sizeof attr)`: `open_tree` that
/// applies `attr` before the new fd becomes visible. With `attr == None` it
/// behaves like `open_tree` (used to probe for the call).
///
/// # References
/// - Linux commit "fs: add open_tree_attr()" (6.15), `fs/namespace.c`
pub(crate) fn open_tree_attr(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_uint,
    attr: Option<&RawMountAttr>,
) -> Result<OwnedFd, Errno> {
    let (ptr, size) = match attr {
        Some(a) => (a as *const RawMountAttr, MOUNT_ATTR_SIZE_VER0),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: `path` is NUL-terminated; `ptr` is null with size 0 or points to
    // a live `struct mount_attr` of `size` bytes, which the kernel only reads.
    let ret = unsafe {
        libc::syscall(
            SYS_OPEN_TREE_ATTR,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            flags,
            ptr,
            size,
        )
    };
    fd_result(ret)
}

fn fd_result(ret: libc::c_long) -> Result<OwnedFd, Errno> {
    if ret < 0 {
        return Err(errno());
    }
    let fd = RawFd::try_from(ret).map_err(|_| Errno::INVAL)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, NS_GET_NSTYPE)`: the `CLONE_NEW*` flag of the namespace `fd` refers to.
///
/// # References
/// - [`ioctl_ns(2)`](https://man7.org/linux/man-pages/man2/ioctl_ns.2.html)
pub(crate) fn ns_get_nstype(fd: BorrowedFd<'_>) -> Result<libc::c_int, Errno> {
    // SAFETY: NS_GET_NSTYPE takes no argument and returns an int.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// `listxattrat(dirfd, path, at_flags, list, size)`: the xattr names of the
/// entry `path` names relative to `dirfd` (with `AT_SYMLINK_NOFOLLOW`, of a
/// final symlink itself). Returns the bytes written to `list`.
///
/// # References
/// - Linux commit "fs/xattr: add *at family syscalls" (6.13), `fs/xattr.c`
pub(crate) fn listxattrat(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    at_flags: libc::c_uint,
    list: &mut [u8],
) -> Result<usize, Errno> {
    // SAFETY: `path` is NUL-terminated; the kernel writes at most
    // `list.len()` bytes into `list`.
    let ret = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            at_flags,
            list.as_mut_ptr(),
            list.len(),
        )
    };
    usize::try_from(ret).map_err(|_| errno())
}

/// `struct xattr_args` (`XATTR_ARGS_SIZE_VER0`, 16 bytes).
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// `getxattrat(dirfd, path, at_flags, name, &args, sizeof args)`: the value
/// of xattr `name` of the entry `path` names relative to `dirfd`. Returns
/// the bytes written to `value`.
///
/// # References
/// - Linux commit "fs/xattr: add *at family syscalls" (6.13), `fs/xattr.c`
pub(crate) fn getxattrat(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    at_flags: libc::c_uint,
    name: &CStr,
    value: &mut [u8],
) -> Result<usize, Errno> {
    let args = XattrArgs {
        value: value.as_mut_ptr() as u64,
        size: u32::try_from(value.len()).unwrap_or(u32::MAX),
        flags: 0,
    };
    // SAFETY: `path` and `name` are NUL-terminated; `args` is a valid
    // `struct xattr_args` of the size passed, whose buffer is `value` (at
    // most `value.len()` bytes written); the kernel only reads `args`.
    let ret = unsafe {
        libc::syscall(
            SYS_GETXATTRAT,
            dirfd.as_raw_fd(),
            path.as_ptr(),
            at_flags,
            name.as_ptr(),
            &args as *const XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    usize::try_from(ret).map_err(|_| errno())
}

/// `unshare(CLONE_FS)`: give the calling thread its own working directory,
/// root and umask, so `fchdir` there does not move the other threads.
///
/// # References
/// - [`unshare(2)`](https://man7.org/linux/man-pages/man2/unshare.2.html)
#[allow(dead_code)] // for threads that must enter another mount namespace
pub(crate) fn unshare_fs() -> Result<(), Errno> {
    // SAFETY: rustix marks `unshare` unsafe for CLONE_FILES, which can
    // invalidate fds other code holds; CLONE_FS only copies the thread's
    // cwd/root/umask and touches no memory or fd Rust relies on.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }
}

/// `struct mnt_id_req` (`MNT_ID_REQ_SIZE_VER0`, 24 bytes).
#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// Offsets into `struct statmount` (include/uapi/linux/mount.h, Linux 6.15).
mod statmount_off {
    pub const SIZE: usize = 0;
    pub const MASK: usize = 8;
    pub const FS_TYPE: usize = 36;
    pub const MNT_ATTR: usize = 64;
    pub const MNT_POINT: usize = 108;
    pub const FS_SUBTYPE: usize = 120;
    pub const SUPPORTED_MASK: usize = 144;
    pub const UIDMAP_NUM: usize = 152;
    pub const UIDMAP: usize = 156;
    pub const GIDMAP_NUM: usize = 160;
    pub const GIDMAP: usize = 164;
    /// Where the string area `str[]` starts.
    pub const STR: usize = 512;
}

pub(crate) const STATMOUNT_MNT_BASIC: u64 = 0x2;
pub(crate) const STATMOUNT_MNT_POINT: u64 = 0x10;
pub(crate) const STATMOUNT_FS_TYPE: u64 = 0x20;
pub(crate) const STATMOUNT_FS_SUBTYPE: u64 = 0x100;
pub(crate) const STATMOUNT_SUPPORTED_MASK: u64 = 0x1000;
pub(crate) const STATMOUNT_MNT_UIDMAP: u64 = 0x2000;
pub(crate) const STATMOUNT_MNT_GIDMAP: u64 = 0x4000;

/// What `statmount` returned that this crate uses.
#[derive(Debug, Clone, Default)]
pub(crate) struct Statmount {
    /// The `mask` of fields the kernel filled in.
    pub mask: u64,
    pub mnt_attr: u64,
    /// `STATMOUNT_FS_TYPE`, `STATMOUNT_FS_SUBTYPE` (6.11), `STATMOUNT_MNT_POINT`.
    pub fs_type: Option<String>,
    pub fs_subtype: Option<String>,
    pub mnt_point: Option<Vec<u8>>,
    /// The fields this kernel knows (`STATMOUNT_SUPPORTED_MASK`, Linux 6.15).
    pub supported_mask: u64,
    /// Each extent as "inside outside count", as seen from the caller's namespace.
    pub uidmap: Vec<String>,
    pub gidmap: Vec<String>,
}

/// `statmount(&{mnt_id}, buf, bufsize, 0)` for the unique mount id `mnt_id`
/// (`STATX_MNT_ID_UNIQUE`), in the caller's mount namespace.
///
/// # References
/// - [`statmount(2)`](https://man7.org/linux/man-pages/man2/statmount.2.html)
pub(crate) fn statmount(mnt_id: u64, mask: u64) -> Result<Statmount, Errno> {
    let req = MntIdReq {
        size: std::mem::size_of::<MntIdReq>() as u32,
        spare: 0,
        mnt_id,
        param: mask,
    };
    let mut buf: Vec<u64> = vec![0; 512];
    loop {
        let bytes = buf.len() * 8;
        // SAFETY: `req` is a valid request of the size it states; `buf` is a
        // writable, 8-byte aligned buffer of `bytes` bytes.
        let ret = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                &req as *const MntIdReq,
                buf.as_mut_ptr(),
                bytes,
                0 as libc::c_uint,
            )
        };
        if ret == 0 {
            break;
        }
        let e = errno();
        // The strings did not fit: grow (bounded: a mount's text is small).
        if e == Errno::OVERFLOW && buf.len() < (1 << 20) {
            let grown = buf.len() * 4;
            buf.resize(grown, 0);
            continue;
        }
        return Err(e);
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(parse_statmount(&bytes))
}

fn read_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0)
}

fn read_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

/// Decode the fields we use; string offsets are relative to `str[]`.
fn parse_statmount(b: &[u8]) -> Statmount {
    use statmount_off as o;
    let size = (read_u32(b, o::SIZE) as usize).min(b.len());
    let b = &b[..size];
    let strings = b.get(o::STR..).unwrap_or(&[]);
    let array_at = |off: u32, n: u32| -> Vec<String> {
        let mut out = Vec::new();
        let mut s = strings.get(off as usize..).unwrap_or(&[]);
        // `n` comes from the kernel but is bounded by the bytes present.
        for _ in 0..n {
            if s.is_empty() {
                break;
            }
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            out.push(String::from_utf8_lossy(&s[..end]).into_owned());
            s = s.get(end + 1..).unwrap_or(&[]);
        }
        out
    };
    let mask = read_u64(b, o::MASK);
    let string_at = |bit: u64, off: usize| -> Option<Vec<u8>> {
        if mask & bit == 0 {
            return None;
        }
        let s = strings.get(read_u32(b, off) as usize..)?;
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        Some(s[..end].to_vec())
    };
    let text = |v: Option<Vec<u8>>| v.map(|v| String::from_utf8_lossy(&v).into_owned());
    Statmount {
        mask,
        fs_type: text(string_at(STATMOUNT_FS_TYPE, o::FS_TYPE)),
        fs_subtype: text(string_at(STATMOUNT_FS_SUBTYPE, o::FS_SUBTYPE)),
        mnt_point: string_at(STATMOUNT_MNT_POINT, o::MNT_POINT),
        mnt_attr: read_u64(b, o::MNT_ATTR),
        supported_mask: read_u64(b, o::SUPPORTED_MASK),
        uidmap: if mask & STATMOUNT_MNT_UIDMAP != 0 {
            array_at(read_u32(b, o::UIDMAP), read_u32(b, o::UIDMAP_NUM))
        } else {
            Vec::new()
        },
        gidmap: if mask & STATMOUNT_MNT_GIDMAP != 0 {
            array_at(read_u32(b, o::GIDMAP), read_u32(b, o::GIDMAP_NUM))
        } else {
            Vec::new()
        },
    }
}

// ---- helper child: CLONE_VM, pidfd, parent-death signal ----

/// `CLONE_PIDFD` (Linux 5.2): the kernel stores a pidfd for the child at the
/// `parent_tid` pointer. Older kernels ignore the bit (it is the long-removed
/// `CLONE_PID`), leaving the pointer untouched: that is how its absence shows.
const CLONE_PIDFD: libc::c_int = 0x1000;

/// A child process parked in a new user namespace, sharing our address space
/// (`CLONE_VM`) so that creating it costs the same whatever our resident size.
///
/// It does nothing but sleep until it is killed. Dropping the handle kills and
/// reaps it on every path; the namespace lives on as long as an fd to it is
/// open.
///
/// What is guaranteed, and by what:
/// - **It dies with its parent thread.** The child sets
///   `PR_SET_PDEATHSIG(SIGKILL)` first thing, then compares `getppid()` with
///   the pid we recorded before `clone`: if the parent died before the
///   `prctl` (the child was reparented), it exits at once. A caller killed at
///   any instant therefore leaves no helper holding its address space.
/// - **It is signalled and reaped through its pidfd** (`CLONE_PIDFD`, Linux
///   5.2; `pidfd_send_signal` 5.1; `waitid(P_PIDFD)` 5.4). A pidfd names this
///   process and no other: if some other waiter of ours (a `__WALL` reaper,
///   a subreaper thread) reaped it first, the pidfd calls fail with `ESRCH` /
///   `ECHILD` instead of hitting a process that recycled the pid.
/// - Kernels without `CLONE_PIDFD` (before 5.2) fall back to `kill(pid)` and
///   `waitpid(pid, __WALL)`; on 5.2 and 5.3 (pidfd, but no `P_PIDFD`) the
///   signal goes through the pidfd and the wait by pid. Those fallbacks are
///   exact only while no other waiter in the process reaps our children.
pub(crate) struct ParkedChild {
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    /// Reap with `waitid(P_PIDFD)` (Linux 5.4) rather than by pid.
    waitid_pidfd: bool,
    /// The child's stack; must outlive the child, so it is freed only after reaping.
    _stack: Vec<u128>,
}

/// Stack for the parked child: it makes a few system calls.
const CHILD_STACK_BYTES: usize = 16 * 1024;

/// The child's entire life. It runs on its own small stack in our address
/// space, with our thread's TLS pointer, so it must not touch memory another
/// thread may use (no allocation, no errno, no TLS): only raw system calls
/// via `libc::syscall`, which writes errno only on failure, and none of
/// these fails: `prctl(PR_SET_PDEATHSIG)` with a valid signal, `getppid`,
/// `exit`, and `pause`, which would fail only with EINTR after a handler ran
/// (every signal is blocked, and SIGKILL runs no handler).
///
/// `arg` carries the parent's pid as an integer (no memory is read).
extern "C" fn parked_child_main(arg: *mut libc::c_void) -> libc::c_int {
    let parent = arg as usize as libc::c_long;
    // SAFETY: raw system calls with integer arguments and no memory effects.
    unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG as libc::c_long,
            libc::SIGKILL as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        );
        // The parent died before the prctl: we were reparented and nobody
        // will kill us. Leave now (exit ends only this task: no CLONE_THREAD).
        if libc::syscall(libc::SYS_getppid) != parent {
            libc::syscall(libc::SYS_exit, 0 as libc::c_long);
        }
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

impl ParkedChild {
    /// `clone(CLONE_NEWUSER | CLONE_VM | CLONE_PIDFD, exit signal 0)` with
    /// every signal blocked, so that no handler of ours ever runs on the
    /// child's small stack.
    ///
    /// The child must not outlive the calling thread (its parent-death signal
    /// is tied to this thread): keep the handle within one call.
    ///
    /// `use_pidfd` asks for `CLONE_PIDFD` (the caller knows from probing
    /// whether `pidfd_send_signal` exists; a kernel without `CLONE_PIDFD`
    /// ignores the flag); `waitid_pidfd` whether `waitid(P_PIDFD)` does.
    ///
    /// # References
    /// - [`clone(2)`](https://man7.org/linux/man-pages/man2/clone.2.html)
    /// - [`PR_SET_PDEATHSIG`](https://man7.org/linux/man-pages/man2/PR_SET_PDEATHSIG.2const.html)
    pub(crate) fn spawn(use_pidfd: bool, waitid_pidfd: bool) -> Result<ParkedChild, Errno> {
        let mut stack: Vec<u128> = vec![0; CHILD_STACK_BYTES / 16];
        // The stack grows down: hand the kernel its (16-byte aligned) top.
        let top = stack.as_mut_ptr_range().end as *mut libc::c_void;
        // Recorded before clone: the child compares its parent with this.
        let parent = std::process::id() as usize;

        // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask only
        // write the sets we pass.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        // No exit signal: no SIGCHLD reaches an application's handler.
        // (That does not hide the child from every waiter: `__WALL` and
        // `__WCLONE` waits see it, which is why we use its pidfd.)
        let flags = libc::CLONE_NEWUSER | libc::CLONE_VM | if use_pidfd { CLONE_PIDFD } else { 0 };
        let mut pidfd: libc::c_int = -1;
        // SAFETY: `parked_child_main` never returns and touches no shared
        // memory; `top` is the end of a live stack that outlives the child
        // (dropped only after the child is reaped, see `Drop`); `pidfd` is a
        // valid `int` the kernel writes the pidfd to (CLONE_PIDFD) before
        // clone returns. The tls and child_tid arguments are null and unused
        // (no CLONE_SETTLS, no CLONE_CHILD_*TID).
        let pid = unsafe {
            libc::clone(
                parked_child_main,
                top,
                flags,
                parent as *mut libc::c_void,
                &mut pidfd as *mut libc::c_int,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::pid_t>(),
            )
        };
        let clone_errno = errno();
        // SAFETY: restoring the mask we saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        if pid < 0 {
            return Err(clone_errno);
        }
        let pidfd = (pidfd >= 0).then(|| {
            // SAFETY: the kernel created this fd for us (CLONE_PIDFD); nothing
            // else owns it.
            unsafe { OwnedFd::from_raw_fd(pidfd) }
        });
        Ok(ParkedChild {
            pid,
            pidfd,
            waitid_pidfd,
            _stack: stack,
        })
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The child's pidfd, on kernels with `CLONE_PIDFD` (5.2).
    pub(crate) fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }

    /// Whether the child has not been reaped (by us or by anyone else), so
    /// that its pid still names it: `pidfd_send_signal(pidfd, 0)`. Anything
    /// opened under `/proc/PID` *before* a `true` answer is the child's.
    /// Without a pidfd (before 5.2) this is `kill(pid, 0)`, exact only while
    /// no other waiter reaps our children.
    pub(crate) fn is_unreaped(&self) -> bool {
        match &self.pidfd {
            Some(fd) => pidfd_send_signal(fd.as_fd(), 0).is_ok(),
            // SAFETY: signal 0 checks for existence only; no signal is sent.
            None => unsafe { libc::kill(self.pid, 0) == 0 },
        }
    }
}

impl Drop for ParkedChild {
    fn drop(&mut self) {
        let Some(fd) = self.pidfd.as_ref() else {
            // Before Linux 5.2. SAFETY: `pid` is our child; it cannot have
            // been recycled unless another waiter in this process reaped it
            // (the documented limit of this fallback).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            wait_pid(self.pid);
            return;
        };
        // ESRCH here means it is gone already: nothing else is hit.
        let _ = pidfd_send_signal(fd.as_fd(), libc::SIGKILL);
        if !self.waitid_pidfd {
            wait_pid(self.pid);
            return;
        }
        loop {
            match waitid_pidfd(fd.as_fd()) {
                Err(Errno::INTR) => continue,
                // Linux 5.2/5.3 have the pidfd but not P_PIDFD.
                Err(Errno::INVAL) => {
                    wait_pid(self.pid);
                    break;
                }
                // Reaped (Ok), or someone else reaped it (ECHILD).
                _ => break,
            }
        }
    }
}

fn wait_pid(pid: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r >= 0 || errno() != Errno::INTR {
            break;
        }
    }
}

// ---- pidfds, procfs and nsfs ----

/// `PIDFD_GET_USER_NAMESPACE` (`_IO(0xFF, 9)`), Linux 6.11.
const PIDFD_GET_USER_NAMESPACE: libc::c_ulong = 0xFF09;

/// `NSFS_MAGIC`: the filesystem of namespace files.
pub(crate) const NSFS_MAGIC: u64 = 0x6e73_6673;
/// `PROC_SUPER_MAGIC`.
pub(crate) const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// The inode number of every procfs instance's root directory (`PROC_ROOT_INO`).
pub(crate) const PROC_ROOT_INO: u64 = 1;

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`, Linux 5.1; `sig` 0 only checks
/// that the process has not been reaped.
///
/// # References
/// - [`pidfd_send_signal(2)`](https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html)
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> Result<(), Errno> {
    // SAFETY: integer arguments and a null siginfo pointer, which the kernel
    // accepts (it then fills in a siginfo as kill(2) would).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// `waitid(P_PIDFD, pidfd, &info, WEXITED | __WALL)`, Linux 5.4: reap the
/// process `pidfd` names, and only it.
///
/// # References
/// - [`waitid(2)`](https://man7.org/linux/man-pages/man2/waitid.2.html)
pub(crate) fn waitid_pidfd(pidfd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: siginfo_t is plain data the kernel fills in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid out-pointer for the whole call.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::__WALL,
        )
    };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// `ioctl(pidfd, PIDFD_GET_USER_NAMESPACE)`, Linux 6.11: an fd of the user
/// namespace of the process `pidfd` names (ESRCH once it has exited).
///
/// # References
/// - Linux commit "pidfs: allow retrieval of namespace file descriptors" (6.11)
pub(crate) fn pidfd_get_user_namespace(pidfd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    // SAFETY: this ioctl takes no argument and returns a new fd or -1.
    let ret = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_USER_NAMESPACE as _, 0) };
    fd_result(libc::c_long::from(ret))
}

/// `listmount(2)`, Linux 6.8.
const SYS_LISTMOUNT: libc::c_long = NR_BASE + 458;
/// `LSMT_ROOT`: list from the root of the caller's mount namespace.
pub(crate) const LSMT_ROOT: u64 = u64::MAX;

/// `listmount(&{mnt_id, param: last}, ids, ids.len(), 0)`: the unique ids
/// of mounts below `mnt_id` in the caller's mount namespace, after `last`
/// (0 to start); how many were written to `ids`.
///
/// # References
/// - [`listmount(2)`](https://man7.org/linux/man-pages/man2/listmount.2.html)
pub(crate) fn listmount(mnt_id: u64, last: u64, ids: &mut [u64]) -> Result<usize, Errno> {
    let req = MntIdReq {
        size: std::mem::size_of::<MntIdReq>() as u32,
        spare: 0,
        mnt_id,
        param: last,
    };
    // SAFETY: `req` is a valid request of the size it states; `ids` is a
    // writable array of `ids.len()` u64s.
    let ret = unsafe {
        libc::syscall(
            SYS_LISTMOUNT,
            &req as *const MntIdReq,
            ids.as_mut_ptr(),
            ids.len(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(errno())
    } else {
        usize::try_from(ret).map_err(|_| Errno::INVAL)
    }
}

// ---- rootfs: helper threads for overlays ----

/// `unshare(CLONE_FS | CLONE_NEWNS)`: give the calling thread its own
/// working directory and root and its own copy of the mount namespace, so
/// that what it mounts there is seen by no other thread or process. The
/// namespace dies with the thread (nothing else refers to it).
///
/// # References
/// - [`unshare(2)`](https://man7.org/linux/man-pages/man2/unshare.2.html)
pub(crate) fn unshare_fs_and_mount_ns() -> Result<(), Errno> {
    // SAFETY: as for `unshare_fs`: CLONE_FS and CLONE_NEWNS change only the
    // calling thread's fs context and mount namespace, no memory or fd.
    unsafe {
        rustix::thread::unshare_unsafe(
            rustix::thread::UnshareFlags::FS | rustix::thread::UnshareFlags::NEWNS,
        )
    }
}

/// `setfsgid(gid)` then `setfsuid(uid)` for the calling thread only (raw
/// system calls: the kernel's credentials are per thread, and libc does not
/// broadcast these two). Returns the ids the thread has afterwards, which
/// the caller compares: these calls report no errors.
///
/// # References
/// - [`setfsuid(2)`](https://man7.org/linux/man-pages/man2/setfsuid.2.html)
pub(crate) fn set_thread_fsids(uid: u32, gid: u32) -> (u32, u32) {
    // SAFETY: setfsgid/setfsuid take an integer and change only the calling
    // thread's credentials; an argument of -1 (u32::MAX) only queries.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, gid);
        libc::syscall(libc::SYS_setfsuid, uid);
        let g = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
        let u = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
        (u, g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_attr_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<RawMountAttr>(), MOUNT_ATTR_SIZE_VER0);
        assert_eq!(std::mem::align_of::<RawMountAttr>(), 8);
        // Field order is ABI: attr_set, attr_clr, propagation, userns_fd.
        assert_eq!(std::mem::offset_of!(RawMountAttr, attr_set), 0);
        assert_eq!(std::mem::offset_of!(RawMountAttr, attr_clr), 8);
        assert_eq!(std::mem::offset_of!(RawMountAttr, propagation), 16);
        assert_eq!(std::mem::offset_of!(RawMountAttr, userns_fd), 24);
        assert_eq!(std::mem::size_of::<MntIdReq>(), 24);
        assert_eq!(std::mem::offset_of!(MntIdReq, mnt_id), 8);
    }

    #[test]
    fn syscall_numbers() {
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(SYS_STATMOUNT, 457);
            assert_eq!(SYS_OPEN_TREE_ATTR, 467);
        }
    }

    #[test]
    fn statmount_parser_tolerates_garbage() {
        // Sizes and offsets pointing past the buffer must not panic.
        let mut b = vec![0xffu8; 600];
        b[..4].copy_from_slice(&600u32.to_ne_bytes());
        let _ = parse_statmount(&b);
        let _ = parse_statmount(&[]);
    }
}
