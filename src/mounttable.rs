//! The mount table, only as much of it as a question needs.
//!
//! `/proc/self/mountinfo` grows with every mount of the namespace (a node
//! with tens of thousands of mounts pays for all of them on every read), so
//! where the kernel has `listmount`/`statmount` (Linux 6.8) this module asks
//! about one mount ([`mount_of`]) or one subtree ([`subtree`]) by id: the
//! mount of a path comes from `statx(STATX_MNT_ID_UNIQUE)` and one
//! `statmount`, the mounts below it from one `listmount` of that mount and a
//! `statmount` each. Elsewhere (or with `IDMAPPED_FORCE_FALLBACK=listmount`)
//! it reads `mountinfo` of our thread through the verified [procfs handle](crate::procfs).
//!
//! A table that cannot be read or parsed is an [`Error`], never an answer:
//! no caller may conclude "not idmapped" or "no submounts" from a failure.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, StatxFlags, CWD};

use crate::error::{Error, ErrorKind, Result};
use crate::features::{self, Availability};
use crate::procfs::{self, Base};
use crate::sys;

/// One mount, as this crate needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// Where the mount is attached (relative to our root), unescaped.
    pub mount_point: PathBuf,
    /// Filesystem type (`ext4`, `tmpfs`, `fuse.sshfs`, ...).
    pub fs_type: String,
    /// Whether the mount is idmapped (`MOUNT_ATTR_IDMAP`, or the `idmapped`
    /// option in mountinfo).
    pub idmapped: bool,
}

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): the 64-bit id `statmount` takes.
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

fn use_listmount() -> bool {
    features::features().listmount == Availability::Available
}

fn parse_error(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput(what.into()))
}

/// The mount `path` is on (a final symlink is not followed).
pub(crate) fn mount_of(path: &Path) -> Result<MountEntry> {
    if use_listmount() {
        let id = unique_id(path)?;
        return stat_one(id, path);
    }
    let id = reusable_id(path)?;
    mountinfo()?
        .into_iter()
        .find(|(mid, _)| *mid == id)
        .map(|(_, e)| e)
        .ok_or_else(|| {
            parse_error(format!(
                "mount id {id} of {path:?} is not in our mountinfo: cannot tell which mount it is on"
            ))
            .with_path(path)
        })
}

/// `path`'s own mount followed by every mount strictly below `path`,
/// parents before children: what a recursive clone of `path` takes.
pub(crate) fn subtree(path: &Path) -> Result<Vec<MountEntry>> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        Error::sys(
            "realpath",
            format!("{path:?}"),
            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
        )
        .with_path(path)
    })?;
    let mut below: Vec<MountEntry>;
    let top;
    if use_listmount() {
        let id = unique_id(&canonical)?;
        top = stat_one(id, &canonical)?;
        let ids = list_below(id, &canonical)?;
        below = Vec::with_capacity(ids.len());
        for child in ids {
            let e = stat_one(child, &canonical)?;
            // listmount lists everything below the *mount*; keep what is
            // below the path (the path may be a directory inside it).
            if e.mount_point != canonical && e.mount_point.starts_with(&canonical) {
                below.push(e);
            }
        }
    } else {
        let id = reusable_id(&canonical)?;
        let table = mountinfo()?;
        top = table
            .iter()
            .find(|(mid, _)| *mid == id)
            .map(|(_, e)| e.clone())
            .ok_or_else(|| {
                parse_error(format!(
                    "mount id {id} of {canonical:?} is not in our mountinfo"
                ))
                .with_path(&canonical)
            })?;
        below = table
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.mount_point != canonical && e.mount_point.starts_with(&canonical))
            .collect();
    }
    // Parents first: a mount point is below its parent's, so fewer components first.
    below.sort_by_key(|e| e.mount_point.components().count());
    let mut out = vec![top];
    out.extend(below);
    Ok(out)
}

fn unique_id(path: &Path) -> Result<u64> {
    let st = rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::from_bits_retain(STATX_MNT_ID_UNIQUE),
    )
    .map_err(|e| {
        Error::sys("statx", format!("{path:?}, STATX_MNT_ID_UNIQUE"), e).with_path(path)
    })?;
    if st.stx_mask & STATX_MNT_ID_UNIQUE == 0 {
        return Err(parse_error(format!(
            "statx({path:?}) gave no STATX_MNT_ID_UNIQUE although listmount exists"
        ))
        .with_path(path));
    }
    Ok(st.stx_mnt_id)
}

