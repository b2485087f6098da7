//! The fallback: shift the ownership of a directory tree on disk so that it
//! looks, without any mount, exactly the way it would look through an
//! idmapped mount with the same mapping.
//!
//! [`shift_tree`] rewrites every entry's owner, group, POSIX ACL qualifiers
//! and file-capability root id from its on-disk id `X` to `mapping.seen(X)`,
//! the id an idmapped mount shows. Ids no on-disk range covers follow the
//! [`OutOfRange`] policy. Any mapping the kernel accepts for an idmapped
//! mount is accepted here: on-disk and seen ranges may overlap (identity
//! extents, swaps like `b:1000:1001:1 b:1001:1000:1`, shift-by-one
//! `b:0:1:65536`), because whether an entry was shifted is never guessed
//! from its ids (see *Bookkeeping*). [`unshift_tree`] undoes a recorded shift.
//!
//! # Guarantees (each has a test in `tests/chown.rs`, listed in the README)
//!
//! - **The idmapped view, exactly.** With [`OutOfRange::Overflow`], every
//!   entry's uid, gid, mode, ACL entries (order kept) and capability root id
//!   are what an idmapped mount of the original tree shows. An ACL qualifier
//!   the mapping does not cover becomes 65534 (as the view shows it); a
//!   capability whose root id is uncovered is **removed** (through the mount
//!   it grants nothing: the kernel ignores a v3 capability whose root id is
//!   unmapped, and a v2 one is root-owned by the filesystem's namespace).
//!   With [`OutOfRange::Keep`] uncovered ids stay; those that lie inside a
//!   seen range (and so look like container ids) are reported
//!   ([`ShiftReport::kept_in_seen_range`]); where keeping one would give an
//!   ACL two entries for one id, the run refuses before changing anything.
//!   With [`OutOfRange::Fail`] the tree is scanned first and nothing changes
//!   if any id is uncovered.
//! - **Race-free.** Every entry is pinned by one open and checked to be the
//!   inode its directory listing named (`d_ino`); its state is read and
//!   written only through that descriptor (`statx` and `fchownat` with
//!   `AT_EMPTY_PATH`, `fchmod`, `f*xattr`). A regular file is opened for
//!   reading only through a `nodev` mount (the tree's own, or a private
//!   `nodev` clone of it), so a device node swapped in under its name fails
//!   to open before any driver runs; everything else, and every entry where
//!   no `nodev` view can be had, is pinned `O_PATH|O_NOFOLLOW` and its xattr
//!   and chmod calls go through its `/proc/self/fd` link
//!   ([`ShiftReport::entry_access`] says which). A name whose inode was
//!   exchanged has its directory walked again, and every inode is shifted
//!   at most once per run (an in-memory set of the inodes met), so an
//!   attacker renaming or exchanging entries inside the tree can neither
//!   redirect a change nor get an inode shifted twice. A directory whose
//!   ctime changed while it was listed (a name renamed from a part not yet
//!   read to one already read is in no listing) is walked again too.
//! - **No entry missed** when entries move between directories. An entry
//!   moved during the walk from a directory not yet read into one already
//!   finished (a rename or exchange across directories) is in no listing.
//!   So after the walk, *settling passes* go through the tree's directories
//!   again. A directory whose ctime is still the one read just before its
//!   names were read has not changed since, and is taken as it is; any
//!   other has its names read again and checked against the inodes met,
//!   and one holding an entry never met is walked again. A pass that takes
//!   every directory as unchanged proves that every entry of the tree was
//!   met: an entry never met was in some directory when the pass began, and
//!   either the pass read that directory with it there, or it left before,
//!   which changed that directory's ctime. A ctime is trusted to show any
//!   later change only where the filesystem stamps a change after a
//!   `statx` with a fine-grained time (multigrain timestamps, Linux 6.13:
//!   probed on the tree's root), or where the coarse clock had passed it
//!   when it was read; otherwise the next pass waits for the clock to tick.
//!   On a tree that holds still this costs an `openat2`, a `statx` and a
//!   `close` per directory (on older kernels, one more reading of each
//!   directory's names). While entries keep moving (an attacker still at work), the
//!   passes stop once 3 in a row meet no inode the run had not met (16 at
//!   most): every entry found was shifted, but one moved across directories
//!   at just the right moment, each time, could be missed. What moved is
//!   reported ([`ShiftReport::tree_changed`]).
//! - **Never leaves the tree** (no symlink followed, `openat2` with
//!   `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV`
//!   where the kernel has it) and **does not cross mounts** (also file bind
//!   mounts) unless [`ShiftOptions::cross_mounts`], and then each mount is a
//!   tree of its own with its own record.
//! - **Never shifts a virtual filesystem** (see [`check_shiftable`]).
//! - **Hard links from outside**: an inode whose link count exceeds the
//!   names found inside the tree is left alone and reported by default
//!   ([`OutsideLinks`]).
//! - **Immutable / append-only** entries that must change stop the walk with
//!   [`ErrorKind::Immutable`] naming the path; the record stays "running",
//!   so after `chattr -i` the same command resumes exactly.
//!
//! # Bookkeeping (why a re-run after `SIGKILL` ends as one run would)
//!
//! Two things are kept, and nothing is inferred from ids:
//!
//! 1. **The record**, `trusted.idmapped.record` on the tree's root
//!    directory (format in `record.rs`): state (`running`, `done`,
//!    `undoing`), the mapping, both policies, a random nonce, the root's
//!    (dev, ino), and a ctime threshold `T`. `T` is chosen after the record
//!    is written as the ctime of a later write to the root that is strictly
//!    greater than the ctime the record write left (the walker rewrites the
//!    record until the clock ticks, ≤ one timestamp granule), so every
//!    change made before the record has `ctime < T` and every change the
//!    walk makes has `ctime >= T`.
//! 2. **The stash**, `trusted.idmapped.shift` on an entry, written only when
//!    the entry needs more than one system call (an ACL and an owner; an
//!    owner and a setuid bit or capability the kernel drops on chown), and
//!    always for the root. It holds the nonce and the entry's complete
//!    original state (uid, gid, mode, capability, both ACLs) and is removed
//!    after the entry's last change.
//!
//! A run that finds a `running` record resumes: an entry with a stash of
//! this nonce is finished from the stash (the original state, never the
//! half-shifted one); an entry with `ctime >= T` and no stash was changed by
//! a single atomic call of the earlier run and is done; an entry with
//! `ctime < T` was not touched since the record was written and is
//! translated from what it holds. An entry that needs no change is
//! translated to itself however often it is looked at. The root is shifted
//! last, through its stash, then the record becomes `done`, then the root's
//! stash goes. So each entry is translated exactly once from its original
//! state, whatever instant the earlier run died at. A `done` record makes a
//! re-run with the same mapping and policies O(1) ([`ShiftReport::completed_before`]);
//! any other mapping or policy is refused ([`ErrorKind::ShiftRecorded`]),
//! naming the recorded one. Per entry this costs nothing for the common
//! single-call entry (the ctime comes with the `statx` the walk makes
//! anyway) and a set and a remove of one xattr for multi-call entries.
//!
//! **What can fool it**: another writer changing an entry between the
//! record's write and a *resumed* run makes its `ctime >= T`, so a resumed
//! run takes it as done (a first run is not fooled: it trusts only its own
//! in-memory set; renaming an entry updates its ctime too, so an attacker
//! active while a resumed run goes on can get entries left unshifted, never
//! shifted twice); the realtime clock stepped backwards between the record
//! and the changes (ctime follows it); a filesystem whose timestamps are
//! coarser than the time between two changes is handled by the tick wait,
//! but one that does not update ctime on chown/setxattr would defeat it; a
//! tree copied *with its xattrs* (`cp -a`, `rsync -X`) carries a record
//! for another inode: refused, naming it (remove the copy's
//! `trusted.idmapped.record` only if the copy was made before any shift
//! started). Filesystems without `trusted.*` xattrs (ramfs, NFS, most FUSE)
//! cannot hold the record: refused, before anything changes.
//!
//! It needs `/proc` mounted (to name `O_PATH` descriptors in the xattr and
//! chmod calls; on a `nodev` view only fifos, sockets, devices and files
//! that refuse a read open go that way), and privilege: `CAP_CHOWN`,
//! `CAP_FOWNER`, `CAP_FSETID`, `CAP_SETFCAP`, and `CAP_SYS_ADMIN` for the
//! `trusted.*` xattrs.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::map::{IdMap, Mapping};

