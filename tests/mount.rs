//! Idmapped mounts on a real kernel: the translation rules, recursion, every
//! refusal the kernel can give, replace/clear, read-back, leaks and threads.
//! Root only; each test runs in its own private mount namespace. Serial, so
//! that the leak test's process-wide counts see no other test's fds.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{as_fsid, owner, touch_owned, TestFs};
use idmapped::features::{self, Availability};
use idmapped::probe::{self, Support};
use idmapped::{
    read_idmap, set_attr_at_path, CloneFlags, DetachedMount, ErrorKind, IdmapReadback, Mapping,
    MountAttr, MountAttrFlags, UserNamespace,
};
use serial_test::serial;

fn mapping(spec: &[&str]) -> Mapping {
    Mapping::parse_map_mount(spec.iter().copied()).unwrap()
}

/// DESIGN §2: map `0 10000 10000`.
fn example_mapping() -> Mapping {
    mapping(&["b:0:10000:10000"])
}

fn idmap_at(source: &Path, target: &Path, m: &Mapping, recursive: bool) {
    let ns = UserNamespace::from_mapping(m).unwrap();
    let (flags, attr) = if recursive {
        (CloneFlags::RECURSIVE, MountAttr::new().idmap_recursive(&ns))
    } else {
        (CloneFlags::empty(), MountAttr::new().idmap(&ns))
    };
    let mnt = DetachedMount::clone_with(source, flags, &attr).unwrap();
    mnt.attach(target).unwrap();
}

#[test]
#[serial]
fn translation_example_end_to_end() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = fs.path("src");
    std::fs::create_dir(&src).unwrap();
    std::os::unix::fs::chown(&src, Some(1000), Some(1000)).unwrap();
    touch_owned(&src.join("a"), 1000, 1000);
    touch_owned(&src.join("b"), 15000, 15000);
    let target = fs.scratch("target");

    idmap_at(&src, &target, &example_mapping(), false);

    // On-disk 1000 is seen as 11000; 15000 has no mapping: overflow id;
    // a caller with fsuid 11000 creates a file stored on disk as 1000.
    common::assert_design_example(&src, &target);

    // chown 12000 through the mount stores 2000.
    std::os::unix::fs::chown(target.join("a"), Some(12000), Some(12000)).unwrap();
    assert_eq!(owner(&src.join("a")), (2000, 2000));

    // A caller whose fsuid has no mapping cannot create files (EOVERFLOW).
    let t = target.clone();
    let err = as_fsid(50000, 50000, move || {
        std::fs::write(t.join("nope"), b"z").unwrap_err()
    });
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
}

#[test]
#[serial]
fn tmpfs_can_be_idmapped_on_this_kernel() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::tmpfs();
    let src = fs.path("d");
    std::fs::create_dir(&src).unwrap();
    touch_owned(&src.join("f"), 1000, 1000);
    match probe::idmap_support(&src).unwrap() {
        Support::Supported => {}
        Support::Unsupported(r) => {
            // tmpfs gained FS_ALLOW_IDMAP in 6.3: on older kernels the probe
            // must name tmpfs.
            assert_eq!(r, probe::Reason::Filesystem { fs: "tmpfs".into() });
            eprintln!("tmpfs cannot be idmapped here: {r}");
            return;
        }
    }
    let target = fs.scratch("t");
    idmap_at(&src, &target, &example_mapping(), false);
    assert_eq!(owner(&target.join("f")), (11000, 11000));
}

#[test]
#[serial]
fn recursive_means_recursive_in_both_calls() {
    privileged!();
    needs_mount_setattr!();
    let (outer, _inner, src) = common::tree_with_submount();

    // Non-recursive: the submount is not part of the clone at all.
    let t1 = outer.scratch("t1");
    idmap_at(&src, &t1, &example_mapping(), false);
    assert_eq!(owner(&t1.join("top")), (11000, 11000));
    assert!(!t1.join("sub/deep").exists());

    // Recursive: the submount is cloned AND idmapped (AT_RECURSIVE in both
    // open_tree and mount_setattr), through either kernel path.
    let t2 = outer.scratch("t2");
    idmap_at(&src, &t2, &example_mapping(), true);
    assert_eq!(owner(&t2.join("top")), (11000, 11000));
    assert_eq!(owner(&t2.join("sub/deep")), (11000, 11000));
    assert!(read_idmap(t2.join("sub")).unwrap().is_idmapped());

    // Same through the two-call path explicitly.
    let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();
    let mut m = DetachedMount::clone_tree(&src, CloneFlags::RECURSIVE).unwrap();
    m.set_attr(&MountAttr::new().idmap_recursive(&ns)).unwrap();
    let t3 = outer.scratch("t3");
    m.attach(&t3).unwrap();
    assert_eq!(owner(&t3.join("sub/deep")), (11000, 11000));
}

