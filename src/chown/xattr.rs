//! The on-disk formats the walker rewrites: POSIX ACL xattrs, file
//! capabilities, and the walker's own crash-recovery stash (its record, on
//! the tree's root, is in `record.rs`).
//!
//! All three are little-endian byte strings defined by the kernel ABI
//! (`include/uapi/linux/posix_acl_xattr.h`, `include/uapi/linux/capability.h`).
//! Everything here is pure: parsing never panics, whatever the bytes.
#![forbid(unsafe_code)]

/// `system.posix_acl_access`: the ACL checked on access.
pub(crate) const ACL_ACCESS: &str = "system.posix_acl_access";
/// `system.posix_acl_default`: the ACL a directory hands to new children.
pub(crate) const ACL_DEFAULT: &str = "system.posix_acl_default";
/// `security.capability`: file capabilities.
pub(crate) const CAPABILITY: &str = "security.capability";
/// Where an entry's pre-shift state is parked while a chown that the kernel
/// answers by clearing setuid/setgid or capabilities is in flight.
pub(crate) const STASH: &str = "trusted.idmapped.shift";

const ACL_VERSION: u32 = 2;
const ACL_HEADER: usize = 4;
const ACL_ENTRY: usize = 8;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

const CAP_REVISION_MASK: u32 = 0xFF00_0000;
const CAP_REVISION_2: u32 = 0x0200_0000;
const CAP_REVISION_3: u32 = 0x0300_0000;
const CAP_FLAGS_EFFECTIVE: u32 = 0x0000_0001;
const CAP_V2_LEN: usize = 20;
const CAP_V3_LEN: usize = 24;

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

/// Which id space an ACL entry's id lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AclId {
    /// An `ACL_USER` entry: a uid.
    User,
    /// An `ACL_GROUP` entry: a gid.
    Group,
}

/// Rewrite the ids of an ACL xattr value with `f`.
///
/// Returns `Ok(None)` when no id changes (the caller then writes nothing, which
/// is what makes a second run cheap), `Ok(Some(bytes))` for the new value.
/// `Err(())` when the value is not a version-2 ACL: the caller refuses to touch
/// what it cannot parse rather than guess.
pub(crate) fn translate_acl<E>(
    value: &[u8],
    mut f: impl FnMut(AclId, u32) -> Result<u32, E>,
) -> Result<Result<Option<Vec<u8>>, E>, ()> {
    if value.len() < ACL_HEADER || (value.len() - ACL_HEADER) % ACL_ENTRY != 0 {
        return Err(());
    }
    if le32(value, 0) != Some(ACL_VERSION) {
        return Err(());
    }
    let mut out: Option<Vec<u8>> = None;
    let mut at = ACL_HEADER;
    while at < value.len() {
        let tag = le16(value, at).ok_or(())?;
        let id = le32(value, at + 4).ok_or(())?;
        let kind = match tag {
            ACL_USER => Some(AclId::User),
            ACL_GROUP => Some(AclId::Group),
            _ => None,
        };
        if let Some(kind) = kind {
            let new = match f(kind, id) {
                Ok(new) => new,
                Err(e) => return Ok(Err(e)),
            };
            if new != id {
                let buf = out.get_or_insert_with(|| value.to_vec());
                buf[at + 4..at + 8].copy_from_slice(&new.to_le_bytes());
            }
        }
        at += ACL_ENTRY;
    }
    Ok(Ok(out))
}

/// A parsed `security.capability` value, as the kernel returns it to a reader
/// in the initial user namespace (revision 2, or revision 3 with a root id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileCaps {
    /// `VFS_CAP_FLAGS_EFFECTIVE` was set.
    effective: bool,
    /// permitted/inheritable words, low and high.
    data: [u8; 16],
    /// The uid that is root in the namespaces these capabilities apply to;
    /// 0 for revision 2 (which applies to the filesystem's own namespace).
    pub(crate) rootid: u32,
}

