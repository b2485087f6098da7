//! Id mappings: which on-disk id is seen as which id through an idmapped mount.
//!
//! A mount is idmapped with a user namespace, and the namespace's
//! `/proc/PID/uid_map` line `A B N` then means: **a file whose on-disk id is
//! `A + n` is seen through the mount as `B + n`** (for `n < N`). An on-disk id
//! that no line covers is seen as [`OVERFLOW_ID`], and such a file cannot be
//! written, chmod-ed or unlinked through the mount.
//!
//! The kernel calls the two columns "inside" and "outside", and tools have
//! described them backwards more than once. This module therefore never uses
//! those words: the first column is [`Extent::on_disk`], the second is
//! [`Extent::seen`].
//!
//! | syntax | on-disk | seen |
//! |---|---|---|
//! | `/proc/PID/uid_map` line `A B N` | `A` | `B` |
//! | mount-idmapped `--map-mount=[b:\|u:\|g:]FROM:TO:RANGE` (no prefix: `b:`) | `FROM` | `TO` |
//! | util-linux `X-mount.idmap=[u:\|g:\|b:]A:B:N` | `A` | `B` |
//!
//! Example: with `0 10000 10000`, on-disk 1000 is seen as 11000, on-disk 15000
//! is seen as 65534, and `chown 12000` through the mount stores 2000.
//!
//! ```
//! use idmapped::map::IdMap;
//!
//! let map = IdMap::parse_proc("0 10000 10000\n")?;
//! assert_eq!(map.seen(1000), Some(11000));
//! assert_eq!(map.seen(15000), None);
//! assert_eq!(map.on_disk(12000), Some(2000));
//! # Ok::<(), idmapped::map::MapError>(())
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

/// The id an unmapped on-disk id is seen as through an idmapped mount.
///
/// This is the default of `/proc/sys/fs/overflowuid` and
/// `/proc/sys/fs/overflowgid`; an administrator can change those, so treat
/// this as the usual value rather than a guarantee.
pub const OVERFLOW_ID: u32 = 65534;

/// The most extents the kernel accepts in one uid or gid map.
pub const MAX_EXTENTS: usize = 340;

/// The longest map text, in bytes, the kernel accepts in its single write.
///
/// The kernel refuses a write to `/proc/PID/uid_map` of `PAGE_SIZE` bytes or
/// more; 4 KiB is the smallest page size Linux runs with, so a map whose
/// [`IdMap::to_proc_string`] is at most this long can be written everywhere.
pub const MAX_PROC_LEN: usize = 4095;

/// One column of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The id stored in the filesystem (first column of `uid_map`).
    OnDisk,
    /// The id shown through the idmapped mount (second column of `uid_map`).
    Seen,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::OnDisk => "on-disk",
            Side::Seen => "seen",
        })
    }
}

/// One number of a textual mapping entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// The first on-disk id (`FROM` of `--map-mount`, `A` of `X-mount.idmap`).
    OnDisk,
    /// The first seen id (`TO` of `--map-mount`, `B` of `X-mount.idmap`).
    Seen,
    /// The number of ids (`RANGE` of `--map-mount`, `N` of `X-mount.idmap`).
    Count,
}

/// Which maps an entry applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// User ids only (`u:`).
    Uid,
    /// Group ids only (`g:`).
    Gid,
    /// Both user and group ids (`b:`).
    Both,
}

impl IdKind {
    fn has_uid(self) -> bool {
        matches!(self, IdKind::Uid | IdKind::Both)
    }

    fn has_gid(self) -> bool {
        matches!(self, IdKind::Gid | IdKind::Both)
    }

    fn prefix(self) -> &'static str {
        match self {
            IdKind::Uid => "u",
            IdKind::Gid => "g",
            IdKind::Both => "b",
        }
    }
}

/// Why a mapping was rejected; see [`MapError::reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapErrorReason {
    /// An extent covers no ids.
    ZeroCount,
    /// An extent runs past the largest valid id, `u32::MAX - 1`; `u32::MAX`
    /// is `(uid_t)-1`, which the kernel never maps.
    Overflow {
        /// The column whose range runs past the end.
        side: Side,
    },
    /// Two extents share an id in the same column; the kernel would refuse
    /// the map because the translation would be ambiguous.
    Overlap {
        /// The column in which the two extents share an id.
        side: Side,
        /// The 1-based number of the other extent, counted like
        /// [`MapError::position`].
        other: usize,
        /// The other extent as it was given.
        other_text: String,
    },
    /// A map has more than [`MAX_EXTENTS`] extents.
    TooMany {
        /// How many extents the map has.
        count: usize,
    },
    /// A map's text is longer than [`MAX_PROC_LEN`] bytes.
    TooLong {
        /// The length of the map's text in bytes.
        len: usize,
    },
    /// There are no extents at all.
    Empty,
    /// Entries were given, but none applies to user ids.
    MissingUid,
    /// Entries were given, but none applies to group ids.
    MissingGid,
    /// The text does not have the expected shape.
    Syntax {
        /// What was expected instead.
        expected: &'static str,
    },
    /// A field is not a decimal number in `0..=u32::MAX`.
    BadNumber {
        /// The field that is not a number.
        field: Field,
        /// The field as it was given.
        text: String,
    },
    /// A user-namespace path is not absolute.
    NotAbsolute,
}

impl MapErrorReason {
    /// Writes the reason, naming fields and the other extent in the terms of
    /// the syntax they came from.
    fn describe(&self, f: &mut fmt::Formatter<'_>, origin: Option<Origin>) -> fmt::Result {
        match self {
            MapErrorReason::ZeroCount => f.write_str("the count is zero"),
            MapErrorReason::Overflow { side } => write!(
                f,
                "the {side} range runs past {}, the largest valid id",
                u32::MAX - 1
            ),
            MapErrorReason::Overlap {
                side,
                other,
                other_text,
            } => {
                let noun = origin.map_or("extent", Origin::short_noun);
                write!(
                    f,
                    "overlaps {noun} {other} (`{other_text}`) on the {side} side"
                )
            }
            MapErrorReason::TooMany { count } => write!(
                f,
                "{count} extents, but the kernel accepts at most {MAX_EXTENTS}"
            ),
            MapErrorReason::TooLong { len } => write!(
                f,
                "the map text is {len} bytes, but the kernel accepts at most {MAX_PROC_LEN} in one write"
            ),
            MapErrorReason::Empty => f.write_str("no extents"),
            MapErrorReason::MissingUid => {
                f.write_str("no uid extent: every entry is for gids only; use b: or add u:")
            }
            MapErrorReason::MissingGid => {
                f.write_str("no gid extent: every entry is for uids only; use b: or add g:")
            }
            MapErrorReason::Syntax { expected } => write!(f, "expected {expected}"),
            MapErrorReason::BadNumber { field, text } => {
                let name = match (origin, field) {
                    (Some(Origin::MapMount), Field::OnDisk) => "FROM",
                    (Some(Origin::MapMount), Field::Seen) => "TO",
                    (Some(Origin::MapMount), Field::Count) => "RANGE",
                    (Some(Origin::XMountIdmap), Field::OnDisk) => "A",
                    (Some(Origin::XMountIdmap), Field::Seen) => "B",
                    (Some(Origin::XMountIdmap), Field::Count) => "N",
                    (_, Field::OnDisk) => "on-disk id",
                    (_, Field::Seen) => "seen id",
                    (_, Field::Count) => "count",
                };
                write!(
                    f,
                    "{name} `{text}` is not a decimal number from 0 to {}",
                    u32::MAX
                )
            }
            MapErrorReason::NotAbsolute => f.write_str("a user-namespace path must be absolute"),
        }
    }
}

