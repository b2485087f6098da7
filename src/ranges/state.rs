//! The allocator's durable state: one file per key in a directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::json::{self, Value};
use super::{check_key, key_problem, Allocation, Config, Layout, Pool, MAX_KEY_LEN};
use crate::error::{Error, ErrorKind, Result};

/// Temporary files start with this; `~` is never part of a key, so no
/// temporary file can be mistaken for a record.
const TMP_PREFIX: &str = ".~tmp-";

/// What changed last in the directory (see [`Allocator`] and [`Generation`]).
const GENERATION: &str = ".~generation";

/// How many of the latest allocations `.~generation` names.
const RECENT: usize = 32;

/// The first line of `.~generation` starts with this.
const GENERATION_MAGIC: &str = "idmapped-ranges-generation v1";

/// The contents of `.~generation`: counters every change bumps *before* it
/// happens (under the exclusive lock), and the keys of the latest
/// allocations, so that an allocator whose view is a few allocations old
/// reads just those records instead of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Generation {
    /// Removals ever made: when it moved, every record is read again (a key
    /// released and allocated elsewhere may have a new range under its old name).
    removals: u64,
    /// Changes ever made (allocations and removals).
    changes: u64,
    /// The keys of the latest allocations since the last removal, oldest
    /// first, at most [`RECENT`].
    recent: Vec<String>,
}

impl Generation {
    fn parse(text: &[u8]) -> Option<Generation> {
        let text = std::str::from_utf8(text).ok()?;
        let body = text.strip_suffix("end\n")?;
        let mut lines = body.lines();
        let head = lines.next()?.strip_prefix(GENERATION_MAGIC)?;
        let mut nums = head.split(' ').skip(1);
        let removals = nums.next()?.parse().ok()?;
        let changes = nums.next()?.parse().ok()?;
        if nums.next().is_some() {
            return None;
        }
        let recent: Vec<String> = lines.map(str::to_owned).collect();
        if recent.len() > RECENT || recent.iter().any(|k| key_problem(k).is_some()) {
            return None;
        }
        Some(Generation {
            removals,
            changes,
            recent,
        })
    }

    fn text(&self) -> String {
        let mut t = format!("{GENERATION_MAGIC} {} {}\n", self.removals, self.changes);
        for k in &self.recent {
            t.push_str(k);
            t.push('\n');
        }
        t.push_str("end\n");
        t
    }
}

/// Records are a few hundred bytes; anything larger is not one of ours.
const MAX_RECORD: usize = 4096;

/// Why a file of the state directory was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateProblem {
    /// Its name is not a key (and not one of our own temporary files).
    NotAKey {
        /// Why the name is not a key.
        reason: &'static str,
    },
    /// It is not a regular file (a symlink, a directory, a fifo...).
    NotRegularFile,
    /// Its content is not a record.
    Malformed {
        /// What is wrong with it.
        detail: String,
    },
    /// The record's size is not the current `ids_per_pod` (the state was
    /// written with other settings).
    WrongSize {
        /// The record's first host id.
        first: u64,
        /// The record's size.
        count: u64,
        /// The current `ids_per_pod`.
        ids_per_pod: u32,
    },
    /// The record does not start on a block boundary.
    Misaligned {
        /// The record's first host id.
        first: u64,
        /// The current `ids_per_pod`.
        ids_per_pod: u32,
    },
    /// The record lies (partly) outside the pool.
    OutsidePool {
        /// The record's first host id.
        first: u64,
        /// The record's size.
        count: u64,
        /// The current pool.
        pool: Pool,
    },
    /// The record is the block that contains 4294967295, which the kernel
    /// never maps.
    UnusableBlock {
        /// The record's first host id.
        first: u64,
        /// The record's size.
        count: u64,
    },
    /// The record's block is another key's too.
    Overlap {
        /// The record's first host id.
        first: u64,
        /// The record's size.
        count: u64,
        /// The other key (its file name).
        other: String,
    },
}