impl FileCaps {
    /// Parse a revision 2 or 3 value; anything else (revision 1, garbage) is
    /// `None`, and the caller refuses to chown what it could not restore.
    pub(crate) fn parse(value: &[u8]) -> Option<FileCaps> {
        let magic = le32(value, 0)?;
        let rootid = match (magic & CAP_REVISION_MASK, value.len()) {
            (CAP_REVISION_2, CAP_V2_LEN) => 0,
            (CAP_REVISION_3, CAP_V3_LEN) => le32(value, 20)?,
            _ => return None,
        };
        let mut data = [0u8; 16];
        data.copy_from_slice(value.get(4..20)?);
        Some(FileCaps {
            effective: magic & CAP_FLAGS_EFFECTIVE != 0,
            data,
            rootid,
        })
    }

    /// The same capabilities with another root id.
    pub(crate) fn with_rootid(&self, rootid: u32) -> FileCaps {
        FileCaps {
            rootid,
            ..self.clone()
        }
    }

    /// The bytes to write. Root id 0 is written as revision 2: that is what
    /// the kernel itself stores for it and returns to readers, so a shift and
    /// its inverse give back the original bytes exactly.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let flags = if self.effective {
            CAP_FLAGS_EFFECTIVE
        } else {
            0
        };
        let mut out = Vec::with_capacity(CAP_V3_LEN);
        if self.rootid == 0 {
            out.extend_from_slice(&(CAP_REVISION_2 | flags).to_le_bytes());
            out.extend_from_slice(&self.data);
        } else {
            out.extend_from_slice(&(CAP_REVISION_3 | flags).to_le_bytes());
            out.extend_from_slice(&self.data);
            out.extend_from_slice(&self.rootid.to_le_bytes());
        }
        out
    }
}

const STASH_MAGIC: &[u8; 8] = b"IDMSHFT2";
const ABSENT: u32 = u32::MAX;

/// An entry's complete pre-shift state: everything the walk may rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct State {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// `st_mode`, type bits included.
    pub(crate) mode: u32,
    /// The raw `security.capability` value, if any.
    pub(crate) cap: Option<Vec<u8>>,
    /// The raw `system.posix_acl_access` value, if any.
    pub(crate) acl_access: Option<Vec<u8>>,
    /// The raw `system.posix_acl_default` value, if any.
    pub(crate) acl_default: Option<Vec<u8>>,
}

/// What an entry looked like before a shift that takes more than one system
/// call, tagged with the nonce of the run (the record's) that wrote it.
///
/// Written to the entry itself ([`STASH`]) before its first change and
/// removed after its last, so that a walk killed in between is finished by
/// the next run from the original state, never from a half-shifted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stash {
    pub(crate) nonce: u64,
    pub(crate) state: State,
}