impl fmt::Display for MapErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f, None)
    }
}

/// The syntax an offending entry came from; decides how it is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// An [`Extent`] given to [`IdMap::new`] or [`Extent::new`].
    Extent,
    /// A `(IdKind, Extent)` given to [`Mapping::from_entries`].
    Entry,
    /// A line of `/proc/PID/uid_map` text.
    ProcLine,
    /// A `--map-mount` value.
    MapMount,
    /// A whitespace-separated entry of `X-mount.idmap=`.
    XMountIdmap,
}

impl Origin {
    fn noun(self) -> &'static str {
        match self {
            Origin::Extent => "extent",
            Origin::Entry => "entry",
            Origin::ProcLine => "line",
            Origin::MapMount => "--map-mount value",
            Origin::XMountIdmap => "X-mount.idmap entry",
        }
    }

    /// The noun for a second entry of the same syntax, once the first one
    /// has already said where the entries came from.
    fn short_noun(self) -> &'static str {
        match self {
            Origin::Extent => "extent",
            Origin::Entry | Origin::XMountIdmap => "entry",
            Origin::ProcLine => "line",
            Origin::MapMount => "value",
        }
    }
}

/// Where an error was found.
#[derive(Debug, Clone, PartialEq, Eq)]
struct At {
    origin: Origin,
    /// 1-based; `None` when the entry stands alone (e.g. [`Extent::new`]).
    index: Option<usize>,
    text: String,
}

/// Why a mapping was rejected, and which entry caused it.
///
/// Its `Display` is one line naming the offending entry and the cause, e.g.
/// ``extent 2 (`100 0 10`): overlaps extent 1 (`0 0 200`) on the on-disk side``
/// or ``--map-mount value 3 `b:0:10000`: expected [KIND:]FROM:TO:RANGE``.
/// [`IdMap::parse_proc`] does not know which file its text came from, so
/// its errors say ``line 4 `1 2`: …``; callers add the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct MapError {
    reason: MapErrorReason,
    id_kind: Option<IdKind>,
    at: Option<At>,
}

impl MapError {
    fn new(reason: MapErrorReason) -> MapError {
        MapError {
            reason,
            id_kind: None,
            at: None,
        }
    }

    fn at(mut self, origin: Origin, index: Option<usize>, text: impl Into<String>) -> MapError {
        self.at = Some(At {
            origin,
            index,
            text: text.into(),
        });
        self
    }

    fn of_kind(mut self, kind: Option<IdKind>) -> MapError {
        self.id_kind = kind;
        self
    }

    /// Why the mapping was rejected.
    pub fn reason(&self) -> &MapErrorReason {
        &self.reason
    }

    /// The map the error concerns, when it concerns only one of
    /// the uid map ([`IdKind::Uid`]) and the gid map ([`IdKind::Gid`]).
    pub fn id_kind(&self) -> Option<IdKind> {
        self.id_kind
    }

    /// The 1-based number of the offending extent, line, value or entry,
    /// when the error is about one.
    pub fn position(&self) -> Option<usize> {
        self.at.as_ref().and_then(|at| at.index)
    }

    /// The offending extent, line, value or entry as it was given, when the
    /// error is about one.
    pub fn text(&self) -> Option<&str> {
        self.at.as_ref().map(|at| at.text.as_str())
    }
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.id_kind {
            Some(IdKind::Uid) => "uid",
            Some(IdKind::Gid) => "gid",
            Some(IdKind::Both) | None => "",
        };
        let origin = self.at.as_ref().map(|at| at.origin);
        match &self.at {
            None if kind.is_empty() => {}
            None => write!(f, "{kind} map: ")?,
            Some(At {
                origin: origin @ (Origin::Extent | Origin::Entry),
                index,
                text,
            }) => {
                if !kind.is_empty() {
                    write!(f, "{kind} ")?;
                }
                let noun = origin.noun();
                match index {
                    Some(index) => write!(f, "{noun} {index} (`{text}`): ")?,
                    None => write!(f, "{noun} `{text}`: ")?,
                }
            }
            Some(At {
                origin,
                index,
                text,
            }) => {
                let noun = origin.noun();
                match index {
                    Some(index) => write!(f, "{noun} {index} `{text}`")?,
                    None => write!(f, "{noun} `{text}`")?,
                }
                if !kind.is_empty() {
                    write!(f, " ({kind} map)")?;
                }
                f.write_str(": ")?;
            }
        }
        self.reason.describe(f, origin)
    }
}

/// One mapping line: `count` ids starting at `on_disk` are seen starting at
/// `seen`.
///
/// Its `Display` is the `uid_map` line form, `on_disk seen count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    // Field order matters: the derived `Ord` sorts by `on_disk` first, which
    // is what `IdMap::canonical` relies on.
    on_disk: u32,
    seen: u32,
    count: u32,
}

/// The exclusive end of `count` ids starting at `first`, which cannot
/// overflow in `u64`.
fn end(first: u32, count: u32) -> u64 {
    u64::from(first) + u64::from(count)
}

/// `to + (id - from)` when `id` lies in `from..from + count`.
fn translate(id: u32, from: u32, to: u32, count: u32) -> Option<u32> {
    let offset = id.checked_sub(from)?;
    if offset < count {
        to.checked_add(offset)
    } else {
        None
    }
}

impl Extent {
    /// Creates an extent: `count` ids starting at `on_disk` are seen starting
    /// at `seen`.
    ///
    /// Like the kernel, this refuses an empty extent and one whose on-disk or
    /// seen range would reach `u32::MAX`, which is `(uid_t)-1` and never a
    /// valid id: `on_disk + count` and `seen + count` may be at most
    /// `u32::MAX`.
    pub fn new(on_disk: u32, seen: u32, count: u32) -> Result<Extent, MapError> {
        Extent::check(on_disk, seen, count).map_err(|reason| {
            MapError::new(reason).at(Origin::Extent, None, format!("{on_disk} {seen} {count}"))
        })
    }

    fn check(on_disk: u32, seen: u32, count: u32) -> Result<Extent, MapErrorReason> {
        let last_end = u64::from(u32::MAX);
        if count == 0 {
            Err(MapErrorReason::ZeroCount)
        } else if end(on_disk, count) > last_end {
            Err(MapErrorReason::Overflow { side: Side::OnDisk })
        } else if end(seen, count) > last_end {
            Err(MapErrorReason::Overflow { side: Side::Seen })
        } else {
            Ok(Extent {
                on_disk,
                seen,
                count,
            })
        }
    }

    /// The first on-disk id of the extent.
    pub fn on_disk(&self) -> u32 {
        self.on_disk
    }

    /// The id the first on-disk id is seen as.
    pub fn seen(&self) -> u32 {
        self.seen
    }

    /// The number of ids the extent covers (at least 1).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The id `on_disk` is seen as, if this extent covers it.
    pub fn seen_of(&self, on_disk: u32) -> Option<u32> {
        translate(on_disk, self.on_disk, self.seen, self.count)
    }