mod record;
mod walk;
mod xattr;

pub use record::{RecordState, ShiftRecord};

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::ffi::OsStrExt;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, StatxFlags, CWD};
use rustix::io::Errno;

use record::RECORD;

/// What to do with an on-disk id that no on-disk range of the mapping covers
/// (an idmapped mount shows it as 65534).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutOfRange {
    /// Leave the id as it is (reversible: [`unshift_tree`] leaves it too).
    /// Kept ids inside a seen range are reported; a kept ACL qualifier that
    /// a shifted one would duplicate makes the run refuse before it changes
    /// anything.
    #[default]
    Keep,
    /// Scan the tree first; if any id (owner, group, ACL qualifier,
    /// capability root id) is uncovered, change nothing and fail with
    /// [`ErrorKind::IdOutOfRange`] naming the first path, the id and the count.
    Fail,
    /// Write the overflow id 65534, as the idmapped view shows it; remove a
    /// capability whose root id is uncovered. Not reversible for those ids.
    Overflow,
}

impl OutOfRange {
    /// The name used on command lines and in the record.
    pub fn name(self) -> &'static str {
        match self {
            OutOfRange::Keep => "keep",
            OutOfRange::Fail => "fail",
            OutOfRange::Overflow => "overflow",
        }
    }
}

impl std::str::FromStr for OutOfRange {
    type Err = Error;
    fn from_str(s: &str) -> Result<OutOfRange> {
        match s {
            "keep" => Ok(OutOfRange::Keep),
            "fail" => Ok(OutOfRange::Fail),
            "overflow" => Ok(OutOfRange::Overflow),
            _ => Err(Error::new(ErrorKind::InvalidInput(format!(
                "out-of-range policy {s:?}: expected keep, fail or overflow"
            )))),
        }
    }
}

/// What to do with an inode whose link count exceeds the names of it found
/// inside the tree: it is also linked from outside, and shifting it changes
/// a file outside the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutsideLinks {
    /// Leave it unchanged and report its paths ([`ShiftReport::outside_links`]).
    #[default]
    Skip,
    /// Shift it anyway (also reported).
    Shift,
    /// Scan first; change nothing and fail with [`ErrorKind::LinkedOutside`].
    Fail,
}

