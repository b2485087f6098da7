//! The shift record: what the walker keeps on the tree's root directory
//! (`trusted.idmapped.record`) so that a run can tell a fresh tree, a shift
//! in progress, a finished shift and an unshift in progress apart.
//!
//! The value is a few lines of text (so `getfattr -n trusted.idmapped.record
//! -d --only-values ROOT` is readable):
//!
//! ```text
//! idmapped shift record 1
//! state: running
//! nonce: 5f0c2d6b9a8e7f10
//! since: 1764586000.123456789
//! root: 2049 131073
//! out-of-range: keep
//! outside-links: skip
//! uid: 0 100000 65536
//! gid: 0 100000 65536
//! ```
//!
//! `state` is `running`, `done` or `undoing` (an [`unshift`](super::unshift_tree)
//! in progress; the mapping lines are then the forward shift being undone);
//! `since` is the ctime threshold of the run (`none` while it is being
//! chosen); `root` the device and inode number of the directory the record
//! was written for (a copy of the tree carries the xattr but not the inode).
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use super::{OutOfRange, OutsideLinks};
use crate::map::{Extent, IdMap, Mapping};

/// The xattr on the tree's root that holds the record.
pub(crate) const RECORD: &str = "trusted.idmapped.record";
const HEADER: &str = "idmapped shift record 1";

/// Where a recorded shift stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// A shift started and has not finished (it was killed, or failed):
    /// running it again with the same mapping and policy finishes it.
    Running,
    /// The shift finished.
    Done,
    /// An unshift started and has not finished: unshift again.
    Undoing,
}

impl RecordState {
    fn name(self) -> &'static str {
        match self {
            RecordState::Running => "running",
            RecordState::Done => "done",
            RecordState::Undoing => "undoing",
        }
    }
}

/// A shift recorded on a tree's root (see [`read_record`](super::read_record)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShiftRecord {
    /// Where it stands.
    pub state: RecordState,
    /// The mapping of the (forward) shift.
    pub mapping: Mapping,
    /// Its out-of-range policy.
    pub out_of_range: OutOfRange,
    /// Its policy for inodes also linked from outside the tree.
    pub outside_links: OutsideLinks,
    /// Identifies the run: per-entry stashes carry it.
    pub(crate) nonce: u64,
    /// ctime threshold (seconds, nanoseconds); `None` while being chosen.
    pub(crate) since: Option<(i64, u32)>,
    /// Device and inode number of the root it was written for.
    pub(crate) root: (u64, u64),
    /// Entries an earlier run found immutable or append-only and left
    /// untouched: done by the next run whatever their ctime.
    pub(crate) redo: Vec<(u64, u64)>,
}

impl ShiftRecord {
    /// Whether a run with these arguments is the recorded one.
    pub(crate) fn same_shift(
        &self,
        mapping: &Mapping,
        oor: OutOfRange,
        links: OutsideLinks,
    ) -> bool {
        self.mapping.canonical() == mapping.canonical()
            && self.out_of_range == oor
            && self.outside_links == links
    }

    /// One line for messages: `mapping b:0:100000:65536 (uids and gids
    /// on disk 0–65535 (65536 ids) seen as 100000–165535 (65536 ids)),
    /// --out-of-range=keep, --outside-links=skip (finished)`.
    pub fn describe(&self) -> String {
        format!(
            "mapping {} ({}), --out-of-range={}, --outside-links={} ({})",
            map_mount_text(&self.mapping),
            ranges_text(&self.mapping),
            self.out_of_range.name(),
            self.outside_links.name(),
            match self.state {
                RecordState::Running => "unfinished",
                RecordState::Done => "finished",
                RecordState::Undoing => "being undone",
            }
        )
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        let _ = writeln!(s, "{HEADER}");
        let _ = writeln!(s, "state: {}", self.state.name());
        let _ = writeln!(s, "nonce: {:016x}", self.nonce);
        match self.since {
            Some((sec, nsec)) => {
                let _ = writeln!(s, "since: {sec}.{nsec:09}");
            }
            None => {
                let _ = writeln!(s, "since: none");
            }
        }
        let _ = writeln!(s, "root: {} {}", self.root.0, self.root.1);
        let _ = writeln!(s, "out-of-range: {}", self.out_of_range.name());
        let _ = writeln!(s, "outside-links: {}", self.outside_links.name());
        for (dev, ino) in &self.redo {
            let _ = writeln!(s, "redo: {dev} {ino}");
        }
        for (kind, map) in [("uid", self.mapping.uids()), ("gid", self.mapping.gids())] {
            for e in map.extents() {
                let _ = writeln!(s, "{kind}: {} {} {}", e.on_disk(), e.seen(), e.count());
            }
        }
        s.into_bytes()
    }