impl Stash {
    /// Serialise: magic, nonce, uid, gid, mode, then capability, access ACL
    /// and default ACL, each as a length (`u32::MAX` for none) and bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let s = &self.state;
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(STASH_MAGIC);
        out.extend_from_slice(&self.nonce.to_le_bytes());
        for w in [s.uid, s.gid, s.mode] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for blob in [&s.cap, &s.acl_access, &s.acl_default] {
            match blob {
                // An xattr value is at most 64 KiB: the cast cannot truncate.
                Some(b) => {
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(b);
                }
                None => out.extend_from_slice(&ABSENT.to_le_bytes()),
            }
        }
        out
    }

    /// Parse; `None` for anything we did not write (an older format included).
    pub(crate) fn decode(b: &[u8]) -> Option<Stash> {
        if b.get(..8)? != STASH_MAGIC {
            return None;
        }
        let nonce = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
        let uid = le32(b, 16)?;
        let gid = le32(b, 20)?;
        let mode = le32(b, 24)?;
        let mut at = 28usize;
        let mut blob = || -> Option<Option<Vec<u8>>> {
            let len = le32(b, at)?;
            at = at.checked_add(4)?;
            if len == ABSENT {
                return Some(None);
            }
            let end = at.checked_add(usize::try_from(len).ok()?)?;
            let v = b.get(at..end)?.to_vec();
            at = end;
            Some(Some(v))
        };
        let cap = blob()?;
        let acl_access = blob()?;
        let acl_default = blob()?;
        if at != b.len() {
            return None;
        }
        Some(Stash {
            nonce,
            state: State {
                uid,
                gid,
                mode,
                cap,
                acl_access,
                acl_default,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn acl_translates_user_and_group_entries_only() {
        let u = u32::MAX;
        let v = acl(&[
            (1, 6, u),
            (2, 4, 1000),
            (4, 4, u),
            (8, 5, 2000),
            (0x10, 7, u),
            (0x20, 0, u),
        ]);
        let out = translate_acl::<()>(&v, |k, id| {
            Ok(match k {
                AclId::User => id + 10,
                AclId::Group => id + 20,
            })
        })
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(
            out,
            acl(&[
                (1, 6, u),
                (2, 4, 1010),
                (4, 4, u),
                (8, 5, 2020),
                (0x10, 7, u),
                (0x20, 0, u)
            ])
        );
        // identity: nothing to write
        assert_eq!(translate_acl::<()>(&v, |_, id| Ok(id)), Ok(Ok(None)));
        // errors propagate
        assert_eq!(translate_acl(&v, |_, _| Err(7)), Ok(Err(7)));
    }

    #[test]
    fn acl_rejects_garbage() {
        for bad in [&[][..], &[2, 0, 0], &[1, 0, 0, 0], &[2, 0, 0, 0, 1]] {
            assert_eq!(translate_acl::<()>(bad, |_, id| Ok(id)), Err(()), "{bad:?}");
        }
        assert_eq!(translate_acl::<()>(&acl(&[]), |_, id| Ok(id)), Ok(Ok(None)));
    }

    #[test]
    fn caps_v2_becomes_v3_and_back() {
        let mut v2 = (CAP_REVISION_2 | 1).to_le_bytes().to_vec();
        v2.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        let c = FileCaps::parse(&v2).unwrap();
        assert_eq!(c.rootid, 0);
        assert_eq!(c.encode(), v2);
        let v3 = c.with_rootid(100000).encode();
        assert_eq!(v3.len(), 24);
        assert_eq!(&v3[..4], &(CAP_REVISION_3 | 1).to_le_bytes());
        assert_eq!(&v3[20..], &100000u32.to_le_bytes());
        let back = FileCaps::parse(&v3).unwrap();
        assert_eq!(back.rootid, 100000);
        assert_eq!(back.with_rootid(0).encode(), v2);
    }

    #[test]
    fn caps_reject_other_revisions_and_lengths() {
        assert!(FileCaps::parse(&[]).is_none());
        assert!(FileCaps::parse(&0x0100_0000u32.to_le_bytes()).is_none());
        let mut v2 = CAP_REVISION_2.to_le_bytes().to_vec();
        v2.extend_from_slice(&[0; 20]); // 24 bytes with a revision-2 magic
        assert!(FileCaps::parse(&v2).is_none());
    }

    #[test]
    fn stash_round_trips_and_rejects_garbage() {
        for (cap, acl) in [(None, None), (Some(vec![1u8, 2, 3]), Some(vec![]))] {
            let s = Stash {
                nonce: 0x0123_4567_89ab_cdef,
                state: State {
                    uid: 1,
                    gid: 2,
                    mode: 0o104755,
                    cap,
                    acl_access: acl.clone(),
                    acl_default: acl.map(|_| vec![9, 9]),
                },
            };
            let b = s.encode();
            assert_eq!(Stash::decode(&b), Some(s));
            for cut in 0..b.len() {
                assert!(Stash::decode(&b[..cut]).is_none());
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Stash::decode(&longer).is_none());
        }
        assert!(Stash::decode(b"IDMSHFT1xxxxxxxxxxxxxxxxxxxxxxxx").is_none());
    }
}