impl OutsideLinks {
    /// The name used on command lines and in the record.
    pub fn name(self) -> &'static str {
        match self {
            OutsideLinks::Skip => "skip",
            OutsideLinks::Shift => "shift",
            OutsideLinks::Fail => "fail",
        }
    }
}

impl std::str::FromStr for OutsideLinks {
    type Err = Error;
    fn from_str(s: &str) -> Result<OutsideLinks> {
        match s {
            "skip" => Ok(OutsideLinks::Skip),
            "shift" => Ok(OutsideLinks::Shift),
            "fail" => Ok(OutsideLinks::Fail),
            _ => Err(Error::new(ErrorKind::InvalidInput(format!(
                "outside-links policy {s:?}: expected skip, shift or fail"
            )))),
        }
    }
}

/// A progress callback: called from the walking threads, now and then, with
/// totals so far. It must be cheap and must not panic.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How [`shift_tree`] walks.
#[derive(Clone, Default)]
pub struct ShiftOptions {
    /// Policy for ids the mapping does not cover.
    pub out_of_range: OutOfRange,
    /// Policy for inodes also linked from outside the tree.
    pub outside_links: OutsideLinks,
    /// Walking threads; 0 means one per available CPU.
    pub threads: usize,
    /// Also shift the directory mounts inside the tree, each as a tree of
    /// its own (its own record); every one is checked with
    /// [`check_shiftable`] before anything changes. File bind mounts are
    /// never shifted (counted in [`ShiftReport::skipped_mounts`]).
    pub cross_mounts: bool,
    /// Compute and report, but change nothing (no record either).
    pub dry_run: bool,
    /// Never open an entry for reading: pin every one `O_PATH` and make its
    /// xattr calls through `/proc/self/fd` ([`EntryAccess::ProcPaths`];
    /// slower). For hosts where opening a file has a cost of its own, such
    /// as an IMA policy that measures files opened for reading.
    pub pin_only: bool,
    /// Called with running totals while the walk goes on.
    pub progress: Option<ProgressFn>,
}

impl fmt::Debug for ShiftOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShiftOptions")
            .field("out_of_range", &self.out_of_range)
            .field("outside_links", &self.outside_links)
            .field("threads", &self.threads)
            .field("cross_mounts", &self.cross_mounts)
            .field("dry_run", &self.dry_run)
            .field("pin_only", &self.pin_only)
            .field("progress", &self.progress.as_ref().map(|_| "Fn"))
            .finish()
    }
}

/// Running totals handed to [`ShiftOptions::progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Entries examined so far.
    pub visited: u64,
    /// Entries changed so far.
    pub changed: u64,
}

/// An id kept as it is ([`OutOfRange::Keep`]) although it lies inside a
/// seen range: through the shifted tree it looks like a container id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptId {
    /// The entry.
    pub path: PathBuf,
    /// `"uid"` or `"gid"` (owner, group, ACL qualifier or capability root id).
    pub kind: &'static str,
    /// The id.
    pub id: u32,
}

/// What [`shift_tree`] / [`unshift_tree`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShiftReport {
    /// The tree's record said this very shift was finished: nothing was
    /// walked (an O(1) check).
    pub completed_before: bool,
    /// The record said this shift was unfinished: the walk resumed it.
    pub resumed: bool,
    /// Entries examined (every name, the root included).
    pub visited: u64,
    /// Entries whose owner, group, mode, ACL or capability was rewritten (or,
    /// with [`ShiftOptions::dry_run`], would have been).
    pub changed: u64,
    /// Entries a resumed run found done by the earlier one.
    pub already_shifted: u64,
    /// Extra names of hard-linked files, skipped because the inode was
    /// handled through another name.
    pub hardlinks_deduplicated: u64,
    /// `system.posix_acl_access` / `system.posix_acl_default` values rewritten.
    pub acls_rewritten: u64,
    /// `security.capability` values rewritten or removed.
    pub capabilities_rewritten: u64,
    /// Uncovered ids met (owners, groups, ACL qualifiers, capability root ids).
    pub out_of_range: u64,
    /// Uncovered ids kept although inside a seen range (all of them).
    pub kept_in_seen_range: Vec<KeptId>,
    /// Mount points inside the tree that were not entered.
    pub skipped_mounts: u64,
    /// With [`ShiftOptions::cross_mounts`]: the mounts (roots) shifted, the
    /// tree's own first.
    pub mounts_shifted: Vec<PathBuf>,
    /// Inodes also linked from outside the tree (one path each): left
    /// unchanged, or shifted with [`OutsideLinks::Shift`].
    pub outside_links: Vec<PathBuf>,
    /// Entries found half-shifted by an interrupted run and finished from
    /// their stash.
    pub recovered: u64,
    /// Entries moved, appeared or went while the walk ran (an exchange, a
    /// rename, within a directory or across directories): the directories
    /// concerned were walked again (see the module docs, *No entry missed*).
    pub tree_changed: bool,
    /// The tree was still changing when the settling passes stopped: every
    /// entry found was shifted, but that none was missed is not proven (an
    /// entry moved across directories at just the right moments could have
    /// escaped every pass). Implies [`tree_changed`](Self::tree_changed).
    pub tree_unsettled: bool,
    /// How the walk opened entries (the slowest way any mount needed).
    pub entry_access: EntryAccess,
    /// Wall-clock time of the walk.
    pub elapsed: Duration,
}

