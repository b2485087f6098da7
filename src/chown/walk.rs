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
//!
//! Per entry: one open pins the name, `statx` of that descriptor must show
//! the inode the listing's `d_ino` named (else the directory is walked again
//! afterwards), and every read and write goes through the descriptor. Where
//! the walk goes through a `nodev` mount ([`View`]) a regular file is opened
//! for reading, so its xattr calls take the descriptor itself; anything
//! else, and every entry elsewhere, is pinned `O_PATH` and its xattr calls
//! name it through `/proc/self/fd`. See the module docs of `chown` for the
//! bookkeeping (record, ctime threshold, stash).
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::hash::{Hash, Hasher};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{
    self as rfs, AtFlags, Gid, Mode, OFlags, RawDir, ResolveFlags, Statx, StatxAttributes,
    StatxFlags, Uid, CWD,
};
use rustix::io::Errno;

use super::xattr::{
    translate_acl, AclId, FileCaps, Stash, State, ACL_ACCESS, ACL_DEFAULT, CAPABILITY, STASH,
};
use super::{EntryAccess, KeptId, OutOfRange, OutsideLinks, Progress, ShiftOptions, ShiftReport};
use crate::error::{Error, ErrorKind, Result};
use crate::features::{self, Availability};
use crate::map::{IdMap, Mapping, OVERFLOW_ID};
use crate::mount::{CloneFlags, DetachedMount, MountAttr, MountAttrFlags};

const DT_UNKNOWN: u8 = 0;
const DT_DIR: u8 = 4;
const DT_REG: u8 = 8;
const DT_LNK: u8 = 10;
/// Fifos, sockets, devices: never opened for reading.
const DT_OTHER: u8 = 1;

/// A listing's file type, as the `DT_*` number the walker needs.
fn dtype(t: rfs::FileType) -> u8 {
    match t {
        rfs::FileType::Directory => DT_DIR,
        rfs::FileType::Symlink => DT_LNK,
        rfs::FileType::RegularFile => DT_REG,
        rfs::FileType::Unknown => DT_UNKNOWN,
        _ => DT_OTHER,
    }
}

/// What we ask `statx` for. `MNT_ID` tells mount points apart from plain
/// entries even where `st_dev` cannot (file bind mounts from the same fs);
/// `CTIME` is the bookkeeping's clock.
const STATX_MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::MODE)
    .union(StatxFlags::NLINK)
    .union(StatxFlags::UID)
    .union(StatxFlags::GID)
    .union(StatxFlags::INO)
    .union(StatxFlags::CTIME)
    .union(StatxFlags::MNT_ID);

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o0010;
const PERMS: u32 = 0o7777;

/// How many times an entry that changes between our look and our action is
/// looked at again before the walk gives up with `TreeChanged`; also how
/// many times a directory whose names moved is walked again.
const RETRIES: usize = 8;
/// How many times directories whose names moved are walked again.
const RESCANS: usize = 64;
/// The most settling passes ([`Worker::settle_pass`]) one run makes.
const SETTLE_PASSES: usize = 16;
/// Settling passes in a row that meet no new inode, after which a tree that
/// keeps changing is taken as it is (and reported changed).
const QUIET_PASSES: usize = 3;
/// getdents buffer: large, so a big directory takes few system calls.
const DIRENT_BUF: usize = 256 * 1024;
/// Push totals to the shared counters (and the callback) this often.
const PROGRESS_EVERY: u64 = 4096;
/// Shards of the shared tables, so threads rarely contend on one lock.
const SHARDS: usize = 64;
/// The fewest names of one directory handed to another worker: below this the
/// hand-over (a dup, a wake-up) costs about what the names do.
const MIN_PART: usize = 64;
/// How long an idle worker waits for work before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// What one run does: the mapping to apply, the policies, the bookkeeping.
pub(super) struct Spec<'a> {
    pub(super) mapping: &'a Mapping,
    pub(super) out_of_range: OutOfRange,
    pub(super) outside_links: OutsideLinks,
    /// The nonce stashes of this shift carry.
    pub(super) nonce: u64,
    /// Resuming: entries with a ctime at or after this are done.
    pub(super) since: Option<(i64, u32)>,
    /// Read only: find out what would be done, and what stops the run.
    pub(super) scan: bool,
    /// Inodes a resumed run must do whatever their ctime (they were
    /// immutable when the earlier run met them).
    pub(super) redo: HashSet<(u64, u64)>,
}

/// Entries that must change but are immutable or append-only: (path,
/// attribute, (dev, ino)).
pub(super) type Frozen = Vec<(PathBuf, &'static str, (u64, u64))>;

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
    ctime: (i64, u32),
    /// `Some("immutable ...")` / `Some("append-only ...")`.
    frozen: Option<&'static str>,
}

impl Meta {
    fn new(st: &Statx) -> Meta {
        let attrs = st.stx_attributes & st.stx_attributes_mask;
        let frozen = if attrs.contains(StatxAttributes::IMMUTABLE) {
            Some("immutable (chattr +i)")
        } else if attrs.contains(StatxAttributes::APPEND) {
            Some("append-only (chattr +a)")
        } else {
            None
        };
        Meta {
            dev: rfs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            mnt: (st.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(st.stx_mnt_id),
            uid: st.stx_uid,
            gid: st.stx_gid,
            mode: u32::from(st.stx_mode),
            nlink: st.stx_nlink,
            ctime: (st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec),
            frozen,
        }
    }
    fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
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
    /// The inode number the listing gave each name.
    inos: Vec<u64>,
    /// The `d_type` the listing gave each name.
    types: Vec<u8>,
}

struct Queue {
    items: Vec<Work>,
    workers: usize,
    idle: usize,
    finished: bool,
}

/// What is known of a multiply-linked inode: the names of it found so far.
struct Links {
    nlink: u32,
    /// (directory inode, hash of the name): each name counted once, however
    /// often its directory is walked.
    names: Vec<(u64, u64)>,
    first: PathBuf,
    handled: bool,
}

/// What the walk saw of a directory whose names it went through: what the
/// settling passes hold the tree against.
struct Listed {
    /// Its ctime just before its names were read.
    ctime: (i64, u32),
    /// Any later change is sure to give it another ctime: the filesystem
    /// gives a changed inode a fine-grained ctime once `statx` has read it
    /// (multigrain timestamps), or the clock had moved on since its last
    /// change when that ctime was read.
    distinct: bool,
    /// Its subdirectories (name, inode), where one worker met all its names.
    subdirs: Option<Vec<(CString, u64)>>,
}

/// What one settling pass found.
#[derive(Default)]
struct Settled {
    /// Directories handed back to the walk: an entry in them the walk never
    /// met, or they changed while this pass read them.
    dirty: usize,
    /// Some directory could not be taken as unchanged since the walk (or the
    /// last pass) read it: only a later pass can tell.
    unsure: bool,
    /// Some directory did change since then (or the walk never finished
    /// reading it).
    changed: bool,
    /// The latest ctime whose directory a later change might leave as it is
    /// (same clock tick): the next pass waits until the clock is past it.
    wait_for: Option<(i64, u32)>,
}

/// Uncovered ids met by a scan under `OutOfRange::Fail`.
#[derive(Default)]
struct Uncovered {
    count: u64,
    first: Option<(PathBuf, &'static str, u32)>,
}

/// State shared by all workers of one run.
struct Ctx<'a> {
    uids: &'a IdMap,
    gids: &'a IdMap,
    spec: &'a Spec<'a>,
    opts: &'a ShiftOptions,
    threads: usize,
    window: usize,
    /// Inodes this run changed or looked at and left as they are (or,
    /// scanning, would change): none is done twice.
    claimed: Vec<Mutex<InodeSet>>,
    /// Multiply-linked inodes, by (dev, ino).
    links: Vec<Mutex<HashMap<(u64, u64), Links>>>,
    kept: Mutex<Vec<KeptId>>,
    frozen: Mutex<Frozen>,
    uncovered: Mutex<Uncovered>,
    /// Directories whose listing and contents disagreed: walked again.
    rescan: Mutex<Vec<Work>>,
    rescan_keys: Mutex<HashSet<(u64, u64)>>,
    /// Directories whose names the walk went through, by (dev, ino).
    listed: Vec<Mutex<HashMap<(u64, u64), Listed>>>,
    /// A change after `statx` read a ctime always gives a later one
    /// ([`fine_ctimes`]): then every [`Listed`] is `distinct`.
    fine_ctime: bool,
    tree_changed: AtomicBool,
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
    /// Regular files may be opened for reading: the walk goes through a
    /// `nodev` mount ([`View`]). Cleared if `openat2` turns out missing.
    read_opens: AtomicBool,
    /// 0 unknown, 1 `listxattrat`/`getxattrat` work (6.13), 2 they do not.
    xattrat: AtomicU8,
}

/// A hasher for (dev, ino) keys, cheaper than SipHash on the per-entry
/// path. The filesystems the walker shifts assign inode numbers themselves
/// (FUSE, where a user could pick them, is not among them).
#[derive(Default, Clone, Copy)]
struct InodeHasher(u64);

impl Hasher for InodeHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type InodeSet = HashSet<(u64, u64), std::hash::BuildHasherDefault<InodeHasher>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn shard(key: (u64, u64)) -> usize {
    (key.1 as usize ^ key.0 as usize) % SHARDS
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