    /// The on-disk id seen as `seen`, if this extent covers it.
    pub fn on_disk_of(&self, seen: u32) -> Option<u32> {
        translate(seen, self.seen, self.on_disk, self.count)
    }

    fn on_disk_range(&self) -> (u64, u64) {
        (u64::from(self.on_disk), end(self.on_disk, self.count))
    }

    fn seen_range(&self) -> (u64, u64) {
        (u64::from(self.seen), end(self.seen, self.count))
    }

    fn swapped(self) -> Extent {
        Extent {
            on_disk: self.seen,
            seen: self.on_disk,
            count: self.count,
        }
    }

    /// `self` followed directly by `next`, when the two are contiguous in
    /// both columns and so translate exactly like one extent.
    fn merged(&self, next: &Extent) -> Option<Extent> {
        let contiguous = end(self.on_disk, self.count) == u64::from(next.on_disk)
            && end(self.seen, self.count) == u64::from(next.seen);
        if !contiguous {
            return None;
        }
        Extent::check(self.on_disk, self.seen, self.count.checked_add(next.count)?).ok()
    }

    /// The length of this extent's line in [`IdMap::to_proc_string`].
    fn proc_len(&self) -> usize {
        // Three numbers, two spaces and a newline.
        digits(self.on_disk) + digits(self.seen) + digits(self.count) + 3
    }
}

fn digits(n: u32) -> usize {
    match n.checked_ilog10() {
        // ilog10 of a u32 is at most 9.
        Some(log) => log as usize + 1,
        None => 1,
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.on_disk, self.seen, self.count)
    }
}

/// Picks one column of an extent as a half-open range `start..end`.
type ColumnRange = fn(&Extent) -> (u64, u64);

/// Finds two extents whose ranges (as given by `range`) share an id,
/// returning `(later, earlier)` in the caller's order.
///
/// Sorting by start means that if any two ranges overlap, some range starts
/// before the furthest end seen so far, so one sweep finds a pair.
fn find_overlap(extents: &[Extent], range: ColumnRange) -> Option<(usize, usize)> {
    let mut sorted: Vec<(u64, u64, usize)> = extents
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (start, end) = range(e);
            (start, end, i)
        })
        .collect();
    sorted.sort_unstable();
    let mut furthest: Option<(u64, usize)> = None;
    for (start, end, i) in sorted {
        match furthest {
            Some((far_end, j)) if start < far_end => return Some((i.max(j), i.min(j))),
            Some((far_end, _)) if end <= far_end => {}
            _ => furthest = Some((end, i)),
        }
    }
    None
}

/// Checks what the kernel checks when a map is written: 1 to
/// [`MAX_EXTENTS`] extents, text short enough for one write, and no id in two
/// extents on either side.
///
/// `locate` names extent `i` (0-based) as its 1-based number and text in the
/// syntax given by `origin`, so that errors point at what the user wrote.
fn validate(
    extents: &[Extent],
    kind: Option<IdKind>,
    origin: Origin,
    locate: &dyn Fn(usize) -> (usize, String),
) -> Result<(), MapError> {
    if extents.is_empty() {
        return Err(MapError::new(MapErrorReason::Empty).of_kind(kind));
    }
    if extents.len() > MAX_EXTENTS {
        let count = extents.len();
        return Err(MapError::new(MapErrorReason::TooMany { count }).of_kind(kind));
    }
    let len = extents
        .iter()
        .fold(0usize, |len, e| len.saturating_add(e.proc_len()));
    if len > MAX_PROC_LEN {
        return Err(MapError::new(MapErrorReason::TooLong { len }).of_kind(kind));
    }
    let sides: [(Side, ColumnRange); 2] = [
        (Side::OnDisk, Extent::on_disk_range),
        (Side::Seen, Extent::seen_range),
    ];
    for (side, range) in sides {
        if let Some((i, j)) = find_overlap(extents, range) {
            let (index, text) = locate(i);
            let (other, other_text) = locate(j);
            let reason = MapErrorReason::Overlap {
                side,
                other,
                other_text,
            };
            return Err(MapError::new(reason)
                .of_kind(kind)
                .at(origin, Some(index), text));
        }
    }
    Ok(())
}

/// Names extent `i` of a plain extent list.
fn locate_extent(extents: &[Extent], i: usize) -> (usize, String) {
    let text = extents.get(i).map(Extent::to_string).unwrap_or_default();
    (i.saturating_add(1), text)
}

/// A validated list of extents for one id kind (uids or gids).
///
/// The caller's order is kept, because it is what gets written to the kernel,
/// but it carries no meaning: the kernel uses it only to speed up lookups.
/// Equality and hashing therefore compare the [canonical](IdMap::canonical)
/// forms, so two maps are equal exactly when they translate every id the
/// same way.
///
/// Its `Display` is the same as [`IdMap::to_proc_string`].
#[derive(Debug, Clone)]
pub struct IdMap {
    extents: Vec<Extent>,
}

impl IdMap {
    /// Creates a map from extents, checking what the kernel checks: 1 to
    /// [`MAX_EXTENTS`] extents, at most [`MAX_PROC_LEN`] bytes of text, and no
    /// id covered by two extents in either column.
    pub fn new(extents: Vec<Extent>) -> Result<IdMap, MapError> {
        validate(&extents, None, Origin::Extent, &|i| {
            locate_extent(&extents, i)
        })?;
        Ok(IdMap { extents })
    }

    /// A map in which the `count` ids starting at `first` are seen as
    /// themselves.
    pub fn identity(first: u32, count: u32) -> Result<IdMap, MapError> {
        IdMap::new(vec![Extent::new(first, first, count)?])
    }

    /// The extents, in the order they were given.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The id a file owned by `on_disk` is seen as through the mount, or
    /// `None` if it is unmapped (and then seen as [`OVERFLOW_ID`]).
    pub fn seen(&self, on_disk: u32) -> Option<u32> {
        self.extents.iter().find_map(|e| e.seen_of(on_disk))
    }

    /// The on-disk id stored when a file is given id `seen` through the
    /// mount, or `None` if `seen` is unmapped (and the kernel refuses it).
    pub fn on_disk(&self, seen: u32) -> Option<u32> {
        self.extents.iter().find_map(|e| e.on_disk_of(seen))
    }

    /// The map with its columns swapped: what was seen becomes on-disk.
    ///
    /// Always valid, since the checks are symmetric in the two columns.
    pub fn inverse(&self) -> IdMap {
        IdMap {
            extents: self.extents.iter().map(|e| e.swapped()).collect(),
        }
    }

    /// The map sorted by on-disk id, with extents that are contiguous in both
    /// columns merged.
    ///
    /// Two maps translate every id the same way exactly when their canonical
    /// forms have the same extents.
    pub fn canonical(&self) -> IdMap {
        let mut sorted = self.extents.clone();
        sorted.sort_unstable();
        let mut extents: Vec<Extent> = Vec::with_capacity(sorted.len());
        for e in sorted {
            if let Some(last) = extents.last_mut() {
                if let Some(merged) = last.merged(&e) {
                    *last = merged;
                    continue;
                }
            }
            extents.push(e);
        }
        // Merging only removes lines and shortens the text, so the result
        // is as valid as `self`.
        IdMap { extents }
    }