impl fmt::Display for StateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateProblem::NotAKey { reason } => {
                write!(f, "the name is not a key ({reason})")
            }
            StateProblem::NotRegularFile => f.write_str("not a regular file"),
            StateProblem::Malformed { detail } => write!(f, "malformed record: {detail}"),
            StateProblem::WrongSize {
                first,
                count,
                ids_per_pod,
            } => write!(
                f,
                "record {first}:{count} has {count} ids, not ids_per_pod {ids_per_pod} (written with other settings?)"
            ),
            StateProblem::Misaligned { first, ids_per_pod } => write!(
                f,
                "record starting at {first} is not aligned to ids_per_pod {ids_per_pod}"
            ),
            StateProblem::OutsidePool { first, count, pool } => {
                write!(f, "record {first}:{count} is outside the pool {pool}")
            }
            StateProblem::UnusableBlock { first, count } => write!(
                f,
                "record {first}:{count} contains 4294967295, which the kernel never maps"
            ),
            StateProblem::Overlap {
                first,
                count,
                other,
            } => write!(f, "record {first}:{count} overlaps the record of {other:?}"),
        }
    }
}

/// Per-pod id ranges kept in a directory, safe to share between processes.
///
/// # On disk
/// One file per key, named by the key, in the kubelet's format:
///
/// ```text
/// {"uidMappings":[{"hostId":FIRST,"containerId":0,"length":COUNT}],
///  "gidMappings":[{"hostId":FIRST,"containerId":0,"length":COUNT}]}
/// ```
///
/// A record is written as a temporary file (`.~tmp-PID-N`), `fsync`ed,
/// renamed to the key (`RENAME_NOREPLACE`) and the directory `fsync`ed
/// before [`allocate`](Self::allocate) returns, so a returned range is on
/// disk whatever happens next, and a range that is on disk was never
/// returned twice. (The directory is synced after the lock is released:
/// the record is complete and visible by then, and concurrent allocators
/// share their syncs.) A temporary file left by a killed process is not an
/// allocation: it is ignored and removed. A release is synced the same way;
/// one lost to a power cut leaves the block allocated to a key that is
/// gone, which the next `reconcile` releases.
///
/// # Many processes
/// Every operation holds `flock` on the directory (exclusive; shared for
/// [`list`](Self::list)) while it reads and changes the state, so any
/// number of processes and [`Allocator`]s may share one directory.
/// [`open`](Self::open) reads and validates every record. Later
/// operations keep that view current without reading everything again:
/// every change first bumps the counters in `.~generation` (which also names
/// the latest allocations); an unchanged generation means nothing to read,
/// a few allocations behind means reading just their records, more means
/// reading the directory for new names, and any removal means reading
/// everything again (a key released and allocated elsewhere may have a new
/// range under its old name). The state must be changed only through this
/// type; a record removed by hand is noticed when its key is asked for.
///
/// # Validation
/// `open` refuses, with [`ErrorKind::InvalidState`] naming the file and the
/// record, any file that is not a regular file named by a key, not a
/// well-formed record, not `ids_per_pod` ids, not on a block boundary,
/// outside the pool, the block containing 4294967295, or a block another
/// record holds. Nothing is changed then: fix the state or drain the node
/// (the kubelet's rule: never start with a conflict).
#[derive(Debug)]
pub struct Allocator {
    dir: OwnedFd,
    path: PathBuf,
    layout: Layout,
    by_key: HashMap<String, Allocation>,
    /// The key holding each allocated block, by the block's first id.
    by_first: BTreeMap<u32, String>,
    /// The `.~generation` the cache matches; `None`: read everything next time.
    generation: Option<Generation>,
    temp_serial: u64,
}

/// Holds `flock` on the state directory until dropped.
struct Locked<'a>(BorrowedFd<'a>);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, FlockOperation::Unlock);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lock {
    Shared,
    Exclusive,
}

