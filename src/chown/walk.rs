//! The walk itself: fd-relative traversal, per-entry shifting, the work queue.
//!
//! Shape: every worker runs a depth-first walk with an explicit stack of
//! [`Frame`]s (no recursion, so no call-stack depth per level). A frame holds
//! its directory's descriptor only while it is among the deepest `window`
//! frames; an older one is closed and reopened later through `..` of its child,
//! checked to be the same inode, so depth costs neither descriptors nor
//! quadratic reopening. Idle workers are fed subtrees: a worker about to
//! descend hands the already-opened directory to the shared queue instead.
//! A large directory is shared too: while a worker goes through its names and
//! another is idle, it hands the back half of the names still to do (with a
//! duplicate of the directory's descriptor) to the queue.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    self as rfs, AtFlags, Gid, Mode, OFlags, RawDir, ResolveFlags, Statx, StatxFlags, Uid, CWD,
};
use rustix::io::Errno;

use super::xattr::{
    translate_acl, AclId, FileCaps, Stash, ACL_ACCESS, ACL_DEFAULT, CAPABILITY, STASH,
};
use super::{OutOfRange, Progress, ShiftOptions, ShiftReport};
use crate::error::{Error, ErrorKind, Result};
use crate::map::{IdMap, Mapping, OVERFLOW_ID};

/// What we ask `statx` for. `MNT_ID` tells mount points apart from plain
/// entries even where `st_dev` cannot (file bind mounts from the same fs).
const STATX_MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::MODE)
    .union(StatxFlags::NLINK)
    .union(StatxFlags::UID)
    .union(StatxFlags::GID)
    .union(StatxFlags::INO)
    .union(StatxFlags::MNT_ID);

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
/// setuid and setgid: the bits the kernel drops when a file changes owner.
const SUID_SGID: u32 = 0o6000;
const PERMS: u32 = 0o7777;

/// How many times an entry that changes between our look and our action is
/// looked at again before the walk gives up with `TreeChanged`.
const RETRIES: usize = 4;
/// getdents buffer: large, so a big directory takes few system calls.
const DIRENT_BUF: usize = 256 * 1024;
/// Push totals to the shared counters (and the callback) this often.
const PROGRESS_EVERY: u64 = 4096;
/// Hard-link table shards, so threads rarely contend on one lock.
const SHARDS: usize = 64;
/// The fewest names of one directory handed to another worker: below this the
/// hand-over (a dup, a wake-up) costs about what the names do.
const MIN_PART: usize = 64;
/// How long an idle worker waits for work before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The identity and attributes of one inode as `statx` reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    dev: u64,
    ino: u64,
    /// `None` on kernels before 5.8 (no `STATX_MNT_ID`).
    mnt: Option<u64>,
    uid: u32,
    gid: u32,
    mode: u32,
    nlink: u32,
}

impl Meta {
    fn new(st: &Statx) -> Meta {
        Meta {
            dev: rfs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mnt: (st.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(st.stx_mnt_id),
            uid: st.stx_uid,
            gid: st.stx_gid,
            mode: u32::from(st.stx_mode),
            nlink: st.stx_nlink,
        }
    }
    fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    fn same_inode(&self, other: &Meta) -> bool {
        self.dev == other.dev && self.ino == other.ino && self.mnt == other.mnt
    }
    /// Whether `self` (an entry of a directory described by `dir`) is the
    /// root of another mount.
    fn is_mount_below(&self, dir: &Meta) -> bool {
        match (self.mnt, dir.mnt) {
            (Some(a), Some(b)) => a != b,
            _ => self.dev != dir.dev,
        }
    }
}

/// Counters of one worker, summed into the report at the end.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    visited: u64,
    changed: u64,
    already: u64,
    dedup: u64,
    acls: u64,
    caps: u64,
    out_of_range: u64,
    mounts: u64,
    recovered: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.visited += o.visited;
        self.changed += o.changed;
        self.already += o.already;
        self.dedup += o.dedup;
        self.acls += o.acls;
        self.caps += o.caps;
        self.out_of_range += o.out_of_range;
        self.mounts += o.mounts;
        self.recovered += o.recovered;
    }
}

/// A directory, already opened, checked and shifted itself, whose contents
/// are still to be walked: all of them, or only the names of `part`.
struct Work {
    fd: OwnedFd,
    meta: Meta,
    path: PathBuf,
    part: Option<Part>,
}

/// Some names of a directory, read by the worker that split them off.
struct Part {
    /// The names, each with its NUL.
    names: Vec<u8>,
    /// Where each name starts in `names`.
    starts: Vec<usize>,
}

struct Queue {
    items: Vec<Work>,
    workers: usize,
    idle: usize,
    finished: bool,
}