/// How a walk opened the entries it changed ([`ShiftReport::entry_access`]).
///
/// Every entry is pinned by one open and every change goes through that
/// descriptor; what differs is the cost of the xattr calls (listing, ACLs,
/// capabilities), which an `O_PATH` descriptor cannot take directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum EntryAccess {
    /// Nothing was walked (a completed shift, or nothing to do).
    #[default]
    NotWalked,
    /// Regular files opened for reading on the tree's own mount, which is
    /// `nodev` (so no device driver's `open` can run): xattr calls take the
    /// descriptor.
    NodevMount,
    /// Regular files opened for reading through a private clone of the
    /// tree's mount marked `nodev` (Linux 5.12; trees with no mount below
    /// them).
    NodevClone,
    /// Every entry pinned `O_PATH`, its xattr calls through
    /// `/proc/self/fd/N` (before Linux 5.12, mounts below the tree, a clone
    /// refused, [`ShiftOptions::pin_only`], or
    /// `IDMAPPED_FORCE_FALLBACK=nodev_view`).
    ProcPaths,
}

impl EntryAccess {
    /// A short name for output (`nodev-mount`, `nodev-clone`, `proc-paths`,
    /// `not-walked`).
    pub fn name(self) -> &'static str {
        match self {
            EntryAccess::NotWalked => "not-walked",
            EntryAccess::NodevMount => "nodev-mount",
            EntryAccess::NodevClone => "nodev-clone",
            EntryAccess::ProcPaths => "proc-paths",
        }
    }

    pub(crate) fn opens_for_reading(self) -> bool {
        matches!(self, EntryAccess::NodevMount | EntryAccess::NodevClone)
    }

    /// The slower of two (for a report over several mounts).
    fn slower(self, other: EntryAccess) -> EntryAccess {
        let rank = |a: EntryAccess| match a {
            EntryAccess::NotWalked => 0,
            EntryAccess::NodevMount => 1,
            EntryAccess::NodevClone => 2,
            EntryAccess::ProcPaths => 3,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl ShiftReport {
    /// Add `o` (another mount's walk) to this report.
    pub(crate) fn absorb(&mut self, o: ShiftReport) {
        self.visited += o.visited;
        self.changed += o.changed;
        self.already_shifted += o.already_shifted;
        self.hardlinks_deduplicated += o.hardlinks_deduplicated;
        self.acls_rewritten += o.acls_rewritten;
        self.capabilities_rewritten += o.capabilities_rewritten;
        self.out_of_range += o.out_of_range;
        self.kept_in_seen_range.extend(o.kept_in_seen_range);
        self.skipped_mounts += o.skipped_mounts;
        self.mounts_shifted.extend(o.mounts_shifted);
        self.outside_links.extend(o.outside_links);
        self.recovered += o.recovered;
        self.tree_changed |= o.tree_changed;
        self.tree_unsettled |= o.tree_unsettled;
        self.resumed |= o.resumed;
        self.completed_before &= o.completed_before;
        self.entry_access = self.entry_access.slower(o.entry_access);
        self.elapsed += o.elapsed;
    }
}

/// A range of ids written so no reader can misread it: `0–9 (10 ids)`,
/// `5 (1 id)`.
pub fn describe_range(start: u32, count: u32) -> String {
    match count {
        0 => format!("none at {start}"),
        1 => format!("{start} (1 id)"),
        n => format!("{start}–{} ({n} ids)", u64::from(start) + u64::from(n) - 1),
    }
}

/// Filesystems the walker shifts: ones that store ownership on behalf of
/// their users and can hold `trusted.*` xattrs.
///
/// An **allowlist**, not a denylist, so that a pseudo-filesystem the list
/// has not heard of (a new kernel one, a driver's) is refused rather than
/// shifted: a wrong refusal costs an error message naming the type, a
/// wrong shift gives host device nodes or kernel files to a container.
pub const SHIFTABLE_FILESYSTEMS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "zfs", "bcachefs", "jfs", "reiserfs",
    "nilfs2", "gfs2", "ocfs2",
];

/// Virtual filesystems, named as such in the refusal.
const VIRTUAL_FILESYSTEMS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "bpf",
    "configfs",
    "pstore",
    "efivarfs",
    "mqueue",
    "binfmt_misc",
    "fusectl",
    "nsfs",
    "selinuxfs",
    "smackfs",
    "autofs",
    "rpc_pipefs",
    "hugetlbfs",
    "hostfs",
    "sockfs",
    "pipefs",
    "anon_inodefs",
    "ramfs",
    "rootfs",
    "overlay",
];

fn refusal(fs: &str) -> Option<String> {
    if SHIFTABLE_FILESYSTEMS.contains(&fs) {
        return None;
    }
    Some(if fs == "ramfs" || fs == "rootfs" {
        "ramfs has no trusted.* xattrs, so it cannot hold the shift record that makes a re-run exact".into()
    } else if fs == "overlay" {
        "chowning through overlayfs copies every file up; shift the layers instead".into()
    } else if VIRTUAL_FILESYSTEMS.contains(&fs) {
        "it is a virtual filesystem whose files belong to the host".into()
    } else {
        format!(
            "not a filesystem the walker knows to store ownership and trusted.* xattrs (it shifts only {})",
            SHIFTABLE_FILESYSTEMS.join(", ")
        )
    })
}