impl Allocator {
    /// Opens (creating it, mode 0700, if missing) the state directory at
    /// `path` with `config`, which must pass every rule
    /// ([`ErrorKind::RangeRule`], checked before anything is created), then
    /// reads and validates every record.
    pub fn open(path: impl AsRef<Path>, config: &Config) -> Result<Allocator> {
        let layout = config.layout()?;
        let path = path.as_ref().to_path_buf();
        create_dir(&path)?;
        let dir = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::sys("open", format!("{path:?}, O_DIRECTORY"), e).with_path(&path))?;
        let mut alloc = Allocator {
            dir,
            path,
            layout,
            by_key: HashMap::new(),
            by_first: BTreeMap::new(),
            generation: None,
            temp_serial: 0,
        };
        let dir = alloc.dup_dir()?;
        let _lock = lock(dir.as_fd(), Lock::Exclusive, &alloc.path)?;
        alloc.refresh(Lock::Exclusive)?;
        Ok(alloc)
    }

    /// The settings the allocator works with.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `key`'s range, allocating a free block if it has none: a block chosen
    /// uniformly at random among the free ones (see the [module
    /// docs](super)), durable before this returns. Idempotent: the same key
    /// gets its existing range. Fails with [`ErrorKind::InvalidKey`],
    /// [`ErrorKind::PoolExhausted`], or [`ErrorKind::InvalidState`] when a
    /// record that appeared since `open` is invalid.
    pub fn allocate(&mut self, key: &str) -> Result<Allocation> {
        check_key(key)?;
        let dir = self.dup_dir()?;
        let _lock = lock(dir.as_fd(), Lock::Exclusive, &self.path)?;
        self.refresh(Lock::Exclusive)?;
        if self.by_key.contains_key(key) && !self.record_exists(key)? {
            // Removed behind our back (by hand): believe the directory.
            self.generation = None;
            self.refresh(Lock::Exclusive)?;
        }
        if let Some(a) = self.by_key.get(key) {
            return Ok(a.clone());
        }
        let usable = self.layout.usable_blocks();
        let taken = self.by_first.len() as u64;
        let free = usable.saturating_sub(taken);
        if free == 0 {
            return Err(Error::new(ErrorKind::PoolExhausted {
                usable,
                pool: self.layout.pool(),
            })
            .with_path(&self.path));
        }
        let index = self.nth_free(random_below(free)?);
        let first = self.layout.block_first(index).ok_or_else(|| {
            Error::new(ErrorKind::PoolExhausted {
                usable,
                pool: self.layout.pool(),
            })
        })?;
        let count = self.layout.ids_per_pod();
        let allocation = Allocation::new(key.to_owned(), first, count).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput(format!(
                "block {first}:{count} is not a valid mapping"
            )))
        })?;
        let next = self.bump_generation(Some(key))?;
        // Until the record is written and cached, our view is not `next`.
        self.generation = None;
        self.write_record(key, first, count)?;
        self.by_first.insert(first, key.to_owned());
        self.by_key.insert(key.to_owned(), allocation.clone());
        self.generation = Some(next);
        // The record is complete on disk (fsynced before the rename) and
        // visible to every allocator, so the lock can go before the
        // directory is synced: concurrent allocators then sync together.
        drop(_lock);
        self.sync_dir()?;
        Ok(allocation)
    }

    /// Frees `key`'s range, durably; returns it, or `None` when `key` had
    /// none (not an error).
    pub fn release(&mut self, key: &str) -> Result<Option<Allocation>> {
        check_key(key)?;
        let dir = self.dup_dir()?;
        let _lock = lock(dir.as_fd(), Lock::Exclusive, &self.path)?;
        self.refresh(Lock::Exclusive)?;
        if !self.by_key.contains_key(key) {
            return Ok(None);
        }
        let removed = self.remove(&[key.to_owned()]);
        drop(_lock);
        let synced = self.sync_dir();
        let mut released = removed?;
        synced?;
        Ok(released.pop())
    }

    /// Releases every allocation whose key is not in `live` (the pods that
    /// still exist), durably; returns what was released, sorted by first id.
    pub fn reconcile<'a>(
        &mut self,
        live: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Allocation>> {
        let mut keep = HashSet::new();
        for key in live {
            check_key(key)?;
            keep.insert(key);
        }
        let dir = self.dup_dir()?;
        let _lock = lock(dir.as_fd(), Lock::Exclusive, &self.path)?;
        self.refresh(Lock::Exclusive)?;
        let gone: Vec<String> = self
            .by_first
            .values()
            .filter(|k| !keep.contains(k.as_str()))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let removed = self.remove(&gone);
        drop(_lock);
        let synced = self.sync_dir();
        let released = removed?;
        synced?;
        Ok(released)
    }

    /// Every allocation, sorted by first id, as the directory holds it now.
    pub fn list(&mut self) -> Result<Vec<Allocation>> {
        let dir = self.dup_dir()?;
        let _lock = lock(dir.as_fd(), Lock::Shared, &self.path)?;
        self.refresh(Lock::Shared)?;
        Ok(self
            .by_first
            .values()
            .filter_map(|k| self.by_key.get(k).cloned())
            .collect())
    }

    fn dup_dir(&self) -> Result<OwnedFd> {
        rustix::io::fcntl_dupfd_cloexec(&self.dir, 0)
            .map_err(|e| Error::sys("fcntl", "F_DUPFD_CLOEXEC", e).with_path(&self.path))
    }

    /// The index of the `n`-th free block (0-based), walking the taken
    /// blocks in order: O(allocated), not O(pool).
    fn nth_free(&self, n: u64) -> u64 {
        let mut index = n;
        for first in self.by_first.keys() {
            match self.layout.block_index(u64::from(*first)) {
                Some(taken) if taken <= index => index += 1,
                Some(_) => break,
                None => {}
            }
        }
        index
    }

    /// Brings the cache up to date with the directory; the caller holds the lock.
    fn refresh(&mut self, lock: Lock) -> Result<()> {
        let now = self.read_generation()?;
        let result = match (&self.generation, &now) {
            (Some(old), Some(new)) if old.removals == new.removals => {
                let behind = new.changes.wrapping_sub(old.changes);
                if behind == 0 {
                    Ok(())
                } else if behind <= new.recent.len() as u64 {
                    let start = new.recent.len() - behind as usize;
                    self.read_recent(lock, &new.recent[start..])
                } else {
                    self.read_new_names(lock)
                }
            }
            _ => self.read_all(lock),
        };
        // On failure, read everything next time.
        self.generation = if result.is_ok() { now } else { None };
        result
    }

    fn read_all(&mut self, lock: Lock) -> Result<()> {
        self.by_key.clear();
        self.by_first.clear();
        let mut names = Vec::new();
        self.scan(lock, |_, name| {
            names.push(name.to_owned());
            true
        })?;
        names.sort();
        for name in names {
            self.add_record(&name, false)?;
        }
        Ok(())
    }

    /// Reads the records that appeared since the cache was made (the
    /// directory changed by allocations only).
    fn read_new_names(&mut self, lock: Lock) -> Result<()> {
        let mut new = Vec::new();
        let mut cached_present = 0;
        self.scan(lock, |cache, name| {
            if cache.contains_key(name) {
                cached_present += 1;
            } else {
                new.push(name.to_owned());
            }
            true
        })?;
        if cached_present != self.by_key.len() {
            // A record went without a removal being counted (by hand).
            return self.read_all(lock);
        }
        new.sort();
        for name in new {
            self.add_record(&name, false)?;
        }
        Ok(())
    }

    /// Reads the records of the latest allocations named by `.~generation`.
    fn read_recent(&mut self, lock: Lock, keys: &[String]) -> Result<()> {
        let distinct = keys.iter().collect::<HashSet<_>>().len() == keys.len();
        if !distinct || keys.iter().any(|k| self.by_key.contains_key(k)) {
            // Allocated again without a removal being counted: its record
            // was removed by hand. Believe the directory.
            return self.read_all(lock);
        }
        for key in keys {
            // A missing record: its writer was killed before the rename.
            self.add_record(key, true)?;
        }
        Ok(())
    }

    /// Reads, validates and caches `name`'s record; `missing_ok`: a record
    /// that does not exist is skipped.
    fn add_record(&mut self, name: &str, missing_ok: bool) -> Result<()> {
        let Some(allocation) = self.read_record(name, missing_ok)? else {
            return Ok(());
        };
        if let Some(other) = self.by_first.get(&allocation.first()) {
            return Err(self.invalid(
                name,
                StateProblem::Overlap {
                    first: allocation.first().into(),
                    count: allocation.count().into(),
                    other: other.clone(),
                },
            ));
        }
        self.by_first.insert(allocation.first(), name.to_owned());
        self.by_key.insert(name.to_owned(), allocation);
        Ok(())
    }

    fn record_exists(&self, key: &str) -> Result<bool> {
        match rustix::fs::statat(&self.dir, key, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(
                Error::sys("fstatat", format!("{:?}, {key:?}", self.path), e)
                    .with_path(self.path.join(key)),
            ),
        }
    }

    /// Calls `each(cache, key)` for every key in the directory; temporary
    /// files are skipped, and removed under an exclusive lock; any other
    /// name that is not a key is refused.
    fn scan(
        &self,
        lock: Lock,
        mut each: impl FnMut(&HashMap<String, Allocation>, &str) -> bool,
    ) -> Result<()> {
        let dir = rustix::fs::Dir::read_from(&self.dir).map_err(|e| {
            Error::sys("openat", format!("{:?}, \".\", O_DIRECTORY", self.path), e)
                .with_path(&self.path)
        })?;
        for entry in dir {
            let entry = entry.map_err(|e| {
                Error::sys("getdents64", format!("{:?}", self.path), e).with_path(&self.path)
            })?;
            let raw = entry.file_name().to_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            if raw.starts_with(TMP_PREFIX.as_bytes()) {
                let name = String::from_utf8_lossy(raw);
                if lock == Lock::Exclusive {
                    // Only a process holding the exclusive lock writes a
                    // temporary file, and it removes or renames it before
                    // unlocking: one seen now was left by a killed run.
                    match rustix::fs::unlinkat(&self.dir, raw, AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => {
                            return Err(Error::sys(
                                "unlinkat",
                                format!("{:?}, {name:?}", self.path),
                                e,
                            )
                            .with_path(self.path.join(&*name)))
                        }
                    }
                }
                continue;
            }
            if raw == GENERATION.as_bytes() {
                continue;
            }
            let Ok(key) = std::str::from_utf8(raw) else {
                let name = String::from_utf8_lossy(raw);
                return Err(self.invalid(
                    &name,
                    StateProblem::NotAKey {
                        reason: "it is not UTF-8",
                    },
                ));
            };
            if let Some(reason) = key_problem(key) {
                return Err(self.invalid(key, StateProblem::NotAKey { reason }));
            }
            if !each(&self.by_key, key) {
                break;
            }
        }
        Ok(())
    }

    fn invalid(&self, file: &str, problem: StateProblem) -> Error {
        Error::new(ErrorKind::InvalidState {
            file: file.to_owned(),
            problem,
        })
        .with_path(self.path.join(file))
    }

    fn read_record(&self, name: &str, missing_ok: bool) -> Result<Option<Allocation>> {
        let path = self.path.join(name);
        let fd = match rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if missing_ok => return Ok(None),
            Err(Errno::LOOP) => return Err(self.invalid(name, StateProblem::NotRegularFile)),
            Err(e) => {
                return Err(Error::sys(
                    "openat",
                    format!("{:?}, {name:?}, O_RDONLY|O_NOFOLLOW", self.path),
                    e,
                )
                .with_path(path))
            }
        };
        let st = rustix::fs::fstat(&fd)
            .map_err(|e| Error::sys("fstat", format!("{name:?}"), e).with_path(&path))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(self.invalid(name, StateProblem::NotRegularFile));
        }
        let text = read_limited(&fd, MAX_RECORD + 1)
            .map_err(|e| Error::sys("read", format!("{name:?}"), e).with_path(&path))?;
        if text.len() > MAX_RECORD {
            return Err(self.invalid(
                name,
                StateProblem::Malformed {
                    detail: format!("longer than {MAX_RECORD} bytes"),
                },
            ));
        }
        let (first, count) = parse_record(&text)
            .map_err(|detail| self.invalid(name, StateProblem::Malformed { detail }))?;
        self.check_record(name, first, count).map(Some)
    }

    fn check_record(&self, name: &str, first: u64, count: u64) -> Result<Allocation> {
        let l = self.layout.ids_per_pod();
        let pool = self.layout.pool();
        let problem = if count != u64::from(l) {
            Some(StateProblem::WrongSize {
                first,
                count,
                ids_per_pod: l,
            })
        } else if first % u64::from(l) != 0 {
            Some(StateProblem::Misaligned {
                first,
                ids_per_pod: l,
            })
        } else if first < pool.first
            || u128::from(first) + u128::from(count)
                > u128::from(pool.first) + u128::from(pool.count)
        {
            Some(StateProblem::OutsidePool { first, count, pool })
        } else if self.layout.block_index(first).is_none() {
            Some(StateProblem::UnusableBlock { first, count })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(self.invalid(name, problem));
        }
        let built = u32::try_from(first)
            .ok()
            .zip(u32::try_from(count).ok())
            .and_then(|(f, c)| Allocation::new(name.to_owned(), f, c));
        built.ok_or_else(|| self.invalid(name, StateProblem::UnusableBlock { first, count }))
    }

    /// `.~generation`, or `None` when it is absent or not one (which makes
    /// everything be read again).
    fn read_generation(&self) -> Result<Option<Generation>> {
        let fd = match rustix::fs::openat(
            &self.dir,
            GENERATION,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // None yet (no change made), or removed by hand: either way
            // nothing says the cache is current.
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => return Ok(None),
            Err(e) => {
                return Err(
                    Error::sys("openat", format!("{:?}, {GENERATION:?}", self.path), e)
                        .with_path(self.path.join(GENERATION)),
                )
            }
        };
        let limit = (MAX_KEY_LEN + 1) * RECENT + 128;
        Ok(read_limited(&fd, limit)
            .ok()
            .and_then(|t| Generation::parse(&t)))
    }

    /// Records in `.~generation`, before the change is made, that `allocated`
    /// is being allocated (`None`: that records are being removed).
    /// Returns the new generation.
    fn bump_generation(&self, allocated: Option<&str>) -> Result<Generation> {
        let mut next = match self.read_generation()? {
            Some(g) => g,
            // Unreadable: counters nobody can have seen, so that every
            // allocator reads everything again.
            None => Generation {
                removals: random_below(u64::MAX)?,
                changes: 0,
                recent: Vec::new(),
            },
        };
        next.changes = next.changes.wrapping_add(1);
        match allocated {
            Some(key) => {
                if next.recent.len() == RECENT {
                    next.recent.remove(0);
                }
                next.recent.push(key.to_owned());
            }
            None => {
                next.removals = next.removals.wrapping_add(1);
                next.recent.clear();
            }
        }
        let path = self.path.join(GENERATION);
        let fd = rustix::fs::openat(
            &self.dir,
            GENERATION,
            OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| {
            Error::sys(
                "openat",
                format!("{:?}, {GENERATION:?}, O_WRONLY|O_CREAT", self.path),
                e,
            )
            .with_path(&path)
        })?;
        // Readers hold the lock, so they never see it half written; a run
        // killed half way leaves text that does not parse, and so makes
        // everyone read everything again.
        let text = next.text();
        write_all_at(&fd, text.as_bytes())
            .and_then(|()| rustix::fs::ftruncate(&fd, text.len() as u64))
            .map_err(|e| Error::sys("pwrite", format!("{GENERATION:?}"), e).with_path(&path))?;
        Ok(next)
    }

    /// Removes the records of `keys` (all in the cache); the caller syncs
    /// the directory.
    fn remove(&mut self, keys: &[String]) -> Result<Vec<Allocation>> {
        let next = self.bump_generation(None)?;
        self.generation = None;
        let mut released = Vec::new();
        let mut result = Ok(());
        for key in keys {
            match rustix::fs::unlinkat(&self.dir, key.as_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {
                    if let Some(a) = self.by_key.remove(key) {
                        self.by_first.remove(&a.first());
                        released.push(a);
                    }
                }
                Err(e) => {
                    result = Err(
                        Error::sys("unlinkat", format!("{:?}, {key:?}", self.path), e)
                            .with_path(self.path.join(key)),
                    );
                    break;
                }
            }
        }
        result?;
        // What we removed is gone from the cache too: it matches `next`.
        self.generation = Some(next);
        released.sort_by_key(Allocation::first);
        Ok(released)
    }

    fn sync_dir(&self) -> Result<()> {
        rustix::fs::fsync(&self.dir)
            .map_err(|e| Error::sys("fsync", format!("{:?}", self.path), e).with_path(&self.path))
    }

    /// Writes `key`'s record: temporary file, fsync, rename (the caller
    /// fsyncs the directory). On failure the temporary file is removed.
    fn write_record(&mut self, key: &str, first: u32, count: u32) -> Result<()> {
        self.temp_serial += 1;
        let temp = format!("{TMP_PREFIX}{}-{}", std::process::id(), self.temp_serial);
        let temp_path = self.path.join(&temp);
        let fd = rustix::fs::openat(
            &self.dir,
            temp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| {
            Error::sys(
                "openat",
                format!("{:?}, {temp:?}, O_WRONLY|O_CREAT|O_EXCL", self.path),
                e,
            )
            .with_path(&temp_path)
        })?;
        let text = record_text(first, count);
        let written = write_all_at(&fd, text.as_bytes())
            .map_err(|e| Error::sys("write", format!("{temp:?}"), e))
            .and_then(|()| {
                rustix::fs::fsync(&fd).map_err(|e| Error::sys("fsync", format!("{temp:?}"), e))
            })
            .and_then(|()| self.rename_new(&temp, key));
        drop(fd);
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&self.dir, temp.as_str(), AtFlags::empty());
            return Err(e.with_path(&temp_path));
        }
        Ok(())
    }

    /// Renames `temp` to `key`, refusing to replace an existing file.
    fn rename_new(&self, temp: &str, key: &str) -> Result<()> {
        match rustix::fs::renameat_with(&self.dir, temp, &self.dir, key, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            // A filesystem without RENAME_NOREPLACE: the lock already
            // guarantees that `key` does not exist.
            Err(Errno::INVAL) => rustix::fs::renameat(&self.dir, temp, &self.dir, key)
                .map_err(|e| Error::sys("renameat", format!("{temp:?}, {key:?}"), e)),
            Err(e) => Err(Error::sys(
                "renameat2",
                format!("{temp:?}, {key:?}, RENAME_NOREPLACE"),
                e,
            )),
        }
    }
}