/// State shared by all workers of one run.
struct Ctx<'a> {
    uids: &'a IdMap,
    gids: &'a IdMap,
    opts: &'a ShiftOptions,
    threads: usize,
    window: usize,
    hardlinks: Vec<Mutex<HashSet<(u64, u64)>>>,
    /// With `cross_mounts`, directories already entered: a bind mount can show
    /// a directory twice, or inside itself.
    dirs_seen: Option<Mutex<HashSet<(u64, u64)>>>,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Mirror of `Queue::idle`, read without the lock on the hot path.
    waiting: AtomicUsize,
    /// Mirror of `Queue::items.len()`, likewise.
    queued: AtomicUsize,
    /// Mirror of `Queue::finished`, likewise.
    done: AtomicBool,
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    visited: AtomicU64,
    changed: AtomicU64,
    /// 0 unknown, 1 `openat2` works, 2 it does not (old kernel, seccomp).
    openat2: AtomicU8,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ctx<'_> {
    fn fail(&self, e: Error) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        self.abort.store(true, Ordering::SeqCst);
        let _q = lock(&self.queue);
        self.cv.notify_all();
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// Hand `work` to an idle worker if one is waiting; give it back otherwise.
    fn offer(&self, work: Work) -> Option<Work> {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return Some(work);
        }
        let mut q = lock(&self.queue);
        if q.items.len() >= self.threads || q.finished {
            return Some(work);
        }
        q.items.push(work);
        self.queued.store(q.items.len(), Ordering::Relaxed);
        self.cv.notify_one();
        None
    }

    /// Whether a worker is idle with nothing queued for it yet (no lock taken).
    fn hungry(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > self.queued.load(Ordering::Relaxed)
    }

    /// Queue the work `make` builds if a worker is idle with nothing queued
    /// for it; false if none is (or `make` declines).
    fn feed(&self, make: impl FnOnce() -> Option<Work>) -> bool {
        let mut q = lock(&self.queue);
        if q.items.len() >= q.idle || q.finished {
            return false;
        }
        let Some(work) = make() else { return false };
        q.items.push(work);
        self.queued.store(q.items.len(), Ordering::Relaxed);
        self.cv.notify_one();
        true
    }

    /// Claim a multiply-linked inode for this run; false if already claimed.
    fn claim(&self, m: &Meta) -> bool {
        let shard = (m.ino as usize ^ m.dev as usize) % SHARDS;
        lock(&self.hardlinks[shard]).insert((m.dev, m.ino))
    }

    fn unclaim(&self, m: &Meta) {
        let shard = (m.ino as usize ^ m.dev as usize) % SHARDS;
        lock(&self.hardlinks[shard]).remove(&(m.dev, m.ino));
    }
}

fn sys(name: &'static str, args: String, errno: Errno, path: &Path) -> Error {
    Error::sys(name, args, errno).with_path(path)
}

fn changed_under_us(path: &Path, what: &str) -> Error {
    Error::new(ErrorKind::TreeChanged(format!(
        "{what}: {}",
        path.display()
    )))
    .with_path(path)
}

fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // Digits only: no interior NUL is possible.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// The xattrs of an entry that matter to the walker.
#[derive(Debug, Default, Clone, Copy)]
struct Names {
    acl_access: bool,
    acl_default: bool,
    cap: bool,
    stash: bool,
}

impl Names {
    fn parse(list: &[u8]) -> Names {
        let mut n = Names::default();
        for name in list.split(|&b| b == 0) {
            match name {
                b"system.posix_acl_access" => n.acl_access = true,
                b"system.posix_acl_default" => n.acl_default = true,
                b"security.capability" => n.cap = true,
                b"trusted.idmapped.shift" => n.stash = true,
                _ => {}
            }
        }
        n
    }
    fn any(&self) -> bool {
        self.acl_access || self.acl_default || self.cap || self.stash
    }
}

/// An inode the walker may change mode and xattrs of, named so that no path
/// is ever followed: a real directory descriptor, or an `O_PATH` descriptor
/// reached through its `/proc/self/fd` magic link (which names exactly that
/// inode, whatever happens to the tree meanwhile).
#[derive(Clone, Copy)]
enum Handle<'f> {
    Dir(BorrowedFd<'f>),
    Path(BorrowedFd<'f>),
}

impl Handle<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match *self {
            Handle::Dir(fd) | Handle::Path(fd) => fd,
        }
    }

    fn list(&self, buf: &mut Vec<u8>) -> std::result::Result<Names, Errno> {
        loop {
            let n = match *self {
                Handle::Dir(fd) => rfs::flistxattr(fd, &mut buf[..]),
                Handle::Path(fd) => rfs::listxattr(proc_fd_path(fd), &mut buf[..]),
            };
            match n {
                Ok(n) => return Ok(Names::parse(&buf[..n])),
                Err(Errno::RANGE) => grow(buf)?,
                Err(Errno::NOTSUP) => return Ok(Names::default()),
                Err(e) => return Err(e),
            }
        }
    }

    fn get(&self, name: &str) -> std::result::Result<Option<Vec<u8>>, Errno> {
        let mut buf = vec![0u8; 256];
        loop {
            let n = match *self {
                Handle::Dir(fd) => rfs::fgetxattr(fd, name, &mut buf[..]),
                Handle::Path(fd) => rfs::getxattr(proc_fd_path(fd), name, &mut buf[..]),
            };
            match n {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(Errno::NODATA) => return Ok(None),
                Err(Errno::RANGE) => grow(&mut buf)?,
                Err(e) => return Err(e),
            }
        }
    }

    fn set(&self, name: &str, value: &[u8]) -> std::result::Result<(), Errno> {
        let flags = rfs::XattrFlags::empty();
        match *self {
            Handle::Dir(fd) => rfs::fsetxattr(fd, name, value, flags),
            Handle::Path(fd) => rfs::setxattr(proc_fd_path(fd), name, value, flags),
        }
    }

    fn remove(&self, name: &str) -> std::result::Result<(), Errno> {
        let r = match *self {
            Handle::Dir(fd) => rfs::fremovexattr(fd, name),
            Handle::Path(fd) => rfs::removexattr(proc_fd_path(fd), name),
        };
        match r {
            Err(Errno::NODATA) => Ok(()),
            r => r,
        }
    }

    fn chown(&self, uid: u32, gid: u32) -> std::result::Result<(), Errno> {
        rfs::chownat(
            self.fd(),
            c"",
            Some(Uid::from_raw_unchecked(uid)),
            Some(Gid::from_raw_unchecked(gid)),
            AtFlags::EMPTY_PATH,
        )
    }

    fn chmod(&self, mode: u32) -> std::result::Result<(), Errno> {
        let mode = Mode::from_bits_retain(mode & PERMS);
        match *self {
            Handle::Dir(fd) => rfs::fchmod(fd, mode),
            Handle::Path(fd) => rfs::chmodat(CWD, proc_fd_path(fd), mode, AtFlags::empty()),
        }
    }

    fn describe(&self) -> String {
        match *self {
            Handle::Dir(fd) => format!("fd {}", fd.as_raw_fd()),
            Handle::Path(fd) => format!("\"/proc/self/fd/{}\"", fd.as_raw_fd()),
        }
    }
}