    /// Parses the text of `/proc/PID/uid_map` or `gid_map`.
    ///
    /// Each line holds three whitespace-separated decimal numbers: on-disk,
    /// seen, count. Leading and trailing whitespace (the kernel pads the
    /// numbers to ten columns) and blank lines are ignored. Errors name the
    /// 1-based line number and its text. A namespace whose map was never
    /// written reads as empty, which is an error here.
    pub fn parse_proc(text: &str) -> Result<IdMap, MapError> {
        let mut extents = Vec::new();
        let mut lines: Vec<(usize, &str)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let number = i.saturating_add(1);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let extent = parse_proc_line(line)
                .map_err(|reason| MapError::new(reason).at(Origin::ProcLine, Some(number), line))?;
            extents.push(extent);
            lines.push((number, line));
        }
        validate(&extents, None, Origin::ProcLine, &|i| match lines.get(i) {
            Some(&(number, line)) => (number, line.to_owned()),
            None => locate_extent(&extents, i),
        })?;
        Ok(IdMap { extents })
    }

    /// The text to write to `/proc/PID/uid_map` or `gid_map`: one
    /// `on_disk seen count` line per extent, in order.
    ///
    /// The kernel accepts a map only in a single `write`, so write all of
    /// this at once.
    pub fn to_proc_string(&self) -> String {
        self.to_string()
    }

    /// Whether no id is both in some extent's on-disk range and in some
    /// extent's seen range.
    ///
    /// When this holds, shifting ownership on disk by this map is
    /// idempotent per file: an id already shifted is never shifted again, so
    /// an interrupted run can simply be repeated.
    pub fn on_disk_ranges_disjoint_from_seen(&self) -> bool {
        let mut on_disk: Vec<(u64, u64)> = self.extents.iter().map(Extent::on_disk_range).collect();
        let mut seen: Vec<(u64, u64)> = self.extents.iter().map(Extent::seen_range).collect();
        on_disk.sort_unstable();
        seen.sort_unstable();
        // Ranges within each list are disjoint, so a merge-like sweep that
        // advances whichever range ends first visits every candidate pair.
        let (mut a, mut b) = (on_disk.iter().peekable(), seen.iter().peekable());
        while let (Some(&&(a_start, a_end)), Some(&&(b_start, b_end))) = (a.peek(), b.peek()) {
            if a_start < b_end && b_start < a_end {
                return false;
            }
            if a_end <= b_end {
                a.next();
            } else {
                b.next();
            }
        }
        true
    }
}

fn parse_proc_line(line: &str) -> Result<Extent, MapErrorReason> {
    let mut fields = line.split_whitespace();
    match (fields.next(), fields.next(), fields.next(), fields.next()) {
        (Some(on_disk), Some(seen), Some(count), None) => parse_extent(on_disk, seen, count),
        _ => Err(MapErrorReason::Syntax {
            expected: "3 numbers",
        }),
    }
}

/// Parses a decimal id. `u32::from_str` alone would also accept a `+` sign.
fn parse_number(text: &str, field: Field) -> Result<u32, MapErrorReason> {
    let bad = || MapErrorReason::BadNumber {
        field,
        text: text.to_owned(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

fn parse_extent(on_disk: &str, seen: &str, count: &str) -> Result<Extent, MapErrorReason> {
    Extent::check(
        parse_number(on_disk, Field::OnDisk)?,
        parse_number(seen, Field::Seen)?,
        parse_number(count, Field::Count)?,
    )
}

impl PartialEq for IdMap {
    fn eq(&self, other: &IdMap) -> bool {
        self.extents == other.extents || self.canonical().extents == other.canonical().extents
    }
}

impl Eq for IdMap {}

impl Hash for IdMap {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must agree with `eq`, which compares canonical forms.
        self.canonical().extents.hash(state);
    }
}

impl fmt::Display for IdMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.extents.iter().try_for_each(|e| writeln!(f, "{e}"))
    }
}

/// A uid map and a gid map, both present: since Linux 6.9 a namespace must
/// have both to idmap a mount.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mapping {
    uids: IdMap,
    gids: IdMap,
}

/// One entry of a textual or programmatic mapping, before it is split into
/// the uid and gid maps.
struct Entry<'a> {
    kind: IdKind,
    extent: Extent,
    /// The entry as the user wrote it; `None` when it was not text.
    text: Option<&'a str>,
}

impl Entry<'_> {
    fn describe(&self) -> String {
        match self.text {
            Some(text) => text.to_owned(),
            None => {
                let e = &self.extent;
                format!(
                    "{}:{}:{}:{}",
                    self.kind.prefix(),
                    e.on_disk,
                    e.seen,
                    e.count
                )
            }
        }
    }
}

impl Mapping {
    /// Pairs a uid map with a gid map.
    pub fn new(uids: IdMap, gids: IdMap) -> Mapping {
        Mapping { uids, gids }
    }

    /// The uid map.
    pub fn uids(&self) -> &IdMap {
        &self.uids
    }

    /// The gid map.
    pub fn gids(&self) -> &IdMap {
        &self.gids
    }

    /// Both maps with their columns swapped.
    pub fn inverse(&self) -> Mapping {
        Mapping::new(self.uids.inverse(), self.gids.inverse())
    }

    /// Both maps in [canonical](IdMap::canonical) form.
    pub fn canonical(&self) -> Mapping {
        Mapping::new(self.uids.canonical(), self.gids.canonical())
    }

    /// Builds a mapping from entries; an [`IdKind::Both`] entry adds its
    /// extent to both maps.
    ///
    /// Fails if either map ends up empty or invalid (see [`IdMap::new`]);
    /// errors name the 1-based entry number.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (IdKind, Extent)>,
    ) -> Result<Mapping, MapError> {
        let entries: Vec<Entry<'_>> = entries
            .into_iter()
            .map(|(kind, extent)| Entry {
                kind,
                extent,
                text: None,
            })
            .collect();
        Mapping::build(&entries, Origin::Entry)
    }

    /// Parses mount-idmapped's `--map-mount` values, one per element:
    /// `b:FROM:TO:RANGE`, `u:FROM:TO:RANGE` or `g:FROM:TO:RANGE`, where
    /// on-disk `FROM + n` is seen as `TO + n` for `n < RANGE`.
    ///
    /// A value without a prefix, `FROM:TO:RANGE` (util-linux's syntax), is
    /// read as `b:`: uids and gids. A value naming a user-namespace file
    /// (`/proc/PID/ns/user`) is not a mapping and is refused; open such a
    /// path instead of parsing it. Errors name the 1-based value number and
    /// its text.
    pub fn parse_map_mount<'a>(
        values: impl IntoIterator<Item = &'a str>,
    ) -> Result<Mapping, MapError> {
        let mut entries = Vec::new();
        for (i, value) in values.into_iter().enumerate() {
            let value = value.trim();
            let (kind, extent) = parse_map_mount_value(value).map_err(|reason| {
                MapError::new(reason).at(Origin::MapMount, Some(i.saturating_add(1)), value)
            })?;
            entries.push(Entry {
                kind,
                extent,
                text: Some(value),
            });
        }
        Mapping::build(&entries, Origin::MapMount)
    }

    fn build(entries: &[Entry<'_>], origin: Origin) -> Result<Mapping, MapError> {
        // For each map, its extents and the index of the entry each came
        // from, so that errors name the entry rather than a position in a
        // map the user never wrote down.
        let mut uids = (Vec::new(), Vec::new());
        let mut gids = (Vec::new(), Vec::new());
        for (i, entry) in entries.iter().enumerate() {
            if entry.kind.has_uid() {
                uids.0.push(entry.extent);
                uids.1.push(i);
            }
            if entry.kind.has_gid() {
                gids.0.push(entry.extent);
                gids.1.push(i);
            }
        }
        let missing = match (uids.0.is_empty(), gids.0.is_empty()) {
            (true, true) => Some(MapErrorReason::Empty),
            (true, false) => Some(MapErrorReason::MissingUid),
            (false, true) => Some(MapErrorReason::MissingGid),
            (false, false) => None,
        };
        if let Some(reason) = missing {
            return Err(MapError::new(reason));
        }
        let make = |kind: IdKind, (extents, sources): (Vec<Extent>, Vec<usize>)| {
            let locate = |i: usize| {
                let source = sources.get(i).copied().unwrap_or(i);
                let text = entries.get(source).map(Entry::describe).unwrap_or_default();
                (source.saturating_add(1), text)
            };
            validate(&extents, Some(kind), origin, &locate)?;
            Ok(IdMap { extents })
        };
        Ok(Mapping::new(
            make(IdKind::Uid, uids)?,
            make(IdKind::Gid, gids)?,
        ))
    }
}