    fn is_claimed(&self, m: &Meta) -> bool {
        lock(&self.claimed[shard(m.key())]).contains(&m.key())
    }

    /// Claim an inode for this run's change; false if already claimed.
    fn claim(&self, m: &Meta) -> bool {
        lock(&self.claimed[shard(m.key())]).insert(m.key())
    }

    /// Whether this run met the inode (`dev`, `ino`): changed it, found it
    /// needed no change, or counted it as one name of a multiply-linked
    /// inode.
    fn met(&self, key: (u64, u64)) -> bool {
        lock(&self.claimed[shard(key)]).contains(&key)
            || lock(&self.links[shard(key)]).contains_key(&key)
    }

    /// How many inodes this run has met (see [`Ctx::met`]).
    fn met_count(&self) -> usize {
        let claimed: usize = self.claimed.iter().map(|s| lock(s).len()).sum();
        let links: usize = self.links.iter().map(|s| lock(s).len()).sum();
        claimed + links
    }

    /// Note what the walk saw of a directory whose names it went through;
    /// `ctime` was read just before the names, and the coarse clock `now`
    /// right after it.
    fn note_listed(
        &self,
        key: (u64, u64),
        ctime: (i64, u32),
        now: (i64, u32),
        subdirs: Option<Vec<(CString, u64)>>,
    ) -> bool {
        let distinct = self.fine_ctime || clock_moved_on(ctime, now);
        lock(&self.listed[shard(key)]).insert(
            key,
            Listed {
                ctime,
                distinct,
                subdirs,
            },
        );
        distinct
    }

    /// Walk `dir` again after this round: a name in it did not lead to the
    /// inode its listing named.
    fn walk_again(&self, dir: BorrowedFd<'_>, meta: &Meta, path: &Path) {
        self.tree_changed.store(true, Ordering::Relaxed);
        if !lock(&self.rescan_keys).insert(meta.key()) {
            return;
        }
        if let Ok(fd) = rustix::io::fcntl_dupfd_cloexec(dir, 0) {
            lock(&self.rescan).push(Work {
                fd,
                meta: *meta,
                path: path.to_path_buf(),
                part: None,
            });
        }
    }

    /// The scan's handle on `name` in `dir` (nothing pinned): by
    /// `listxattrat`/`getxattrat` where the kernel has them, else by its
    /// `/proc/self/fd` path, kept in `named`.
    fn scan_handle<'h>(
        &self,
        dir: BorrowedFd<'h>,
        name: &'h CStr,
        named: &'h mut Option<CString>,
    ) -> Handle<'h> {
        if self.xattrat.load(Ordering::Relaxed) == 1 {
            Handle::At(dir, name)
        } else {
            Handle::Named(named.insert(entry_path(dir, name)))
        }
    }

    /// Count one name of a multiply-linked inode; true when the inode is to
    /// be handled now (every link found, or the policy shifts regardless).
    fn link_found(&self, m: &Meta, dir: &Meta, name: &CStr, path: &Path) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let here = (dir.ino, h.finish());
        let mut table = lock(&self.links[shard(m.key())]);
        let e = table.entry(m.key()).or_insert_with(|| Links {
            nlink: m.nlink,
            names: Vec::new(),
            first: path.to_path_buf(),
            handled: false,
        });
        e.nlink = e.nlink.max(m.nlink);
        if !e.names.contains(&here) {
            e.names.push(here);
        }
        if e.handled {
            return false;
        }
        let all = e.names.len() as u64 >= u64::from(e.nlink);
        if all || self.spec.outside_links == OutsideLinks::Shift {
            e.handled = true;
            return true;
        }
        false
    }
}

/// `CLOCK_REALTIME_COARSE`, the clock the kernel stamps a change with
/// (before multigrain timestamps), as (seconds, nanoseconds).
fn coarse_now() -> (i64, u32) {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    (t.tv_sec, u32::try_from(t.tv_nsec).unwrap_or(0))
}

/// Whether a change made after the coarse clock read `now` is sure to stamp
/// a ctime other than `ctime`. A ctime with no nanoseconds may come from a
/// filesystem that keeps whole seconds (ext4 with 128-byte inodes): then the
/// clock must be in a later second.
fn clock_moved_on(ctime: (i64, u32), now: (i64, u32)) -> bool {
    if ctime.1 == 0 {
        ctime.0 < now.0
    } else {
        ctime < now
    }
}

/// Whether a change to an inode right after `statx` read its ctime always
/// gives it a later ctime (multigrain timestamps, Linux 6.13, on ext4, xfs,
/// btrfs and tmpfs), found by trying it on `dir`: `chmod` to the mode it
/// has changes nothing but the ctime. Three tries within microseconds all
/// advancing cannot be three clock ticks. No means the coarse clock decides
/// ([`clock_moved_on`]); so does `IDMAPPED_FORCE_FALLBACK=fine_ctime`.
fn fine_ctimes(dir: BorrowedFd<'_>) -> bool {
    if features::forced_fallback("fine_ctime") {
        return false;
    }
    let Ok(st) = rfs::fstat(dir) else {
        return false;
    };
    let mode = Mode::from_bits_retain(st.st_mode & PERMS);
    (0..3).all(|_| {
        let Ok(before) = statx_fd(dir) else {
            return false;
        };
        rfs::fchmod(dir, mode).is_ok() && statx_fd(dir).is_ok_and(|m| m.ctime > before.ctime)
    })
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
}

/// An inode the walker may change, named so that no path is ever followed:
/// a descriptor opened for reading (a directory, or a regular file on a
/// `nodev` mount), or an `O_PATH` descriptor reached through its
/// `/proc/self/fd` magic link (which names exactly that inode, whatever
/// happens to the tree meanwhile).
#[derive(Clone, Copy)]
enum Handle<'f> {
    Open(BorrowedFd<'f>),
    Path(BorrowedFd<'f>),
    /// `/proc/self/fd/<dir>/<name>`, read with the `l*` xattr calls (the
    /// last component not followed): for the read-only scan only.
    Named(&'f CStr),
    /// `<dir>` and `<name>`, read with `listxattrat`/`getxattrat` and
    /// `AT_SYMLINK_NOFOLLOW` (Linux 6.13): for the read-only scan only.
    At(BorrowedFd<'f>, &'f CStr),
}

/// `/proc/self/fd/<dir>/<name>`.
fn entry_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut b = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    b.extend_from_slice(name.to_bytes());
    CString::new(b).unwrap_or_default()
}

impl Handle<'_> {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match *self {
            Handle::Open(fd) | Handle::Path(fd) => Some(fd),
            Handle::Named(_) | Handle::At(..) => None,
        }
    }

    fn list(&self, buf: &mut Vec<u8>) -> std::result::Result<Names, Errno> {
        loop {
            let n = match *self {
                Handle::Open(fd) => rfs::flistxattr(fd, &mut buf[..]),
                Handle::Path(fd) => rfs::listxattr(proc_fd_path(fd), &mut buf[..]),
                Handle::Named(p) => rfs::llistxattr(p, &mut buf[..]),
                Handle::At(dir, name) => {
                    crate::sys::listxattrat(dir, name, AT_SYMLINK_NOFOLLOW, &mut buf[..])
                }
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
                Handle::Open(fd) => rfs::fgetxattr(fd, name, &mut buf[..]),
                Handle::Path(fd) => rfs::getxattr(proc_fd_path(fd), name, &mut buf[..]),
                Handle::Named(p) => rfs::lgetxattr(p, name, &mut buf[..]),
                Handle::At(dir, entry) => {
                    let Ok(cname) = CString::new(name) else {
                        return Err(Errno::INVAL);
                    };
                    crate::sys::getxattrat(dir, entry, AT_SYMLINK_NOFOLLOW, &cname, &mut buf[..])
                }
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
            Handle::Open(fd) => rfs::fsetxattr(fd, name, value, flags),
            Handle::Path(fd) => rfs::setxattr(proc_fd_path(fd), name, value, flags),
            Handle::Named(_) | Handle::At(..) => Err(Errno::PERM),
        }
    }

    fn remove(&self, name: &str) -> std::result::Result<(), Errno> {
        let r = match *self {
            Handle::Open(fd) => rfs::fremovexattr(fd, name),
            Handle::Path(fd) => rfs::removexattr(proc_fd_path(fd), name),
            Handle::Named(_) | Handle::At(..) => Err(Errno::PERM),
        };
        match r {
            Err(Errno::NODATA) => Ok(()),
            r => r,
        }
    }

    fn chown(&self, uid: u32, gid: u32) -> std::result::Result<(), Errno> {
        let Some(fd) = self.fd() else {
            return Err(Errno::PERM);
        };
        rfs::chownat(
            fd,
            c"",
            Some(Uid::from_raw_unchecked(uid)),
            Some(Gid::from_raw_unchecked(gid)),
            AtFlags::EMPTY_PATH,
        )
    }

    fn chmod(&self, mode: u32) -> std::result::Result<(), Errno> {
        let mode = Mode::from_bits_retain(mode & PERMS);
        match *self {
            Handle::Open(fd) => rfs::fchmod(fd, mode),
            Handle::Path(fd) => rfs::chmodat(CWD, proc_fd_path(fd), mode, AtFlags::empty()),
            Handle::Named(_) | Handle::At(..) => Err(Errno::PERM),
        }
    }

    fn describe(&self) -> String {
        match *self {
            Handle::Open(fd) => format!("fd {}", fd.as_raw_fd()),
            Handle::Path(fd) => format!("\"/proc/self/fd/{}\"", fd.as_raw_fd()),
            Handle::Named(p) => format!("{p:?}"),
            Handle::At(dir, name) => {
                format!("fd {}, {name:?}, AT_SYMLINK_NOFOLLOW", dir.as_raw_fd())
            }
        }
    }
}