fn create_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => {
            let errno = e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error);
            Err(Error::sys("mkdir", format!("{path:?}, 0700"), errno).with_path(path))
        }
    }
}

fn lock<'a>(dir: BorrowedFd<'a>, how: Lock, path: &Path) -> Result<Locked<'a>> {
    let (op, name) = match how {
        Lock::Shared => (FlockOperation::LockShared, "LOCK_SH"),
        Lock::Exclusive => (FlockOperation::LockExclusive, "LOCK_EX"),
    };
    loop {
        match rustix::fs::flock(dir, op) {
            Ok(()) => return Ok(Locked(dir)),
            Err(Errno::INTR) => continue,
            Err(e) => {
                return Err(Error::sys("flock", format!("{path:?}, {name}"), e).with_path(path))
            }
        }
    }
}

/// A uniformly random number in `0..n` (`n > 0`), from `getrandom(2)`.
fn random_below(n: u64) -> Result<u64> {
    // Rejection sampling: no bias towards small values.
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let mut buf = [0u8; 8];
        let mut filled = 0;
        while filled < buf.len() {
            match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())
            {
                Ok(k) => filled += k,
                Err(Errno::INTR) => {}
                Err(e) => return Err(Error::sys("getrandom", "8 bytes", e)),
            }
        }
        let v = u64::from_ne_bytes(buf);
        if v < zone {
            return Ok(v % n);
        }
    }
}