/// Double an xattr buffer after `ERANGE`; give up at 1 MiB (the VFS limit is 64 KiB).
fn grow(buf: &mut Vec<u8>) -> std::result::Result<(), Errno> {
    let len = buf.len().saturating_mul(2).max(256);
    if len > 1 << 20 {
        return Err(Errno::RANGE);
    }
    buf.resize(len, 0);
    Ok(())
}

/// `statx` of an open fd; `path` names it in the error.
fn fstatx(fd: BorrowedFd<'_>, path: &Path) -> Result<Meta> {
    rfs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        STATX_MASK,
    )
    .map(|st| Meta::new(&st))
    .map_err(|e| {
        let args = format!("fd {}, \"\", AT_EMPTY_PATH", fd.as_raw_fd());
        sys("statx", args, e, path)
    })
}

/// Where a mapping sends one id.
enum Class {
    /// In an on-disk range: becomes this.
    Shift(u32),
    /// In a seen range: shifted before (the ranges are disjoint).
    Already,
    /// Neither.
    Outside,
}

fn classify(map: &IdMap, id: u32) -> Class {
    if let Some(seen) = map.seen(id) {
        Class::Shift(seen)
    } else if map.on_disk(id).is_some() {
        Class::Already
    } else {
        Class::Outside
    }
}

/// A subdirectory found by a scan, to be opened when the walk gets to it.
struct SubDir {
    name: CString,
    meta: Meta,
}

/// One level of a worker's depth-first walk.
struct Frame {
    /// Closed (None) for frames older than the window; reopened through `..`.
    fd: Option<OwnedFd>,
    meta: Meta,
    subdirs: Vec<SubDir>,
    next: usize,
}

/// Result of opening a subdirectory found earlier.
enum Child {
    Dir(OwnedFd, Meta),
    Gone,
    Changed,
}

struct Worker<'c, 'a> {
    ctx: &'c Ctx<'a>,
    counts: Counts,
    flushed: Counts,
    dirent: Vec<u8>,
    names: Vec<u8>,
    starts: Vec<usize>,
    list: Vec<u8>,
    pathbuf: Vec<u8>,
    /// This thread has its own working directory (`unshare(CLONE_FS)`).
    own_cwd: bool,
    /// The directory (dev, ino) that working directory is.
    cwd: Option<(u64, u64)>,
}

impl<'c, 'a> Worker<'c, 'a> {
    fn new(ctx: &'c Ctx<'a>) -> Self {
        Worker {
            ctx,
            counts: Counts::default(),
            flushed: Counts::default(),
            dirent: Vec::new(),
            names: Vec::new(),
            starts: Vec::new(),
            list: vec![0; 1024],
            pathbuf: Vec::with_capacity(512),
            own_cwd: false,
            cwd: None,
        }
    }

    fn flush_progress(&mut self) {
        let dv = self.counts.visited - self.flushed.visited;
        let dc = self.counts.changed - self.flushed.changed;
        self.flushed = self.counts;
        let visited = self.ctx.visited.fetch_add(dv, Ordering::Relaxed) + dv;
        let changed = self.ctx.changed.fetch_add(dc, Ordering::Relaxed) + dc;
        if let Some(cb) = &self.ctx.opts.progress {
            cb(&Progress { visited, changed });
        }
    }

    fn visited_one(&mut self) {
        self.counts.visited += 1;
        if self.counts.visited - self.flushed.visited >= PROGRESS_EVERY {
            self.flush_progress();
        }
    }

    /// The id an on-disk id becomes, by the mapping and the out-of-range policy.
    fn target(&mut self, map: &IdMap, kind: &'static str, id: u32, path: &Path) -> Result<u32> {
        match classify(map, id) {
            Class::Shift(n) => Ok(n),
            Class::Already => Ok(id),
            Class::Outside => {
                self.counts.out_of_range += 1;
                match self.ctx.opts.out_of_range {
                    OutOfRange::Keep => Ok(id),
                    OutOfRange::Overflow => Ok(OVERFLOW_ID),
                    OutOfRange::Fail => {
                        Err(Error::new(ErrorKind::IdOutOfRange { kind, id }).with_path(path))
                    }
                }
            }
        }
    }

    /// New owner and group, and whether both were shifted already.
    fn owner(&mut self, uid: u32, gid: u32, path: &Path) -> Result<(u32, u32)> {
        let (uids, gids) = (self.ctx.uids, self.ctx.gids);
        if matches!(classify(uids, uid), Class::Already)
            && matches!(classify(gids, gid), Class::Already)
        {
            self.counts.already += 1;
        }
        let nu = self.target(uids, "uid", uid, path)?;
        let ng = self.target(gids, "gid", gid, path)?;
        Ok((nu, ng))
    }

    /// Like [`owner`](Self::owner) where the mapping covers both ids; None
    /// (and nothing counted) where it does not.
    fn owner_covered(&mut self, uid: u32, gid: u32) -> Option<(u32, u32)> {
        let (cu, cg) = (classify(self.ctx.uids, uid), classify(self.ctx.gids, gid));
        let nu = match cu {
            Class::Shift(n) => n,
            Class::Already => uid,
            Class::Outside => return None,
        };
        let ng = match cg {
            Class::Shift(n) => n,
            Class::Already => gid,
            Class::Outside => return None,
        };
        if matches!((cu, cg), (Class::Already, Class::Already)) {
            self.counts.already += 1;
        }
        Some((nu, ng))
    }

    /// `/proc/self/fd/<dir>/<name>`: names exactly `name` in the held
    /// directory; with the `l*` xattr calls its last component is not followed.
    fn proc_entry_path(&mut self, dir: BorrowedFd<'_>, name: &CStr) -> &CStr {
        use std::io::Write;
        self.pathbuf.clear();
        let _ = write!(self.pathbuf, "/proc/self/fd/{}/", dir.as_raw_fd());
        self.pathbuf.extend_from_slice(name.to_bytes());
        self.pathbuf.push(0);
        CStr::from_bytes_with_nul(&self.pathbuf).unwrap_or(c"")
    }