/// The mounts of the tree at `root` the walker would shift (the tree's own,
/// and with `recursive` every directory mount below it), refusing — before
/// anything changes — if any is on a filesystem outside
/// [`SHIFTABLE_FILESYSTEMS`], with [`ErrorKind::NotShiftable`] naming the
/// mount and its type.
pub fn check_shiftable(root: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    let own = crate::mounttable::mount_of(root)?;
    if let Some(why) = refusal(&own.fs_type) {
        return Err(Error::new(ErrorKind::NotShiftable {
            fs: own.fs_type.clone(),
            why,
        })
        .with_path(root));
    }
    let mut mounts = vec![root.to_path_buf()];
    if recursive {
        for m in crate::mounttable::subtree(root)?.into_iter().skip(1) {
            if let Some(why) = refusal(&m.fs_type) {
                return Err(Error::new(ErrorKind::NotShiftable {
                    fs: m.fs_type.clone(),
                    why,
                })
                .with_path(&m.mount_point));
            }
            mounts.push(m.mount_point);
        }
    }
    Ok(mounts)
}

fn open_root(root: &Path) -> Result<OwnedFd> {
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rfs::openat(CWD, root, oflags, Mode::empty()).map_err(|e| {
        Error::sys(
            "openat",
            format!("AT_FDCWD, {root:?}, O_DIRECTORY|O_NOFOLLOW"),
            e,
        )
        .with_path(root)
    })
}

/// The shift recorded on the tree at `root`, if any (see the module docs).
pub fn read_record(root: &Path) -> Result<Option<ShiftRecord>> {
    let fd = open_root(root)?;
    load_record(fd.as_fd(), root)
}

fn load_record(fd: BorrowedFd<'_>, root: &Path) -> Result<Option<ShiftRecord>> {
    let mut buf = vec![0u8; 4096];
    match rfs::fgetxattr(fd, RECORD, &mut buf) {
        Ok(n) => match ShiftRecord::decode(&buf[..n]) {
            Some(r) => Ok(Some(r)),
            None => Err(Error::new(ErrorKind::ShiftRecorded {
                recorded: format!("an unreadable {RECORD} value"),
                hint: "it was not written by this version of idmapped; inspect it with getfattr"
                    .into(),
            })
            .with_path(root)),
        },
        Err(Errno::NODATA) | Err(Errno::NOTSUP) => Ok(None),
        Err(e) => Err(Error::sys("fgetxattr", format!("fd, {RECORD:?}"), e).with_path(root)),
    }
}

fn store_record(fd: BorrowedFd<'_>, root: &Path, r: &ShiftRecord) -> Result<()> {
    rfs::fsetxattr(fd, RECORD, &r.encode(), rfs::XattrFlags::empty()).map_err(|e| {
        let err = Error::sys("fsetxattr", format!("fd, {RECORD:?}"), e).with_path(root);
        match e {
            Errno::NOTSUP => err.with_kind(ErrorKind::NotShiftable {
                fs: crate::probe::fs_type(root),
                why: "the filesystem has no trusted.* xattrs, so it cannot hold the shift record that makes a re-run exact".into(),
            }),
            _ => err,
        }
    })
}

fn remove_record(fd: BorrowedFd<'_>, root: &Path) -> Result<()> {
    match rfs::fremovexattr(fd, RECORD) {
        Ok(()) | Err(Errno::NODATA) => Ok(()),
        Err(e) => Err(Error::sys("fremovexattr", format!("fd, {RECORD:?}"), e).with_path(root)),
    }
}

fn ctime_of(fd: BorrowedFd<'_>, root: &Path) -> Result<(i64, u32)> {
    let st = rfs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::CTIME).map_err(|e| {
        Error::sys("statx", "fd, \"\", AT_EMPTY_PATH, STATX_CTIME", e).with_path(root)
    })?;
    Ok((st.stx_ctime.tv_sec, st.stx_ctime.tv_nsec))
}

/// Write `r` (state running or undoing) and choose its ctime threshold: the
/// ctime of a rewrite of the record strictly later than the one the first
/// write left, so that no change before the record can have a ctime at or
/// after it, whatever the timestamp granularity.
fn begin(fd: BorrowedFd<'_>, root: &Path, r: &mut ShiftRecord) -> Result<()> {
    r.since = None;
    store_record(fd, root, r)?;
    let first = ctime_of(fd, root)?;
    // A chmod to the mode the root has changes nothing but its ctime (a
    // rewrite of an xattr with the same value may not even do that).
    let st = rfs::fstat(fd).map_err(|e| Error::sys("fstat", "fd", e).with_path(root))?;
    let mode = Mode::from_bits_retain(st.st_mode & 0o7777);
    let mut waited = Duration::ZERO;
    loop {
        rfs::fchmod(fd, mode).map_err(|e| {
            Error::sys("fchmod", format!("fd, {:o}", mode.bits()), e).with_path(root)
        })?;
        let now = ctime_of(fd, root)?;
        if now > first {
            r.since = Some(now);
            return store_record(fd, root, r);
        }
        if waited > Duration::from_secs(5) {
            return Err(Error::new(ErrorKind::InvalidInput(
                "the root's ctime did not advance within 5 s: the filesystem's timestamps cannot order the shift".into(),
            ))
            .with_path(root));
        }
        std::thread::sleep(Duration::from_millis(1));
        waited += Duration::from_millis(1);
    }
}