fn parse_map_mount_value(value: &str) -> Result<(IdKind, Extent), MapErrorReason> {
    const SYNTAX: MapErrorReason = MapErrorReason::Syntax {
        expected: "[KIND:]FROM:TO:RANGE",
    };
    if value.starts_with('/') {
        return Err(MapErrorReason::Syntax {
            expected: "[KIND:]FROM:TO:RANGE, not a user-namespace path",
        });
    }
    let parts: Vec<&str> = value.split(':').collect();
    let (kind, from, to, range) = match parts[..] {
        [kind, from, to, range] => (Some(kind), from, to, range),
        // A KIND and two numbers is a value missing a field, not an extent
        // whose FROM is `b`.
        ["b" | "u" | "g", _, _] => return Err(SYNTAX),
        // util-linux's X-mount.idmap= syntax: no KIND means uids and gids.
        [from, to, range] => (None, from, to, range),
        _ => return Err(SYNTAX),
    };
    let kind = match kind {
        None | Some("b") => IdKind::Both,
        Some("u") => IdKind::Uid,
        Some("g") => IdKind::Gid,
        Some(_) => {
            return Err(MapErrorReason::Syntax {
                expected: "KIND to be u, g or b",
            })
        }
    };
    Ok((kind, parse_extent(from, to, range)?))
}

/// The value of util-linux's `X-mount.idmap=` mount option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XMountIdmap {
    /// Whitespace-separated `[u:|g:|b:]A:B:N` entries: on-disk `A + n` is
    /// seen as `B + n` for `n < N`.
    Mapping(Mapping),
    /// An absolute path to a user-namespace file such as `/proc/PID/ns/user`,
    /// whose maps are used as they are.
    UsernsPath(PathBuf),
}

impl XMountIdmap {
    /// Parses the value of `X-mount.idmap=`.
    ///
    /// A value starting with `/` is a user-namespace path. Otherwise it is a
    /// whitespace-separated list of `[u:|g:|b:]A:B:N` entries, where an entry
    /// without a prefix applies to both uids and gids. Errors name the
    /// 1-based entry number and its text.
    pub fn parse(value: &str) -> Result<XMountIdmap, MapError> {
        let value = value.trim();
        if value.starts_with('/') {
            return Ok(XMountIdmap::UsernsPath(PathBuf::from(value)));
        }
        let mut entries = Vec::new();
        for (i, text) in value.split_whitespace().enumerate() {
            let (kind, extent) = parse_x_mount_entry(text).map_err(|reason| {
                MapError::new(reason).at(Origin::XMountIdmap, Some(i.saturating_add(1)), text)
            })?;
            entries.push(Entry {
                kind,
                extent,
                text: Some(text),
            });
        }
        Mapping::build(&entries, Origin::XMountIdmap).map(XMountIdmap::Mapping)
    }
}