    /// List an entry's xattr names without opening it: relative to this
    /// thread's own working directory, moved to `dir`, where the thread has
    /// one (a single-name lookup, like the `*at` calls); else through
    /// `/proc/self/fd/<dir>/<name>`, which costs a few /proc lookups more.
    fn list_at(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        name: &CStr,
    ) -> std::result::Result<Names, Errno> {
        if self.own_cwd && self.cwd != Some((dmeta.dev, dmeta.ino)) {
            match rustix::process::fchdir(dir) {
                Ok(()) => self.cwd = Some((dmeta.dev, dmeta.ino)),
                Err(_) => self.own_cwd = false,
            }
        }
        let mut list = std::mem::take(&mut self.list);
        let r = loop {
            let path = if self.own_cwd {
                name
            } else {
                self.proc_entry_path(dir, name)
            };
            match rfs::llistxattr(path, &mut list[..]) {
                Ok(n) => break Ok(Names::parse(&list[..n])),
                Err(Errno::RANGE) => {
                    if let Err(e) = grow(&mut list) {
                        break Err(e);
                    }
                }
                Err(Errno::NOTSUP) => break Ok(Names::default()),
                Err(e) => break Err(e),
            }
        };
        self.list = list;
        r
    }

    /// Read all names of a directory, handle every non-directory, and return
    /// the subdirectories (statx'ed, not yet opened).
    fn scan(&mut self, dir: BorrowedFd<'_>, dmeta: &Meta, path: &Path) -> Result<Vec<SubDir>> {
        self.names.clear();
        self.starts.clear();
        if self.dirent.capacity() < DIRENT_BUF {
            self.dirent = Vec::with_capacity(DIRENT_BUF);
        }
        let mut dirent = std::mem::take(&mut self.dirent);
        {
            let buf: &mut [MaybeUninit<u8>] = dirent.spare_capacity_mut();
            let mut it = RawDir::new(dir, buf);
            while let Some(entry) = it.next() {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        self.dirent = dirent;
                        return Err(sys(
                            "getdents64",
                            format!("fd {}", dir.as_raw_fd()),
                            e,
                            path,
                        ));
                    }
                };
                let name = entry.file_name().to_bytes_with_nul();
                if name == b".\0" || name == b"..\0" {
                    continue;
                }
                self.starts.push(self.names.len());
                self.names.extend_from_slice(name);
            }
        }
        self.dirent = dirent;
        let names = std::mem::take(&mut self.names);
        let starts = std::mem::take(&mut self.starts);
        let result = self.visit_names(dir, dmeta, path, &names, &starts);
        self.names = names;
        self.starts = starts;
        result
    }

    /// Visit the names of `dir` listed by `names` and `starts` (as [`scan`]
    /// collects them); return the subdirectories. While another worker is
    /// idle, the back half of the names still to do goes to it.
    ///
    /// [`scan`]: Self::scan
    fn visit_names(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        path: &Path,
        names: &[u8],
        starts: &[usize],
    ) -> Result<Vec<SubDir>> {
        let mut subdirs = Vec::new();
        let mut to = starts.len();
        let mut i = 0;
        while i < to {
            if self.ctx.aborted() {
                break;
            }
            if to - i >= 2 * MIN_PART && self.ctx.hungry() {
                let cut = i + (to - i) / 2;
                let end = starts.get(to).copied().unwrap_or(names.len());
                let fed = self.ctx.feed(|| {
                    // No descriptor to spare: keep the names.
                    let fd = rustix::io::fcntl_dupfd_cloexec(dir, 0).ok()?;
                    let base = starts[cut];
                    Some(Work {
                        fd,
                        meta: *dmeta,
                        path: path.to_path_buf(),
                        part: Some(Part {
                            names: names[base..end].to_vec(),
                            starts: starts[cut..to].iter().map(|s| s - base).collect(),
                        }),
                    })
                });
                if fed {
                    to = cut;
                }
            }
            let start = starts[i];
            let end = starts.get(i + 1).copied().unwrap_or(names.len());
            i += 1;
            let Ok(name) = CStr::from_bytes_with_nul(&names[start..end]) else {
                continue;
            };
            self.visit(dir, dmeta, path, name, &mut subdirs)?;
        }
        Ok(subdirs)
    }

    /// Look at one name: a directory goes to `subdirs`, anything else is shifted now.
    fn visit(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        dpath: &Path,
        name: &CStr,
        subdirs: &mut Vec<SubDir>,
    ) -> Result<()> {
        self.visited_one();
        for _ in 0..RETRIES {
            let st = match rfs::statx(
                dir,
                name,
                AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
                STATX_MASK,
            ) {
                Ok(st) => Meta::new(&st),
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => {
                    let p = dpath.join(OsStr::from_bytes(name.to_bytes()));
                    return Err(sys(
                        "statx",
                        format!("fd {}, {name:?}, AT_SYMLINK_NOFOLLOW", dir.as_raw_fd()),
                        e,
                        &p,
                    ));
                }
            };
            if st.is_mount_below(dmeta) && !self.ctx.opts.cross_mounts {
                self.counts.mounts += 1;
                return Ok(());
            }
            if st.is_dir() {
                subdirs.push(SubDir {
                    name: name.to_owned(),
                    meta: st,
                });
                return Ok(());
            }
            if self.shift_nondir(dir, dmeta, dpath, name, &st)? {
                return Ok(());
            }
        }
        let p = dpath.join(OsStr::from_bytes(name.to_bytes()));
        Err(changed_under_us(
            &p,
            "entry kept changing while being shifted",
        ))
    }

    /// Shift a non-directory; false when it turned out to be another inode
    /// than the one examined (look again).
    fn shift_nondir(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        dpath: &Path,
        name: &CStr,
        st: &Meta,
    ) -> Result<bool> {
        let path = || dpath.join(OsStr::from_bytes(name.to_bytes()));
        if st.nlink > 1 && !self.ctx.claim(st) {
            self.counts.dedup += 1;
            return Ok(true);
        }
        let names = if st.is_symlink() {
            // Symlinks carry neither ACLs nor capabilities, and are never stashed.
            Names::default()
        } else {
            match self.list_at(dir, dmeta, name) {
                Ok(n) => n,
                Err(Errno::NOENT) => return Ok(true),
                Err(e) => {
                    let a = format!("{name:?} in the directory of fd {}", dir.as_raw_fd());
                    return Err(sys("llistxattr", a, e, &path()));
                }
            }
        };
        let sensitive = !st.is_symlink() && st.mode & SUID_SGID != 0;
        if !names.any() && !sensitive {
            // The common case: only the owner changes, and nothing the kernel
            // drops on chown needs restoring. One call, relative to the held
            // directory, not following a symlink: a swapped entry can at worst
            // be another entry of this directory, never something outside.
            let (nu, ng) = match self.owner_covered(st.uid, st.gid) {
                Some(ids) => ids,
                // The out-of-range policy may fail, naming the entry.
                None => self.owner(st.uid, st.gid, &path())?,
            };
            if (nu, ng) != (st.uid, st.gid) {
                if !self.ctx.opts.dry_run {
                    match rfs::chownat(
                        dir,
                        name,
                        Some(Uid::from_raw_unchecked(nu)),
                        Some(Gid::from_raw_unchecked(ng)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    ) {
                        Ok(()) => {}
                        Err(Errno::NOENT) => return Ok(true),
                        Err(e) => {
                            let a = format!(
                                "fd {}, {name:?}, {nu}, {ng}, AT_SYMLINK_NOFOLLOW",
                                dir.as_raw_fd()
                            );
                            return Err(sys("fchownat", a, e, &path()));
                        }
                    }
                }
                self.counts.changed += 1;
            }
            return Ok(true);
        }
        // Mode or xattrs to carry over: pin the inode first. O_PATH opens
        // nothing (no fifo blocks, no device driver runs).
        let fd = match rfs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(true),
            Err(e) => {
                let a = format!("fd {}, {name:?}, O_PATH|O_NOFOLLOW", dir.as_raw_fd());
                return Err(sys("openat", a, e, &path()));
            }
        };
        let now = fstatx(fd.as_fd(), &path())?;
        if !now.same_inode(st) {
            if st.nlink > 1 {
                self.ctx.unclaim(st);
            }
            return Ok(false);
        }
        self.shift_inode(Handle::Path(fd.as_fd()), &now, &path())?;
        Ok(true)
    }

    /// The full procedure for one pinned inode: ACLs, owner, mode, capability,
    /// with the crash-recovery stash around the chown where the kernel drops
    /// setuid/setgid or capabilities.
    fn shift_inode(&mut self, h: Handle<'_>, m: &Meta, path: &Path) -> Result<()> {
        let xerr = |call: &'static str, what: &str, e: Errno| {
            sys(call, format!("{}, {what:?}", h.describe()), e, path)
        };
        let names = if m.is_symlink() {
            Names::default()
        } else {
            h.list(&mut self.list)
                .map_err(|e| xerr("listxattr", "", e))?
        };

        // A stash left by a run that died mid-entry describes the state
        // before the shift; trust it only if the owner is still the one it
        // had before or the one the shift was giving it.
        let stash = if names.stash {
            h.get(STASH)
                .map_err(|e| xerr("getxattr", STASH, e))?
                .and_then(|b| Stash::decode(&b))
                .filter(|s| {
                    (m.uid, m.gid) == (s.uid, s.gid) || (m.uid, m.gid) == (s.new_uid, s.new_gid)
                })
        } else {
            None
        };
        let (buid, bgid, bmode) = match &stash {
            Some(s) => (s.uid, s.gid, s.mode),
            None => (m.uid, m.gid, m.mode),
        };
        let base_cap = match &stash {
            Some(s) => s.cap.clone(),
            None if names.cap => h
                .get(CAPABILITY)
                .map_err(|e| xerr("getxattr", CAPABILITY, e))?,
            None => None,
        };

        // Plan everything first, so that a refused id (OutOfRange::Fail)
        // leaves this entry untouched.
        let (nu, ng) = self.owner(buid, bgid, path)?;
        let new_cap = match &base_cap {
            None => None,
            Some(raw) => {
                let caps = FileCaps::parse(raw).ok_or_else(|| {
                    Error::new(ErrorKind::InvalidInput(format!(
                        "{CAPABILITY} value {raw:02x?} is neither revision 2 nor 3: \
                         a chown would drop it and it could not be restored"
                    )))
                    .with_path(path)
                })?;
                match classify(self.ctx.uids, caps.rootid) {
                    Class::Shift(r) => Some(caps.with_rootid(r).encode()),
                    Class::Already => Some(raw.clone()),
                    Class::Outside => {
                        self.counts.out_of_range += 1;
                        match self.ctx.opts.out_of_range {
                            OutOfRange::Keep => Some(raw.clone()),
                            OutOfRange::Overflow => None,
                            OutOfRange::Fail => {
                                return Err(Error::new(ErrorKind::IdOutOfRange {
                                    kind: "uid",
                                    id: caps.rootid,
                                })
                                .with_path(path))
                            }
                        }
                    }
                }
            }
        };
        let mut acls: Vec<(&'static str, Vec<u8>)> = Vec::new();
        for (present, xname) in [
            (names.acl_access, ACL_ACCESS),
            (names.acl_default, ACL_DEFAULT),
        ] {
            if !present {
                continue;
            }
            let Some(value) = h.get(xname).map_err(|e| xerr("getxattr", xname, e))? else {
                continue;
            };
            let translated = translate_acl(&value, |kind, id| match kind {
                AclId::User => self.target(self.ctx.uids, "uid", id, path),
                AclId::Group => self.target(self.ctx.gids, "gid", id, path),
            });
            match translated {
                Err(()) => {
                    return Err(Error::new(ErrorKind::InvalidInput(format!(
                        "{xname} is not a version 2 POSIX ACL"
                    )))
                    .with_path(path))
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(new))) => acls.push((xname, new)),
                Ok(Ok(None)) => {}
            }
        }

        let need_chown = (m.uid, m.gid) != (nu, ng);
        // What the kernel drops on chown of a non-directory.
        let kills = need_chown && !m.is_dir() && (bmode & SUID_SGID != 0 || base_cap.is_some());
        let restore_mode = !m.is_dir()
            && !m.is_symlink()
            && ((need_chown && bmode & SUID_SGID != 0) || m.mode & PERMS != bmode & PERMS);
        let cap_differs = base_cap != new_cap;
        let changes = need_chown || restore_mode || cap_differs || !acls.is_empty() || names.stash;
        if stash.is_some() {
            self.counts.recovered += 1;
        }
        if !changes {
            return Ok(());
        }
        self.counts.changed += 1;
        self.counts.acls += acls.len() as u64;
        if cap_differs {
            self.counts.caps += 1;
        }
        if self.ctx.opts.dry_run {
            return Ok(());
        }

        // ACL values are replaced atomically and chown leaves them alone:
        // they need no stash.
        for (xname, value) in &acls {
            h.set(xname, value)
                .map_err(|e| xerr("setxattr", xname, e))?;
        }
        let mut stashed = names.stash;
        if kills && stash.is_none() {
            let s = Stash {
                uid: buid,
                gid: bgid,
                mode: bmode,
                new_uid: nu,
                new_gid: ng,
                cap: base_cap.clone(),
            };
            match h.set(STASH, &s.encode()) {
                Ok(()) => stashed = true,
                // No xattrs on this filesystem (hence no capabilities), or
                // no CAP_SYS_ADMIN for trusted.*: only a setuid/setgid bit
                // is at stake, restored right below, so go on without the
                // stash (a kill in those few instructions would lose it).
                Err(Errno::NOTSUP | Errno::PERM) if base_cap.is_none() => {}
                Err(e) => return Err(xerr("setxattr", STASH, e)),
            }
        }
        if need_chown {
            h.chown(nu, ng).map_err(|e| {
                sys(
                    "fchownat",
                    format!("{}, \"\", {nu}, {ng}, AT_EMPTY_PATH", h.describe()),
                    e,
                    path,
                )
            })?;
        }
        if restore_mode {
            h.chmod(bmode).map_err(|e| {
                sys(
                    "chmod",
                    format!("{}, {:o}", h.describe(), bmode & PERMS),
                    e,
                    path,
                )
            })?;
        }
        if base_cap.is_some() || new_cap.is_some() {
            let current = h
                .get(CAPABILITY)
                .map_err(|e| xerr("getxattr", CAPABILITY, e))?;
            if current != new_cap {
                match &new_cap {
                    Some(v) => h
                        .set(CAPABILITY, v)
                        .map_err(|e| xerr("setxattr", CAPABILITY, e))?,
                    None => h
                        .remove(CAPABILITY)
                        .map_err(|e| xerr("removexattr", CAPABILITY, e))?,
                }
            }
        }
        if stashed {
            h.remove(STASH).map_err(|e| xerr("removexattr", STASH, e))?;
        }
        Ok(())
    }

    /// Open a subdirectory found by a scan and check it is still that one.
    fn open_child(
        &mut self,
        parent: BorrowedFd<'_>,
        sd: &SubDir,
        pmeta: &Meta,
        path: &Path,
    ) -> Result<Child> {
        let cross = sd.meta.is_mount_below(pmeta);
        let fd = match open_dir(self.ctx, parent, &sd.name, cross) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Child::Gone),
            Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV | Errno::AGAIN) => {
                return Ok(Child::Changed)
            }
            Err(e) => {
                let p = path.join(OsStr::from_bytes(sd.name.to_bytes()));
                let a = format!(
                    "fd {}, {:?}, O_RDONLY|O_DIRECTORY|O_NOFOLLOW, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS{}",
                    parent.as_raw_fd(),
                    sd.name,
                    if cross { "" } else { "|RESOLVE_NO_XDEV" }
                );
                return Err(sys("openat2", a, e, &p));
            }
        };
        let m = fstatx(fd.as_fd(), path)?;
        if !m.same_inode(&sd.meta) || !m.is_dir() {
            return Ok(Child::Changed);
        }
        Ok(Child::Dir(fd, m))
    }

    /// Walk the contents of one directory (already shifted itself).
    fn run_subtree(&mut self, work: Work) -> Result<()> {
        let Work {
            fd,
            meta,
            mut path,
            part,
        } = work;
        let subdirs = match part {
            None => self.scan(fd.as_fd(), &meta, &path)?,
            Some(p) => self.visit_names(fd.as_fd(), &meta, &path, &p.names, &p.starts)?,
        };
        let mut stack = vec![Frame {
            fd: Some(fd),
            meta,
            subdirs,
            next: 0,
        }];
        // Frames below `lowest_open` have their descriptor closed.
        let mut lowest_open = 0usize;
        let mut open = 1usize;
        let mut tries = 0usize;
        // Subdirectories still to do in all frames: a child is handed to an
        // idle worker only while this one has other work left, so a chain of
        // single subdirectories does not bounce between threads.
        let mut pending = stack[0].subdirs.len();
        loop {
            if self.ctx.aborted() {
                return Ok(());
            }
            let Some(top) = stack.last_mut() else { break };
            if top.next >= top.subdirs.len() {
                let Some(done) = stack.pop() else { break };
                if done.fd.is_some() {
                    open = open.saturating_sub(1);
                }
                let Some(parent) = stack.last_mut() else {
                    break;
                };
                path.pop();
                if parent.fd.is_none() {
                    let Some(child_fd) = done.fd else {
                        return Err(lost(&path));
                    };
                    parent.fd = Some(reopen_parent(child_fd.as_fd(), &parent.meta, &path)?);
                    open += 1;
                    lowest_open = stack.len() - 1;
                }
                continue;
            }
            let pmeta = top.meta;
            let idx = top.next;
            let Some(parent) = top.fd.as_ref() else {
                return Err(lost(&path));
            };
            let parent = parent.as_fd();
            let sd = &top.subdirs[idx];
            let (cfd, cmeta) = match self.open_child(parent, sd, &pmeta, &path)? {
                Child::Dir(fd, m) => (fd, m),
                Child::Gone => {
                    top.next += 1;
                    pending = pending.saturating_sub(1);
                    tries = 0;
                    continue;
                }
                Child::Changed => {
                    // Look at the name again: whatever is there now is in this
                    // directory, so it is ours to shift (a symlink now, say).
                    tries += 1;
                    if tries > RETRIES {
                        let p = path.join(OsStr::from_bytes(sd.name.to_bytes()));
                        return Err(changed_under_us(
                            &p,
                            "directory kept changing while being opened",
                        ));
                    }
                    let name = sd.name.clone();
                    let mut again = Vec::new();
                    // visit() counts the name; it was counted by the scan already.
                    self.counts.visited = self.counts.visited.saturating_sub(1);
                    self.visit(parent, &pmeta, &path, &name, &mut again)?;
                    match again.pop() {
                        Some(sd) => top.subdirs[idx] = sd,
                        None => {
                            top.next += 1;
                            pending = pending.saturating_sub(1);
                            tries = 0;
                        }
                    }
                    continue;
                }
            };
            top.next += 1;
            pending = pending.saturating_sub(1);
            tries = 0;
            // The name is not needed again; free it (wide trees).
            let name = std::mem::take(&mut top.subdirs[idx].name);
            if let Some(seen) = &self.ctx.dirs_seen {
                if !lock(seen).insert((cmeta.dev, cmeta.ino)) {
                    continue;
                }
            }
            path.push(OsStr::from_bytes(name.to_bytes()));
            self.shift_inode(Handle::Dir(cfd.as_fd()), &cmeta, &path)?;
            let mut cfd = cfd;
            if pending > 0 && self.ctx.waiting.load(Ordering::Relaxed) > 0 {
                let work = Work {
                    fd: cfd,
                    meta: cmeta,
                    path: path.clone(),
                    part: None,
                };
                match self.ctx.offer(work) {
                    None => {
                        path.pop();
                        continue;
                    }
                    Some(w) => cfd = w.fd,
                }
            }
            let subdirs = self.scan(cfd.as_fd(), &cmeta, &path)?;
            pending += subdirs.len();
            stack.push(Frame {
                fd: Some(cfd),
                meta: cmeta,
                subdirs,
                next: 0,
            });
            open += 1;
            if open > self.ctx.window && lowest_open + 1 < stack.len() {
                stack[lowest_open].fd = None;
                lowest_open += 1;
                open = open.saturating_sub(1);
            }
        }
        Ok(())
    }
}

