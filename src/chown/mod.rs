//! The fallback: shift the ownership of a directory tree on disk so that it
//! looks, without any mount, the way it would look through an idmapped mount.
//!
//! [`shift_tree`] rewrites every entry's owner, group, POSIX ACL entries and
//! file-capability root id from its on-disk id `X` to `mapping.seen(X)`, the id
//! an idmapped mount with the same mapping would show. It is the O(n)
//! alternative for kernels and filesystems that cannot idmap a mount.
//!
//! # Guarantees
//!
//! - **Never leaves the tree.** Directories are held open, one per level, and
//!   every call names a single entry relative to such a descriptor without
//!   following symlinks (`openat2` with `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
//!   RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV` where the kernel has it).
//!   Entries whose mode or extended attributes are written are first opened
//!   `O_PATH|O_NOFOLLOW` and checked to be the inode that was examined.
//! - **Does not cross mounts** (also file bind mounts), unless
//!   [`ShiftOptions::cross_mounts`] asks for it.
//! - **Idempotent and crash-safe.** The mapping's on-disk ranges must be
//!   disjoint from its seen ranges, so an id that was shifted is never shifted
//!   again, and running the same shift again after a crash (or a `SIGKILL`)
//!   finishes the job. Where the kernel drops setuid/setgid bits and
//!   capabilities on chown, the original state is first parked in the
//!   `trusted.idmapped.shift` xattr of the entry itself and restored from
//!   there by the next run if the walk dies in between.
//! - **Hard links** are shifted once however many names they have.
//! - **Never opens** fifos, sockets or devices (only `O_PATH`), and needs
//!   neither one descriptor per level nor call-stack depth per level, so
//!   trees of any depth can be shifted under a low `RLIMIT_NOFILE`.
//!
//! The root directory is shifted last: when its owner is in the seen range,
//! a run over the whole tree has finished.
//!
//! It needs `/proc` mounted (the only way to name an `O_PATH` descriptor in
//! the xattr and chmod calls without following a path), and privilege:
//! `CAP_CHOWN`, `CAP_FOWNER`, `CAP_FSETID`, `CAP_SETFCAP`, and
//! `CAP_SYS_ADMIN` for the `trusted.*` stash.
#![forbid(unsafe_code)]
// `Error` (168 bytes) is the crate's shared type; boxing it is its owner's call.
#![allow(clippy::result_large_err)]

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::map::{IdMap, Mapping, OVERFLOW_ID};

mod walk;
mod xattr;

/// What to do with an on-disk id that the mapping does not cover (neither in
/// an on-disk range, to be shifted, nor in a seen range, already shifted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutOfRange {
    /// Leave the id as it is. Reversible: the inverse shift leaves it too.
    #[default]
    Keep,
    /// Stop the walk with [`ErrorKind::IdOutOfRange`]. Entries shifted before
    /// the one that failed stay shifted; run again with another policy (the
    /// shift is idempotent) or shift back with the inverse mapping.
    Fail,
    /// Write the overflow id 65534, which is how an idmapped mount shows such
    /// ids. Not reversible. Refused when 65534 itself lies in an on-disk
    /// range, since a second run would then shift it again. An out-of-range
    /// capability root id drops the capability (through an idmapped mount it
    /// is not visible and grants nothing); an out-of-range ACL entry gets 65534.
    Overflow,
}

/// A progress callback: called from the walking threads, now and then, with
/// totals so far. It must be cheap and must not panic.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How [`shift_tree`] walks.
#[derive(Clone, Default)]
pub struct ShiftOptions {
    /// Policy for ids the mapping does not cover.
    pub out_of_range: OutOfRange,
    /// Walking threads; 0 means one per available CPU.
    pub threads: usize,
    /// Also shift filesystems mounted inside the tree (directory and file
    /// mounts). Off by default: the tree is the one mount `root` is on.
    pub cross_mounts: bool,
    /// Compute and report, but change nothing.
    pub dry_run: bool,
    /// Called with running totals while the walk goes on.
    pub progress: Option<ProgressFn>,
}

