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
//! | mount-idmapped `--map-mount=b:FROM:TO:RANGE` | `FROM` | `TO` |
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
/// ``uid extent 2 (`100 0 10`): overlaps extent 1 (`0 0 200`) on the on-disk side``.
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
            MapError::new(reason).at(
                Origin::Extent,
                None,
                format!("{on_disk} {seen} {count}"),
            )
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

/// Finds two extents whose ranges (as given by `range`) share an id,
/// returning `(later, earlier)` in the caller's order.
///
/// Sorting by start means that if any two ranges overlap, some range starts
/// before the furthest end seen so far, so one sweep finds a pair.
fn find_overlap(extents: &[Extent], range: fn(&Extent) -> (u64, u64)) -> Option<(usize, usize)> {
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
    let sides: [(Side, fn(&Extent) -> (u64, u64)); 2] = [
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
    /// The prefix is required. A value naming a user-namespace file
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
    if value.starts_with('/') {
        return Err(MapErrorReason::Syntax {
            expected: "KIND:FROM:TO:RANGE, not a user-namespace path",
        });
    }
    let mut parts = value.split(':');
    let (Some(kind), Some(from), Some(to), Some(range), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(MapErrorReason::Syntax {
            expected: "KIND:FROM:TO:RANGE",
        });
    };
    let kind = match kind {
        "b" => IdKind::Both,
        "u" => IdKind::Uid,
        "g" => IdKind::Gid,
        _ => {
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