fn lost(path: &Path) -> Error {
    changed_under_us(path, "internal: the walk lost a directory descriptor")
}

/// Open a directory entry as a directory, never through a symlink, never out
/// of `parent`, and (unless `cross`) never onto another mount.
fn open_dir(
    ctx: &Ctx<'_>,
    parent: BorrowedFd<'_>,
    name: &CStr,
    cross: bool,
) -> std::result::Result<OwnedFd, Errno> {
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if ctx.openat2.load(Ordering::Relaxed) != 2 {
        let mut resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        if !cross {
            resolve |= ResolveFlags::NO_XDEV;
        }
        for _ in 0..8 {
            match rfs::openat2(parent, name, oflags, Mode::empty(), resolve) {
                // A concurrent rename makes RESOLVE_BENEATH ask for a retry.
                Err(Errno::AGAIN) => continue,
                // Old kernel or a seccomp filter: fall back for the rest of the run.
                Err(Errno::NOSYS) | Err(Errno::PERM) => {
                    ctx.openat2.store(2, Ordering::Relaxed);
                    break;
                }
                r => {
                    ctx.openat2.store(1, Ordering::Relaxed);
                    return r;
                }
            }
        }
        if ctx.openat2.load(Ordering::Relaxed) != 2 {
            return Err(Errno::AGAIN);
        }
    }
    // A single name with O_NOFOLLOW cannot leave `parent` or follow a link;
    // the caller checks (dev, ino, mount) afterwards, which also catches a
    // mount that appeared since the scan.
    rfs::openat(parent, name, oflags, Mode::empty())
}

