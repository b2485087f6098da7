//! `/proc/self/mountinfo`: which mount a path is on, its filesystem type,
//! whether it is idmapped (the `idmapped` per-mount option, Linux 5.12), and
//! which mounts sit below a path.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, StatxFlags, CWD};

/// One line of `/proc/self/mountinfo` (see proc_pid_mountinfo(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// Mount id (the reusable one `STATX_MNT_ID` returns).
    pub id: u64,
    /// Where the mount is attached, unescaped.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,idmapped,...`).
    pub options: String,
    /// Filesystem type (`ext4`, `tmpfs`, `fuse.sshfs`, ...).
    pub fs_type: String,
}

impl MountEntry {
    /// The `idmapped` per-mount option.
    pub fn is_idmapped(&self) -> bool {
        self.options.split(',').any(|o| o == "idmapped")
    }
}

/// Parse the whole table; malformed lines are skipped (the kernel writes it).
pub(crate) fn read() -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read("/proc/thread-self/mountinfo")?;
    Ok(parse(&text))
}

fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let id = std::str::from_utf8(fields.first()?).ok()?.parse().ok()?;
    let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.get(4)?)));
    let options = String::from_utf8_lossy(fields.get(5)?).into_owned();
    // Optional fields end at the lone "-"; the fs type follows it.
    let dash = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let fs_type = String::from_utf8_lossy(&unescape(fields.get(dash + 1)?)).into_owned();
    Some(MountEntry {
        id,
        mount_point,
        options,
        fs_type,
    })
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

/// The mount id (`STATX_MNT_ID`) of the mount `path` is on, without following
/// a final symlink.
pub(crate) fn mount_id_of(path: &Path) -> rustix::io::Result<u64> {
    let st = rustix::fs::statx(CWD, path, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::MNT_ID)?;
    Ok(st.stx_mnt_id)
}

/// The entry for the mount `path` is on.
pub(crate) fn entry_of(path: &Path) -> Option<MountEntry> {
    let id = mount_id_of(path).ok()?;
    read().ok()?.into_iter().find(|e| e.id == id)
}

/// `path`'s own mount followed by every mount strictly below `path`, in
/// table order (parents before children): what a recursive clone takes.
pub(crate) fn tree_of(path: &Path) -> Vec<MountEntry> {
    let Ok(canonical) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let Ok(table) = read() else {
        return Vec::new();
    };
    let top = mount_id_of(&canonical).ok();
    let mut out: Vec<MountEntry> = table
        .iter()
        .filter(|e| Some(e.id) == top)
        .cloned()
        .collect();
    out.extend(
        table
            .into_iter()
            .filter(|e| e.mount_point != canonical && e.mount_point.starts_with(&canonical)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lines() {
        let t = b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                  90 27 0:50 / /mnt/a\\040b rw,nosuid,idmapped shared:5 master:1 - tmpfs tmpfs rw\n\
                  garbage\n";
        let v = parse(t);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].fs_type, "ext4");
        assert!(!v[0].is_idmapped());
        assert_eq!(v[1].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(v[1].fs_type, "tmpfs");
        assert!(v[1].is_idmapped());
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"trailing\\"), b"trailing\\");
        assert_eq!(unescape(b"\\09"), b"\\09");
    }
}