fn parse_x_mount_entry(entry: &str) -> Result<(IdKind, Extent), MapErrorReason> {
    // No entry syntax contains a slash, so this is a relative path the user
    // meant as a user-namespace file.
    if entry.contains('/') {
        return Err(MapErrorReason::NotAbsolute);
    }
    let (kind, rest) = match entry.split_once(':') {
        Some(("u", rest)) => (IdKind::Uid, rest),
        Some(("g", rest)) => (IdKind::Gid, rest),
        Some(("b", rest)) => (IdKind::Both, rest),
        _ => (IdKind::Both, entry),
    };
    let mut parts = rest.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(n), None) => Ok((kind, parse_extent(a, b, n)?)),
        _ => Err(MapErrorReason::Syntax {
            expected: "[u:|g:|b:]A:B:N",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::collections::HashSet;

    fn ext(on_disk: u32, seen: u32, count: u32) -> Extent {
        Extent::new(on_disk, seen, count).expect("valid extent in test")
    }

    fn map(extents: &[(u32, u32, u32)]) -> IdMap {
        IdMap::new(extents.iter().map(|&(a, b, n)| ext(a, b, n)).collect())
            .expect("valid map in test")
    }

    fn hash_of<T: Hash>(value: &T) -> u64 {
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    fn reason<T: fmt::Debug>(result: Result<T, MapError>) -> MapErrorReason {
        result.expect_err("should be rejected").reason().clone()
    }

    #[test]
    fn design_example() {
        let m = map(&[(0, 10000, 10000)]);
        assert_eq!(m.seen(1000), Some(11000));
        assert_eq!(m.seen(15000), None);
        assert_eq!(m.on_disk(12000), Some(2000));
        assert_eq!(m.on_disk(9999), None);
        assert_eq!(m.seen(9999), Some(19999));
        assert_eq!(m.seen(10000), None);
        assert_eq!(m.on_disk(19999), Some(9999));
        assert_eq!(m.on_disk(20000), None);
    }

    #[test]
    fn extent_lookup_edges() {
        let e = ext(100, 5000, 10);
        assert_eq!(e.seen_of(99), None);
        assert_eq!(e.seen_of(100), Some(5000));
        assert_eq!(e.seen_of(109), Some(5009));
        assert_eq!(e.seen_of(110), None);
        assert_eq!(e.on_disk_of(5009), Some(109));
        assert_eq!(e.on_disk_of(5010), None);
        assert_eq!(e.seen_of(u32::MAX), None);
        assert_eq!((e.on_disk(), e.seen(), e.count()), (100, 5000, 10));
        assert_eq!(e.to_string(), "100 5000 10");
    }

    #[test]
    fn extent_zero_count() {
        let err = Extent::new(0, 0, 0).unwrap_err();
        assert_eq!(err.reason(), &MapErrorReason::ZeroCount);
        assert_eq!(err.to_string(), "extent `0 0 0`: the count is zero");
    }

    #[test]
    fn extent_overflow_limits() {
        let max = u32::MAX;
        // Exactly reaching (uid_t)-1 exclusively is fine; it is never mapped.
        assert!(Extent::new(0, 0, max).is_ok());
        assert!(Extent::new(max - 1, 0, 1).is_ok());
        assert!(Extent::new(0, max - 1, 1).is_ok());
        let e = ext(max - 1, max - 1, 1);
        assert_eq!(e.seen_of(max - 1), Some(max - 1));
        assert_eq!(e.seen_of(max), None);
        assert_eq!(
            reason(Extent::new(max, 0, 1)),
            MapErrorReason::Overflow { side: Side::OnDisk }
        );
        assert_eq!(
            reason(Extent::new(0, max, 1)),
            MapErrorReason::Overflow { side: Side::Seen }
        );
        assert_eq!(
            reason(Extent::new(1, 0, max)),
            MapErrorReason::Overflow { side: Side::OnDisk }
        );
        assert_eq!(
            reason(Extent::new(0, 1, max)),
            MapErrorReason::Overflow { side: Side::Seen }
        );
        assert_eq!(
            reason(Extent::new(max, max, max)),
            MapErrorReason::Overflow { side: Side::OnDisk }
        );
    }

    #[test]
    fn overlap_on_disk_side() {
        let err = IdMap::new(vec![ext(0, 0, 200), ext(100, 1000, 10)]).unwrap_err();
        assert_eq!(
            err.reason(),
            &MapErrorReason::Overlap {
                side: Side::OnDisk,
                other: 1,
                other_text: "0 0 200".into(),
            }
        );
        assert_eq!(err.position(), Some(2));
        assert_eq!(err.text(), Some("100 1000 10"));
        assert_eq!(
            err.to_string(),
            "extent 2 (`100 1000 10`): overlaps extent 1 (`0 0 200`) on the on-disk side"
        );
    }

    #[test]
    fn overlap_seen_side() {
        let err = IdMap::new(vec![ext(0, 0, 200), ext(500, 199, 10)]).unwrap_err();
        assert_eq!(
            err.reason(),
            &MapErrorReason::Overlap {
                side: Side::Seen,
                other: 1,
                other_text: "0 0 200".into(),
            }
        );
        assert_eq!(err.position(), Some(2));
    }

    #[test]
    fn overlap_found_regardless_of_order_and_distance() {
        // The overlapping pair is not adjacent after sorting by start.
        let err = IdMap::new(vec![
            ext(50, 5000, 5),
            ext(0, 0, 100),
            ext(20, 1000, 5),
            ext(300, 300, 1),
        ])
        .unwrap_err();
        assert!(matches!(
            err.reason(),
            MapErrorReason::Overlap {
                side: Side::OnDisk,
                ..
            }
        ));
        // Adjacent but not overlapping is fine on both sides.
        assert!(IdMap::new(vec![ext(10, 10, 10), ext(0, 0, 10), ext(20, 20, 1)]).is_ok());
        // Identical extents overlap.
        assert!(IdMap::new(vec![ext(7, 7, 1), ext(7, 7, 1)]).is_err());
    }

    #[test]
    fn too_many_and_empty() {
        let extents = |n: u32| (0..n).map(|i| ext(i * 2, i * 2, 1)).collect::<Vec<_>>();
        let max = u32::try_from(MAX_EXTENTS).unwrap();
        assert_eq!(IdMap::new(extents(max)).unwrap().extents().len(), 340);
        assert_eq!(
            reason(IdMap::new(extents(max + 1))),
            MapErrorReason::TooMany { count: 341 }
        );
        assert_eq!(reason(IdMap::new(Vec::new())), MapErrorReason::Empty);
        assert_eq!(reason(IdMap::parse_proc("")), MapErrorReason::Empty);
        assert_eq!(reason(IdMap::parse_proc("\n  \n")), MapErrorReason::Empty);
    }

    #[test]
    fn too_long_for_one_write() {
        // 200 lines of 32 bytes: fewer than 340 extents, but over 4 KiB.
        let extents: Vec<Extent> = (0..200)
            .map(|i| ext(4_000_000_000 + i * 10, 4_100_000_000 + i * 10, 1))
            .collect();
        let len = extents.iter().map(|e| e.to_string().len() + 1).sum();
        assert!(len > MAX_PROC_LEN);
        assert_eq!(reason(IdMap::new(extents)), MapErrorReason::TooLong { len });
    }

    #[test]
    fn identity() {
        let m = IdMap::identity(1000, 10).unwrap();
        assert_eq!(m.seen(1005), Some(1005));
        assert_eq!(m.seen(1010), None);
        assert_eq!(reason(IdMap::identity(0, 0)), MapErrorReason::ZeroCount);
        assert!(IdMap::identity(0, u32::MAX).is_ok());
    }

    #[test]
    fn inverse_round_trip() {
        let m = map(&[(0, 10000, 10000), (20000, 5, 3)]);
        let inv = m.inverse();
        assert_eq!(inv.extents(), &[ext(10000, 0, 10000), ext(5, 20000, 3)]);
        assert_eq!(inv.seen(11000), Some(1000));
        assert_eq!(inv.on_disk(1000), Some(11000));
        assert_eq!(inv.inverse().extents(), m.extents());
    }

    #[test]
    fn canonical_merges_contiguous_only() {
        let m = map(&[(10, 1010, 5), (0, 1000, 10)]);
        assert_eq!(m.canonical().extents(), &[ext(0, 1000, 15)]);
        // Contiguous on disk only, or on the seen side only: kept apart.
        let m = map(&[(0, 1000, 10), (10, 2000, 5), (100, 1015, 5)]);
        assert_eq!(
            m.canonical().extents(),
            &[ext(0, 1000, 10), ext(10, 2000, 5), ext(100, 1015, 5)]
        );
        // A chain of three merges into one, and a merge up to the limit works.
        let m = map(&[(5, 5, 5), (0, 0, 5), (10, 10, u32::MAX - 10)]);
        assert_eq!(m.canonical().extents(), &[ext(0, 0, u32::MAX)]);
    }

    #[test]
    fn equality_ignores_order_and_splitting() {
        let a = map(&[(0, 1000, 15), (100, 0, 1)]);
        let b = map(&[(100, 0, 1), (10, 1010, 5), (0, 1000, 10)]);
        let c = map(&[(0, 1000, 15), (100, 1, 1)]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(hash_of(&a), hash_of(&b));
        // Order is still kept for writing.
        assert_eq!(b.extents().first(), Some(&ext(100, 0, 1)));

        let mut set = HashSet::new();
        set.insert(Mapping::new(a.clone(), a.clone()));
        assert!(set.contains(&Mapping::new(b.clone(), b.clone())));
        assert!(!set.contains(&Mapping::new(b.clone(), c.clone())));
    }

    #[test]
    fn parse_proc_kernel_format() {
        let m = IdMap::parse_proc("         0          0 4294967295\n").unwrap();
        assert_eq!(m.extents(), &[ext(0, 0, u32::MAX)]);
        let text = "         0     100000      65536\n     65536          0          1\n";
        let m = IdMap::parse_proc(text).unwrap();
        assert_eq!(m.extents(), &[ext(0, 100000, 65536), ext(65536, 0, 1)]);
        // Tabs, blank lines, CRLF, no final newline.
        let m = IdMap::parse_proc("\n\t1 2 3\r\n\n4\t5  6").unwrap();
        assert_eq!(m.extents(), &[ext(1, 2, 3), ext(4, 5, 6)]);
    }

    #[test]
    fn parse_proc_errors_name_the_line() {
        let err = IdMap::parse_proc("0 0 1\n\n5 5 1\n  1 2  \n").unwrap_err();
        assert_eq!(
            err.reason(),
            &MapErrorReason::Syntax {
                expected: "3 numbers"
            }
        );
        assert_eq!(err.position(), Some(4));
        assert_eq!(err.to_string(), "line 4 `1 2`: expected 3 numbers");
        assert_eq!(
            reason(IdMap::parse_proc("1 2 3 4")),
            MapErrorReason::Syntax {
                expected: "3 numbers"
            }
        );
        assert_eq!(
            reason(IdMap::parse_proc("1 -2 3")),
            MapErrorReason::BadNumber {
                field: Field::Seen,
                text: "-2".into()
            }
        );
        assert_eq!(
            reason(IdMap::parse_proc("1 2 0")),
            MapErrorReason::ZeroCount
        );
        let err = IdMap::parse_proc("0 0 200\n# c\n").unwrap_err();
        assert_eq!(err.position(), Some(2));
        // Overlaps are reported with line numbers, blank lines counted.
        let err = IdMap::parse_proc("0 0 200\n\n100 1000 10\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 3 `100 1000 10`: overlaps line 1 (`0 0 200`) on the on-disk side"
        );
    }

    #[test]
    fn bad_numbers() {
        for text in [
            "",
            "+1",
            "-1",
            "0x10",
            "1e3",
            "4294967296",
            "99999999999",
            "١",
        ] {
            assert_eq!(
                parse_number(text, Field::Count),
                Err(MapErrorReason::BadNumber {
                    field: Field::Count,
                    text: text.into()
                }),
                "{text:?}"
            );
        }
        assert_eq!(parse_number("4294967295", Field::Count), Ok(u32::MAX));
        assert_eq!(parse_number("007", Field::Count), Ok(7));
    }

    #[test]
    fn proc_string_round_trip() {
        let m = map(&[(0, 10000, 10000), (20000, 5, 3)]);
        let text = m.to_proc_string();
        assert_eq!(text, "0 10000 10000\n20000 5 3\n");
        assert_eq!(m.to_string(), text);
        let back = IdMap::parse_proc(&text).unwrap();
        assert_eq!(back.extents(), m.extents());
    }

    #[test]
    fn disjoint_on_disk_and_seen() {
        assert!(map(&[(0, 100000, 65536)]).on_disk_ranges_disjoint_from_seen());
        assert!(!map(&[(0, 0, 1)]).on_disk_ranges_disjoint_from_seen());
        // Touching is not overlapping.
        assert!(map(&[(0, 10, 10)]).on_disk_ranges_disjoint_from_seen());
        assert!(!map(&[(0, 9, 10)]).on_disk_ranges_disjoint_from_seen());
        // Across extents: on-disk 500 of the second is seen-side of the first.
        assert!(!map(&[(0, 500, 1), (500, 9000, 1)]).on_disk_ranges_disjoint_from_seen());
        // A swap is not disjoint; a rotation into fresh ids is.
        assert!(!map(&[(0, 1, 1), (1, 0, 1)]).on_disk_ranges_disjoint_from_seen());
        assert!(map(&[(0, 1000, 10), (10, 2000, 10), (3000, 20, 5)])
            .on_disk_ranges_disjoint_from_seen());
    }

    #[test]
    fn from_entries() {
        let m = Mapping::from_entries([
            (IdKind::Both, ext(0, 10000, 1000)),
            (IdKind::Uid, ext(1000, 5, 1)),
            (IdKind::Gid, ext(1000, 6, 1)),
        ])
        .unwrap();
        assert_eq!(m.uids(), &map(&[(0, 10000, 1000), (1000, 5, 1)]));
        assert_eq!(m.gids(), &map(&[(0, 10000, 1000), (1000, 6, 1)]));
        assert_eq!(m.inverse().uids().seen(5), Some(1000));
        assert_eq!(m.inverse().inverse(), m);
        assert_eq!(m.canonical(), m);

        let err = Mapping::from_entries([(IdKind::Uid, ext(0, 0, 1))]).unwrap_err();
        assert_eq!(err.reason(), &MapErrorReason::MissingGid);
        assert!(err.to_string().starts_with("no gid extent:"), "{err}");
        let err = Mapping::from_entries([(IdKind::Gid, ext(0, 0, 1))]).unwrap_err();
        assert_eq!(err.reason(), &MapErrorReason::MissingUid);
        assert_eq!(reason(Mapping::from_entries([])), MapErrorReason::Empty);

        let err = Mapping::from_entries([
            (IdKind::Uid, ext(0, 0, 10)),
            (IdKind::Gid, ext(0, 0, 10)),
            (IdKind::Both, ext(100, 5, 1)),
        ])
        .unwrap_err();
        assert_eq!(err.id_kind(), Some(IdKind::Uid));
        assert_eq!(err.position(), Some(3));
        assert_eq!(
            err.to_string(),
            "uid entry 3 (`b:100:5:1`): overlaps entry 1 (`u:0:0:10`) on the seen side"
        );
    }

    #[test]
    fn map_mount() {
        let m = Mapping::parse_map_mount(["b:0:10000:10000", " u:20000:5:1 "]).unwrap();
        assert_eq!(m.uids(), &map(&[(0, 10000, 10000), (20000, 5, 1)]));
        assert_eq!(m.gids(), &map(&[(0, 10000, 10000)]));
        assert_eq!(m.uids().seen(1000), Some(11000));

        let err = Mapping::parse_map_mount(["b:0:0:1", "u:1:1:1", "b:0:10000"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--map-mount value 3 `b:0:10000`: expected [KIND:]FROM:TO:RANGE"
        );
        assert_eq!(err.position(), Some(3));
        assert_eq!(err.text(), Some("b:0:10000"));
        let syntax = |value: &str| reason(Mapping::parse_map_mount([value]));
        for value in [
            "",
            "b",
            "0:1",
            "b:0:1",
            "u:0:1",
            "g:0:1",
            "b:0:0:1:2",
            "b:0:0:1:",
        ] {
            assert_eq!(
                syntax(value),
                MapErrorReason::Syntax {
                    expected: "[KIND:]FROM:TO:RANGE"
                },
                "{value:?}"
            );
        }
        for value in ["x:0:0:1", "B:0:0:1", ":0:0:1"] {
            assert_eq!(
                syntax(value),
                MapErrorReason::Syntax {
                    expected: "KIND to be u, g or b"
                }
            );
        }
        assert!(matches!(
            syntax("/proc/1/ns/user"),
            MapErrorReason::Syntax { .. }
        ));
        let err = Mapping::parse_map_mount(["b:0:x:1"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--map-mount value 1 `b:0:x:1`: TO `x` is not a decimal number from 0 to 4294967295"
        );
        for (value, field) in [
            ("b::0:1", Field::OnDisk),
            ("b:0:+1:1", Field::Seen),
            ("b:0:0:4294967296", Field::Count),
        ] {
            assert!(matches!(
                syntax(value),
                MapErrorReason::BadNumber { field: f, .. } if f == field
            ));
        }
        assert_eq!(syntax("b:0:0:0"), MapErrorReason::ZeroCount);
        assert_eq!(
            syntax("b:4294967295:0:1"),
            MapErrorReason::Overflow { side: Side::OnDisk }
        );
        let err = Mapping::parse_map_mount(["u:0:0:1"]).unwrap_err();
        assert_eq!(err.reason(), &MapErrorReason::MissingGid);
        assert_eq!(
            err.to_string(),
            "no gid extent: every entry is for uids only; use b: or add g:"
        );
        assert_eq!(
            reason(Mapping::parse_map_mount(["g:0:0:1"])),
            MapErrorReason::MissingUid
        );
        assert_eq!(
            reason(Mapping::parse_map_mount(std::iter::empty())),
            MapErrorReason::Empty
        );
        let err = Mapping::parse_map_mount(["u:0:0:10", "g:0:0:10", "b:5:100:1"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--map-mount value 3 `b:5:100:1` (uid map): overlaps value 1 (`u:0:0:10`) on the on-disk side"
        );
    }

    #[test]
    fn map_mount_without_kind_is_both() {
        // util-linux's `A:B:N`: uids and gids, exactly like `b:A:B:N`.
        let plain = Mapping::parse_map_mount(["0:1000:10"]).unwrap();
        assert_eq!(plain, Mapping::parse_map_mount(["b:0:1000:10"]).unwrap());
        assert_eq!(plain.uids(), &map(&[(0, 1000, 10)]));
        assert_eq!(plain.gids(), &map(&[(0, 1000, 10)]));
        // Mixed with kinds, and validated like any other value.
        let mixed = Mapping::parse_map_mount(["0:100000:1000", "u:5000:0:1"]).unwrap();
        assert_eq!(mixed.uids(), &map(&[(0, 100000, 1000), (5000, 0, 1)]));
        assert_eq!(mixed.gids(), &map(&[(0, 100000, 1000)]));
        let err = Mapping::parse_map_mount(["0:x:10"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--map-mount value 1 `0:x:10`: TO `x` is not a decimal number from 0 to 4294967295"
        );
        assert_eq!(
            reason(Mapping::parse_map_mount(["0:0:0"])),
            MapErrorReason::ZeroCount
        );
    }

    #[test]
    fn x_mount_idmap() {
        let parsed = XMountIdmap::parse(" u:0:100000:65536 g:0:200000:65536\t70000:0:1 ").unwrap();
        let XMountIdmap::Mapping(m) = parsed else {
            panic!("expected a mapping: {parsed:?}");
        };
        assert_eq!(m.uids(), &map(&[(0, 100000, 65536), (70000, 0, 1)]));
        assert_eq!(m.gids(), &map(&[(0, 200000, 65536), (70000, 0, 1)]));
        assert_eq!(
            XMountIdmap::parse("0:10000:10000").unwrap(),
            XMountIdmap::Mapping(Mapping::new(
                map(&[(0, 10000, 10000)]),
                map(&[(0, 10000, 10000)])
            ))
        );
        assert_eq!(
            XMountIdmap::parse(" /proc/1234/ns/user ").unwrap(),
            XMountIdmap::UsernsPath(PathBuf::from("/proc/1234/ns/user"))
        );

        let err = XMountIdmap::parse("proc/1234/ns/user").unwrap_err();
        assert_eq!(err.reason(), &MapErrorReason::NotAbsolute);
        let err = XMountIdmap::parse("b:0:0:1 ./ns").unwrap_err();
        assert_eq!(err.reason(), &MapErrorReason::NotAbsolute);
        assert_eq!(err.position(), Some(2));

        let syntax = MapErrorReason::Syntax {
            expected: "[u:|g:|b:]A:B:N",
        };
        for value in ["0:0", "x:0:0:1", "u:0:0", "0:0:1:2", "u:"] {
            assert_eq!(reason(XMountIdmap::parse(value)), syntax, "{value:?}");
        }
        let err = XMountIdmap::parse("b:0:0:1 g:1:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "X-mount.idmap entry 2 `g:1:1`: expected [u:|g:|b:]A:B:N"
        );
        let err = XMountIdmap::parse("u:0:0:1 g:0:z:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "X-mount.idmap entry 2 `g:0:z:1`: B `z` is not a decimal number from 0 to 4294967295"
        );
        assert_eq!(
            reason(XMountIdmap::parse("u:0:0:1")),
            MapErrorReason::MissingGid
        );
        assert_eq!(
            reason(XMountIdmap::parse("g:0:0:1")),
            MapErrorReason::MissingUid
        );
        assert_eq!(reason(XMountIdmap::parse("   ")), MapErrorReason::Empty);
        assert_eq!(
            reason(XMountIdmap::parse("0:4294967295:1")),
            MapErrorReason::Overflow { side: Side::Seen }
        );
    }

    /// A small deterministic generator (splitmix64), so the property test
    /// needs no extra crate and every failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// A number in `0..bound` (`bound` > 0).
        fn below(&mut self, bound: u32) -> u32 {
            u32::try_from(self.next() % u64::from(bound)).unwrap()
        }
    }

    /// A random valid map over a small id space, so that neighbours, merges
    /// and gaps all occur.
    fn random_map(rng: &mut Rng) -> IdMap {
        let target = 1 + rng.below(12);
        let mut extents: Vec<Extent> = Vec::new();
        for _ in 0..target * 4 {
            if extents.len() >= target as usize {
                break;
            }
            let candidate = match extents.last() {
                // Often continue the previous extent in both columns, so
                // canonical() has something to merge.
                Some(last) if rng.below(3) == 0 => Extent::new(
                    last.on_disk() + last.count(),
                    last.seen() + last.count(),
                    1 + rng.below(8),
                ),
                _ => Extent::new(rng.below(500), rng.below(500), 1 + rng.below(40)),
            };
            let Ok(candidate) = candidate else { continue };
            let mut with = extents.clone();
            with.push(candidate);
            if IdMap::new(with.clone()).is_ok() {
                extents = with;
            }
        }
        if extents.is_empty() {
            extents.push(ext(rng.below(500), rng.below(500), 1));
        }
        // Shuffle so the caller's order is arbitrary.
        for i in (1..extents.len()).rev() {
            let j = rng.below(u32::try_from(i).unwrap() + 1) as usize;
            extents.swap(i, j);
        }
        IdMap::new(extents).unwrap()
    }

    #[test]
    fn random_maps_round_trip() {
        let mut rng = Rng(0x1d_4a9e_d000);
        for _ in 0..300 {
            let m = random_map(&mut rng);
            let back = IdMap::parse_proc(&m.to_proc_string()).unwrap();
            assert_eq!(back.extents(), m.extents());

            let canonical = m.canonical();
            assert!(canonical.extents().len() <= m.extents().len());
            assert!(IdMap::new(canonical.extents().to_vec()).is_ok());
            assert!(canonical.extents().windows(2).all(|w| w[0] < w[1]));
            assert_eq!(canonical, m);
            assert_eq!(hash_of(&canonical), hash_of(&m));
            assert_eq!(canonical.canonical().extents(), canonical.extents());
            assert_eq!(m.inverse().inverse().extents(), m.extents());

            // Every extent boundary plus random ids.
            let edges = m.extents().iter().flat_map(|e| {
                let (a, n) = (e.on_disk(), e.count());
                [a.saturating_sub(1), a, a + n - 1, a + n]
            });
            let ids: Vec<u32> = edges.chain((0..20).map(|_| rng.below(600))).collect();
            for id in ids {
                assert_eq!(canonical.seen(id), m.seen(id), "on-disk {id} in\n{m}");
                assert_eq!(canonical.on_disk(id), m.on_disk(id), "seen {id} in\n{m}");
                if let Some(seen) = m.seen(id) {
                    assert_eq!(m.on_disk(seen), Some(id));
                    assert_eq!(m.inverse().seen(seen), Some(id));
                }
            }
        }
    }
}