/// Reopen a directory whose descriptor was given up, as the parent of its
/// child, and check it is still the same inode on the same mount.
fn reopen_parent(child: BorrowedFd<'_>, expect: &Meta, path: &Path) -> Result<OwnedFd> {
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::openat(child, c"..", oflags, Mode::empty()).map_err(|e| {
        sys(
            "openat",
            format!("fd {}, \"..\", O_DIRECTORY|O_NOFOLLOW", child.as_raw_fd()),
            e,
            path,
        )
    })?;
    let m = fstatx(fd.as_fd(), path)?;
    if !m.same_inode(expect) {
        return Err(changed_under_us(
            path,
            "a directory was moved during the walk",
        ));
    }
    Ok(fd)
}

fn worker(ctx: &Ctx<'_>, spawned: bool) -> Counts {
    let mut w = Worker::new(ctx);
    // A thread of our own may have a working directory of its own: then the
    // xattr listing, which has no `*at` form in rustix, can name an entry
    // relative to the directory being walked instead of through /proc.
    // Never on the caller's thread, whose working directory is not ours.
    if spawned && crate::sys::unshare_fs().is_ok() {
        w.own_cwd = true;
    }
    lock(&ctx.queue).workers += 1;
    loop {
        let item = {
            let mut q = lock(&ctx.queue);
            loop {
                if q.finished || ctx.aborted() {
                    break None;
                }
                if let Some(it) = q.items.pop() {
                    ctx.queued.store(q.items.len(), Ordering::Relaxed);
                    break Some(it);
                }
                q.idle += 1;
                ctx.waiting.store(q.idle, Ordering::Relaxed);
                if q.idle == q.workers {
                    // Nobody is walking and nothing is queued: done.
                    q.finished = true;
                    ctx.done.store(true, Ordering::Relaxed);
                    ctx.cv.notify_all();
                    break None;
                }
                // Work usually comes within microseconds (a worker splits its
                // directory as soon as it sees this one idle): wait for it
                // awake for a moment, since waking a sleeping thread can
                // take a millisecond (an idle virtual CPU). Still counted idle.
                drop(q);
                let since = Instant::now();
                while ctx.queued.load(Ordering::Relaxed) == 0
                    && !ctx.done.load(Ordering::Relaxed)
                    && !ctx.aborted()
                    && since.elapsed() < SPIN
                {
                    std::hint::spin_loop();
                }
                q = lock(&ctx.queue);
                if q.items.is_empty() && !q.finished && !ctx.aborted() {
                    q = ctx.cv.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
                q.idle -= 1;
                ctx.waiting.store(q.idle, Ordering::Relaxed);
            }
        };
        let Some(item) = item else { break };
        if let Err(e) = w.run_subtree(item) {
            ctx.fail(e);
        }
    }
    w.flush_progress();
    w.counts
}

/// Descriptors this process may still open: the soft limit minus those open now.
fn fd_budget() -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    let in_use = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(64);
    limit.saturating_sub(in_use)
}