/// `AT_SYMLINK_NOFOLLOW` for the `*xattrat` calls.
const AT_SYMLINK_NOFOLLOW: u32 = libc::AT_SYMLINK_NOFOLLOW as u32;

/// Double an xattr buffer after `ERANGE`; give up at 1 MiB (the VFS limit is 64 KiB).
fn grow(buf: &mut Vec<u8>) -> std::result::Result<(), Errno> {
    let len = buf.len().saturating_mul(2).max(256);
    if len > 1 << 20 {
        return Err(Errno::RANGE);
    }
    buf.resize(len, 0);
    Ok(())
}

/// `statx` of an open fd.
fn statx_fd(fd: BorrowedFd<'_>) -> std::result::Result<Meta, Errno> {
    rfs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        STATX_MASK,
    )
    .map(|st| Meta::new(&st))
}

fn statx_error(fd: BorrowedFd<'_>, e: Errno, path: &Path) -> Error {
    let args = format!("fd {}, \"\", AT_EMPTY_PATH", fd.as_raw_fd());
    sys("statx", args, e, path)
}

/// `statx` of an open fd; `path` names it in the error.
fn fstatx(fd: BorrowedFd<'_>, path: &Path) -> Result<Meta> {
    statx_fd(fd).map_err(|e| statx_error(fd, e, path))
}

/// Device and inode number of an open directory.
pub(super) fn dev_ino(fd: BorrowedFd<'_>, path: &Path) -> Result<(u64, u64)> {
    fstatx(fd, path).map(|m| m.key())
}

/// The mount a walk goes through, and how it may open entries.
pub(super) struct View {
    /// A private clone of the tree's mount, marked `nodev`, unmounted when
    /// the view is dropped.
    _clone: Option<DetachedMount>,
    /// The tree's root directory, on the mount the walk goes through.
    pub(super) root: OwnedFd,
    pub(super) access: EntryAccess,
}

impl View {
    /// The view of the tree whose root directory is `fd` (at `path`).
    ///
    /// Opening a regular file for reading lets its xattr calls take the
    /// descriptor (an `O_PATH` one needs a `/proc/self/fd` path walk per
    /// call, the largest cost per entry), but an open of a device runs its
    /// driver, and an attacker can swap a device node in under a name the
    /// listing gave as a regular file. On a `nodev` mount that open fails
    /// before any driver runs. So: the mount itself if it is `nodev`; else a
    /// private non-recursive clone marked `nodev` (`open_tree` +
    /// `mount_setattr`, Linux 5.12), used only where no mount lies below the
    /// tree (a clone without them would show what they cover); else
    /// [`EntryAccess::ProcPaths`]. Opens for reading also need `openat2`
    /// (`RESOLVE_NO_XDEV`). `pin_only` ([`ShiftOptions::pin_only`]) and
    /// `IDMAPPED_FORCE_FALLBACK=nodev_view` choose the last rung.
    pub(super) fn open(fd: &OwnedFd, path: &Path, pin_only: bool) -> Result<View> {
        let dup = |fd: BorrowedFd<'_>| {
            rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| {
                sys(
                    "fcntl",
                    format!("fd {}, F_DUPFD_CLOEXEC", fd.as_raw_fd()),
                    e,
                    path,
                )
            })
        };
        let proc_paths = || {
            Ok(View {
                _clone: None,
                root: dup(fd.as_fd())?,
                access: EntryAccess::ProcPaths,
            })
        };
        let f = features::features();
        if pin_only
            || features::forced_fallback("nodev_view")
            || f.openat2 != Availability::Available
        {
            return proc_paths();
        }
        let nodev =
            rfs::fstatvfs(fd).is_ok_and(|st| st.f_flag.contains(rfs::StatVfsMountFlags::NODEV));
        if nodev {
            return Ok(View {
                _clone: None,
                root: dup(fd.as_fd())?,
                access: EntryAccess::NodevMount,
            });
        }
        if f.mount_setattr != Availability::Available {
            return proc_paths();
        }
        match crate::mounttable::subtree(path) {
            Ok(mounts) if mounts.len() == 1 => {}
            _ => return proc_paths(),
        }
        let Ok(mut clone) = DetachedMount::clone_tree_at(fd, "", CloneFlags::empty()) else {
            return proc_paths();
        };
        if clone
            .set_attr(&MountAttr::new().set(MountAttrFlags::NODEV))
            .is_err()
        {
            return proc_paths();
        }
        let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Ok(root) = rfs::openat(&clone, c".", oflags, Mode::empty()) else {
            return proc_paths();
        };
        if fstatx(root.as_fd(), path)?.key() != fstatx(fd.as_fd(), path)?.key() {
            return proc_paths();
        }
        Ok(View {
            _clone: Some(clone),
            root,
            access: EntryAccess::NodevClone,
        })
    }
}

