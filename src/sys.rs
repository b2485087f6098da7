//! The crate's only `unsafe` code: thin shims over system calls that neither
//! rustix nor libc wrap, each returning owned types and an [`Errno`].
//!
//! Everything here is deliberately dumb: no diagnosis, no fallbacks. The
//! modules above turn an errno into an [`ErrorKind`](crate::ErrorKind).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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
    pub const MNT_ATTR: usize = 64;
    pub const SUPPORTED_MASK: usize = 144;
    pub const UIDMAP_NUM: usize = 152;
    pub const UIDMAP: usize = 156;
    pub const GIDMAP_NUM: usize = 160;
    pub const GIDMAP: usize = 164;
    /// Where the string area `str[]` starts.
    pub const STR: usize = 512;
}

pub(crate) const STATMOUNT_MNT_BASIC: u64 = 0x2;
pub(crate) const STATMOUNT_SUPPORTED_MASK: u64 = 0x1000;
pub(crate) const STATMOUNT_MNT_UIDMAP: u64 = 0x2000;
pub(crate) const STATMOUNT_MNT_GIDMAP: u64 = 0x4000;

/// What `statmount` returned that this crate uses.
#[derive(Debug, Clone, Default)]
pub(crate) struct Statmount {
    /// The `mask` of fields the kernel filled in.
    pub mask: u64,
    pub mnt_attr: u64,
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
    Statmount {
        mask,
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

/// A child process parked in a new user namespace, sharing our address space
/// (`CLONE_VM`) so that creating it costs the same whatever our resident size.
///
/// It does nothing but sleep until it is killed. Dropping the handle kills and
/// reaps it on every path; the namespace lives on as long as an fd to
/// `/proc/PID/ns/user` is open.
pub(crate) struct ParkedChild {
    pid: libc::pid_t,
    /// The child's stack; must outlive the child, so it is freed only after reaping.
    _stack: Vec<u128>,
}

/// Stack for the parked child: it makes one system call in a loop.
const CHILD_STACK_BYTES: usize = 16 * 1024;

/// The child's entire life: sleep until killed. Runs on its own small stack
/// in our address space, so it must not touch memory that another thread may
/// use (no allocation, no errno, no TLS): only raw `pause` system calls via
/// `libc::syscall`, which sets errno only on failure, and `pause` fails only
/// with EINTR, which cannot happen with every signal blocked.
extern "C" fn parked_child_main(_: *mut libc::c_void) -> libc::c_int {
    loop {
        // SAFETY: `pause` has no arguments and no memory effects.
        unsafe { libc::syscall(libc::SYS_pause) };
    }
}

impl ParkedChild {
    /// `clone(CLONE_NEWUSER | CLONE_VM, exit signal 0)` with every signal blocked,
    /// so that no handler of ours ever runs on the child's small stack.
    ///
    /// # References
    /// - [`clone(2)`](https://man7.org/linux/man-pages/man2/clone.2.html)
    pub(crate) fn spawn() -> Result<ParkedChild, Errno> {
        let mut stack: Vec<u128> = vec![0; CHILD_STACK_BYTES / 16];
        // The stack grows down: hand the kernel its (16-byte aligned) top.
        let top = stack.as_mut_ptr_range().end as *mut libc::c_void;

        // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask only
        // write the sets we pass.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        // No exit signal: a clone child that raises no SIGCHLD is invisible to
        // an application's `waitpid(-1, ..)` reaper, so only we can reap it
        // (with __WCLONE).
        let flags = libc::CLONE_NEWUSER | libc::CLONE_VM;
        // SAFETY: `parked_child_main` never returns and touches no shared
        // memory; `top` is the end of a live stack that outlives the child
        // (dropped only after the child is reaped, see `Drop`).
        let pid = unsafe { libc::clone(parked_child_main, top, flags, std::ptr::null_mut()) };
        let clone_errno = errno();
        // SAFETY: restoring the mask we saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        if pid < 0 {
            return Err(clone_errno);
        }
        Ok(ParkedChild { pid, _stack: stack })
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }
}

impl Drop for ParkedChild {
    fn drop(&mut self) {
        // SAFETY: `pid` is our unreaped child (only `__WCLONE` waits can reap
        // it), so it cannot have been recycled for another process.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        loop {
            let mut status = 0;
            // SAFETY: waiting for our own child; `status` is a valid out-pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::__WCLONE) };
            if r >= 0 || errno() != Errno::INTR {
                break;
            }
        }
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