/// Check that `/proc/self/fd/N` names the inode of N: the walker names
/// `O_PATH` descriptors that way, and must not trust a /proc that is absent
/// or not procfs.
fn check_proc(root: BorrowedFd<'_>, meta: &Meta, path: &Path) -> Result<()> {
    let p = proc_fd_path(root);
    match rfs::statx(CWD, &p, AtFlags::empty(), STATX_MASK) {
        Ok(st) if Meta::new(&st).same_inode(meta) => Ok(()),
        Ok(_) => Err(Error::new(ErrorKind::InvalidInput(format!(
            "{p:?} does not lead to the tree's root: /proc is not a working procfs"
        )))
        .with_path(path)),
        Err(e) => Err(sys("statx", format!("{p:?}, 0"), e, path).with_kind(
            ErrorKind::InvalidInput("the walker needs procfs mounted on /proc".into()),
        )),
    }
}

pub(super) fn run(root: &Path, mapping: &Mapping, opts: &ShiftOptions) -> Result<ShiftReport> {
    let start = Instant::now();
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_fd = rfs::openat(CWD, root, oflags, Mode::empty()).map_err(|e| {
        sys(
            "openat",
            format!("AT_FDCWD, {root:?}, O_DIRECTORY|O_NOFOLLOW"),
            e,
            root,
        )
    })?;
    let root_meta = fstatx(root_fd.as_fd(), root)?;
    check_proc(root_fd.as_fd(), &root_meta, root)?;
    // A second descriptor for the queue; the first stays for the root's own
    // shift, which comes last.
    let work_fd = rfs::openat(&root_fd, c".", oflags, Mode::empty()).map_err(|e| {
        sys(
            "openat",
            format!("fd {}, \".\"", root_fd.as_raw_fd()),
            e,
            root,
        )
    })?;

    let mut threads = match opts.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    // Each worker needs its window of directory descriptors plus a few for
    // the entry at hand and one queued subtree. Fewer threads rather than
    // EMFILE when the limit is low.
    let budget = fd_budget().saturating_sub(8);
    if budget < 6 {
        return Err(sys(
            "openat",
            "not enough file descriptors left".into(),
            Errno::MFILE,
            root,
        ));
    }
    threads = threads.clamp(1, (budget / 6) as usize);
    let window = ((budget / threads as u64).saturating_sub(4) as usize).clamp(2, 64);

    let ctx = Ctx {
        uids: mapping.uids(),
        gids: mapping.gids(),
        opts,
        threads,
        window,
        hardlinks: (0..SHARDS).map(|_| Mutex::new(HashSet::new())).collect(),
        dirs_seen: opts
            .cross_mounts
            .then(|| Mutex::new(HashSet::from([(root_meta.dev, root_meta.ino)]))),
        queue: Mutex::new(Queue {
            items: vec![Work {
                fd: work_fd,
                meta: root_meta,
                path: root.to_path_buf(),
                part: None,
            }],
            workers: 0,
            idle: 0,
            finished: false,
        }),
        cv: Condvar::new(),
        waiting: AtomicUsize::new(0),
        queued: AtomicUsize::new(1),
        done: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        visited: AtomicU64::new(0),
        changed: AtomicU64::new(0),
        // IDMAPPED_FORCE_FALLBACK=openat2 tests the pre-5.6 path.
        openat2: AtomicU8::new(if crate::features::forced_fallback("openat2") {
            2
        } else {
            0
        }),
    };

    let mut counts = Counts::default();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("idmapped-shift-{i}"))
                .spawn_scoped(s, || worker(&ctx, true));
            // Could not start a thread: the others share its work.
            if let Ok(h) = spawned {
                handles.push(h);
            }
        }
        if handles.is_empty() {
            counts.add(&worker(&ctx, false));
        }
        for h in handles {
            match h.join() {
                Ok(c) => counts.add(&c),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    if let Some(e) = lock(&ctx.error).take() {
        return Err(e);
    }

    // The root last: once it shows the seen ids, the whole tree is done.
    let mut w = Worker::new(&ctx);
    w.visited_one();
    w.shift_inode(Handle::Dir(root_fd.as_fd()), &root_meta, root)?;
    w.flush_progress();
    counts.add(&w.counts);

    Ok(ShiftReport {
        visited: counts.visited,
        changed: counts.changed,
        already_shifted: counts.already,
        hardlinks_deduplicated: counts.dedup,
        acls_rewritten: counts.acls,
        capabilities_rewritten: counts.caps,
        out_of_range: counts.out_of_range,
        skipped_mounts: counts.mounts,
        recovered: counts.recovered,
        elapsed: start.elapsed(),
    })
}