impl fmt::Debug for ShiftOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShiftOptions")
            .field("out_of_range", &self.out_of_range)
            .field("threads", &self.threads)
            .field("cross_mounts", &self.cross_mounts)
            .field("dry_run", &self.dry_run)
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

/// What [`shift_tree`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShiftReport {
    /// Entries examined (every name, the root included).
    pub visited: u64,
    /// Entries whose owner, group, ACL or capability was rewritten (or, with
    /// [`ShiftOptions::dry_run`], would have been).
    pub changed: u64,
    /// Entries whose owner and group were both in the seen range already
    /// (a repeated or resumed run).
    pub already_shifted: u64,
    /// Extra names of hard-linked files, skipped because the inode was
    /// shifted through another name.
    pub hardlinks_deduplicated: u64,
    /// `system.posix_acl_access` / `system.posix_acl_default` values rewritten.
    pub acls_rewritten: u64,
    /// `security.capability` values rewritten (or dropped, see [`OutOfRange::Overflow`]).
    pub capabilities_rewritten: u64,
    /// Ids (owner, group, ACL entries, capability root ids) outside the mapping.
    pub out_of_range: u64,
    /// Mount points (directories or files) inside the tree that were not entered.
    pub skipped_mounts: u64,
    /// Entries found half-shifted by an interrupted run and finished from
    /// their stash.
    pub recovered: u64,
    /// Wall-clock time of the walk.
    pub elapsed: Duration,
}

/// Shift the ownership of the tree at `root` on disk by `mapping`: an entry
/// stored with uid `X` gets `mapping.uids().seen(X)`, and likewise for gids,
/// ACL entries and capability root ids. See the [module docs](self) for the
/// guarantees.
///
/// `root` must be a directory; its last component is not followed if it is a
/// symlink. The mapping's on-disk ranges must be disjoint from its seen
/// ranges (else [`ErrorKind::InvalidInput`]). To undo a shift, shift again
/// with [`Mapping::inverse`].
///
/// # Errors
///
/// The first failure stops the walk and is returned; what was shifted stays
/// shifted, and a later run finishes the job. The tree changing under the walk
/// in a way that cannot be followed safely gives [`ErrorKind::TreeChanged`].
pub fn shift_tree(root: &Path, mapping: &Mapping, options: &ShiftOptions) -> Result<ShiftReport> {
    check_disjoint("uid", mapping.uids())?;
    check_disjoint("gid", mapping.gids())?;
    if options.out_of_range == OutOfRange::Overflow {
        for (kind, map) in [("uid", mapping.uids()), ("gid", mapping.gids())] {
            if map.seen(OVERFLOW_ID).is_some() {
                return Err(Error::new(ErrorKind::InvalidInput(format!(
                    "the overflow {kind} {OVERFLOW_ID} is inside an on-disk range of the mapping: \
                     ids written as {OVERFLOW_ID} would be shifted again by a second run"
                ))));
            }
        }
    }
    walk::run(root, mapping, options)
}

/// Refuse a map whose on-disk ranges meet its seen ranges, naming the pair.
fn check_disjoint(kind: &str, map: &IdMap) -> Result<()> {
    if map.on_disk_ranges_disjoint_from_seen() {
        return Ok(());
    }
    let range = |start: u32, count: u32| (u64::from(start), u64::from(start) + u64::from(count));
    for a in map.extents() {
        let (a0, a1) = range(a.on_disk(), a.count());
        for b in map.extents() {
            let (b0, b1) = range(b.seen(), b.count());
            if a0 < b1 && b0 < a1 {
                return Err(Error::new(ErrorKind::InvalidInput(format!(
                    "{kind} on-disk range {a0}..{a1} overlaps seen range {b0}..{b1}: \
                     shifting in place needs them disjoint, or a re-run would shift ids twice"
                ))));
            }
        }
    }
    Err(Error::new(ErrorKind::InvalidInput(format!(
        "{kind} on-disk ranges overlap the seen ranges"
    ))))
}