fn read_limited(fd: &OwnedFd, limit: usize) -> std::result::Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while out.len() < limit {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn write_all_at(fd: &OwnedFd, mut bytes: &[u8]) -> std::result::Result<(), Errno> {
    let mut offset = 0u64;
    while !bytes.is_empty() {
        match rustix::io::pwrite(fd, bytes, offset) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                bytes = &bytes[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A record in the kubelet's format.
fn record_text(first: u32, count: u32) -> String {
    let m = format!(r#"[{{"hostId":{first},"containerId":0,"length":{count}}}]"#);
    format!("{{\"uidMappings\":{m},\"gidMappings\":{m}}}\n")
}

/// `(hostId, length)` of a record whose uid and gid mappings are one
/// identical extent with `containerId` 0.
fn parse_record(text: &[u8]) -> std::result::Result<(u64, u64), String> {
    let value = json::parse(text).map_err(|e| e.to_string())?;
    let Value::Object(members) = value else {
        return Err("not a JSON object".into());
    };
    let member = |name: &str| members.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    if let Some((n, _)) = members
        .iter()
        .find(|(n, _)| n != "uidMappings" && n != "gidMappings")
    {
        return Err(format!("unexpected member {n:?}"));
    }
    let uids = one_mapping(member("uidMappings"), "uidMappings")?;
    let gids = one_mapping(member("gidMappings"), "gidMappings")?;
    if uids != gids {
        return Err(format!(
            "uidMappings {}:{} and gidMappings {}:{} differ",
            uids.0, uids.1, gids.0, gids.1
        ));
    }
    Ok(uids)
}

fn one_mapping(v: Option<&Value>, name: &str) -> std::result::Result<(u64, u64), String> {
    let Some(Value::Array(items)) = v else {
        return Err(format!("{name} is missing or not an array"));
    };
    let [Value::Object(fields)] = items.as_slice() else {
        return Err(format!("{name} must hold exactly one mapping"));
    };
    let mut host = None;
    let mut container = None;
    let mut length = None;
    for (n, v) in fields {
        let Value::Number(x) = v else {
            return Err(format!("{name}.{n} is not a non-negative integer"));
        };
        match n.as_str() {
            "hostId" => host = Some(*x),
            "containerId" => container = Some(*x),
            "length" => length = Some(*x),
            other => return Err(format!("unexpected member {name}.{other}")),
        }
    }
    match (host, container, length) {
        (Some(h), Some(0), Some(l)) => Ok((h, l)),
        (Some(_), Some(c), Some(_)) => Err(format!("{name}.containerId is {c}, not 0")),
        _ => Err(format!("{name} needs hostId, containerId and length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_other_shapes() {
        assert_eq!(
            parse_record(record_text(131072, 65536).as_bytes()),
            Ok((131072, 65536))
        );
        for bad in [
            r#"{"uidMappings":[{"hostId":1,"containerId":0,"length":2}]}"#,
            r#"{"uidMappings":[{"hostId":1,"containerId":0,"length":2}],"gidMappings":[{"hostId":3,"containerId":0,"length":2}]}"#,
            r#"{"uidMappings":[{"hostId":1,"containerId":1,"length":2}],"gidMappings":[{"hostId":1,"containerId":1,"length":2}]}"#,
            r#"{"uidMappings":[],"gidMappings":[]}"#,
            r#"{"uidMappings":[{"hostId":1,"containerId":0,"length":2,"x":1}],"gidMappings":[{"hostId":1,"containerId":0,"length":2}]}"#,
            r#"{"uidMappings":[{"hostId":1,"containerId":0,"length":2}],"gidMappings":[{"hostId":1,"containerId":0,"length":2}],"x":[]}"#,
            r#"[]"#,
            "",
        ] {
            assert!(parse_record(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn generation_round_trips_and_refuses_damage() {
        let g = Generation {
            removals: 3,
            changes: 41,
            recent: vec!["pod-a".into(), "pod-b".into()],
        };
        assert_eq!(Generation::parse(g.text().as_bytes()), Some(g.clone()));
        let text = g.text();
        for bad in [
            "",
            "garbage",
            &text[..text.len() - 1],
            &text.replace("end\n", ""),
            &format!("{text}x"),
            &text.replace("pod-a", "bad key"),
            &text.replace(" 41", " 41 7"),
        ] {
            assert_eq!(Generation::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn random_below_stays_below() {
        for n in [1, 2, 3, 65534] {
            for _ in 0..100 {
                assert!(random_below(n).unwrap() < n);
            }
        }
    }
}