fn nonce() -> u64 {
    // RandomState is seeded from the OS's randomness.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

/// Shift the ownership of the tree at `root` on disk by `mapping`: an entry
/// stored with uid `X` gets `mapping.uids().seen(X)`, and likewise for gids,
/// ACL qualifiers and capability root ids; uncovered ids follow
/// [`ShiftOptions::out_of_range`]. See the [module docs](self).
///
/// `root` must be a directory; its last component is not followed. A tree
/// whose record says this shift is done returns at once with
/// [`ShiftReport::completed_before`]; an unfinished one is resumed. Undo with
/// [`unshift_tree`] (not by shifting with the inverse mapping: a swap is its
/// own inverse, and the record would refuse it anyway).
///
/// # Errors
///
/// [`ErrorKind::ShiftRecorded`] for a tree whose record refuses this shift
/// (another mapping or policy, an unfinished unshift, a copied record);
/// [`ErrorKind::NotShiftable`] for a virtual filesystem (nothing changed);
/// [`ErrorKind::IdOutOfRange`] / [`ErrorKind::LinkedOutside`] with the
/// `Fail` policies and [`ErrorKind::AclCollision`] (nothing changed); during
/// the walk, the first failure stops it and is returned, the record stays
/// "running", and running the same shift again finishes the job.
pub fn shift_tree(root: &Path, mapping: &Mapping, options: &ShiftOptions) -> Result<ShiftReport> {
    let mounts = submounts(root, options.cross_mounts)?;
    let mut total = ShiftReport {
        completed_before: true,
        ..ShiftReport::default()
    };
    // Parents before children: a child mount's root is an entry the
    // parent's walk skips as a mount point.
    for rel in &mounts {
        let Some(r) = shift_one(root, rel, mapping, options)? else {
            total.skipped_mounts += 1;
            continue;
        };
        total.absorb(r);
        total.mounts_shifted.push(root.join(rel));
    }
    if !options.cross_mounts {
        total.mounts_shifted.clear();
    }
    Ok(total)
}

/// The mounts to shift, relative to `root` (`""` for its own), after
/// [`check_shiftable`] accepted every one.
fn submounts(root: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    let mounts = check_shiftable(root, recursive)?;
    if mounts.len() == 1 {
        return Ok(vec![PathBuf::new()]);
    }
    let canon = std::fs::canonicalize(root).map_err(|e| {
        Error::new(ErrorKind::InvalidInput(format!(
            "cannot resolve the tree's path: {e}"
        )))
        .with_path(root)
    })?;
    let mut out = vec![PathBuf::new()];
    for m in mounts.into_iter().skip(1) {
        if let Ok(rel) = m.strip_prefix(&canon) {
            out.push(rel.to_path_buf());
        }
    }
    Ok(out)
}

/// Open a mount's root `rel` beneath the tree's root, never through a
/// symlink; `None` for a file mount (never shifted).
fn open_mount_beneath(tree: &Path, rel: &Path) -> Result<Option<OwnedFd>> {
    let tree_fd = open_root(tree)?;
    if rel.as_os_str().is_empty() {
        return Ok(Some(tree_fd));
    }
    let mount = tree.join(rel);
    let oflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = rfs::ResolveFlags::BENEATH
        | rfs::ResolveFlags::NO_SYMLINKS
        | rfs::ResolveFlags::NO_MAGICLINKS;
    let r = match rfs::openat2(&tree_fd, rel, oflags, Mode::empty(), resolve) {
        // No openat2 (before 5.6): one component at a time, no symlinks.
        Err(Errno::NOSYS) | Err(Errno::PERM) => {
            let mut fd = tree_fd;
            let mut r = Ok(());
            for c in rel.components() {
                let name = std::ffi::CString::new(c.as_os_str().as_bytes()).map_err(|_| {
                    Error::new(ErrorKind::InvalidInput("NUL in a mount path".into()))
                })?;
                match rfs::openat(&fd, name.as_c_str(), oflags, Mode::empty()) {
                    Ok(next) => fd = next,
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
            r.map(|()| fd)
        }
        r => r,
    };
    match r {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOTDIR) => Ok(None),
        Err(e) => Err(Error::sys(
            "openat2",
            format!("{rel:?}, O_DIRECTORY|O_NOFOLLOW, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS"),
            e,
        )
        .with_path(mount)),
    }
}

fn shift_one(
    tree: &Path,
    rel: &Path,
    mapping: &Mapping,
    options: &ShiftOptions,
) -> Result<Option<ShiftReport>> {
    let start = std::time::Instant::now();
    let Some(fd) = open_mount_beneath(tree, rel)? else {
        return Ok(None);
    };
    let joined = tree.join(rel);
    let path: &Path = if rel.as_os_str().is_empty() {
        tree
    } else {
        &joined
    };
    let (dev, ino) = walk::dev_ino(fd.as_fd(), path)?;
    let recorded = load_record(fd.as_fd(), path)?;
    let (oor, links) = (options.out_of_range, options.outside_links);
    let mut record = match recorded {
        Some(r) if r.root != (dev, ino) => {
            return Err(Error::new(ErrorKind::ShiftRecorded {
                recorded: r.describe(),
                hint: format!(
                    "the record was written for another directory (inode {} on device {}, this is {ino} on {dev}): the tree was copied with its xattrs; remove {RECORD} from the copy only if it was copied before any shift began",
                    r.root.1, r.root.0
                ),
            })
            .with_path(path))
        }
        Some(r) if r.state == RecordState::Undoing => {
            return Err(Error::new(ErrorKind::ShiftRecorded {
                recorded: r.describe(),
                hint: format!("an unshift is unfinished: run `mount-idmapped --unshift {}` again first", path.display()),
            })
            .with_path(path))
        }
        Some(r) if !r.same_shift(mapping, oor, links) => {
            let hint = match r.state {
                RecordState::Done => format!(
                    "undo it first with `mount-idmapped --unshift {}`",
                    path.display()
                ),
                _ => "finish it by running it again with the recorded mapping and policies, or undo it after that".to_string(),
            };
            return Err(Error::new(ErrorKind::ShiftRecorded {
                recorded: r.describe(),
                hint,
            })
            .with_path(path));
        }
        Some(r) if r.state == RecordState::Done => {
            if !options.dry_run {
                walk::drop_root_stash(fd.as_fd(), path)?;
            }
            return Ok(Some(ShiftReport {
                completed_before: true,
                elapsed: start.elapsed(),
                ..ShiftReport::default()
            }));
        }
        Some(r) => Some(r),
        None => None,
    };
    let view = walk::View::open(&fd, path, options.pin_only)?;
    let resumed = record.as_ref().is_some_and(|r| r.since.is_some());
    let mut spec = walk::Spec {
        mapping,
        out_of_range: oor,
        outside_links: links,
        nonce: record.as_ref().map_or_else(nonce, |r| r.nonce),
        since: record.as_ref().and_then(|r| r.since),
        scan: false,
        redo: record
            .as_ref()
            .map(|r| r.redo.iter().copied().collect())
            .unwrap_or_default(),
    };
    // Find out first where the run must change nothing if it cannot finish.
    if needs_scan(mapping, oor, links) || options.dry_run {
        spec.scan = true;
        let scanned = walk::run(&view, path, &spec, options, &mut |_| Ok(()))?;
        if options.dry_run {
            return Ok(Some(ShiftReport {
                resumed,
                elapsed: start.elapsed(),
                ..scanned
            }));
        }
        spec.scan = false;
    }
    if record.is_none() {
        let mut r = ShiftRecord {
            state: RecordState::Running,
            mapping: mapping.clone(),
            out_of_range: oor,
            outside_links: links,
            nonce: spec.nonce,
            since: None,
            root: (dev, ino),
            redo: Vec::new(),
        };
        begin(fd.as_fd(), path, &mut r)?;
        spec.since = None; // a first run trusts only its own in-memory set
        record = Some(r);
    } else if let Some(r) = record.as_mut() {
        if r.since.is_none() {
            begin(fd.as_fd(), path, r)?;
        }
    }
    let mut record = record.unwrap_or_else(|| unreachable_record(mapping));
    let mut finish = |frozen: &walk::Frozen| {
        if frozen.is_empty() {
            record.state = RecordState::Done;
            record.redo.clear();
        } else {
            record.redo.extend(frozen.iter().map(|f| f.2));
            record.redo.sort_unstable();
            record.redo.dedup();
        }
        store_record(fd.as_fd(), path, &record)
    };
    let mut report = walk::run(&view, path, &spec, options, &mut finish)?;
    report.resumed = resumed;
    report.elapsed = start.elapsed();
    Ok(Some(report))
}

/// Never used: `record` is always set above; kept total without a panic.
fn unreachable_record(mapping: &Mapping) -> ShiftRecord {
    ShiftRecord {
        state: RecordState::Running,
        mapping: mapping.clone(),
        out_of_range: OutOfRange::Keep,
        outside_links: OutsideLinks::Skip,
        nonce: 0,
        since: None,
        root: (0, 0),
        redo: Vec::new(),
    }
}

/// Whether a read-only pass must come first: `Fail` policies, and `Keep`
/// where a kept ACL qualifier could meet a shifted one (some seen id lies
/// outside every on-disk range).
fn needs_scan(mapping: &Mapping, oor: OutOfRange, links: OutsideLinks) -> bool {
    let seen_outside_on_disk = |map: &IdMap| {
        map.extents().iter().any(|e| {
            let (s, n) = (u64::from(e.seen()), u64::from(e.count()));
            // Some seen id of this extent is not covered by the on-disk ranges.
            !covered(map, s, s + n)
        })
    };
    oor == OutOfRange::Fail
        || links == OutsideLinks::Fail
        || (oor == OutOfRange::Keep
            && (seen_outside_on_disk(mapping.uids()) || seen_outside_on_disk(mapping.gids())))
}

/// Whether ids `[lo, hi)` all lie in on-disk ranges of `map`.
fn covered(map: &IdMap, lo: u64, hi: u64) -> bool {
    let mut ranges: Vec<(u64, u64)> = map
        .extents()
        .iter()
        .map(|e| {
            (
                u64::from(e.on_disk()),
                u64::from(e.on_disk()) + u64::from(e.count()),
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut at = lo;
    for (a, b) in ranges {
        if a > at {
            break;
        }
        at = at.max(b);
        if at >= hi {
            return true;
        }
    }
    at >= hi
}

/// Undo the shift recorded on the tree at `root`: apply the inverse of the
/// recorded mapping to exactly the ids the shift wrote, then remove the
/// record. Ids kept as they were ([`OutOfRange::Keep`]) stay, so the tree is
/// the original again except for kept ids that lay inside a seen range (the
/// report of the shift listed them) and, after [`OutOfRange::Overflow`], ids
/// written as 65534. Killed midway, run it again: the record says `undoing`.
///
/// Only `options.threads`, `progress` and `cross_mounts` are used: the
/// policies are the recorded ones.
pub fn unshift_tree(root: &Path, options: &ShiftOptions) -> Result<ShiftReport> {
    let mounts = submounts(root, options.cross_mounts)?;
    let mut total = ShiftReport::default();
    // Children before parents: the reverse order of the shift.
    for rel in mounts.iter().rev() {
        let Some(r) = unshift_one(root, rel, options)? else {
            total.skipped_mounts += 1;
            continue;
        };
        total.absorb(r);
        total.mounts_shifted.push(root.join(rel));
    }
    if !options.cross_mounts {
        total.mounts_shifted.clear();
    }
    Ok(total)
}

fn unshift_one(tree: &Path, rel: &Path, options: &ShiftOptions) -> Result<Option<ShiftReport>> {
    let start = std::time::Instant::now();
    let Some(fd) = open_mount_beneath(tree, rel)? else {
        return Ok(None);
    };
    let joined = tree.join(rel);
    let path: &Path = if rel.as_os_str().is_empty() {
        tree
    } else {
        &joined
    };
    let (dev, ino) = walk::dev_ino(fd.as_fd(), path)?;
    let Some(mut record) = load_record(fd.as_fd(), path)? else {
        return Err(Error::new(ErrorKind::InvalidInput(format!(
            "{} records no shift ({RECORD} is absent): nothing to undo",
            path.display()
        )))
        .with_path(path));
    };
    if record.root != (dev, ino) {
        return Err(Error::new(ErrorKind::ShiftRecorded {
            recorded: record.describe(),
            hint:
                "the record was written for another directory: the tree was copied with its xattrs"
                    .into(),
        })
        .with_path(path));
    }
    let resumed = match record.state {
        RecordState::Running => {
            return Err(Error::new(ErrorKind::ShiftRecorded {
                recorded: record.describe(),
                hint: "the shift is unfinished: finish it by running it again, then unshift".into(),
            })
            .with_path(path))
        }
        RecordState::Done => {
            record.state = RecordState::Undoing;
            record.nonce = nonce();
            if !options.dry_run {
                begin(fd.as_fd(), path, &mut record)?;
            }
            false
        }
        RecordState::Undoing => {
            if record.since.is_none() {
                begin(fd.as_fd(), path, &mut record)?;
                false
            } else {
                true
            }
        }
    };
    let inverse = record.mapping.inverse();
    let view = walk::View::open(&fd, path, options.pin_only)?;
    let spec = walk::Spec {
        mapping: &inverse,
        out_of_range: OutOfRange::Keep,
        outside_links: match record.outside_links {
            OutsideLinks::Fail => OutsideLinks::Skip,
            l => l,
        },
        nonce: record.nonce,
        since: if resumed { record.since } else { None },
        scan: options.dry_run,
        redo: record.redo.iter().copied().collect(),
    };
    let mut finish = |frozen: &walk::Frozen| {
        if frozen.is_empty() {
            remove_record(fd.as_fd(), path)
        } else {
            record.redo.extend(frozen.iter().map(|f| f.2));
            store_record(fd.as_fd(), path, &record)
        }
    };
    let mut report = walk::run(&view, path, &spec, options, &mut finish)?;
    report.resumed = resumed;
    report.elapsed = start.elapsed();
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_unambiguously() {
        assert_eq!(describe_range(0, 10), "0–9 (10 ids)");
        assert_eq!(describe_range(5, 1), "5 (1 id)");
        assert_eq!(describe_range(u32::MAX, 1), "4294967295 (1 id)");
        assert_eq!(describe_range(1, u32::MAX), "1–4294967295 (4294967295 ids)");
    }

    #[test]
    fn scan_first_only_where_needed() {
        let m = |s: &[&str]| Mapping::parse_map_mount(s.iter().copied()).unwrap();
        use OutOfRange::*;
        use OutsideLinks as L;
        // The common mapping: seen ids outside every on-disk range.
        assert!(needs_scan(&m(&["b:0:100000:65536"]), Keep, L::Skip));
        assert!(!needs_scan(&m(&["b:0:100000:65536"]), Overflow, L::Skip));
        assert!(needs_scan(&m(&["b:0:100000:65536"]), Overflow, L::Fail));
        assert!(needs_scan(&m(&["b:0:100000:65536"]), Fail, L::Skip));
        // A swap: every seen id is an on-disk id too.
        assert!(!needs_scan(
            &m(&["b:1000:1001:1", "b:1001:1000:1"]),
            Keep,
            L::Skip
        ));
        assert!(needs_scan(&m(&["b:0:1:65536"]), Keep, L::Skip));
        assert!(!needs_scan(&m(&["b:0:1:10", "b:10:0:1"]), Keep, L::Skip));
    }

    #[test]
    fn refuses_virtual_and_unknown_filesystems() {
        for fs in [
            "proc",
            "sysfs",
            "devtmpfs",
            "cgroup2",
            "ramfs",
            "nfs4",
            "fuse.sshfs",
            "overlay",
        ] {
            assert!(refusal(fs).is_some(), "{fs}");
        }
        for fs in ["ext4", "xfs", "btrfs", "tmpfs"] {
            assert!(refusal(fs).is_none(), "{fs}");
        }
    }
}