#[test]
#[serial]
fn recursive_failure_names_the_submount_and_its_fs() {
    privileged!();
    needs_mount_setattr!();
    let outer = TestFs::ext4();
    let src = outer.path("src");
    let blocker = src.join("proc");
    std::fs::create_dir_all(&blocker).unwrap();
    common::run("mount", &["-t", "proc", "proc", blocker.to_str().unwrap()]);

    let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();
    let err = DetachedMount::clone_with(
        &src,
        CloneFlags::RECURSIVE,
        &MountAttr::new().idmap_recursive(&ns),
    )
    .unwrap_err();
    // The mount call classifies without probing; diagnose names the submount.
    assert_eq!(err.kind(), &ErrorKind::IdmapRefused, "{err}");
    let err = probe::diagnose(err, &src, true);
    assert_eq!(
        err.kind(),
        &ErrorKind::NotSupported { fs: "proc".into() },
        "{err}"
    );
    assert_eq!(err.path(), Some(blocker.as_path()), "{err}");
    let text = err.to_string();
    assert!(text.contains("proc") && text.contains("EINVAL"), "{text}");

    // All or nothing: nothing was mounted anywhere.
    assert!(common::mounts_below(&outer.scratch("none")).is_empty());

    // Non-recursive, the same source is fine: the blocker is not part of it.
    let t = outer.scratch("t");
    idmap_at(&src, &t, &example_mapping(), false);
}

#[test]
#[serial]
fn error_kinds_are_diagnosed() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();
    let idmap = MountAttr::new().idmap(&ns);

    // procfs and ramfs cannot be idmapped: NotSupported naming the type.
    for kind in ["proc", "ramfs"] {
        let vfs = TestFs::virtual_fs(kind);
        let err = DetachedMount::clone_with(&vfs.root, CloneFlags::empty(), &idmap).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::IdmapRefused, "{err}");
        let err = probe::diagnose(err, &vfs.root, false);
        assert_eq!(
            err.kind(),
            &ErrorKind::NotSupported { fs: kind.into() },
            "{err}"
        );
        assert!(err.is_unsupported());
        assert_eq!(
            probe::idmap_support(&vfs.root).unwrap(),
            Support::Unsupported(probe::Reason::Filesystem { fs: kind.into() })
        );
    }

    // An attached mount cannot be idmapped.
    let err = set_attr_at_path(&fs.root, &idmap).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NotDetached, "{err}");

    // Already idmapped: mount_setattr refuses to change an idmap.
    let first = fs.scratch("first");
    idmap_at(&fs.root, &first, &example_mapping(), false);
    let mut again = DetachedMount::clone_tree(&first, CloneFlags::empty()).unwrap();
    let err = again.set_attr(&idmap).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::AlreadyIdmapped, "{err}");
    // The probe answers per mount: the idmapped mount and the plain one on
    // the same filesystem get their own answers, whichever is asked first.
    let replace = features::features().open_tree_attr == Availability::Available;
    let want = if replace {
        Support::Supported
    } else {
        Support::Unsupported(probe::Reason::AlreadyIdmapped)
    };
    assert_eq!(probe::idmap_support(&first).unwrap(), want);
    assert_eq!(probe::idmap_support(&fs.root).unwrap(), Support::Supported);
    assert_eq!(probe::idmap_support(&first).unwrap(), want);

    // The initial user namespace.
    // (Our own namespace: /proc/1 may be hidden from us; CI runs in the initial one.)
    let init = UserNamespace::open("/proc/self/ns/user").unwrap();
    assert!(
        init.is_initial(),
        "tests must run in the initial user namespace"
    );
    let err = DetachedMount::clone_with(
        &fs.root,
        CloneFlags::empty(),
        &MountAttr::new().idmap(&init),
    )
    .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InitialUserns, "{err}");

    // Not a user namespace at all.
    let err = UserNamespace::open("/proc/self/ns/mnt").unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NotUserns, "{err}");
    let f = std::fs::File::open("/proc/self/stat").unwrap();
    let err = UserNamespace::from_fd(f.into()).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NotUserns, "{err}");

    // A file open for writing on the mount: EBUSY.
    let writer = std::fs::File::create(fs.path("busy")).unwrap();
    let mut m = DetachedMount::clone_tree(&fs.root, CloneFlags::empty()).unwrap();
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(Path::new(&format!(
            "/proc/self/fd/{}/busy",
            rustix::fd::AsRawFd::as_raw_fd(&rustix::fd::AsFd::as_fd(&m))
        )))
        .unwrap();
    let err = m.set_attr(&idmap).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Busy, "{err}");
    drop((held, writer));
    m.set_attr(&idmap).unwrap();
}