    /// Parse; `None` for anything that is not a record we wrote.
    pub(crate) fn decode(b: &[u8]) -> Option<ShiftRecord> {
        let text = std::str::from_utf8(b).ok()?;
        let mut lines = text.lines();
        if lines.next()? != HEADER {
            return None;
        }
        let (mut state, mut nonce, mut since, mut root, mut oor, mut links) =
            (None, None, None, None, None, None);
        let (mut uids, mut gids, mut redo) = (Vec::new(), Vec::new(), Vec::new());
        for line in lines {
            let (key, value) = line.split_once(": ")?;
            match key {
                "state" => {
                    state = Some(match value {
                        "running" => RecordState::Running,
                        "done" => RecordState::Done,
                        "undoing" => RecordState::Undoing,
                        _ => return None,
                    })
                }
                "nonce" => nonce = Some(u64::from_str_radix(value, 16).ok()?),
                "since" => {
                    since = Some(if value == "none" {
                        None
                    } else {
                        let (a, b) = value.split_once('.')?;
                        let nsec: u32 = b.parse().ok()?;
                        if b.len() != 9 || nsec >= 1_000_000_000 {
                            return None;
                        }
                        Some((a.parse().ok()?, nsec))
                    })
                }
                "redo" => {
                    let (a, b) = value.split_once(' ')?;
                    redo.push((a.parse().ok()?, b.parse().ok()?));
                }
                "root" => {
                    let (a, b) = value.split_once(' ')?;
                    root = Some((a.parse().ok()?, b.parse().ok()?));
                }
                "out-of-range" => oor = Some(value.parse::<OutOfRange>().ok()?),
                "outside-links" => links = Some(value.parse::<OutsideLinks>().ok()?),
                "uid" | "gid" => {
                    let mut it = value.split(' ').map(|w| w.parse::<u32>());
                    let (a, s, n) = (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
                    if it.next().is_some() {
                        return None;
                    }
                    let e = Extent::new(a, s, n).ok()?;
                    if key == "uid" {
                        uids.push(e)
                    } else {
                        gids.push(e)
                    }
                }
                _ => return None,
            }
        }
        Some(ShiftRecord {
            state: state?,
            mapping: Mapping::new(IdMap::new(uids).ok()?, IdMap::new(gids).ok()?),
            out_of_range: oor?,
            outside_links: links?,
            nonce: nonce?,
            since: since?,
            root: root?,
            redo,
        })
    }
}

/// The extents in words no reader can misread: `uids and gids on disk
/// 0–9 (10 ids) seen as 1000–1009 (10 ids)`.
fn ranges_text(m: &Mapping) -> String {
    let words = |map: &IdMap| {
        map.extents()
            .iter()
            .map(|e| {
                format!(
                    "on disk {} seen as {}",
                    super::describe_range(e.on_disk(), e.count()),
                    super::describe_range(e.seen(), e.count())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if m.uids().canonical() == m.gids().canonical() {
        format!("uids and gids {}", words(m.uids()))
    } else {
        format!("uids {}; gids {}", words(m.uids()), words(m.gids()))
    }
}

/// `u:0:100000:65536 g:0:100000:65536` (or `b:` where both maps are the same).
pub(crate) fn map_mount_text(m: &Mapping) -> String {
    let line = |p: &str, map: &IdMap| {
        map.extents()
            .iter()
            .map(|e| format!("{p}:{}:{}:{}", e.on_disk(), e.seen(), e.count()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if m.uids().canonical() == m.gids().canonical() {
        line("b", m.uids())
    } else {
        format!("{} {}", line("u", m.uids()), line("g", m.gids()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let mapping =
            Mapping::parse_map_mount(["b:1000:1001:1", "b:1001:1000:1", "u:0:5:1"]).unwrap();
        for since in [None, Some((1_764_586_000, 5))] {
            let r = ShiftRecord {
                state: RecordState::Running,
                mapping: mapping.clone(),
                out_of_range: OutOfRange::Overflow,
                outside_links: OutsideLinks::Skip,
                nonce: 0xfeed,
                since,
                root: (2049, 12),
                redo: vec![(2049, 77)],
            };
            let b = r.encode();
            assert_eq!(ShiftRecord::decode(&b), Some(r.clone()));
            for cut in [0, 10, b.len() - 3] {
                assert!(ShiftRecord::decode(&b[..cut]).is_none() || cut == b.len());
            }
        }
        assert!(ShiftRecord::decode(b"idmapped shift record 2\n").is_none());
        let r = ShiftRecord {
            state: RecordState::Done,
            mapping: Mapping::parse_map_mount(["b:0:5:10"]).unwrap(),
            out_of_range: OutOfRange::Keep,
            outside_links: OutsideLinks::Skip,
            nonce: 1,
            since: None,
            root: (1, 2),
            redo: Vec::new(),
        };
        assert_eq!(
            r.describe(),
            "mapping b:0:5:10 (uids and gids on disk 0–9 (10 ids) seen as 5–14 (10 ids)), \
             --out-of-range=keep, --outside-links=skip (finished)"
        );
        assert!(ShiftRecord::decode(&[0xff, 0xfe]).is_none());
    }
}
