//! The ownership-shift walker on real ext4 images, as root, each test in its
//! own private mount namespace.
//!
//! Needs: mkfs.ext4 (e2fsprogs), mount/umount (util-linux), setfacl/getfacl
//! (acl), getcap (libcap2-bin).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::TestFs;
use idmapped::chown::{
    read_record, shift_tree, unshift_tree, EntryAccess, OutOfRange, OutsideLinks, RecordState,
    ShiftOptions, ShiftReport,
};
use idmapped::error::ErrorKind;
use idmapped::map::Mapping;
use idmapped::{CloneFlags, DetachedMount, MountAttr, UserNamespace};
use rustix::fs::{self as rfs, FileType, Mode, OFlags, XattrFlags, CWD};

// ---------------------------------------------------------------- harness

fn run(cmd: &mut Command) -> String {
    let out = common::output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` divided by `IDMAPPED_TEST_SCALE` (the VMs, which emulate the CPU,
/// set 10), at least `min`: the same tests with smaller trees and fewer rounds.
fn scaled(n: usize, min: usize) -> usize {
    let d: usize = std::env::var("IDMAPPED_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    (n / d).max(min)
}

fn map(spec: &str) -> Mapping {
    Mapping::parse_map_mount([spec]).expect("mapping")
}

fn opts(threads: usize) -> ShiftOptions {
    ShiftOptions {
        threads,
        ..ShiftOptions::default()
    }
}

fn shift(root: &Path, m: &Mapping, o: &ShiftOptions) -> ShiftReport {
    shift_tree(root, m, o).unwrap_or_else(|e| panic!("shift {}: {e}", root.display()))
}

fn unshift(root: &Path, threads: usize) -> ShiftReport {
    unshift_tree(root, &opts(threads)).unwrap_or_else(|e| panic!("unshift {}: {e}", root.display()))
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("{p:?}: {e}"));
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A character device node, mode 0666.
fn char_device(p: &Path, major: u32, minor: u32) {
    rfs::mknodat(
        CWD,
        p,
        FileType::CharacterDevice,
        Mode::from_bits_truncate(0o666),
        rfs::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {p:?}: {e}"));
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

fn lget(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    match rfs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => None,
        Err(e) => panic!("lgetxattr {p:?} {name}: {e}"),
    }
}

fn lset(p: &Path, name: &str, v: &[u8]) {
    rfs::lsetxattr(p, name, v, XattrFlags::empty())
        .unwrap_or_else(|e| panic!("lsetxattr {p:?} {name}: {e}"));
}

// ------------------------------------------------- raw formats, for tests

const ACL_UNDEFINED: u32 = u32::MAX;

/// A version-2 POSIX ACL xattr value: owner, named users, group, named
/// groups, mask, other.
pub fn acl(
    owner: u16,
    users: &[(u32, u16)],
    group: u16,
    groups: &[(u32, u16)],
    other: u16,
) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    let mut e = |tag: u16, perm: u16, id: u32| {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    };
    e(0x01, owner, ACL_UNDEFINED);
    for &(id, p) in users {
        e(0x02, p, id);
    }
    e(0x04, group, ACL_UNDEFINED);
    for &(id, p) in groups {
        e(0x08, p, id);
    }
    if !users.is_empty() || !groups.is_empty() {
        e(0x10, 7, ACL_UNDEFINED);
    }
    e(0x20, other, ACL_UNDEFINED);
    v
}

/// A `security.capability` value: revision 2 for root id 0 (what the kernel
/// stores and returns for it), revision 3 otherwise.
pub fn caps(permitted: u32, rootid: u32) -> Vec<u8> {
    let rev: u32 = if rootid == 0 {
        0x0200_0001
    } else {
        0x0300_0001
    };
    let mut v = rev.to_le_bytes().to_vec();
    for w in [permitted, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    if rootid != 0 {
        v.extend_from_slice(&rootid.to_le_bytes());
    }
    v
}

// ------------------------------------------------------------- snapshots

/// What a tree shows of one entry: everything an idmapped mount translates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    /// `d`, `f`, `l`, `p` (fifo), `s`, `c`, `b`.
    pub kind: char,
    pub uid: u32,
    pub gid: u32,
    /// Full st_mode.
    pub mode: u32,
    pub acl_access: Option<Vec<u8>>,
    pub acl_default: Option<Vec<u8>>,
    pub cap: Option<Vec<u8>>,
    /// The walker's crash stash: must never survive a finished run.
    pub stash: Option<Vec<u8>>,
}

/// Snapshot a tree (relative path → [`Snap`]), never following symlinks.
/// Iterative, so deep trees do not overflow the stack (paths must stay
/// under PATH_MAX, though).
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_fifo() {
            'p'
        } else if ft.is_socket() {
            's'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else {
            'f'
        };
        let x = |n| if kind == 'l' { None } else { lget(&p, n) };
        out.insert(
            rel.clone(),
            Snap {
                kind,
                uid: md.uid(),
                gid: md.gid(),
                mode: md.mode(),
                acl_access: x("system.posix_acl_access"),
                acl_default: x("system.posix_acl_default"),
                cap: x("security.capability"),
                stash: x("trusted.idmapped.shift"),
            },
        );
        if kind == 'd' {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

/// How an idmapped mount with `m` would show a tree snapshotted as `s`
/// (ids outside the mapping left as they are, as the walker's default
/// policy does; an idmapped mount would show 65534 for those).
pub fn expected_view(s: &BTreeMap<PathBuf, Snap>, m: &Mapping) -> BTreeMap<PathBuf, Snap> {
    let u = |id: u32| m.uids().seen(id).unwrap_or(id);
    let g = |id: u32| m.gids().seen(id).unwrap_or(id);
    let tacl = |v: &Vec<u8>| {
        let mut v = v.clone();
        let mut at = 4;
        while at + 8 <= v.len() {
            let tag = u16::from_le_bytes([v[at], v[at + 1]]);
            let id = u32::from_le_bytes(v[at + 4..at + 8].try_into().unwrap());
            let new = match tag {
                0x02 => u(id),
                0x08 => g(id),
                _ => id,
            };
            v[at + 4..at + 8].copy_from_slice(&new.to_le_bytes());
            at += 8;
        }
        v
    };
    let tcap = |v: &Vec<u8>| {
        let root = if v.len() == 24 {
            u32::from_le_bytes(v[20..24].try_into().unwrap())
        } else {
            0
        };
        let perm = u32::from_le_bytes(v[4..8].try_into().unwrap());
        caps(perm, u(root))
    };
    s.iter()
        .map(|(p, e)| {
            (
                p.clone(),
                Snap {
                    uid: u(e.uid),
                    gid: g(e.gid),
                    acl_access: e.acl_access.as_ref().map(tacl),
                    acl_default: e.acl_default.as_ref().map(tacl),
                    cap: e.cap.as_ref().map(tcap),
                    ..e.clone()
                },
            )
        })
        .collect()
}

fn assert_same(a: &BTreeMap<PathBuf, Snap>, b: &BTreeMap<PathBuf, Snap>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: entry count");
    let mut bad = 0;
    for (p, x) in a {
        let y = &b[p];
        if x != y {
            if bad < 10 {
                eprintln!("{what}: {p:?}\n  want {x:?}\n  have {y:?}");
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{what}: {bad} entries differ");
}

// ------------------------------------------------------ random trees

/// xorshift64*: a seeded, dependency-free generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Build a random tree of `n` entries under `root` (which must exist) with
/// every kind the walker meets: directories (some setgid, some with default
/// ACLs), files (some setuid/setgid, with access ACLs, with v2 or v3
/// capabilities), symlinks (into the tree, outside it, dangling), fifos,
/// sockets, character devices, hard links. Ids are mostly below 3000;
/// `out_of_range_pct` percent are 200000+ (outside `b:0:100000:65536`).
pub fn random_tree(root: &Path, seed: u64, n: usize, out_of_range_pct: u64) {
    random_tree_shaped(root, seed, n, out_of_range_pct, 15);
}

/// [`random_tree`] where only `dir_pct` % of the entries are directories
/// (15 in `random_tree`); the others that would have been become files.
/// Few directories means large ones, which the walker splits across workers.
pub fn random_tree_shaped(root: &Path, seed: u64, n: usize, out_of_range_pct: u64, dir_pct: u64) {
    let mut r = Rng::new(seed);
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    let id = |r: &mut Rng| {
        if r.chance(out_of_range_pct) {
            200_000 + r.below(1000) as u32
        } else {
            r.below(3000) as u32
        }
    };
    for i in 0..n {
        // Prefer recent directories: gives depth as well as width.
        let d = if r.chance(60) {
            dirs.len() - 1 - (r.below(dirs.len().min(8) as u64) as usize)
        } else {
            r.below(dirs.len() as u64) as usize
        };
        let p = dirs[d].join(format!("e{i}"));
        let (uid, gid) = (id(&mut r), id(&mut r));
        let roll = match r.below(100) {
            roll if roll < 15 && roll >= dir_pct => 15,
            roll => roll,
        };
        match roll {
            0..=14 => {
                fs::create_dir(&p).unwrap();
                lchown(&p, uid, gid);
                if r.chance(10) {
                    lset(
                        &p,
                        "system.posix_acl_default",
                        &acl(7, &[(id(&mut r), 5)], 5, &[(id(&mut r), 7)], 0),
                    );
                }
                if r.chance(10) {
                    lset(
                        &p,
                        "system.posix_acl_access",
                        &acl(7, &[(id(&mut r), 5)], 5, &[], 5),
                    );
                }
                if r.chance(10) {
                    chmod(&p, 0o2775);
                }
                dirs.push(p);
            }
            15..=64 => {
                fs::write(&p, i.to_string()).unwrap();
                lchown(&p, uid, gid);
                if r.chance(8) {
                    let users = [(id(&mut r), 4), (id(&mut r) + 3000, 6)];
                    lset(
                        &p,
                        "system.posix_acl_access",
                        &acl(6, &users, 4, &[(id(&mut r), 4)], 4),
                    );
                }
                if r.chance(6) {
                    chmod(&p, [0o4755, 0o2755, 0o6755, 0o2745][r.below(4) as usize]);
                }
                if r.chance(5) {
                    let root = if r.chance(50) { 0 } else { id(&mut r) };
                    lset(&p, "security.capability", &caps(1 << r.below(32), root));
                }
                files.push(p);
            }
            65..=74 => {
                let target = match r.below(3) {
                    0 => PathBuf::from("/etc/passwd"),
                    1 => PathBuf::from("../nowhere"),
                    _ => files.last().cloned().unwrap_or_else(|| PathBuf::from("/")),
                };
                symlink(target, &p).unwrap();
                lchown(&p, uid, gid);
            }
            75..=79 => {
                rfs::mkfifoat(CWD, &p, Mode::from_bits_truncate(0o640)).unwrap();
                lchown(&p, uid, gid);
                if r.chance(20) {
                    lset(
                        &p,
                        "system.posix_acl_access",
                        &acl(6, &[(id(&mut r), 6)], 4, &[], 0),
                    );
                }
            }
            80..=89 if !files.is_empty() => {
                let f = &files[r.below(files.len() as u64) as usize];
                fs::hard_link(f, &p).unwrap();
            }
            90..=94 => {
                rfs::mknodat(
                    CWD,
                    &p,
                    FileType::Socket,
                    Mode::from_bits_truncate(0o600),
                    0,
                )
                .unwrap();
                lchown(&p, uid, gid);
            }
            _ => {
                let dev = rfs::makedev(1, 3);
                rfs::mknodat(
                    CWD,
                    &p,
                    FileType::CharacterDevice,
                    Mode::from_bits_truncate(0o666),
                    dev,
                )
                .unwrap();
                lchown(&p, uid, gid);
                if r.chance(20) {
                    chmod(&p, 0o4666);
                }
            }
        }
    }
}

const MAP: &str = "b:0:100000:65536";

// ------------------------------------------------------------------ tests

#[test]
fn random_tree_shift_matches_view_and_inverse_restores_bytes() {
    privileged!();
    let fs = TestFs::ext4_sized(256, 65536);
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    random_tree(&root, 0xC0FFEE, scaled(5000, 500), 3);
    let before = snapshot(&root);
    for kind in ['d', 'f', 'l', 'p', 's', 'c'] {
        assert!(before.values().any(|s| s.kind == kind), "no {kind} in tree");
    }
    assert!(before.values().any(|s| s.cap.is_some()));
    assert!(before.values().any(|s| s.acl_default.is_some()));
    assert!(before
        .values()
        .any(|s| s.mode & 0o6000 != 0 && s.kind == 'f'));

    let rep = shift(&root, &map(MAP), &opts(0));
    assert_eq!(rep.visited as usize, before.len(), "{rep:?}");
    // Nothing moved: the settling passes prove the tree complete without
    // calling it changed (with coarse timestamps too, after a clock tick).
    assert!(!rep.tree_changed && !rep.tree_unsettled, "{rep:?}");
    assert!(
        rep.hardlinks_deduplicated > 0 && rep.acls_rewritten > 0 && rep.capabilities_rewritten > 0,
        "{rep:?}"
    );
    assert!(rep.out_of_range > 0, "{rep:?}");
    let after = snapshot(&root);
    assert_same(
        &expected_view(&before, &map(MAP)),
        &after,
        "shifted tree vs expected view",
    );

    let again = shift(&root, &map(MAP), &opts(0));
    assert!(
        again.completed_before && again.visited == 0,
        "second run: {again:?}"
    );
    assert_same(&after, &snapshot(&root), "second run");

    unshift(&root, 3);
    assert_same(&before, &snapshot(&root), "unshift");
}

/// The point of the walker: after the shift, the tree on disk shows exactly
/// what an idmapped mount with the same mapping showed before it — owners,
/// modes, raw ACL and capability bytes (the kernel translates both on
/// getxattr through an idmapped mount).
#[test]
fn shifted_tree_equals_the_idmapped_mount_view() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4_sized(256, 65536);
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    // No ids outside the mapping: for those the idmapped mount shows 65534
    // and the default walker policy keeps them (see out_of_range_policies).
    random_tree(&root, 0x1D3A9, scaled(4000, 500), 0);
    let view = fs.scratch("view");
    let ns = UserNamespace::from_mapping(&map(MAP)).unwrap();
    DetachedMount::clone_with(&root, CloneFlags::empty(), &MountAttr::new().idmap(&ns))
        .unwrap()
        .attach(&view)
        .unwrap();
    let mut idmapped_view = snapshot(&view);
    rustix::mount::unmount(&view, rustix::mount::UnmountFlags::empty()).unwrap();
    acls_as_the_kernel_means_them(&mut idmapped_view, &snapshot(&root), &map(MAP));
    assert!(idmapped_view.values().any(|s| s.cap.is_some()));
    assert!(idmapped_view.values().any(|s| s.acl_access.is_some()));

    let rep = shift(&root, &map(MAP), &opts(0));
    assert_eq!(rep.out_of_range, 0, "{rep:?}");
    assert_same(
        &idmapped_view,
        &snapshot(&root),
        "idmapped view vs shifted tree",
    );
}

/// Large directories are split across idle workers: the result must be the
/// same as with small ones (view, second run, inverse restores the bytes).
#[test]
fn large_directories_split_across_workers() {
    privileged!();
    let fs = TestFs::ext4_sized(256, 65536);
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    // ~12,000 entries in ~12 directories: about 1,000 names each.
    random_tree_shaped(&root, 0x5B11, 12_000, 3, 0);
    for i in 0..11 {
        let sub = root.join(format!("big{i}"));
        fs::create_dir(&sub).unwrap();
        random_tree_shaped(&sub, 0x5B12 + i, 1_000, 3, 0);
    }
    let before = snapshot(&root);
    let rep = shift(&root, &map(MAP), &opts(0));
    assert_eq!(rep.visited as usize, before.len(), "{rep:?}");
    assert_same(
        &expected_view(&before, &map(MAP)),
        &snapshot(&root),
        "shifted large directories vs expected view",
    );
    assert!(shift(&root, &map(MAP), &opts(0)).completed_before);
    unshift(&root, 2);
    assert_same(
        &before,
        &snapshot(&root),
        "inverse shift of large directories",
    );
}

#[test]
fn symlinks_to_outside_are_not_followed() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let outside = fs.root.join("outside");
    let root = fs.root.join("tree");
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::create_dir(&root).unwrap();
    fs::write(outside.join("file"), "x").unwrap();
    fs::write(outside.join("dir/inner"), "x").unwrap();
    for p in [
        &outside,
        &outside.join("file"),
        &outside.join("dir"),
        &outside.join("dir/inner"),
    ] {
        lchown(p, 1000, 1000);
    }
    lset(
        &outside.join("file"),
        "system.posix_acl_access",
        &acl(6, &[(1000, 4)], 4, &[], 4),
    );
    symlink(outside.join("file"), root.join("to-file")).unwrap();
    symlink(outside.join("dir"), root.join("to-dir")).unwrap();
    symlink("../outside/dir", root.join("rel-dir")).unwrap();
    lchown(&root.join("to-file"), 1000, 1000);
    let out_before = snapshot(&outside);

    let rep = shift(&root, &map(MAP), &opts(2));
    assert_eq!(rep.visited, 4, "{rep:?}");
    assert_same(&out_before, &snapshot(&outside), "outside");
    assert_eq!(
        owner(&root.join("to-file")),
        (101000, 101000),
        "the symlink itself is shifted"
    );
    assert_eq!(owner(&root.join("to-dir")), (100000, 100000));
}

#[test]
fn attacker_swapping_a_directory_for_a_symlink_never_gets_outside_changed() {
    privileged!();
    let fs = TestFs::ext4_sized(128, 16384);
    let outside = fs.root.join("outside");
    let root = fs.root.join("tree");
    let build = |d: &Path| {
        fs::create_dir_all(d.join("sub/deeper")).unwrap();
        for i in 0..200 {
            let f = d.join(format!("f{i}"));
            fs::write(&f, "x").unwrap();
            if i % 10 == 0 {
                chmod(&f, 0o4755);
            }
            if i % 10 == 5 {
                lset(
                    &f,
                    "system.posix_acl_access",
                    &acl(6, &[(1000, 4)], 4, &[], 4),
                );
            }
            fs::write(d.join(format!("sub/g{i}")), "x").unwrap();
        }
        fs::write(d.join("sub/deeper/h"), "x").unwrap();
        run(Command::new("chown").args(["-hR", "1000:1000"]).arg(d));
    };
    fs::create_dir(&root).unwrap();
    build(&outside);
    build(&root.join("victim"));
    symlink(&outside, root.join("swap")).unwrap();
    let out_before = snapshot(&outside);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (stop, swaps, root) = (stop.clone(), swaps.clone(), root.clone());
        std::thread::spawn(move || {
            let d = rfs::open(&root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                rfs::renameat_with(&d, "victim", &d, "swap", rfs::RenameFlags::EXCHANGE).unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let (mut walks, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (swaps.load(Ordering::Relaxed) < 2000 || walks < 200) && Instant::now() < deadline {
        // Shift and unshift in turn (an unfinished one is finished first).
        let r = match read_record(&root).unwrap() {
            Some(rec) if rec.state != RecordState::Running => unshift_tree(&root, &opts(2)),
            _ => shift_tree(&root, &map(MAP), &opts(2)),
        };
        match r {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::TreeChanged(_)) => refused += 1,
            Err(e) => panic!("walk failed other than TreeChanged: {e}"),
        }
        walks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
    let n = swaps.load(Ordering::Relaxed);
    eprintln!("{walks} walks ({refused} stopped with TreeChanged) during {n} swaps");
    assert!(n >= 1000, "only {n} swaps");
    assert_same(&out_before, &snapshot(&outside), "outside after the race");
}

#[test]
fn mounts_inside_the_tree_are_not_crossed() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let root = fs.root.join("tree");
    let outside = fs.root.join("outside-file");
    fs::create_dir_all(root.join("mnt")).unwrap();
    fs::write(root.join("bound"), "under").unwrap();
    fs::write(&outside, "outside").unwrap();
    lchown(&outside, 1000, 1000);
    run(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(root.join("mnt")));
    fs::write(root.join("mnt/inner"), "x").unwrap();
    lchown(&root.join("mnt/inner"), 1000, 1000);
    lchown(&root.join("mnt"), 1000, 1000);
    run(Command::new("mount")
        .arg("--bind")
        .arg(&outside)
        .arg(root.join("bound")));

    let rep = shift(&root, &map(MAP), &opts(2));
    assert_eq!(rep.skipped_mounts, 2, "{rep:?}");
    assert_eq!(owner(&root.join("mnt")), (1000, 1000));
    assert_eq!(owner(&root.join("mnt/inner")), (1000, 1000));
    assert_eq!(owner(&outside), (1000, 1000), "file bind mount source");
    assert_eq!(owner(&root), (100000, 100000));

    let cross = ShiftOptions {
        cross_mounts: true,
        ..opts(2)
    };
    // Each directory mount is a tree of its own with its own record: the
    // root's is done (O(1)), the tmpfs is shifted now. A file bind mount is
    // never shifted (its source may well be outside the tree, as here).
    let rep = shift(&root, &map(MAP), &cross);
    assert_eq!(rep.skipped_mounts, 1, "{rep:?}");
    assert_eq!(rep.mounts_shifted.len(), 2, "{rep:?}");
    assert_eq!(owner(&root.join("mnt/inner")), (101000, 101000));
    assert_eq!(owner(&outside), (1000, 1000));
    assert!(read_record(&root.join("mnt")).unwrap().is_some());
    let _ = rustix::mount::unmount(root.join("bound"), rustix::mount::UnmountFlags::empty());
    let _ = rustix::mount::unmount(root.join("mnt"), rustix::mount::UnmountFlags::empty());
}

#[test]
fn hard_links_are_shifted_once() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let root = fs.root.join("tree");
    for d in ["a", "b", "c"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let f = root.join("a/f");
    fs::write(&f, "x").unwrap();
    lchown(&f, 1000, 2000);
    chmod(&f, 0o4755);
    lset(&f, "security.capability", &caps(1 << 12, 0));
    for (i, d) in ["a", "b", "c", "b", "c"].iter().enumerate() {
        fs::hard_link(&f, root.join(d).join(format!("link{i}"))).unwrap();
    }
    let rep = shift(&root, &map(MAP), &opts(0));
    assert_eq!(rep.hardlinks_deduplicated, 5, "{rep:?}");
    assert_eq!(rep.capabilities_rewritten, 1, "{rep:?}");
    assert_eq!(owner(&f), (101000, 102000));
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o4755);
    assert_eq!(lget(&f, "security.capability"), Some(caps(1 << 12, 100000)));
}

#[test]
fn out_of_range_policies() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let m = map("b:1000:101000:1000");
    let mk = |name: &str| {
        let root = fs.root.join(name);
        fs::create_dir(&root).unwrap();
        lchown(&root, 1000, 1000);
        fs::write(root.join("in"), "").unwrap();
        lchown(&root.join("in"), 1500, 1500);
        fs::write(root.join("out"), "").unwrap();
        lchown(&root.join("out"), 5, 1999);
        lset(
            &root.join("in"),
            "system.posix_acl_access",
            &acl(6, &[(7, 4), (1001, 4)], 4, &[], 4),
        );
        root
    };

    let keep = mk("keep");
    let rep = shift(&keep, &m, &opts(1));
    assert_eq!(rep.out_of_range, 2, "{rep:?}");
    assert_eq!(owner(&keep.join("out")), (5, 101999));
    assert_eq!(owner(&keep.join("in")), (101500, 101500));
    assert_eq!(
        lget(&keep.join("in"), "system.posix_acl_access"),
        Some(acl(6, &[(7, 4), (101001, 4)], 4, &[], 4))
    );
    unshift(&keep, 1);
    assert_eq!(owner(&keep.join("out")), (5, 1999), "Keep is reversible");

    let fail = mk("fail");
    let o = ShiftOptions {
        out_of_range: OutOfRange::Fail,
        ..opts(1)
    };
    let e = shift_tree(&fail, &m, &o).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::IdOutOfRange {
                kind: "uid",
                id: 5 | 7,
                count: 2,
            }
        ),
        "{e}"
    );
    assert_eq!(
        owner(&fail),
        (1000, 1000),
        "root not shifted after a failure"
    );

    let over = mk("overflow");
    let o = ShiftOptions {
        out_of_range: OutOfRange::Overflow,
        ..opts(1)
    };
    let rep = shift(&over, &m, &o);
    assert_eq!(rep.out_of_range, 2, "{rep:?}");
    assert_eq!(owner(&over.join("out")), (65534, 101999));
    assert_eq!(
        lget(&over.join("in"), "system.posix_acl_access"),
        Some(acl(6, &[(65534, 4), (101001, 4)], 4, &[], 4))
    );
}

#[test]
fn setuid_setgid_and_capabilities_survive() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    let cases: [(&str, u32, Option<Vec<u8>>); 7] = [
        ("suid", 0o4755, None),
        ("sgid", 0o2755, None),
        ("both", 0o6711, None),
        ("sgid-nox", 0o2644, None),
        ("cap-v2", 0o755, Some(caps(1 << 13, 0))),
        ("cap-v3", 0o755, Some(caps(1 << 21, 1000))),
        ("suid-cap", 0o4750, Some(caps(1 << 7, 0))),
    ];
    for (name, mode, cap) in &cases {
        let p = root.join(name);
        fs::write(&p, "").unwrap();
        lchown(&p, 1000, 1000);
        chmod(&p, *mode);
        if let Some(c) = cap {
            lset(&p, "security.capability", c);
        }
    }
    let d = root.join("sgid-dir");
    fs::create_dir(&d).unwrap();
    lchown(&d, 1000, 1000);
    chmod(&d, 0o2775);

    shift(&root, &map(MAP), &opts(2));
    for (name, mode, cap) in &cases {
        let p = root.join(name);
        assert_eq!(owner(&p), (101000, 101000), "{name}");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, *mode, "{name}");
        let want = cap.as_ref().map(|c| {
            let root = if c.len() == 24 { 1000 } else { 0 };
            caps(
                u32::from_le_bytes(c[4..8].try_into().unwrap()),
                100000 + root,
            )
        });
        assert_eq!(lget(&p, "security.capability"), want, "{name}");
        assert_eq!(lget(&p, "trusted.idmapped.shift"), None, "{name}");
    }
    assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, 0o2775);
    // getcap agrees the v2 capability became a v3 one for root 100000.
    let out = run(Command::new("getcap").arg(root.join("cap-v2")));
    assert!(out.contains("cap_net_raw"), "{out}");

    unshift(&root, 2);
    for (name, mode, cap) in &cases {
        let p = root.join(name);
        assert_eq!(owner(&p), (1000, 1000), "{name}");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, *mode, "{name}");
        assert_eq!(
            lget(&p, "security.capability"),
            *cap,
            "{name}: bytes restored"
        );
    }
}

#[test]
fn acls_are_translated_as_getfacl_sees_them() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let root = fs.root.join("tree");
    fs::create_dir_all(root.join("d")).unwrap();
    fs::write(root.join("f"), "").unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:1000:r,u:2000:rw,g:3000:r,g:4000:rwx"])
        .arg(root.join("f")));
    run(Command::new("setfacl")
        .args(["-d", "-m", "u:1001:rwx,g:3001:rx"])
        .arg(root.join("d")));
    run(Command::new("setfacl")
        .args(["-m", "u:1002:rx"])
        .arg(root.join("d")));
    let rep = shift(&root, &map(MAP), &opts(1));
    assert_eq!(rep.acls_rewritten, 3, "{rep:?}");
    let f = run(Command::new("getfacl")
        .args(["-n", "-c"])
        .arg(root.join("f")));
    for want in [
        "user:101000:r--",
        "user:102000:rw-",
        "group:103000:r--",
        "group:104000:rwx",
    ] {
        assert!(f.contains(want), "{want} in\n{f}");
    }
    let d = run(Command::new("getfacl")
        .args(["-n", "-c"])
        .arg(root.join("d")));
    for want in [
        "default:user:101001:rwx",
        "default:group:103001:r-x",
        "user:101002:r-x",
    ] {
        assert!(d.contains(want), "{want} in\n{d}");
    }
}

#[test]
fn fifos_sockets_and_devices_are_never_opened() {
    privileged!();
    let fs = TestFs::ext4_sized(64, 4096);
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    // Each with something that forces the careful path (ACL, setuid): if the
    // walker opened the fifo for reading it would block for ever.
    let fifo = root.join("fifo");
    rfs::mkfifoat(CWD, &fifo, Mode::from_bits_truncate(0o644)).unwrap();
    lset(
        &fifo,
        "system.posix_acl_access",
        &acl(6, &[(1000, 4)], 4, &[], 4),
    );
    let fifo2 = root.join("fifo-suid");
    rfs::mkfifoat(CWD, &fifo2, Mode::from_bits_truncate(0o644)).unwrap();
    chmod(&fifo2, 0o4644);
    let tty = root.join("tty");
    char_device(&tty, 5, 0);
    lset(
        &tty,
        "system.posix_acl_access",
        &acl(6, &[(1000, 4)], 4, &[], 4),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let r2 = root.clone();
    std::thread::spawn(move || {
        let _ = tx.send(shift_tree(&r2, &map(MAP), &opts(1)).map(|r| r.visited));
    });
    let visited = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("walk blocked: a fifo or device was opened")
        .unwrap();
    assert_eq!(visited, 4);
    assert_eq!(owner(&fifo), (100000, 100000));
    assert_eq!(
        fs::symlink_metadata(&fifo2).unwrap().mode() & 0o7777,
        0o4644
    );
    assert_eq!(
        lget(&tty, "system.posix_acl_access"),
        Some(acl(6, &[(101000, 4)], 4, &[], 4))
    );
}

/// Whether `IDMAPPED_FORCE_FALLBACK` names `feature`.
fn forced_fallback(feature: &str) -> bool {
    std::env::var("IDMAPPED_FORCE_FALLBACK")
        .unwrap_or_default()
        .split(',')
        .any(|f| f.trim() == feature)
}

/// What `ShiftReport::entry_access` must say for a tree on a mount that is
/// not `nodev` and has no mount below it, found by probing as the library
/// chooses.
fn expected_access() -> EntryAccess {
    use idmapped::features::{features, Availability};
    let f = features();
    if forced_fallback("nodev_view")
        || f.openat2 != Availability::Available
        || f.mount_setattr != Availability::Available
    {
        EntryAccess::ProcPaths
    } else {
        EntryAccess::NodevClone
    }
}

/// A thread exchanging two names (`RENAME_EXCHANGE`) over and over, `pick`
/// choosing them (an index into `dirs` and a name in it, for each): it has
/// made 50 swaps when `start` returns, and makes at least 1,000 in all,
/// going on until `stop`.
struct ExchangeAttacker {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl ExchangeAttacker {
    fn start(
        dirs: &[&Path],
        seed: u64,
        mut pick: impl FnMut(&mut Rng) -> ((usize, String), (usize, String)) + Send + 'static,
    ) -> ExchangeAttacker {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let dirs: Vec<_> = dirs
            .iter()
            .map(|d| rfs::open(*d, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap())
            .collect();
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                let mut r = Rng::new(seed);
                while !stop.load(Ordering::Relaxed) || swaps.load(Ordering::Relaxed) < 1000 {
                    let (a, b) = pick(&mut r);
                    if a != b
                        && rfs::renameat_with(
                            &dirs[a.0],
                            a.1.as_str(),
                            &dirs[b.0],
                            b.1.as_str(),
                            rfs::RenameFlags::EXCHANGE,
                        )
                        .is_ok()
                    {
                        swaps.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        while swaps.load(Ordering::Relaxed) < 50 {
            std::hint::spin_loop();
        }
        ExchangeAttacker {
            stop,
            swaps,
            thread,
        }
    }

    fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }

    /// Stop (after 1,000 swaps at least); the number made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.swaps.load(Ordering::Relaxed)
    }
}

/// IN_OPEN events queued on a non-blocking inotify descriptor.
fn opens_seen(inotify: &rustix::fd::OwnedFd) -> usize {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = rfs::inotify::Reader::new(inotify, &mut buf);
    let mut n = 0;
    while let Ok(ev) = reader.next() {
        if ev.events().contains(rfs::inotify::ReadFlags::OPEN) {
            n += 1;
        }
    }
    n
}

#[test]
fn a_device_swapped_in_for_a_file_is_never_opened() {
    privileged!();
    // Regular files are opened for reading (their xattr calls then take the
    // descriptor) only through a nodev view, so a device node an attacker
    // exchanges into a regular file's name fails to open before its driver
    // runs. inotify sees every successful open of the node (O_PATH ones
    // excepted), whoever makes it.
    let fs = TestFs::ext4_sized(64, 8192);
    let m = map(MAP);
    let runs = scaled(6, 2) as u64;
    let mut total_swaps = 0;
    for run in 0..runs {
        let d = fs.root.join(format!("t{run}"));
        fs::create_dir(&d).unwrap();
        const N: usize = 400;
        for i in 0..N {
            fs::write(d.join(format!("f{i}")), format!("F{i}")).unwrap();
        }
        let dev = d.join("dev");
        char_device(&dev, 1, 3);
        let inotify = rfs::inotify::init(
            rfs::inotify::CreateFlags::NONBLOCK | rfs::inotify::CreateFlags::CLOEXEC,
        )
        .unwrap();
        rfs::inotify::add_watch(&inotify, &dev, rfs::inotify::WatchFlags::OPEN).unwrap();
        // The watch works: our own open of the node is seen.
        drop(fs::File::open(&dev).unwrap());
        assert_eq!(
            opens_seen(&inotify),
            1,
            "inotify does not see opens of {dev:?}"
        );

        let attacker = ExchangeAttacker::start(&[&d], run + 7, |r| {
            (
                (0, "dev".to_string()),
                (0, format!("f{}", r.below(N as u64))),
            )
        });
        let rep = shift_tree(&d, &m, &opts(2));
        total_swaps += attacker.stop();
        let rep = rep.unwrap_or_else(|e| panic!("run {run}: walk failed under attack: {e}"));
        assert_eq!(
            opens_seen(&inotify),
            0,
            "run {run}: the walker opened the device node"
        );
        assert_eq!(rep.entry_access, expected_access(), "run {run}");
        // Every entry, the device included, shifted exactly once.
        for e in fs::read_dir(&d).unwrap() {
            let md = fs::symlink_metadata(e.unwrap().path()).unwrap();
            assert_eq!((md.uid(), md.gid()), (100000, 100000), "run {run}");
        }
    }
    eprintln!("{runs} runs, {total_swaps} swaps");
}

#[test]
fn entry_access_follows_the_mount() {
    privileged!();
    let m = map(MAP);
    // A mount that is not nodev, nothing below the tree: a nodev clone.
    let fs = TestFs::ext4_sized(64, 4096);
    let a = fs.root.join("a");
    fs::create_dir(&a).unwrap();
    fs::write(a.join("f"), "x").unwrap();
    assert_eq!(shift(&a, &m, &opts(1)).entry_access, expected_access());
    // The caller can rule out opens for reading.
    let pinned = fs.root.join("pinned");
    fs::create_dir(&pinned).unwrap();
    fs::write(pinned.join("f"), "x").unwrap();
    let o = ShiftOptions {
        pin_only: true,
        ..opts(1)
    };
    assert_eq!(shift(&pinned, &m, &o).entry_access, EntryAccess::ProcPaths);
    assert_eq!(owner(&pinned.join("f")), (100000, 100000));
    // A mount below the tree: a clone would show what it covers, so O_PATH
    // pins and /proc paths.
    let b = fs.root.join("b");
    fs::create_dir_all(b.join("sub")).unwrap();
    fs::write(b.join("f"), "x").unwrap();
    let inner = TestFs::tmpfs();
    run(Command::new("mount")
        .arg("--bind")
        .arg(&inner.root)
        .arg(b.join("sub")));
    let rep = shift(&b, &m, &opts(1));
    assert_eq!(rep.entry_access, EntryAccess::ProcPaths);
    assert_eq!(rep.skipped_mounts, 1);
    assert_eq!(owner(&b.join("f")), (100000, 100000));
    run(Command::new("umount").arg(b.join("sub")));
    // A nodev mount: opened for reading on the mount itself (if openat2 works).
    let nodev = TestFs::tmpfs();
    run(Command::new("mount")
        .args(["-o", "remount,bind,nodev"])
        .arg(&nodev.root));
    let c = nodev.root.join("c");
    fs::create_dir(&c).unwrap();
    fs::write(c.join("f"), "x").unwrap();
    let f = idmapped::features::features();
    let want = if forced_fallback("nodev_view")
        || f.openat2 != idmapped::features::Availability::Available
    {
        EntryAccess::ProcPaths
    } else {
        EntryAccess::NodevMount
    };
    assert_eq!(shift(&c, &m, &opts(1)).entry_access, want);
    assert_eq!(owner(&c.join("f")), (100000, 100000));
}

#[test]
fn second_run_changes_nothing_and_dry_run_changes_nothing() {
    privileged!();
    let fs = TestFs::ext4_sized(128, 32768);
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    random_tree(&root, 7, scaled(3000, 500), 0);
    let before = snapshot(&root);
    let dry = ShiftOptions {
        dry_run: true,
        ..opts(0)
    };
    let d = shift(&root, &map(MAP), &dry);
    assert_same(&before, &snapshot(&root), "dry run");
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    let o = ShiftOptions {
        progress: Some(Arc::new(move |_p: &idmapped::chown::Progress| {
            c2.fetch_add(1, Ordering::Relaxed);
        })),
        ..opts(0)
    };
    let first = shift(&root, &map(MAP), &o);
    assert_eq!(d.changed, first.changed, "dry run predicts the run");
    assert!(first.changed > 0 && calls.load(Ordering::Relaxed) > 0);
    let second = shift(&root, &map(MAP), &opts(0));
    eprintln!("first {first:?}\nsecond {second:?}");
    // O(1): the record says this shift is done; nothing is walked.
    assert!(second.completed_before, "{second:?}");
    assert_eq!((second.changed, second.visited), (0, 0));
}

// ----------------------------------------------- child-process tests

const CHILD_ROOT: &str = "IDMAPPED_TEST_CHILD_ROOT";
const CHILD_MAP: &str = "IDMAPPED_TEST_CHILD_MAP";
const CHILD_NOFILE: &str = "IDMAPPED_TEST_CHILD_NOFILE";

/// Not a test on its own: the body of the child processes that
/// `crash_safety_*` kills and `deep_tree_*` limits. Runs a shift when the
/// parent's environment says so.
#[test]
#[ignore = "helper: the crash and deep-tree tests run it in a child process"]
fn child_shift_helper() {
    let (Ok(root), Ok(m)) = (std::env::var(CHILD_ROOT), std::env::var(CHILD_MAP)) else {
        eprintln!(
            "child_shift_helper: helper for the crash and deep-tree tests; nothing to do alone"
        );
        return;
    };
    if let Ok(n) = std::env::var(CHILD_NOFILE) {
        let n: u64 = n.parse().unwrap();
        rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(n),
                maximum: Some(n),
            },
        )
        .unwrap();
    }
    // The crash tests aim their kills from this line (start-up, which
    // under emulation dwarfs the walk, is behind it).
    println!("{CHILD_WALKS}");
    let t = Instant::now();
    let rep = shift(Path::new(&root), &map(&m), &opts(0));
    println!("CHILD-REPORT {} {rep:?}", t.elapsed().as_nanos());
}

const CHILD_WALKS: &str = "CHILD-WALKS";

fn child(root: &Path, m: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "child_shift_helper",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ROOT, root)
    .env(CHILD_MAP, m);
    c
}

#[test]
fn crash_safety_sigkill_at_random_points() {
    privileged!();
    crash_test(MAP, scaled(40_500, 3000), scaled(12, 5));
}

/// The same with a mapping whose on-disk and seen ranges overlap (each id
/// shifts by one): a double shift or a missed entry would show.
#[test]
fn crash_safety_sigkill_with_an_overlapping_mapping() {
    privileged!();
    crash_test("b:0:1:65536", scaled(20_000, 2000), scaled(10, 5));
}

fn crash_test(mapping: &str, entries: usize, kills: usize) {
    let fs = TestFs::ext4_sized(768, 200_000);
    let a = fs.root.join("a");
    let b = fs.root.join("b");
    for d in [&a, &b] {
        fs::create_dir(d).unwrap();
        random_tree(d, 42, entries, 2);
    }
    let t = Instant::now();
    let ra = shift(&a, &map(mapping), &opts(0));
    let full = t.elapsed();
    assert!(ra.visited as usize >= entries - 1000, "{ra:?}");
    eprintln!("uninterrupted: {ra:?}");

    let mut r = Rng::new(1234);
    let (mut killed, mut finished, mut recovered, mut resumed) = (0, 0, 0, 0u64);
    // Each kill is aimed at a random point of the child's walk, timed from
    // the line it prints just before the walk (start-up, which under
    // emulation dwarfs the walk, is behind it). The window is the walk time
    // the last child that walked a fresh tree measured itself, so on a
    // loaded or emulated machine the aim adapts instead of every child
    // finishing first. It never shrinks below a walk: a kill that lands
    // early (while the run picks its ctime threshold, before it changed
    // anything) leaves a record the next run starts afresh from, and
    // aiming earlier would only make that likelier.
    let mut window = full;
    // Every run that finishes changed the tree (a fresh walk or a resumed
    // one), so the tree is made again unless the test is done: each kill
    // interrupts real work. The test is done when enough kills landed and
    // the run after the last one resumed it (the tree then is what killed
    // and resumed runs made). With enough kills, the next child is let
    // finish; if it walked afresh (the kill was early), one more is killed.
    let mut last_killed = false;
    let mut done = false;
    let mut fresh_trees = 0;
    for _ in 0..400 {
        let aim = killed < kills || !last_killed;
        let mut ch = child(&b, mapping)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(ch.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains(CHILD_WALKS) {
            line.clear();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "the child ended before walking: {:?}", ch.wait());
        }
        if aim {
            std::thread::sleep(window.mul_f64(r.below(1000) as f64 / 1000.0));
            if ch.try_wait().unwrap().is_none() {
                ch.kill().unwrap();
                ch.wait().unwrap();
                killed += 1;
                last_killed = true;
                continue;
            }
        }
        let st = ch.wait().unwrap();
        assert!(st.success(), "child failed: {st}");
        last_killed = false;
        finished += 1;
        // The report comes after the line already read.
        let mut report = String::new();
        std::io::Read::read_to_string(&mut out, &mut report).unwrap();
        let report = report
            .split("CHILD-REPORT ")
            .nth(1)
            .unwrap_or_else(|| panic!("no report from the child: {report:?}"));
        recovered += report
            .split("recovered: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if report.contains("completed_before: true") {
            // The kill landed after the walk had finished.
        } else if report.contains("resumed: true") {
            resumed += 1;
            if killed >= kills {
                done = true;
                break;
            }
        } else {
            let walk_ns: u64 = report.split(' ').next().unwrap().parse().unwrap();
            window = Duration::from_nanos(walk_ns);
        }
        fs::remove_dir_all(&b).unwrap();
        fs::create_dir(&b).unwrap();
        random_tree(&b, 42, entries, 2);
        fresh_trees += 1;
    }
    eprintln!(
        "{killed} children killed; {finished} finished, {resumed} of them resuming a killed \
         walk; the tree made again {fresh_trees} times; last window {window:?}; entries \
         recovered from a stash: {recovered}"
    );
    assert!(
        done,
        "no run resumed a walk after {kills} kills (400 children; {killed} killed, {resumed} resumed)"
    );
    let rb = shift(&b, &map(mapping), &opts(0));
    eprintln!("final run after the kills: {rb:?}");
    let (sa, sb) = (snapshot(&a), snapshot(&b));
    assert!(sb.values().all(|s| s.stash.is_none()), "stash left behind");
    assert_same(&sa, &sb, "killed-and-resumed vs uninterrupted");
}

#[test]
fn deep_tree_under_a_low_descriptor_limit() {
    privileged!();
    const DEPTH: usize = 10_500;
    let fs = TestFs::ext4_sized(256, 65536);
    let root = fs.root.join("deep");
    fs::create_dir(&root).unwrap();
    // Built and checked through descriptors: the paths exceed PATH_MAX.
    let mut d = rfs::open(&root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for i in 0..DEPTH {
        rfs::mkdirat(&d, "d", Mode::from_bits_truncate(0o755)).unwrap();
        if i % 100 == 0 {
            let f = rfs::openat(
                &d,
                format!("f{i}"),
                OFlags::CREATE | OFlags::WRONLY,
                Mode::from_bits_truncate(0o4755),
            )
            .unwrap();
            rfs::fchown(
                &f,
                Some(rfs::Uid::from_raw(1000)),
                Some(rfs::Gid::from_raw(1000)),
            )
            .unwrap();
            rfs::fchmod(&f, Mode::from_bits_truncate(0o4755)).unwrap();
        }
        rfs::chownat(
            &d,
            "d",
            Some(rfs::Uid::from_raw(1000)),
            Some(rfs::Gid::from_raw(1000)),
            rfs::AtFlags::empty(),
        )
        .unwrap();
        d = rfs::openat(&d, "d", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    }
    drop(d);
    let out = child(&root, MAP).env(CHILD_NOFILE, "48").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{}",
        stdout
            .lines()
            .find(|l| l.contains("CHILD-REPORT"))
            .unwrap_or("")
    );
    let mut d = rfs::open(&root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    for i in 0..DEPTH {
        if i % 100 == 0 {
            let st = rfs::statat(&d, format!("f{i}"), rfs::AtFlags::empty()).unwrap();
            assert_eq!(
                (st.st_uid, st.st_mode & 0o7777),
                (101000, 0o4755),
                "level {i}"
            );
        }
        let st = rfs::statat(&d, "d", rfs::AtFlags::empty()).unwrap();
        assert_eq!(st.st_uid, 101000, "level {i}");
        d = rfs::openat(&d, "d", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    }
    drop(d);
    // The tree is deeper than PATH_MAX; unmounting discards it with the image.
}

// ------------------------------------------- exactness, for every mapping

/// A random mapping the kernel accepts: 1–4 extents per kind, each a shift,
/// an identity extent or one half of a swap, overlapping on-disk and seen
/// ranges freely, within the ids `random_tree` uses (mostly < 3000).
fn random_idmap(r: &mut Rng) -> idmapped::IdMap {
    loop {
        let mut ext = Vec::new();
        for _ in 0..1 + r.below(4) {
            let n = 1 + r.below(1500) as u32;
            let a = r.below(3500) as u32;
            match r.below(4) {
                0 => ext.push((a, a, n)),
                1 => {
                    // a swap of two single ids
                    let b = r.below(3500) as u32;
                    ext.push((a, b, 1));
                    ext.push((b, a, 1));
                }
                2 => ext.push((a, a + 1, n)),
                _ => ext.push((
                    a,
                    r.below(3500) as u32 + [0, 100_000][r.below(2) as usize],
                    n,
                )),
            }
        }
        let ext: Result<Vec<_>, _> = ext
            .iter()
            .map(|&(a, b, n)| idmapped::Extent::new(a, b, n))
            .collect();
        if let Ok(m) = ext.and_then(idmapped::IdMap::new) {
            return m;
        }
    }
}

/// What `OutOfRange::Keep` should show: the kernel's view, except that an
/// id the mapping does not cover keeps its on-disk value where the view
/// shows 65534 (or hides the capability).
fn keep_view(
    before: &BTreeMap<PathBuf, Snap>,
    view: &BTreeMap<PathBuf, Snap>,
    m: &Mapping,
) -> BTreeMap<PathBuf, Snap> {
    let mut out = view.clone();
    for (p, b) in before {
        let v = out.get_mut(p).unwrap();
        if m.uids().seen(b.uid).is_none() {
            v.uid = b.uid;
        }
        if m.gids().seen(b.gid).is_none() {
            v.gid = b.gid;
        }
        for (orig, seen) in [
            (&b.acl_access, &mut v.acl_access),
            (&b.acl_default, &mut v.acl_default),
        ] {
            let (Some(o), Some(s)) = (orig, seen.as_mut()) else {
                continue;
            };
            let mut at = 4;
            while at + 8 <= o.len() {
                let tag = u16::from_le_bytes([o[at], o[at + 1]]);
                let id = u32::from_le_bytes(o[at + 4..at + 8].try_into().unwrap());
                let covered = match tag {
                    0x02 => m.uids().seen(id).is_some(),
                    0x08 => m.gids().seen(id).is_some(),
                    _ => true,
                };
                if !covered {
                    s[at + 4..at + 8].copy_from_slice(&id.to_le_bytes());
                }
                at += 8;
            }
        }
        if let Some(c) = &b.cap {
            let root = if c.len() == 24 {
                u32::from_le_bytes(c[20..24].try_into().unwrap())
            } else {
                0
            };
            if m.uids().seen(root).is_none() {
                v.cap = Some(c.clone());
            }
        }
    }
    out
}

/// On Linux 6.1 (seen in the test VM) `getxattr` of a POSIX ACL through an
/// idmapped mount returns the on-disk qualifiers untranslated, although its
/// permission checks translate them; 6.12, 6.18 and 7.3 (seen) return them
/// translated (6.2 reworked the kernel's POSIX ACL handling).
/// Found by probing: if the view's ACLs are byte-for-byte the on-disk ones
/// although the mapping moves some qualifier, take the ACLs the kernel's
/// permission checks use instead: each qualifier translated, an unmapped one
/// as 65534 (as [`kernel_view`] normalizes it).
fn acls_as_the_kernel_means_them(
    view: &mut BTreeMap<PathBuf, Snap>,
    on_disk: &BTreeMap<PathBuf, Snap>,
    m: &Mapping,
) {
    let tr = |v: &Vec<u8>| {
        let mut v = v.clone();
        let mut at = 4;
        while at + 8 <= v.len() {
            let tag = u16::from_le_bytes([v[at], v[at + 1]]);
            let id = u32::from_le_bytes(v[at + 4..at + 8].try_into().unwrap());
            let new = match tag {
                0x02 => m.uids().seen(id).unwrap_or(65534),
                0x08 => m.gids().seen(id).unwrap_or(65534),
                _ => id,
            };
            v[at + 4..at + 8].copy_from_slice(&new.to_le_bytes());
            at += 8;
        }
        v
    };
    let moves = on_disk.values().any(|s| {
        [&s.acl_access, &s.acl_default]
            .into_iter()
            .flatten()
            .any(|a| tr(a) != *a)
    });
    let raw = view.iter().all(|(p, s)| {
        s.acl_access == on_disk[p].acl_access && s.acl_default == on_disk[p].acl_default
    });
    if !(moves && raw) {
        return;
    }
    eprintln!("this kernel returns ACLs through an idmapped mount untranslated: comparing with the translation its permission checks use");
    for (p, s) in view.iter_mut() {
        s.acl_access = on_disk[p].acl_access.as_ref().map(tr);
        s.acl_default = on_disk[p].acl_default.as_ref().map(tr);
    }
}

/// The kernel's idmapped view of `root` with `m` (snapshot through a mount).
fn kernel_view(fs: &TestFs, root: &Path, m: &Mapping) -> BTreeMap<PathBuf, Snap> {
    let view = fs.scratch("view");
    let ns = UserNamespace::from_mapping(m).unwrap();
    DetachedMount::clone_with(root, CloneFlags::empty(), &MountAttr::new().idmap(&ns))
        .unwrap()
        .attach(&view)
        .unwrap();
    let mut v = snapshot_lenient(&view);
    rustix::mount::unmount(&view, rustix::mount::UnmountFlags::empty()).unwrap();
    // An unmapped ACL qualifier reads as 4294967295 through the mount (no
    // valid id; it matches nobody). That cannot be stored (the kernel
    // refuses an invalid id), so the walker writes the overflow id 65534,
    // as documented; compare on those terms.
    for s in v.values_mut() {
        for a in [&mut s.acl_access, &mut s.acl_default]
            .into_iter()
            .flatten()
        {
            let mut at = 4;
            while at + 8 <= a.len() {
                let tag = u16::from_le_bytes([a[at], a[at + 1]]);
                if (tag == 0x02 || tag == 0x08) && a[at + 4..at + 8] == [0xff; 4] {
                    a[at + 4..at + 8].copy_from_slice(&65534u32.to_le_bytes());
                }
                at += 8;
            }
        }
    }
    v
}

/// [`snapshot`], but an xattr the kernel refuses to show through an
/// idmapped mount (a capability whose root id is unmapped: EOVERFLOW)
/// counts as absent, which is what a reader through the mount gets.
fn snapshot_lenient(root: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let mut s = Snap {
            kind: 'f',
            uid: md.uid(),
            gid: md.gid(),
            mode: md.mode(),
            acl_access: None,
            acl_default: None,
            cap: None,
            stash: None,
        };
        let ft = md.file_type();
        if ft.is_symlink() {
            s.kind = 'l';
        } else {
            let get = |n: &str| {
                let mut buf = vec![0u8; 65536];
                rfs::lgetxattr(&p, n, &mut buf[..])
                    .ok()
                    .map(|k| buf[..k].to_vec())
            };
            s.acl_access = get("system.posix_acl_access");
            s.acl_default = get("system.posix_acl_default");
            s.cap = get("security.capability");
            s.stash = get("trusted.idmapped.shift");
        }
        if ft.is_dir() {
            s.kind = 'd';
            let list = fs::read_dir(&p).unwrap_or_else(|e| {
                panic!(
                    "{p:?} (mode {:o}, {}:{}): {e}",
                    md.mode(),
                    md.uid(),
                    md.gid()
                )
            });
            for e in list {
                todo.push(rel.join(e.unwrap().file_name()));
            }
        } else if !ft.is_symlink() && !ft.is_file() {
            s.kind = 'x';
        }
        out.insert(rel, s);
    }
    out
}

/// The differential test: for random mappings (overlapping ones, identity
/// extents, swaps) over random trees (ids inside and outside every range,
/// access and default ACLs, v2/v3 capabilities, setuid/setgid), the shifted
/// tree equals the kernel's idmapped view of the same tree exactly with
/// `overflow`, and the view with uncovered ids kept with `keep` — or `keep`
/// refuses (ACL collision) having changed nothing; then `unshift` restores
/// the original except ids reported as kept inside a seen range.
#[test]
fn differential_random_mappings_match_the_kernel_view() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4_sized(256, 65536);
    let seed0: u64 = std::env::var("IDMAPPED_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let cases: u64 = std::env::var("IDMAPPED_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(scaled(40, 8) as u64);
    let (mut refused, mut kept_seen) = (0, 0);
    for case in 0..cases {
        let seed = seed0 + case;
        let mut r = Rng::new(seed);
        let m = if r.chance(50) {
            let u = random_idmap(&mut r);
            Mapping::new(u.clone(), u)
        } else {
            Mapping::new(random_idmap(&mut r), random_idmap(&mut r))
        };
        let what = format!("seed {seed}, mapping {}", m.uids());
        let over = fs.root.join(format!("o{case}"));
        let keep = fs.root.join(format!("k{case}"));
        for d in [&over, &keep] {
            fs::create_dir(d).unwrap();
            random_tree(d, seed, 300, 3);
            // Root reads the view only where "other" may: through an
            // idmapped mount it has no DAC override on unmapped inodes.
            let mut dirs = vec![d.clone()];
            while let Some(dir) = dirs.pop() {
                let mode = fs::symlink_metadata(&dir).unwrap().mode();
                chmod(&dir, (mode & 0o7777) | 0o005);
                for e in fs::read_dir(&dir).unwrap() {
                    let e = e.unwrap();
                    if e.file_type().unwrap().is_dir() {
                        dirs.push(e.path());
                    }
                }
            }
        }
        let before = snapshot(&keep);
        let mut view = kernel_view(&fs, &over, &m);
        acls_as_the_kernel_means_them(&mut view, &snapshot(&over), &m);

        let o = ShiftOptions {
            out_of_range: OutOfRange::Overflow,
            ..opts(2)
        };
        shift(&over, &m, &o);
        assert_same(
            &view,
            &snapshot_lenient(&over),
            &format!("overflow vs kernel view, {what}"),
        );

        match shift_tree(&keep, &m, &opts(2)) {
            Ok(rep) => {
                assert_same(
                    &keep_view(&before, &view, &m),
                    &snapshot_lenient(&keep),
                    &format!("keep vs view with kept ids, {what}"),
                );
                let kept: std::collections::BTreeSet<PathBuf> = rep
                    .kept_in_seen_range
                    .iter()
                    .map(|k| k.path.strip_prefix(&keep).unwrap().to_path_buf())
                    .collect();
                kept_seen += kept.len();
                unshift(&keep, 2);
                assert!(read_record(&keep).unwrap().is_none(), "record removed");
                let after = snapshot(&keep);
                let differ: Vec<_> = before
                    .iter()
                    .filter(|(p, s)| after[*p] != **s)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in &differ {
                    // Hard links share the inode: any name of it may be reported.
                    let same_inode = |q: &PathBuf| {
                        fs::symlink_metadata(keep.join(q)).unwrap().ino()
                            == fs::symlink_metadata(keep.join(p)).unwrap().ino()
                    };
                    assert!(
                        kept.contains(p) || kept.iter().any(same_inode),
                        "unshift did not restore {p:?} (not reported as kept): {what}\n  was {:?}\n  now {:?}",
                        before[p],
                        after[p]
                    );
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::AclCollision { .. }) => {
                refused += 1;
                assert_same(
                    &before,
                    &snapshot(&keep),
                    &format!("refused keep changed something, {what}"),
                );
                assert!(
                    read_record(&keep).unwrap().is_none(),
                    "refused run left a record"
                );
            }
            Err(e) => panic!("keep failed: {e} ({what})"),
        }
        for d in [&over, &keep] {
            fs::remove_dir_all(d).unwrap();
        }
    }
    eprintln!("{cases} cases; keep refused for ACL collisions in {refused}; {kept_seen} kept ids inside a seen range");
}

/// The examples, one by one.
#[test]
fn ids_inside_a_seen_range_are_translated_not_assumed_shifted() {
    privileged!();
    let fs = TestFs::ext4();
    let m = map("b:0:1000:10");
    let over = ShiftOptions {
        out_of_range: OutOfRange::Overflow,
        ..opts(1)
    };
    // 1005 on disk is uncovered: the view shows 65534.
    let t = fs.root.join("a");
    fs::create_dir(&t).unwrap();
    fs::write(t.join("f"), "").unwrap();
    lchown(&t.join("f"), 1005, 1005);
    shift(&t, &m, &over);
    assert_eq!(owner(&t.join("f")), (65534, 65534));
    assert_eq!(owner(&t), (1000, 1000));

    // fail: exit naming the id and the count, nothing changed (no record).
    let t = fs.root.join("b");
    fs::create_dir(&t).unwrap();
    lchown(&t, 1001, 1001);
    for i in 0..5 {
        fs::write(t.join(format!("in{i}")), "").unwrap();
        lchown(&t.join(format!("in{i}")), 1001, 1001);
    }
    fs::write(t.join("out"), "").unwrap();
    lchown(&t.join("out"), 5000, 1001);
    let before = snapshot(&t);
    let m2 = map("b:1000:2000:10");
    let e = shift_tree(
        &t,
        &m2,
        &ShiftOptions {
            out_of_range: OutOfRange::Fail,
            ..opts(2)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::IdOutOfRange {
                kind: "uid",
                id: 5000,
                count: 1
            }
        ),
        "{e}"
    );
    assert!(e.path().unwrap().ends_with("out"), "{e}");
    assert_same(&before, &snapshot(&t), "fail changed something");
    assert!(read_record(&t).unwrap().is_none());

    // A v2 capability (root id 0) under b:1000:2000:10 b:5:0:1: 0 is
    // uncovered, so through the mount it grants nothing: removed.
    let t = fs.root.join("c");
    fs::create_dir(&t).unwrap();
    lchown(&t, 1000, 1000);
    fs::write(t.join("cap"), "").unwrap();
    lchown(&t.join("cap"), 1001, 1001);
    lset(&t.join("cap"), "security.capability", &caps(1 << 21, 0));
    let m3 = Mapping::parse_map_mount(["b:1000:2000:10", "b:5:0:1"]).unwrap();
    shift(&t, &m3, &over);
    assert_eq!(lget(&t.join("cap"), "security.capability"), None);
    assert_eq!(owner(&t.join("cap")), (2001, 2001));

    // Duplicate ACL entries: u:5 -> 1005 beside a kept 1005 is refused
    // before anything changes; with overflow both are as the view shows.
    let t = fs.root.join("d");
    fs::create_dir(&t).unwrap();
    fs::write(t.join("g"), "").unwrap();
    fs::write(t.join("f"), "").unwrap();
    lset(
        &t.join("f"),
        "system.posix_acl_access",
        &acl(6, &[(5, 4), (1005, 6)], 4, &[], 4),
    );
    let before = snapshot(&t);
    let e = shift_tree(&t, &m, &opts(1)).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::AclCollision {
                kind: "uid",
                id: 1005
            }
        ),
        "{e}"
    );
    assert!(e.path().unwrap().ends_with("f"), "{e}");
    assert_same(&before, &snapshot(&t), "refused keep changed something");
    shift(&t, &m, &over);
    assert_eq!(
        lget(&t.join("f"), "system.posix_acl_access"),
        Some(acl(6, &[(1005, 4), (65534, 6)], 4, &[], 4))
    );
}

#[test]
fn swaps_identity_extents_and_shift_by_one_are_exact_and_undone() {
    privileged!();
    let fs = TestFs::ext4();
    for spec in [
        &["b:1000:1001:1", "b:1001:1000:1"][..],
        &["b:0:0:1000", "b:1000:5000:10"][..],
        &["b:0:1:65536"][..],
    ] {
        let m = Mapping::parse_map_mount(spec.iter().copied()).unwrap();
        let t = fs.root.join(spec[0].replace(':', "_"));
        fs::create_dir(&t).unwrap();
        for (i, id) in [0u32, 1, 999, 1000, 1001, 1005, 5000].iter().enumerate() {
            let p = t.join(format!("f{i}"));
            fs::write(&p, "").unwrap();
            lchown(&p, *id, *id);
        }
        let before = snapshot(&t);
        let rep = shift(&t, &m, &opts(2));
        for (p, s) in &before {
            let want = (
                m.uids().seen(s.uid).unwrap_or(s.uid),
                m.gids().seen(s.gid).unwrap_or(s.gid),
            );
            assert_eq!(owner(&t.join(p)), want, "{spec:?} {p:?}");
        }
        // Running it again changes nothing (a swap applied twice would undo itself).
        let again = shift(&t, &m, &opts(2));
        assert!(again.completed_before, "{again:?}");
        // The inverse mapping is refused, naming the recorded shift.
        if m.inverse() != m {
            let e = shift_tree(&t, &m.inverse(), &opts(2)).unwrap_err();
            match e.kind() {
                ErrorKind::ShiftRecorded { recorded, .. } => {
                    assert!(
                        recorded.contains(&spec[0][2..]) && recorded.contains("finished"),
                        "{e}"
                    )
                }
                k => panic!("{k:?}"),
            }
        }
        let e = shift_tree(
            &t,
            &m,
            &ShiftOptions {
                out_of_range: OutOfRange::Overflow,
                ..opts(1)
            },
        )
        .unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::ShiftRecorded { .. }), "{e}");
        unshift(&t, 2);
        // Restored exactly, except ids kept although inside a seen range
        // (b:1000:5000:10 leaves on-disk 5000, which looks like seen 5000).
        let mut after = snapshot(&t);
        let mut want = before.clone();
        for k in &rep.kept_in_seen_range {
            let rel = k.path.strip_prefix(&t).unwrap().to_path_buf();
            assert_eq!(before[&rel].uid, 5000, "{k:?}");
            after.remove(&rel);
            want.remove(&rel);
        }
        assert_same(&want, &after, "unshift");
        assert!(read_record(&t).unwrap().is_none());
    }
}

// ------------------------------------------------------------ attacks

/// The exchange attacker: one directory of files (one setuid with a
/// capability), directories (each holding a file) and symlinks (pointing
/// outside), exchanged pairwise with `renameat2(RENAME_EXCHANGE)` while the
/// walk runs. Every inode, identified by its content, must end as the
/// translation of its own ids, exactly once (the mapping shifts by one, so a
/// double shift shows), with setuid bits and capabilities kept; outside
/// nothing changes.
#[test]
fn exchange_attacker_every_entry_shifted_exactly_once() {
    privileged!();
    let fs = TestFs::ext4_sized(128, 32768);
    let m = map("b:0:1:65536");
    let outside = fs.root.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("target"), "o").unwrap();
    lchown(&outside.join("target"), 7, 7);
    let runs: u64 = std::env::var("IDMAPPED_ATTACK_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(scaled(12, 3) as u64);
    const N: usize = 600;
    let id_of = |i: usize| (i as u32 * 7) % 3000;
    let mut total_swaps = 0;
    let mut changed_reported = 0;
    for run in 0..runs {
        let root = fs.root.join(format!("t{run}"));
        let d = root.join("d");
        fs::create_dir_all(&d).unwrap();
        for i in 0..N {
            let p = d.join(format!("n{i}"));
            match i % 3 {
                0 => {
                    fs::write(&p, format!("F{i}")).unwrap();
                    lchown(&p, id_of(i), id_of(i));
                    if i % 30 == 0 {
                        chmod(&p, 0o4755);
                        lset(&p, "security.capability", &caps(1 << 12, 0));
                    }
                }
                1 => {
                    fs::create_dir(&p).unwrap();
                    fs::write(p.join("inner"), format!("D{i}")).unwrap();
                    lchown(&p.join("inner"), id_of(i), id_of(i));
                    lchown(&p, id_of(i), id_of(i));
                }
                _ => {
                    symlink(format!("../../outside/target#{i}"), &p).unwrap();
                    lchown(&p, id_of(i), id_of(i));
                }
            }
        }
        let out_before = snapshot(&outside);
        let attacker = ExchangeAttacker::start(&[&d], run + 99, |r| {
            (
                (0, format!("n{}", r.below(N as u64))),
                (0, format!("n{}", r.below(N as u64))),
            )
        });
        let rep = shift_tree(&root, &m, &opts(2));
        let during = attacker.swaps();
        total_swaps += attacker.stop();
        let rep = rep.unwrap_or_else(|e| panic!("run {run}: walk failed under attack: {e}"));
        changed_reported += u64::from(rep.tree_changed);
        eprintln!(
            "run {run}: {during} swaps during the walk, tree_changed {}",
            rep.tree_changed
        );
        // Per entry, by identity (content), never by name.
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let (i, kind) = if md.file_type().is_symlink() {
                let t = fs::read_link(&p).unwrap();
                let t = t.to_string_lossy();
                (t.rsplit('#').next().unwrap().parse::<usize>().unwrap(), 'l')
            } else if md.is_dir() {
                let c = fs::read_to_string(p.join("inner")).unwrap();
                let i: usize = c[1..].parse().unwrap();
                let want = m.uids().seen(id_of(i)).unwrap();
                assert_eq!(
                    owner(&p.join("inner")),
                    (want, want),
                    "run {run}: inner of D{i}"
                );
                (i, 'd')
            } else {
                let c = fs::read_to_string(&p).unwrap();
                (c[1..].parse::<usize>().unwrap(), 'f')
            };
            let want = m.uids().seen(id_of(i)).unwrap();
            assert_eq!(
                (md.uid(), md.gid()),
                (want, want),
                "run {run}: {kind}{i} at {p:?}"
            );
            if kind == 'f' && i % 30 == 0 {
                assert_eq!(md.mode() & 0o7777, 0o4755, "run {run}: setuid of F{i}");
                assert_eq!(
                    lget(&p, "security.capability"),
                    Some(caps(1 << 12, m.uids().seen(0).unwrap())),
                    "run {run}: capability of F{i}"
                );
            }
            if kind != 'l' {
                assert_eq!(lget(&p, "trusted.idmapped.shift"), None);
            }
        }
        assert_same(&out_before, &snapshot(&outside), "outside after the attack");
    }
    eprintln!("{runs} runs, {total_swaps} swaps; tree_changed reported in {changed_reported}");
    assert!(total_swaps >= 1000 * runs);
}

/// The exchange attacker across directories: entries (files, and
/// directories holding a file) exchanged between random directories of the
/// tree while the walk runs, so entries keep moving from directories the
/// walk has not read yet into ones it has finished. Every inode, identified
/// by its content, must end shifted exactly once (the mapping shifts by
/// one, so a double shift shows, and so does one the walk never met).
#[test]
fn cross_directory_attacker_every_entry_shifted_exactly_once() {
    privileged!();
    let fs = TestFs::ext4_sized(128, 32768);
    let m = map("b:0:1:65536");
    let runs = scaled(8, 3) as u64;
    const DIRS: usize = 30;
    const N: usize = 60;
    let id_of = |d: usize, i: usize| ((d * N + i) as u32 * 7) % 3000;
    let mut total_swaps = 0;
    for run in 0..runs {
        let root = fs.root.join(format!("x{run}"));
        let dirs: Vec<PathBuf> = (0..DIRS).map(|k| root.join(format!("d{k}"))).collect();
        for (k, d) in dirs.iter().enumerate() {
            fs::create_dir_all(d).unwrap();
            for i in 0..N {
                let p = d.join(format!("n{i}"));
                let id = id_of(k, i);
                if i % 4 == 0 {
                    fs::create_dir(&p).unwrap();
                    fs::write(p.join("inner"), format!("D{k}.{i}")).unwrap();
                    lchown(&p.join("inner"), id, id);
                } else {
                    fs::write(&p, format!("F{k}.{i}")).unwrap();
                }
                lchown(&p, id, id);
            }
        }
        let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
        let attacker = ExchangeAttacker::start(&refs, run + 1234, |r| {
            let mut one = || {
                (
                    r.below(DIRS as u64) as usize,
                    format!("n{}", r.below(N as u64)),
                )
            };
            (one(), one())
        });
        let rep = shift_tree(&root, &m, &opts(2));
        let during = attacker.swaps();
        total_swaps += attacker.stop();
        let rep = rep.unwrap_or_else(|e| panic!("run {run}: walk failed under attack: {e}"));
        eprintln!(
            "run {run}: {during} swaps during the walk, tree_changed {}",
            rep.tree_changed
        );
        let mut found = 0;
        for d in &dirs {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                let md = fs::symlink_metadata(&p).unwrap();
                let content = if md.is_dir() {
                    let c = fs::read_to_string(p.join("inner")).unwrap();
                    let (k, i) = parse_ki(&c[1..]);
                    let want = m.uids().seen(id_of(k, i)).unwrap();
                    assert_eq!(owner(&p.join("inner")), (want, want), "run {run}: {c}");
                    c
                } else {
                    fs::read_to_string(&p).unwrap()
                };
                let (k, i) = parse_ki(&content[1..]);
                let want = m.uids().seen(id_of(k, i)).unwrap();
                assert_eq!(
                    (md.uid(), md.gid()),
                    (want, want),
                    "run {run}: {content} at {p:?}"
                );
                found += 1;
            }
        }
        assert_eq!(found, DIRS * N, "run {run}: entries lost");
    }
    eprintln!("{runs} runs, {total_swaps} swaps across directories");
    assert!(total_swaps >= 1000 * runs);
}

/// `k.i` of an entry's content.
fn parse_ki(s: &str) -> (usize, usize) {
    let (k, i) = s.split_once('.').unwrap();
    (k.parse().unwrap(), i.parse().unwrap())
}

// --------------------------------------------------- refusals and links

#[test]
fn virtual_filesystems_are_refused_before_anything_changes() {
    privileged!();
    use idmapped::strategy::{mount_with_ownership, Plan, Strategy};
    let fs = TestFs::ext4();
    let m = map(MAP);
    // As SOURCE.
    for (fstype, src) in [("proc", "proc"), ("sysfs", "sysfs"), ("ramfs", "ramfs")] {
        let v = TestFs::virtual_fs(src);
        let e = shift_tree(&v.root, &m, &opts(1)).unwrap_err();
        match e.kind() {
            ErrorKind::NotShiftable { fs, .. } => assert_eq!(fs, fstype, "{e}"),
            k => panic!("{fstype}: {k:?}"),
        }
        assert_eq!(e.path(), Some(v.root.as_path()), "{e}");
    }
    // As a submount: devtmpfs (a bind of /dev), sysfs, proc, ramfs.
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), "").unwrap();
    lchown(&root.join("f"), 5, 5);
    for (name, how) in [
        ("dev", vec!["--bind", "/dev"]),
        ("sys", vec!["-t", "sysfs", "sysfs"]),
        ("proc", vec!["-t", "proc", "proc"]),
        ("ram", vec!["-t", "ramfs", "ramfs"]),
    ] {
        let mp = root.join(name);
        fs::create_dir(&mp).unwrap();
        run(Command::new("mount").args(&how).arg(&mp));
        if name == "ram" {
            fs::write(mp.join("secret"), "").unwrap();
            chmod(&mp.join("secret"), 0o600);
        }
    }
    let before = snapshot(&root.join("ram"));
    let dev_before = owner(Path::new("/dev/null"));
    let target = fs.scratch("target");
    let cross = ShiftOptions {
        cross_mounts: true,
        ..opts(1)
    };
    let e = shift_tree(&root, &m, &cross).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::NotShiftable { .. }), "{e}");
    for strategy in [Strategy::Chown, Strategy::Auto] {
        let plan = Plan::new(strategy, &m).recursive(true);
        let e = mount_with_ownership(&root, &target, &plan).unwrap_err();
        match e.kind() {
            ErrorKind::NotShiftable { fs, .. } => {
                assert!(
                    ["devtmpfs", "sysfs", "proc", "ramfs"].contains(&fs.as_str()),
                    "{e}"
                )
            }
            k => panic!("{strategy:?}: {k:?} ({e})"),
        }
        let p = e.path().unwrap();
        assert!(p.starts_with(&root) && p != root, "names the submount: {e}");
        assert!(e.to_string().contains("nothing was changed"), "{e}");
    }
    assert_eq!(owner(&root.join("f")), (5, 5), "nothing changed");
    assert!(read_record(&root).unwrap().is_none());
    assert_same(&before, &snapshot(&root.join("ram")), "ramfs");
    assert_eq!(owner(Path::new("/dev/null")), dev_before);
    assert!(common::mounts_below(&target).is_empty(), "nothing attached");
    for name in ["dev", "sys", "proc", "ram"] {
        rustix::mount::unmount(root.join(name), rustix::mount::UnmountFlags::DETACH).unwrap();
    }
}

#[test]
fn hard_links_from_outside_are_left_reported_or_refused() {
    privileged!();
    let fs = TestFs::ext4();
    let m = map(MAP);
    for policy in [OutsideLinks::Skip, OutsideLinks::Shift, OutsideLinks::Fail] {
        let base = fs.root.join(policy.name());
        let root = base.join("tree");
        fs::create_dir_all(root.join("sub")).unwrap();
        let outside = base.join("outside");
        fs::write(&outside, "").unwrap();
        fs::hard_link(&outside, root.join("sub/link")).unwrap();
        // Linked twice inside: found all its links, shifted.
        fs::write(root.join("a"), "").unwrap();
        fs::hard_link(root.join("a"), root.join("sub/b")).unwrap();
        let o = ShiftOptions {
            outside_links: policy,
            ..opts(2)
        };
        match policy {
            OutsideLinks::Fail => {
                let e = shift_tree(&root, &m, &o).unwrap_err();
                assert!(
                    matches!(e.kind(), ErrorKind::LinkedOutside { links: 2, found: 1 }),
                    "{e}"
                );
                assert_eq!(owner(&root.join("a")), (0, 0), "fail changes nothing");
                assert!(read_record(&root).unwrap().is_none());
            }
            _ => {
                let rep = shift(&root, &m, &o);
                assert_eq!(rep.outside_links, vec![root.join("sub/link")], "{rep:?}");
                assert_eq!(owner(&root.join("a")), (100000, 100000));
                let want = if policy == OutsideLinks::Skip {
                    (0, 0)
                } else {
                    (100000, 100000)
                };
                assert_eq!(owner(&outside), want, "{policy:?}");
            }
        }
    }
}

#[test]
fn bad_target_changes_nothing_on_disk() {
    privileged!();
    use idmapped::strategy::{mount_with_ownership, Plan, Strategy};
    let fs = TestFs::ext4();
    let root = fs.root.join("tree");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), "").unwrap();
    let file_target = fs.root.join("file");
    fs::write(&file_target, "").unwrap();
    let m = map(MAP);
    for target in [fs.root.join("missing"), file_target] {
        for strategy in [Strategy::Chown, Strategy::Auto] {
            let plan = Plan::new(strategy, &m);
            if strategy == Strategy::Auto
                && idmapped::probe::first_unsupported(&root, false)
                    .unwrap()
                    .is_none()
            {
                continue; // auto idmaps here: nothing on disk either way
            }
            let e = mount_with_ownership(&root, &target, &plan).unwrap_err();
            assert!(e.path() == Some(target.as_path()), "{e}");
            assert_eq!(owner(&root.join("f")), (0, 0), "{e}");
            assert!(read_record(&root).unwrap().is_none(), "{e}");
        }
    }
}

#[test]
fn immutable_and_append_only_entries_stop_the_walk_and_it_resumes() {
    privileged!();
    let fs = TestFs::ext4();
    // Everything else is shifted, the record stays unfinished and lists the
    // entries, and after chattr -i/-a the same command finishes them
    // (although chattr changed their ctime). With fail the tree is scanned
    // first, and the entries are refused before any change.
    for policy in [OutOfRange::Keep, OutOfRange::Overflow, OutOfRange::Fail] {
        let root = fs.root.join(policy.name());
        fs::create_dir(&root).unwrap();
        fs::write(root.join("plain"), "").unwrap();
        lchown(&root.join("plain"), 7, 7);
        let o = ShiftOptions {
            out_of_range: policy,
            ..opts(1)
        };
        for (name, attr) in [("imm", "+i"), ("app", "+a")] {
            let p = root.join(name);
            fs::write(&p, "").unwrap();
            lchown(&p, 5, 5);
            run(Command::new("chattr").arg(attr).arg(&p));
        }
        let e = shift_tree(&root, &map(MAP), &o).unwrap_err();
        match e.kind() {
            ErrorKind::Immutable {
                attribute,
                count: 2,
            } => {
                assert!(attribute.contains("chattr +"), "{e}")
            }
            k => panic!("{k:?}: {e}"),
        }
        let p = e.path().unwrap();
        assert!(p.ends_with("app") || p.ends_with("imm"), "{e}");
        assert!(e.to_string().contains("run the same command again"), "{e}");
        let state = read_record(&root).unwrap().map(|r| r.state);
        if policy == OutOfRange::Fail {
            assert_eq!(state, None, "scanned first: nothing changed");
            assert_eq!(owner(&root.join("plain")), (7, 7));
        } else {
            assert_eq!(state, Some(RecordState::Running));
            assert_eq!(owner(&root.join("plain")), (100007, 100007));
            assert_eq!(owner(&root), (0, 0), "the root waits for them");
        }
        for (name, attr) in [("imm", "-i"), ("app", "-a")] {
            run(Command::new("chattr").arg(attr).arg(root.join(name)));
        }
        let rep = shift(&root, &map(MAP), &o);
        assert_eq!(rep.resumed, policy != OutOfRange::Fail, "{rep:?}");
        for name in ["imm", "app"] {
            assert_eq!(owner(&root.join(name)), (100005, 100005), "{policy:?}");
        }
        assert_eq!(owner(&root.join("plain")), (100007, 100007));
        assert_eq!(
            read_record(&root).unwrap().unwrap().state,
            RecordState::Done
        );
    }
}

/// `auto --recursive` decides per mount: each mount that can be idmapped
/// is, only the others are shifted, and the result says which and why.
/// Expectations come from probing each mount (on 5.10 nothing can be
/// idmapped, on 6.1 tmpfs cannot, on 6.3+ both can).
#[test]
fn auto_recursive_idmaps_what_it_can_and_shifts_the_rest() {
    privileged!();
    use idmapped::probe::{idmap_support, Support};
    use idmapped::strategy::{mount_with_ownership, MountWay, Outcome, Plan, Strategy};
    let fs = TestFs::ext4();
    let root = fs.root.join("tree");
    let sub = root.join("tmp");
    fs::create_dir_all(&sub).unwrap();
    fs::write(root.join("top"), "").unwrap();
    lchown(&root.join("top"), 1000, 1000);
    run(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&sub));
    fs::write(sub.join("inner"), "").unwrap();
    lchown(&sub.join("inner"), 1001, 1001);
    let can = |p: &Path| matches!(idmap_support(p).unwrap(), Support::Supported);
    let (top_idmap, sub_idmap) = (can(&root), can(&sub));
    let target = fs.scratch("target");
    let m = map(MAP);
    let out = mount_with_ownership(
        &root,
        &target,
        &Plan::new(Strategy::Auto, &m).recursive(true),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("top idmappable {top_idmap}, tmpfs idmappable {sub_idmap}: {out:?}");
    match &out {
        Outcome::Idmapped { .. } => assert!(top_idmap && sub_idmap),
        Outcome::PerMount { mounts, .. } => {
            assert_eq!(mounts.len(), 2, "{out:?}");
            for (mo, idm) in mounts.iter().zip([top_idmap, sub_idmap]) {
                assert_eq!(matches!(mo.way, MountWay::Idmapped(_)), idm, "{mo:?}");
            }
        }
        o => panic!("{o:?}"),
    }
    // The same view through the target either way.
    assert_eq!(owner(&target.join("top")), (101000, 101000));
    assert_eq!(owner(&target.join("tmp/inner")), (101001, 101001));
    // On disk: shifted exactly where the mount could not be idmapped.
    let want = |idm: bool, id: u32| {
        if idm {
            (id, id)
        } else {
            (id + 100000, id + 100000)
        }
    };
    assert_eq!(owner(&root.join("top")), want(top_idmap, 1000));
    assert_eq!(owner(&sub.join("inner")), want(sub_idmap, 1001));
    for p in common::mounts_below(&target).into_iter().rev() {
        rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH).unwrap();
    }
    rustix::mount::unmount(&sub, rustix::mount::UnmountFlags::DETACH).unwrap();
}