#[test]
#[serial]
fn userns_without_maps_is_diagnosed() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    // A process in a new user namespace whose maps are never written.
    let mut child =
        common::spawn(std::process::Command::new("unshare").args(["--user", "sleep", "30"]));
    let path = format!("/proc/{}/ns/user", child.id());
    // Wait for unshare to have moved into the new namespace.
    let mine = std::fs::metadata("/proc/self/ns/user").unwrap().ino();
    for _ in 0..200 {
        if std::fs::metadata(&path)
            .map(|m| m.ino() != mine)
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let ns = UserNamespace::open(&path).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ns.lacks_map());
    let result =
        DetachedMount::clone_with(&fs.root, CloneFlags::empty(), &MountAttr::new().idmap(&ns));
    if !common::kernel_at_least(6, 9) {
        // Before 6.9 the kernel idmapped with a namespace without maps
        // (every id then shows as the overflow id).
        eprintln!(
            "Linux < 6.9 accepts a namespace without maps: {:?}",
            result.err()
        );
        return;
    }
    let err = result.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::UsernsMissingMap, "{err}");
}

#[test]
#[serial]
fn replace_and_clear_an_idmap_and_read_it_back() {
    privileged!();
    needs_mount_setattr!();
    let f = features::features();
    if f.open_tree_attr != Availability::Available || f.statmount_idmap != Availability::Available {
        let forced = std::env::var_os("IDMAPPED_FORCE_FALLBACK").is_some();
        if forced || !common::kernel_at_least(6, 15) {
            eprintln!(
                "replace/clear: no open_tree_attr here ({f:?}); checking the refusal instead"
            );
            let fs = TestFs::ext4();
            let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();
            let t = fs.scratch("t");
            idmap_at(&fs.root, &t, &example_mapping(), false);
            let err =
                DetachedMount::clone_with(&t, CloneFlags::empty(), &MountAttr::new().clear_idmap())
                    .unwrap_err();
            assert!(
                matches!(err.kind(), ErrorKind::KernelTooOld { .. }),
                "{err}"
            );
            let err =
                DetachedMount::clone_with(&t, CloneFlags::empty(), &MountAttr::new().idmap(&ns))
                    .unwrap_err();
            assert_eq!(err.kind(), &ErrorKind::AlreadyIdmapped, "{err}");
            return;
        }
        panic!("this kernel lacks open_tree_attr/statmount idmap (Linux 6.15): {f:?}");
    }
    privileged_replace_clear();
}