/// Remove the root's stash left by a run killed between writing the `done`
/// record and removing it.
pub(super) fn drop_root_stash(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    Handle::Open(fd)
        .remove(STASH)
        .or_else(|e| if e == Errno::NOTSUP { Ok(()) } else { Err(e) })
        .map_err(|e| {
            sys(
                "fremovexattr",
                format!("fd {}, {STASH:?}", fd.as_raw_fd()),
                e,
                path,
            )
        })
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

/// One change to make to an entry, in the order they are made.
enum Op {
    Acl(&'static str, Option<Vec<u8>>),
    Chown(u32, u32),
    Chmod(u32),
    Cap(Option<Vec<u8>>),
}

/// The changes to one entry: at most one of each kind (two ACLs, owner,
/// mode, capability), kept on the stack.
struct Ops {
    items: [Option<Op>; 5],
    len: usize,
}

impl Ops {
    fn new() -> Ops {
        Ops {
            items: [None, None, None, None, None],
            len: 0,
        }
    }
    fn push(&mut self, op: Op) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = Some(op);
            self.len += 1;
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn iter(&self) -> impl Iterator<Item = &Op> {
        self.items.iter().flatten()
    }
}

struct Worker<'c, 'a> {
    ctx: &'c Ctx<'a>,
    counts: Counts,
    flushed: Counts,
    dirent: Vec<u8>,
    names: Vec<u8>,
    starts: Vec<usize>,
    inos: Vec<u64>,
    types: Vec<u8>,
    list: Vec<u8>,
    /// Inodes pinned by the current pass over one directory.
    pinned: Vec<u64>,
    /// A name of the current pass did not lead to the inode listed.
    mismatch: bool,
    /// The current pass handed names to another worker.
    split: bool,
    /// Reused for the path of the entry at hand.
    path_buf: PathBuf,
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
            inos: Vec::new(),
            types: Vec::new(),
            list: vec![0; 1024],
            pinned: Vec::new(),
            mismatch: false,
            split: false,
            path_buf: PathBuf::new(),
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

    /// The id an on-disk id becomes: the mapping's, or the out-of-range policy's.
    fn id(&mut self, uid_map: bool, id: u32, path: &Path) -> Result<Tr> {
        let (map, kind) = if uid_map {
            (self.ctx.uids, "uid")
        } else {
            (self.ctx.gids, "gid")
        };
        if let Some(seen) = map.seen(id) {
            return Ok(Tr::Shifted(seen));
        }
        self.counts.out_of_range += 1;
        match self.ctx.spec.out_of_range {
            OutOfRange::Keep => {
                if map.on_disk(id).is_some() {
                    lock(&self.ctx.kept).push(KeptId {
                        path: path.to_path_buf(),
                        kind,
                        id,
                    });
                }
                Ok(Tr::Kept(id))
            }
            OutOfRange::Overflow => Ok(Tr::Shifted(OVERFLOW_ID)),
            OutOfRange::Fail if self.ctx.spec.scan => {
                let mut u = lock(&self.ctx.uncovered);
                u.count += 1;
                if u.first.is_none() {
                    u.first = Some((path.to_path_buf(), kind, id));
                }
                Ok(Tr::Kept(id))
            }
            OutOfRange::Fail => {
                Err(Error::new(ErrorKind::IdOutOfRange { kind, id, count: 1 }).with_path(path))
            }
        }
    }

    /// What `orig` becomes: owner, group, ACL qualifiers, capability root id.
    fn plan(&mut self, orig: &State, path: &Path) -> Result<State> {
        let uid = self.id(true, orig.uid, path)?.value();
        let gid = self.id(false, orig.gid, path)?.value();
        let cap = match &orig.cap {
            None => None,
            Some(raw) => {
                let caps = FileCaps::parse(raw).ok_or_else(|| {
                    Error::new(ErrorKind::InvalidInput(format!(
                        "{CAPABILITY} value {raw:02x?} is neither revision 2 nor 3: \
                         a chown would drop it and it could not be restored"
                    )))
                    .with_path(path)
                })?;
                match self.id(true, caps.rootid, path)? {
                    Tr::Shifted(r)
                        if self.ctx.spec.out_of_range == OutOfRange::Overflow
                            && self.ctx.uids.seen(caps.rootid).is_none() =>
                    {
                        // Uncovered root id: through the mount it grants nothing.
                        let _ = r;
                        None
                    }
                    Tr::Shifted(r) => Some(caps.with_rootid(r).encode()),
                    Tr::Kept(_) => Some(raw.clone()),
                }
            }
        };
        let acl = |w: &mut Self, value: &Option<Vec<u8>>, xname: &str| -> Result<Option<Vec<u8>>> {
            let Some(value) = value else { return Ok(None) };
            let mut kept: Vec<(AclId, u32)> = Vec::new();
            let mut shifted: Vec<(AclId, u32)> = Vec::new();
            let translated = translate_acl(value, |kind, id| {
                let t = w.id(kind == AclId::User, id, path)?;
                match t {
                    Tr::Kept(k) => kept.push((kind, k)),
                    Tr::Shifted(s) => shifted.push((kind, s)),
                }
                Ok::<u32, Error>(t.value())
            });
            match translated {
                Err(()) => Err(Error::new(ErrorKind::InvalidInput(format!(
                    "{xname} is not a version 2 POSIX ACL"
                )))
                .with_path(path)),
                Ok(Err(e)) => Err(e),
                Ok(Ok(new)) => {
                    if w.ctx.spec.out_of_range != OutOfRange::Overflow {
                        if let Some(&(kind, id)) = kept.iter().find(|k| shifted.contains(k)) {
                            let kind = if kind == AclId::User { "uid" } else { "gid" };
                            return Err(
                                Error::new(ErrorKind::AclCollision { kind, id }).with_path(path)
                            );
                        }
                    }
                    Ok(Some(new.unwrap_or_else(|| value.clone())))
                }
            }
        };
        let acl_access = acl(self, &orig.acl_access, ACL_ACCESS)?;
        let acl_default = acl(self, &orig.acl_default, ACL_DEFAULT)?;
        Ok(State {
            uid,
            gid,
            mode: orig.mode,
            cap,
            acl_access,
            acl_default,
        })
    }

    /// Put the listing in inode order. A hashed directory (ext4's htree)
    /// lists in hash order, which visits the inode table at random; in inode
    /// order consecutive entries share its blocks, and an ext4 walk of
    /// 100,000 files went from 0.92 to 0.98 of `chown -R`'s rate (gnulib's
    /// fts sorts large directories so for the same reason). The order does
    /// not matter to the walk otherwise.
    fn sort_by_inode(&mut self) {
        let n = self.starts.len();
        if n < 2 {
            return;
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&i| self.inos[i]);
        let end = |i: usize| self.starts.get(i + 1).copied().unwrap_or(self.names.len());
        let mut names = Vec::with_capacity(self.names.len());
        let mut starts = Vec::with_capacity(n);
        let mut inos = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        for &i in &order {
            starts.push(names.len());
            names.extend_from_slice(&self.names[self.starts[i]..end(i)]);
            inos.push(self.inos[i]);
            types.push(self.types[i]);
        }
        self.names = names;
        self.starts = starts;
        self.inos = inos;
        self.types = types;
    }

    /// Read all names of `dir` (from the start: a directory walked again is
    /// read again) into `names`, `starts`, `inos` and `types`.
    fn read_names(&mut self, dir: BorrowedFd<'_>, path: &Path) -> Result<()> {
        self.names.clear();
        self.starts.clear();
        self.inos.clear();
        self.types.clear();
        if self.dirent.capacity() < DIRENT_BUF {
            self.dirent = Vec::with_capacity(DIRENT_BUF);
        }
        let _ = rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(0));
        let mut dirent = std::mem::take(&mut self.dirent);
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
            self.inos.push(entry.ino());
            self.types.push(dtype(entry.file_type()));
            self.names.extend_from_slice(name);
        }
        self.dirent = dirent;
        Ok(())
    }

    /// Read all names of a directory, handle every non-directory, and return
    /// the subdirectories (pinned and checked, not yet opened as directories).
    fn scan(&mut self, dir: BorrowedFd<'_>, dmeta: &Meta, path: &Path) -> Result<Vec<SubDir>> {
        // A name renamed during the listing from a part not yet read to one
        // read already is in no listing: the directory's ctime tells (the
        // walk itself never changes it). The coarse clock, read just after,
        // tells whether a change in the same tick could leave it as it is.
        let listed_at = fstatx(dir, path)?.ctime;
        let clock = coarse_now();
        self.read_names(dir, path)?;
        self.sort_by_inode();
        let names = std::mem::take(&mut self.names);
        let starts = std::mem::take(&mut self.starts);
        let inos = std::mem::take(&mut self.inos);
        let types = std::mem::take(&mut self.types);
        self.pinned.clear();
        self.mismatch = false;
        self.split = false;
        let result = self.visit_names(dir, dmeta, path, &names, &starts, &inos, &types);
        let mut again = false;
        if result.is_ok() && !self.ctx.spec.scan && fstatx(dir, path)?.ctime != listed_at {
            again = true;
        } else if result.is_ok() && self.mismatch {
            // Names moved during the pass. Unless some of them went to
            // another worker, check that every inode listed was pinned
            // under some name; if one was not, it is still to do.
            again = self.split || {
                let mut pinned = std::mem::take(&mut self.pinned);
                pinned.sort_unstable();
                let missing = inos.iter().any(|i| pinned.binary_search(i).is_err());
                self.pinned = pinned;
                missing
            };
            if !again {
                self.ctx.tree_changed.store(true, Ordering::Relaxed);
            }
        }
        if again {
            self.ctx.walk_again(dir, dmeta, path);
        } else if let (Ok(subdirs), false) = (&result, self.ctx.spec.scan) {
            // What the settling passes check this directory against. The
            // names handed to another worker hold subdirectories this one
            // has not seen: then a pass reads them from the directory.
            let list = (!self.split).then(|| {
                subdirs
                    .iter()
                    .map(|sd| (sd.name.clone(), sd.meta.ino))
                    .collect()
            });
            self.ctx.note_listed(dmeta.key(), listed_at, clock, list);
        }
        self.names = names;
        self.starts = starts;
        self.inos = inos;
        self.types = types;
        result
    }

    /// Visit the names of `dir` listed by `names`, `starts` and `inos` (as
    /// [`scan`] collects them); return the subdirectories. While another
    /// worker is idle, the back half of the names still to do goes to it.
    ///
    /// [`scan`]: Self::scan
    // The hot path: the listing's columns as slices, not a struct built per call.
    #[allow(clippy::too_many_arguments)]
    fn visit_names(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        path: &Path,
        names: &[u8],
        starts: &[usize],
        inos: &[u64],
        types: &[u8],
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
                    // A descriptor of its own (not a dup: one open file
                    // shared by two workers has its reference count
                    // bounce between their CPUs on every call). None to
                    // spare: keep the names.
                    let oflags =
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                    let fd = rfs::openat(dir, c".", oflags, Mode::empty()).ok()?;
                    let base = starts[cut];
                    Some(Work {
                        fd,
                        meta: *dmeta,
                        path: path.to_path_buf(),
                        part: Some(Part {
                            names: names[base..end].to_vec(),
                            starts: starts[cut..to].iter().map(|s| s - base).collect(),
                            inos: inos[cut..to].to_vec(),
                            types: types[cut..to].to_vec(),
                        }),
                    })
                });
                if fed {
                    to = cut;
                    self.split = true;
                }
            }
            let start = starts[i];
            let end = starts.get(i + 1).copied().unwrap_or(names.len());
            let ino = inos.get(i).copied();
            let dt = types.get(i).copied().unwrap_or(DT_UNKNOWN);
            i += 1;
            let Ok(name) = CStr::from_bytes_with_nul(&names[start..end]) else {
                continue;
            };
            self.visit(dir, dmeta, path, name, ino, dt, &mut subdirs)?;
        }
        Ok(subdirs)
    }

    /// Look at one name: pin it, check it is the inode the listing named
    /// (`d_ino`), then a directory goes to `subdirs`, anything else is shifted now.
    // The hot path: the listing's columns as slices, not a struct built per call.
    #[allow(clippy::too_many_arguments)]
    fn visit(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        dpath: &Path,
        name: &CStr,
        d_ino: Option<u64>,
        d_type: u8,
        subdirs: &mut Vec<SubDir>,
    ) -> Result<()> {
        self.visited_one();
        let path = || dpath.join(OsStr::from_bytes(name.to_bytes()));
        if self.ctx.spec.scan {
            return self.look(dir, dmeta, dpath, name, d_type, subdirs);
        }
        let (fd, opened) = match pin(self.ctx, dir, name, d_type) {
            Ok(pinned) => pinned,
            Err(Errno::NOENT) => {
                // Renamed away or removed since the listing.
                self.mismatch = true;
                return Ok(());
            }
            Err(e) => {
                let a = format!("fd {}, {name:?}, O_PATH|O_NOFOLLOW", dir.as_raw_fd());
                return Err(sys("openat", a, e, &path()));
            }
        };
        let m = statx_fd(fd.as_fd()).map_err(|e| statx_error(fd.as_fd(), e, &path()))?;
        if m.is_mount_below(dmeta) {
            // The listing names the directory under the mount point, hidden.
            if let Some(ino) = d_ino {
                self.pinned.push(ino);
            }
            self.counts.mounts += 1;
            return Ok(());
        }
        self.pinned.push(m.ino);
        if d_ino.is_some_and(|ino| ino != m.ino) {
            // Exchanged: the inode listed here is elsewhere now. Shift what
            // is here (it is in this directory, so in the tree); the end of
            // the pass checks that the one listed was met under another name.
            self.mismatch = true;
        }
        if m.is_dir() {
            subdirs.push(SubDir {
                name: name.to_owned(),
                meta: m,
            });
            return Ok(());
        }
        // The entry's path, for errors and reports, in a buffer kept across
        // entries (no allocation per entry).
        let mut p = std::mem::take(&mut self.path_buf);
        p.clear();
        p.push(dpath);
        p.push(OsStr::from_bytes(name.to_bytes()));
        let r = if m.nlink > 1 && !self.ctx.link_found(&m, dmeta, name, &p) {
            self.counts.dedup += 1;
            Ok(())
        } else {
            let h = if opened {
                Handle::Open(fd.as_fd())
            } else {
                Handle::Path(fd.as_fd())
            };
            self.shift_inode(h, &m, &p, false).map(|_| ())
        };
        self.path_buf = p;
        r
    }

    /// [`visit`](Self::visit) for the read-only scan: no pinning (nothing
    /// is written, and the shifting walk that follows checks everything
    /// again on pinned inodes), so two calls per entry: `statx` and
    /// `llistxattr` by name.
    fn look(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        dpath: &Path,
        name: &CStr,
        d_type: u8,
        subdirs: &mut Vec<SubDir>,
    ) -> Result<()> {
        // The entry's path in the buffer kept across entries.
        let mut path = std::mem::take(&mut self.path_buf);
        path.clear();
        path.push(dpath);
        path.push(OsStr::from_bytes(name.to_bytes()));
        let r = self.look_at(dir, dmeta, &path, name, d_type, subdirs);
        self.path_buf = path;
        r
    }

    // The hot path of the scan: the entry as the listing gave it.
    #[allow(clippy::too_many_arguments)]
    fn look_at(
        &mut self,
        dir: BorrowedFd<'_>,
        dmeta: &Meta,
        path: &Path,
        name: &CStr,
        d_type: u8,
        subdirs: &mut Vec<SubDir>,
    ) -> Result<()> {
        let spec = self.ctx.spec;
        // A first run's scan for `keep` only looks for ACL collisions: a
        // non-directory needs no statx (its owner cannot make the run
        // refuse), only its xattr names; a symlink has none.
        let light = spec.since.is_none()
            && !self.ctx.opts.dry_run
            && spec.out_of_range != OutOfRange::Fail
            && spec.outside_links != OutsideLinks::Fail;
        if light && d_type == DT_LNK {
            return Ok(());
        }
        if light && d_type != DT_DIR && d_type != DT_UNKNOWN {
            let mut named = None;
            let h = self.ctx.scan_handle(dir, name, &mut named);
            let names = match h.list(&mut self.list) {
                Ok(n) => n,
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(sys("llistxattr", h.describe(), e, path)),
            };
            if !names.acl_access && !names.acl_default {
                return Ok(());
            }
            let get = |present: bool, x: &str| -> Result<Option<Vec<u8>>> {
                if !present {
                    return Ok(None);
                }
                h.get(x)
                    .map_err(|e| sys("lgetxattr", format!("{}, {x:?}", h.describe()), e, path))
            };
            let st = State {
                acl_access: get(names.acl_access, ACL_ACCESS)?,
                acl_default: get(names.acl_default, ACL_DEFAULT)?,
                ..State::default()
            };
            return self.plan(&st, path).map(|_| ());
        }
        let m = match rfs::statx(
            dir,
            name,
            AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
            STATX_MASK,
        ) {
            Ok(st) => Meta::new(&st),
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => {
                let a = format!("fd {}, {name:?}, AT_SYMLINK_NOFOLLOW", dir.as_raw_fd());
                return Err(sys("statx", a, e, path));
            }
        };
        if m.is_mount_below(dmeta) {
            self.counts.mounts += 1;
            return Ok(());
        }
        if m.is_dir() {
            subdirs.push(SubDir {
                name: name.to_owned(),
                meta: m,
            });
            return Ok(());
        }
        if m.nlink > 1 && !self.ctx.link_found(&m, dmeta, name, path) {
            self.counts.dedup += 1;
            return Ok(());
        }
        let mut named = None;
        let h = self.ctx.scan_handle(dir, name, &mut named);
        self.shift_inode(h, &m, path, false).map(|_| ())
    }

    /// Count an inode the walk leaves as it is among those it met (the
    /// claimed set, which the settling passes consult), so that no later
    /// look at it does the work again.
    fn met_unchanged(&self, m: &Meta) {
        if !self.ctx.spec.scan {
            self.ctx.claim(m);
        }
    }

    /// The procedure for one pinned inode. Returns whether a stash was
    /// written and left in place (only with `keep_stash`, for the root).
    fn shift_inode(
        &mut self,
        h: Handle<'_>,
        m: &Meta,
        path: &Path,
        keep_stash: bool,
    ) -> Result<bool> {
        if self.ctx.is_claimed(m) {
            self.counts.dedup += 1;
            return Ok(false);
        }
        let xerr = |call: &'static str, what: &str, e: Errno| {
            sys(call, format!("{}, {what:?}", h.describe()), e, path)
        };
        let names = if m.is_symlink() {
            Names::default()
        } else {
            h.list(&mut self.list)
                .map_err(|e| xerr("listxattr", "", e))?
        };
        let spec = self.ctx.spec;
        let stash = if names.stash {
            h.get(STASH)
                .map_err(|e| xerr("getxattr", STASH, e))?
                .and_then(|b| Stash::decode(&b))
                .filter(|s| s.nonce == spec.nonce)
        } else {
            None
        };
        // Resuming: changed since the record by a single call of the earlier
        // run. (The root is never taken as done this way: it always has a
        // stash while it is being changed.)
        if stash.is_none()
            && !keep_stash
            && spec.since.is_some_and(|t| m.ctime >= t)
            && !spec.redo.contains(&m.key())
        {
            self.counts.already += 1;
            self.met_unchanged(m);
            return Ok(false);
        }
        let get = |present: bool, xname: &str| -> Result<Option<Vec<u8>>> {
            if present {
                h.get(xname).map_err(|e| xerr("getxattr", xname, e))
            } else {
                Ok(None)
            }
        };
        let cur = State {
            uid: m.uid,
            gid: m.gid,
            mode: m.mode,
            cap: get(names.cap, CAPABILITY)?,
            acl_access: get(names.acl_access, ACL_ACCESS)?,
            acl_default: get(names.acl_default, ACL_DEFAULT)?,
        };
        let orig = stash.as_ref().map_or(&cur, |s| &s.state);
        let want = self.plan(orig, path)?;

        // The changes, in order: ACLs (chown leaves them alone), owner
        // (which, on a non-directory, drops setuid, setgid-with-group-exec
        // and the capability), mode, capability.
        let mut ops = Ops::new();
        for (xname, c, w) in [
            (ACL_ACCESS, &cur.acl_access, &want.acl_access),
            (ACL_DEFAULT, &cur.acl_default, &want.acl_default),
        ] {
            if c != w {
                ops.push(Op::Acl(xname, w.clone()));
            }
        }
        let chown = (cur.uid, cur.gid) != (want.uid, want.gid);
        let kills = chown && !m.is_dir() && !m.is_symlink();
        if chown {
            ops.push(Op::Chown(want.uid, want.gid));
        }
        if !m.is_symlink() {
            let mut mode_after = cur.mode;
            if kills {
                mode_after &= !S_ISUID;
                if mode_after & S_IXGRP != 0 {
                    mode_after &= !S_ISGID;
                }
            }
            // After a chown that could drop a bit, set the mode regardless:
            // some filesystems drop setgid without group-exec too.
            if mode_after & PERMS != want.mode & PERMS
                || (kills && cur.mode & (S_ISUID | S_ISGID) != 0)
            {
                ops.push(Op::Chmod(want.mode));
            }
        }
        let cap_after = if kills { None } else { cur.cap.clone() };
        if cap_after != want.cap || (kills && want.cap.is_some()) {
            ops.push(Op::Cap(want.cap.clone()));
        }
        if stash.is_some() {
            self.counts.recovered += 1;
        }
        if ops.is_empty() && stash.is_none() && !keep_stash {
            self.met_unchanged(m);
            return Ok(false);
        }
        if !ops.is_empty() {
            self.counts.changed += 1;
            self.counts.acls += ops.iter().filter(|o| matches!(o, Op::Acl(..))).count() as u64;
            if want.cap != orig.cap {
                self.counts.caps += 1;
            }
        }
        if spec.scan {
            if !ops.is_empty() {
                self.ctx.claim(m);
                if let Some(attr) = m.frozen {
                    lock(&self.ctx.frozen).push((path.to_path_buf(), attr, m.key()));
                }
            }
            return Ok(false);
        }
        if let (Some(attr), false) = (m.frozen, ops.is_empty()) {
            // Nothing of it was changed: the record lists it, so that the
            // run after `chattr -i` (which bumps its ctime) still does it.
            lock(&self.ctx.frozen).push((path.to_path_buf(), attr, m.key()));
            self.counts.changed -= 1;
            self.met_unchanged(m);
            return Ok(false);
        }
        if !ops.is_empty() && !self.ctx.claim(m) {
            // Another worker took it meanwhile (it moved): shifted once.
            self.counts.dedup += 1;
            self.counts.changed -= 1;
            return Ok(false);
        }
        let stashed = stash.is_some() || ((ops.len() > 1 || keep_stash) && !ops.is_empty());
        if stashed && stash.is_none() {
            let s = Stash {
                nonce: spec.nonce,
                state: cur.clone(),
            };
            h.set(STASH, &s.encode())
                .map_err(|e| xerr("setxattr", STASH, e))?;
        }
        for op in ops.iter() {
            match op {
                Op::Acl(xname, Some(v)) => {
                    h.set(xname, v).map_err(|e| xerr("setxattr", xname, e))?
                }
                Op::Acl(xname, None) => {
                    h.remove(xname).map_err(|e| xerr("removexattr", xname, e))?
                }
                Op::Chown(u, g) => h.chown(*u, *g).map_err(|e| {
                    sys(
                        "fchownat",
                        format!("{}, \"\", {u}, {g}, AT_EMPTY_PATH", h.describe()),
                        e,
                        path,
                    )
                })?,
                Op::Chmod(mode) => h.chmod(*mode).map_err(|e| {
                    sys(
                        "chmod",
                        format!("{}, {:o}", h.describe(), mode & PERMS),
                        e,
                        path,
                    )
                })?,
                Op::Cap(Some(v)) => h
                    .set(CAPABILITY, v)
                    .map_err(|e| xerr("setxattr", CAPABILITY, e))?,
                Op::Cap(None) => h
                    .remove(CAPABILITY)
                    .map_err(|e| xerr("removexattr", CAPABILITY, e))?,
            }
        }
        if stashed && !keep_stash {
            h.remove(STASH).map_err(|e| xerr("removexattr", STASH, e))?;
        }
        Ok(stashed)
    }

    /// One settling pass: go through every directory of the tree again and
    /// hand back to the walk ([`Ctx::walk_again`]) any that holds an entry
    /// the walk never met.
    ///
    /// The walk proper can miss an entry moved from a directory it has not
    /// read yet into one it has finished (a rename or an exchange across
    /// directories): no listing ever names it there. Such a move changes both
    /// directories' ctimes. So a pass takes a directory as settled only if
    /// its ctime is still the one read just before the walk (or the last
    /// pass) read its names, and that ctime is one no later change can
    /// leave ([`Listed::distinct`]); it reads any other directory's names
    /// and checks each against the inodes the run met. A pass that takes
    /// every directory as settled proves the tree complete: an entry the
    /// walk never met was, when the pass began, in some directory; either
    /// the pass read that directory's names with it there, or it left
    /// before, changing that directory after its last reading.
    fn settle_pass(
        &mut self,
        root: BorrowedFd<'_>,
        root_meta: &Meta,
        path: &Path,
    ) -> Result<Settled> {
        /// A directory read by this pass, shared by its subdirectories still
        /// to do (so a wide directory costs one descriptor, not one each).
        struct Read {
            fd: OwnedFd,
            meta: Meta,
            path: PathBuf,
        }
        let mut out = Settled::default();
        let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(root, c".", oflags, Mode::empty())
            .map_err(|e| sys("openat", format!("fd {}, \".\"", root.as_raw_fd()), e, path))?;
        let m = fstatx(fd.as_fd(), path)?;
        if !m.same_inode(root_meta) {
            return Err(lost(path));
        }
        let mut next = Some((fd, m, path.to_path_buf()));
        // Subdirectories still to do: (their parent, name, inode listed).
        let mut stack: Vec<(Rc<Read>, CString, u64)> = Vec::new();
        let dirty = |out: &mut Settled, dir: &Read| {
            out.dirty += 1;
            self.ctx.walk_again(dir.fd.as_fd(), &dir.meta, &dir.path);
        };
        loop {
            let (fd, m, path) = match next.take() {
                Some(d) => d,
                None => {
                    let Some((parent, name, ino)) = stack.pop() else {
                        break;
                    };
                    let child = match open_dir(self.ctx, parent.fd.as_fd(), &name) {
                        Ok(fd) => fd,
                        // Another mount: a tree of its own.
                        Err(Errno::XDEV) => continue,
                        // No descriptor left (a deep and branching tree):
                        // this pass cannot tell.
                        Err(Errno::MFILE | Errno::NFILE) => {
                            out.unsure = true;
                            continue;
                        }
                        Err(_) => {
                            dirty(&mut out, &parent);
                            continue;
                        }
                    };
                    let cm = fstatx(child.as_fd(), &parent.path)?;
                    if cm.is_mount_below(&parent.meta) {
                        continue;
                    }
                    if cm.ino != ino || !cm.is_dir() || !self.ctx.is_claimed(&cm) {
                        // Moved, or a directory the walk never met: walking
                        // its parent again gets it.
                        dirty(&mut out, &parent);
                        continue;
                    }
                    let cpath = parent.path.join(OsStr::from_bytes(name.to_bytes()));
                    (child, cm, cpath)
                }
            };
            if self.ctx.aborted() {
                break;
            }
            let clock = coarse_now();
            let before = lock(&self.ctx.listed[shard(m.key())]).remove(&m.key());
            let settled = before
                .as_ref()
                .is_some_and(|l| l.distinct && l.ctime == m.ctime);
            out.changed |= !before.as_ref().is_some_and(|l| l.ctime == m.ctime);
            let mut unmet = false;
            let subdirs = match before {
                Some(Listed {
                    subdirs: Some(list),
                    ..
                }) if settled => list,
                _ => {
                    out.unsure |= !settled;
                    self.read_names(fd.as_fd(), &path)?;
                    let mut list = Vec::new();
                    for i in 0..self.starts.len() {
                        let end = self.starts.get(i + 1).copied().unwrap_or(self.names.len());
                        let Ok(name) = CStr::from_bytes_with_nul(&self.names[self.starts[i]..end])
                        else {
                            continue;
                        };
                        let ino = self.inos[i];
                        let mut dt = self.types[i];
                        if dt == DT_UNKNOWN
                            || (!settled && dt != DT_DIR && !self.ctx.met((m.dev, ino)))
                        {
                            // Untyped, or never met: look (a file bind mount
                            // hides the inode its name lists).
                            match rfs::statx(
                                fd.as_fd(),
                                name,
                                AtFlags::SYMLINK_NOFOLLOW,
                                STATX_MASK,
                            ) {
                                Ok(st) => {
                                    let e = Meta::new(&st);
                                    if e.is_dir() {
                                        dt = DT_DIR;
                                    } else if !settled
                                        && !e.is_mount_below(&m)
                                        && !self.ctx.met(e.key())
                                    {
                                        unmet = true;
                                    }
                                }
                                Err(_) => unmet = true,
                            }
                        }
                        if dt == DT_DIR {
                            list.push((name.to_owned(), ino));
                        }
                    }
                    if !settled && fstatx(fd.as_fd(), &path)?.ctime != m.ctime {
                        unmet = true;
                    }
                    list
                }
            };
            let dir = Rc::new(Read { fd, meta: m, path });
            if unmet {
                dirty(&mut out, &dir);
            } else if !self
                .ctx
                .note_listed(m.key(), m.ctime, clock, Some(subdirs.clone()))
            {
                out.wait_for = out.wait_for.max(Some(m.ctime));
            }
            stack.extend(
                subdirs
                    .into_iter()
                    .map(|(name, ino)| (Rc::clone(&dir), name, ino)),
            );
        }
        Ok(out)
    }

    /// Open a subdirectory found by a scan and check it is still that one.
    fn open_child(
        &mut self,
        parent: BorrowedFd<'_>,
        sd: &SubDir,
        pmeta: &Meta,
        path: &Path,
    ) -> Result<Child> {
        let _ = pmeta;
        let fd = match open_dir(self.ctx, parent, &sd.name) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Child::Gone),
            Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV | Errno::AGAIN) => {
                return Ok(Child::Changed)
            }
            Err(e) => {
                let p = path.join(OsStr::from_bytes(sd.name.to_bytes()));
                let a = format!(
                    "fd {}, {:?}, O_RDONLY|O_DIRECTORY|O_NOFOLLOW, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV",
                    parent.as_raw_fd(),
                    sd.name,
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
            Some(p) => {
                self.mismatch = false;
                let subdirs = self.visit_names(
                    fd.as_fd(),
                    &meta,
                    &path,
                    &p.names,
                    &p.starts,
                    &p.inos,
                    &p.types,
                )?;
                if self.mismatch {
                    self.ctx.walk_again(fd.as_fd(), &meta, &path);
                }
                subdirs
            }
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
                        // Keeps changing: leave it to the next pass over
                        // this directory (walk_again below).
                        self.ctx.walk_again(parent, &pmeta, &path);
                        top.next += 1;
                        pending = pending.saturating_sub(1);
                        tries = 0;
                        continue;
                    }
                    let name = sd.name.clone();
                    // The directory listed under this name is elsewhere now.
                    self.ctx.walk_again(parent, &pmeta, &path);
                    let mut again = Vec::new();
                    // visit() counts the name; it was counted by the scan already.
                    self.counts.visited = self.counts.visited.saturating_sub(1);
                    self.visit(parent, &pmeta, &path, &name, None, DT_UNKNOWN, &mut again)?;
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
            path.push(OsStr::from_bytes(name.to_bytes()));
            self.shift_inode(Handle::Open(cfd.as_fd()), &cmeta, &path, false)?;
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

/// Pin the entry `name` of `dir`; true if it was opened for reading.
///
/// On a `nodev` view ([`Ctx::read_opens`]) a name listed as a regular file
/// (or untyped) is opened `O_RDONLY|O_NONBLOCK|O_NOCTTY|O_NOFOLLOW` with
/// `RESOLVE_BENEATH|RESOLVE_NO_XDEV|RESOLVE_NO_SYMLINKS`: `nodev` makes a
/// device swapped in under the name fail with `EACCES` before any driver's
/// `open` runs, `O_NONBLOCK` keeps a fifo from blocking and a lease from
/// stalling the walk (`EWOULDBLOCK`), and `NO_XDEV` keeps the open on this
/// mount. A fifo swapped in is opened and closed at once (its writers see a
/// reader come and go); a socket gives `ENXIO`. On any refusal the name is
/// pinned `O_PATH` instead, which opens nothing (no fifo blocks, no driver
/// runs) and, with `O_NOFOLLOW`, pins a symlink itself.
fn pin(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    name: &CStr,
    d_type: u8,
) -> std::result::Result<(OwnedFd, bool), Errno> {
    if (d_type == DT_REG || d_type == DT_UNKNOWN) && ctx.read_opens.load(Ordering::Relaxed) {
        let oflags =
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve = ResolveFlags::BENEATH
            | ResolveFlags::NO_XDEV
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS;
        match rfs::openat2(dir, name, oflags, Mode::empty(), resolve) {
            Ok(fd) => return Ok((fd, true)),
            Err(Errno::NOENT) => return Err(Errno::NOENT),
            Err(Errno::NOSYS) => ctx.read_opens.store(false, Ordering::Relaxed),
            Err(_) => {}
        }
    }
    let fd = rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok((fd, false))
}

/// Open a directory entry as a directory, never through a symlink, never out
/// of `parent`, never onto another mount.
fn open_dir(
    ctx: &Ctx<'_>,
    parent: BorrowedFd<'_>,
    name: &CStr,
) -> std::result::Result<OwnedFd, Errno> {
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if ctx.openat2.load(Ordering::Relaxed) != 2 {
        let resolve = ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV;
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

fn worker(ctx: &Ctx<'_>) -> Counts {
    let mut w = Worker::new(ctx);
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

/// Whether `listxattrat`/`getxattrat` (Linux 6.13) work here: 1 yes, 2 no.
/// `IDMAPPED_FORCE_FALLBACK=xattrat` says no.
fn probe_xattrat(root: BorrowedFd<'_>) -> u8 {
    if features::forced_fallback("xattrat") {
        return 2;
    }
    match crate::sys::listxattrat(root, c".", AT_SYMLINK_NOFOLLOW, &mut [0u8; 0]) {
        // Seccomp filters answer unknown calls with ENOSYS or EPERM.
        Err(Errno::NOSYS) | Err(Errno::PERM) => 2,
        _ => 1,
    }
}

/// What one id becomes.
#[derive(Debug, Clone, Copy)]
enum Tr {
    /// Translated by the mapping (or written as the overflow id).
    Shifted(u32),
    /// Left as it is (uncovered, `Keep`).
    Kept(u32),
}

impl Tr {
    fn value(self) -> u32 {
        match self {
            Tr::Shifted(v) | Tr::Kept(v) => v,
        }
    }
}

/// Run the workers over `items` until the queue is drained.
fn pool(ctx: &Ctx<'_>, items: Vec<Work>) -> Counts {
    {
        let mut q = lock(&ctx.queue);
        q.queued_reset(items);
        ctx.queued.store(q.items.len(), Ordering::Relaxed);
        ctx.waiting.store(0, Ordering::Relaxed);
        ctx.done.store(false, Ordering::Relaxed);
    }
    let mut counts = Counts::default();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..ctx.threads {
            let spawned = std::thread::Builder::new()
                .name(format!("idmapped-shift-{i}"))
                .spawn_scoped(s, || worker(ctx));
            // Could not start a thread: the others share its work.
            if let Ok(h) = spawned {
                handles.push(h);
            }
        }
        if handles.is_empty() {
            counts.add(&worker(ctx));
        }
        for h in handles {
            match h.join() {
                Ok(c) => counts.add(&c),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    counts
}

/// Walk the directories handed back ([`Ctx::walk_again`]) again, round after
/// round, until none is (an inode changed already is never changed twice),
/// `rounds` at most: what is still handed back then is left to the settling
/// passes.
fn walk_again_rounds(ctx: &Ctx<'_>, counts: &mut Counts, rounds: usize) {
    for _ in 0..rounds {
        if lock(&ctx.error).is_some() {
            return;
        }
        let again = std::mem::take(&mut *lock(&ctx.rescan));
        lock(&ctx.rescan_keys).clear();
        if again.is_empty() {
            return;
        }
        // Names seen again are not new entries.
        let before = counts.visited;
        let c = pool(ctx, again);
        counts.add(&c);
        counts.visited = before;
    }
}

/// Settling passes ([`Worker::settle_pass`]), walking again what they hand
/// back, until one finds the whole tree as the walk left it (the tree is
/// then proven complete), or [`QUIET_PASSES`] in a row meet no inode the run
/// had not met, or [`SETTLE_PASSES`] have run: the tree keeps changing, and
/// the report says so ([`ShiftReport::tree_unsettled`]). True if proven.
fn settle(
    ctx: &Ctx<'_>,
    root_fd: BorrowedFd<'_>,
    root_meta: &Meta,
    root: &Path,
    counts: &mut Counts,
) -> Result<bool> {
    let mut w = Worker::new(ctx);
    let mut met = ctx.met_count();
    let mut quiet = 0;
    for _ in 0..SETTLE_PASSES {
        if let Some(e) = lock(&ctx.error).take() {
            return Err(e);
        }
        let pass = w.settle_pass(root_fd, root_meta, root)?;
        if pass.dirty == 0 && !pass.unsure {
            return Ok(true);
        }
        if pass.changed || pass.dirty > 0 {
            ctx.tree_changed.store(true, Ordering::Relaxed);
        }
        if pass.dirty > 0 {
            // One round: the passes are the loop now (under an attacker who
            // keeps exchanging names, more rounds only walk the same
            // directories again).
            walk_again_rounds(ctx, counts, 1);
        }
        let now = ctx.met_count();
        quiet = if now == met { quiet + 1 } else { 0 };
        met = now;
        if quiet >= QUIET_PASSES {
            return Ok(false);
        }
        if let (0, Some(t)) = (pass.dirty, pass.wait_for) {
            // Some directory changed in this clock tick: a later change in
            // the same tick would leave its ctime as it is.
            let since = Instant::now();
            while !clock_moved_on(t, coarse_now()) && since.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    Ok(false)
}

impl Queue {
    fn queued_reset(&mut self, items: Vec<Work>) {
        self.items = items;
        self.workers = 0;
        self.idle = 0;
        self.finished = false;
    }
}

/// Walk the tree whose root directory is `root_fd` (at `root`) by `spec`:
/// everything below the root, then the root itself (through its stash),
/// then `finish` (which marks the record done), then the root's stash goes.
pub(super) fn run(
    view: &View,
    root: &Path,
    spec: &Spec<'_>,
    opts: &ShiftOptions,
    finish: &mut dyn FnMut(&Frozen) -> Result<()>,
) -> Result<ShiftReport> {
    let start = Instant::now();
    let root_fd = &view.root;
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let root_meta = fstatx(root_fd.as_fd(), root)?;
    check_proc(root_fd.as_fd(), &root_meta, root)?;
    // A second descriptor for the queue; the first stays for the root's own
    // shift, which comes last.
    let work_fd = rfs::openat(root_fd, c".", oflags, Mode::empty()).map_err(|e| {
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
        uids: spec.mapping.uids(),
        gids: spec.mapping.gids(),
        spec,
        opts,
        threads,
        window,
        claimed: (0..SHARDS)
            .map(|_| Mutex::new(InodeSet::default()))
            .collect(),
        links: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        kept: Mutex::new(Vec::new()),
        frozen: Mutex::new(Vec::new()),
        uncovered: Mutex::new(Uncovered::default()),
        rescan: Mutex::new(Vec::new()),
        rescan_keys: Mutex::new(HashSet::new()),
        listed: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        // Probed where the walk writes anyway, before any directory is read.
        fine_ctime: !spec.scan && fine_ctimes(root_fd.as_fd()),
        tree_changed: AtomicBool::new(false),
        queue: Mutex::new(Queue {
            items: Vec::new(),
            workers: 0,
            idle: 0,
            finished: false,
        }),
        cv: Condvar::new(),
        waiting: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        visited: AtomicU64::new(0),
        changed: AtomicU64::new(0),
        // IDMAPPED_FORCE_FALLBACK=openat2 tests the pre-5.6 path.
        openat2: AtomicU8::new(if features::forced_fallback("openat2") {
            2
        } else {
            0
        }),
        read_opens: AtomicBool::new(view.access.opens_for_reading()),
        xattrat: AtomicU8::new(probe_xattrat(root_fd.as_fd())),
    };

    let mut counts = pool(
        &ctx,
        vec![Work {
            fd: work_fd,
            meta: root_meta,
            path: root.to_path_buf(),
            part: None,
        }],
    );
    walk_again_rounds(&ctx, &mut counts, RESCANS);
    let settled = spec.scan || settle(&ctx, root_fd.as_fd(), &root_meta, root, &mut counts)?;
    if let Some(e) = lock(&ctx.error).take() {
        return Err(e);
    }
    let mut frozen = std::mem::take(&mut *lock(&ctx.frozen));
    if !frozen.is_empty() {
        // Stop before the root: the record stays unfinished and lists them.
        frozen.sort();
        if !spec.scan {
            finish(&frozen)?;
        }
        let (path, attribute, _) = frozen[0].clone();
        return Err(Error::new(ErrorKind::Immutable {
            attribute,
            count: frozen.len() as u64,
        })
        .with_path(path));
    }

    // The root last. While it is being changed it has a stash; the record
    // becomes done before the stash goes, so a run killed anywhere here
    // either finishes the root from its stash or finds the record done.
    let mut w = Worker::new(&ctx);
    w.visited_one();
    let stashed = w.shift_inode(Handle::Open(root_fd.as_fd()), &root_meta, root, !spec.scan)?;
    w.flush_progress();
    counts.add(&w.counts);

    let mut outside = Vec::new();
    for shard in &ctx.links {
        for l in lock(shard).values() {
            if (l.names.len() as u64) < u64::from(l.nlink) {
                outside.push((l.first.clone(), l.nlink, l.names.len() as u32));
            }
        }
    }
    outside.sort();
    if spec.scan {
        let u = std::mem::take(&mut *lock(&ctx.uncovered));
        if let Some((path, kind, id)) = u.first {
            return Err(Error::new(ErrorKind::IdOutOfRange {
                kind,
                id,
                count: u.count,
            })
            .with_path(path));
        }
        if spec.outside_links == OutsideLinks::Fail {
            if let Some((path, links, found)) = outside.first() {
                return Err(Error::new(ErrorKind::LinkedOutside {
                    links: *links,
                    found: *found,
                })
                .with_path(path));
            }
        }
    } else {
        finish(&frozen)?;
        if stashed {
            drop_root_stash(root_fd.as_fd(), root)?;
        }
    }

    let mut kept = std::mem::take(&mut *lock(&ctx.kept));
    kept.sort_by(|a, b| (&a.path, a.kind, a.id).cmp(&(&b.path, b.kind, b.id)));
    kept.dedup();
    Ok(ShiftReport {
        completed_before: false,
        resumed: false,
        visited: counts.visited,
        changed: counts.changed,
        already_shifted: counts.already,
        hardlinks_deduplicated: counts.dedup,
        acls_rewritten: counts.acls,
        capabilities_rewritten: counts.caps,
        out_of_range: counts.out_of_range,
        kept_in_seen_range: kept,
        skipped_mounts: counts.mounts,
        mounts_shifted: Vec::new(),
        outside_links: outside.into_iter().map(|o| o.0).collect(),
        recovered: counts.recovered,
        tree_changed: ctx.tree_changed.load(Ordering::Relaxed),
        tree_unsettled: !settled,
        entry_access: if ctx.read_opens.load(Ordering::Relaxed) {
            view.access
        } else {
            EntryAccess::ProcPaths
        },
        elapsed: start.elapsed(),
    })
}