fn reusable_id(path: &Path) -> Result<u64> {
    let st = rustix::fs::statx(CWD, path, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::MNT_ID)
        .map_err(|e| Error::sys("statx", format!("{path:?}, STATX_MNT_ID"), e).with_path(path))?;
    if st.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
        return Err(parse_error(format!(
            "statx({path:?}) gave no STATX_MNT_ID (Linux 5.8): cannot tell which mount it is on"
        ))
        .with_path(path));
    }
    Ok(st.stx_mnt_id)
}

/// `statmount` of one mount: type, attributes, mount point.
fn stat_one(id: u64, path: &Path) -> Result<MountEntry> {
    let mask = sys::STATMOUNT_MNT_BASIC
        | sys::STATMOUNT_MNT_POINT
        | sys::STATMOUNT_FS_TYPE
        | sys::STATMOUNT_FS_SUBTYPE;
    let sm = sys::statmount(id, mask).map_err(|e| {
        Error::sys(
            "statmount",
            format!("mnt_id {id}, STATMOUNT_MNT_BASIC|STATMOUNT_MNT_POINT|STATMOUNT_FS_TYPE"),
            e,
        )
        .with_path(path)
    })?;
    let (Some(fs), Some(point)) = (sm.fs_type, sm.mnt_point) else {
        return Err(parse_error(format!(
            "statmount(mnt_id {id}) returned no filesystem type or mount point (mask {:#x})",
            sm.mask
        ))
        .with_path(path));
    };
    if sm.mask & sys::STATMOUNT_MNT_BASIC == 0 {
        return Err(parse_error(format!(
            "statmount(mnt_id {id}) returned no mount attributes"
        ))
        .with_path(path));
    }
    let fs_type = match sm.fs_subtype {
        Some(sub) if !sub.is_empty() => format!("{fs}.{sub}"),
        _ => fs,
    };
    Ok(MountEntry {
        mount_point: PathBuf::from(OsString::from_vec(point)),
        fs_type,
        idmapped: sm.mnt_attr & libc::MOUNT_ATTR_IDMAP != 0,
    })
}

/// Every mount id `listmount` gives below mount `id`, in batches.
fn list_below(id: u64, path: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut buf = vec![0u64; 512];
    let mut last = 0;
    loop {
        let n = sys::listmount(id, last, &mut buf).map_err(|e| {
            Error::sys("listmount", format!("mnt_id {id}, after {last}"), e).with_path(path)
        })?;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(out);
        }
        last = buf[n - 1];
    }
}

/// Our thread's mountinfo, through the verified procfs: (reusable mount id, entry).
fn mountinfo() -> Result<Vec<(u64, MountEntry)>> {
    let text = procfs::handle()?.read(Base::ThreadSelf, "mountinfo")?;
    parse(&text)
}

fn parse(text: &[u8]) -> Result<Vec<(u64, MountEntry)>> {
    let mut out = Vec::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let entry = parse_line(line).ok_or_else(|| {
            parse_error(format!(
                "mountinfo line {}: cannot parse {:?}",
                n + 1,
                String::from_utf8_lossy(line)
            ))
        })?;
        out.push(entry);
    }
    if out.is_empty() {
        return Err(parse_error("mountinfo is empty"));
    }
    Ok(out)
}

fn parse_line(line: &[u8]) -> Option<(u64, MountEntry)> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let id = std::str::from_utf8(fields.first()?).ok()?.parse().ok()?;
    let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.get(4)?)));
    if !mount_point.as_os_str().as_bytes().starts_with(b"/") {
        return None;
    }
    let options = fields.get(5)?;
    // Optional fields end at the lone "-"; the fs type follows it.
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fs_type = String::from_utf8_lossy(&unescape(fields.get(dash + 1)?)).into_owned();
    let idmapped = options.split(|&b| b == b',').any(|o| o == b"idmapped");
    Some((
        id,
        MountEntry {
            mount_point,
            fs_type,
            idmapped,
        },
    ))
}

/// Undo the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let oct = s
            .get(i + 1..i + 4)
            .filter(|d| s[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lines() {
        let t = b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                  90 27 0:50 / /mnt/a\\040b rw,nosuid,idmapped shared:5 master:1 - tmpfs tmpfs rw\n";
        let v = parse(t).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, 27);
        assert_eq!(v[0].1.fs_type, "ext4");
        assert!(!v[0].1.idmapped);
        assert_eq!(v[1].1.mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(v[1].1.fs_type, "tmpfs");
        assert!(v[1].1.idmapped);
    }

    #[test]
    fn a_table_that_does_not_parse_is_an_error() {
        assert!(parse(b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\ngarbage\n").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b"x 1 254:0 / / rw - ext4 a rw\n").is_err());
        assert!(parse(b"27 1 254:0 / relative rw - ext4 a rw\n").is_err());
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"trailing\\"), b"trailing\\");
        assert_eq!(unescape(b"\\09"), b"\\09");
    }
}