fn privileged_replace_clear() {
    let fs = TestFs::ext4();
    touch_owned(&fs.path("f"), 1000, 1000);
    let first = fs.scratch("first");
    let m1 = example_mapping();
    idmap_at(&fs.root, &first, &m1, false);
    assert_eq!(owner(&first.join("f")), (11000, 11000));
    assert_eq!(
        read_idmap(&first).unwrap(),
        IdmapReadback::Idmapped(Some(m1))
    );
    assert_eq!(read_idmap(&fs.root).unwrap(), IdmapReadback::NotIdmapped);

    // Replace: clone the idmapped mount with another idmap.
    let m2 = mapping(&["u:0:20000:5000", "g:0:30000:5000"]);
    let ns2 = UserNamespace::from_mapping(&m2).unwrap();
    let second = fs.scratch("second");
    DetachedMount::clone_with(&first, CloneFlags::empty(), &MountAttr::new().idmap(&ns2))
        .unwrap()
        .attach(&second)
        .unwrap();
    assert_eq!(owner(&second.join("f")), (21000, 31000));
    assert_eq!(
        read_idmap(&second).unwrap(),
        IdmapReadback::Idmapped(Some(m2))
    );

    // Clear: the clone shows on-disk ids again.
    let third = fs.scratch("third");
    DetachedMount::clone_with(&first, CloneFlags::empty(), &MountAttr::new().clear_idmap())
        .unwrap()
        .attach(&third)
        .unwrap();
    assert_eq!(owner(&third.join("f")), (1000, 1000));
    assert_eq!(read_idmap(&third).unwrap(), IdmapReadback::NotIdmapped);
}

#[test]
#[serial]
fn attributes_apply_to_the_clone() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    touch_owned(&fs.path("f"), 0, 0);
    let t = fs.scratch("t");
    let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();
    DetachedMount::clone_with(
        &fs.root,
        CloneFlags::empty(),
        &MountAttr::new()
            .idmap(&ns)
            .set(MountAttrFlags::RDONLY | MountAttrFlags::NOSUID),
    )
    .unwrap()
    .attach(&t)
    .unwrap();
    let err = std::fs::write(t.join("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let st = rustix::fs::statvfs(&t).unwrap();
    assert!(st.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID));
    // Bits owned by dedicated setters are refused, naming them.
    let bad = MountAttrFlags::from_bits_retain(libc::MOUNT_ATTR_IDMAP);
    let err = DetachedMount::clone_with(&fs.root, CloneFlags::empty(), &MountAttr::new().set(bad))
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::InvalidInput(_)), "{err}");
}

#[test]
#[serial]
fn file_onto_file() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    touch_owned(&fs.path("file"), 1000, 1000);
    let target = fs.scratch("t").join("target");
    std::fs::write(&target, b"").unwrap();
    idmap_at(&fs.path("file"), &target, &example_mapping(), false);
    assert_eq!(owner(&target), (11000, 11000));
    assert_eq!(std::fs::read(&target).unwrap(), b"x");
}

#[test]
#[serial]
fn no_leaks_over_10000_cycles() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let m = example_mapping();
    // Warm up lazily created state (probe cache, features) before counting.
    idmap_clone_and_drop(&fs.root, &m);
    let (fds, mounts, children) = (
        common::fd_count(),
        common::mount_count(),
        common::child_count(),
    );
    for _ in 0..10_000 {
        idmap_clone_and_drop(&fs.root, &m);
    }
    assert_eq!(common::fd_count(), fds, "fd leak");
    assert_eq!(common::mount_count(), mounts, "mount leak");
    assert_eq!(common::child_count(), children, "child process leak");
}

fn idmap_clone_and_drop(src: &Path, m: &Mapping) {
    let ns = UserNamespace::from_mapping(m).unwrap();
    let clone =
        DetachedMount::clone_with(src, CloneFlags::empty(), &MountAttr::new().idmap(&ns)).unwrap();
    drop(clone);
}

#[test]
#[serial]
fn eight_threads_at_once() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    touch_owned(&fs.path("f"), 1000, 1000);
    let children = common::child_count();
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let root = fs.root.clone();
            let target = fs.scratch(&format!("t{t}"));
            s.spawn(move || {
                for i in 0..50u32 {
                    // A distinct mapping per thread and round.
                    let base = 100_000 + (t * 1000 + i) * 10_000;
                    let m = mapping(&[&format!("b:0:{base}:10000")]);
                    let ns = UserNamespace::from_mapping(&m).unwrap();
                    let clone = DetachedMount::clone_with(
                        &root,
                        CloneFlags::empty(),
                        &MountAttr::new().idmap(&ns),
                    )
                    .unwrap();
                    if i == 49 {
                        clone.attach(&target).unwrap();
                        assert_eq!(owner(&target.join("f")).0, base + 1000);
                    }
                }
            });
        }
    });
    assert_eq!(common::child_count(), children);
}
