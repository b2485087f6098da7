//! Root filesystems and fresh filesystems (root; a private mount namespace
//! per test): an overlay whose layers are seen through a mapping, by every
//! rung this kernel has (found by probing), and idmapped new tmpfs
//! instances with their options kept.
//!
//! Mapping throughout: `b:0:100000:65536` (on-disk 1000 is seen as 101000).
//! Needs mkfs.ext4, setfacl/getfacl.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{as_fsid, mount_count, owner, run, touch_owned, TestFs};
use idmapped::features::{self, overlay_features, Availability};
use idmapped::rootfs::{LayerRole, Overlay, OverlayMethod};
use idmapped::strategy::{mount_with_ownership, Plan, Strategy};
use idmapped::{ErrorKind, Mapping, MountAttr, NewFilesystem, UserNamespace};
use serial_test::serial;

const MAP: &str = "b:0:100000:65536";

fn mapping() -> Mapping {
    Mapping::parse_map_mount([MAP]).unwrap()
}

/// Skip (printing why; failing on CI) when this kernel cannot build an
/// overlay of idmapped layers at all; otherwise the rungs it has.
macro_rules! overlay_rungs {
    () => {{
        match OverlayMethod::for_this_kernel() {
            Ok(best) => rungs_from(best),
            Err(e) => {
                let why = format!("no overlay of idmapped layers on this kernel: {e}");
                if std::env::var_os("CI").is_some() && std::env::var_os("VM_KERNEL").is_none() {
                    panic!("{why}");
                }
                eprintln!("SKIPPED {}: {why}", module_path!());
                // The refusal is typed: the kernel is too old.
                assert!(matches!(e.kind(), ErrorKind::KernelTooOld { .. }), "{e}");
                return;
            }
        }
    }};
}

/// The best rung and every older one, which a newer kernel also runs.
fn rungs_from(best: OverlayMethod) -> Vec<OverlayMethod> {
    let all = [
        OverlayMethod::LayerFds,
        OverlayMethod::StagedStrings,
        OverlayMethod::StagedMountData,
    ];
    let at = all.iter().position(|m| *m == best).unwrap();
    all[at..].to_vec()
}

/// Two lower layers and an upper/work pair on one ext4 image.
struct Image {
    fs: TestFs,
    lower0: PathBuf,
    lower1: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

fn image() -> Image {
    let fs = TestFs::ext4();
    let lower0 = fs.path("layers/l0");
    let lower1 = fs.path("layers/l1");
    let upper = fs.path("pod/upper");
    let work = fs.path("pod/work");
    for d in [&lower0, &lower1, &upper, &work] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The pod's root directory: writable by every id of the pod.
    for d in [&lower0, &upper] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    // The image's files, owned by on-disk ids.
    touch_owned(&lower0.join("a"), 1000, 1000);
    touch_owned(&lower0.join("root-file"), 0, 0);
    std::fs::create_dir(lower0.join("etc")).unwrap();
    std::os::unix::fs::chown(lower0.join("etc"), Some(0), Some(0)).unwrap();
    touch_owned(&lower1.join("b"), 2000, 2000);
    touch_owned(&lower1.join("acl"), 0, 0);
    run(
        "setfacl",
        &[
            "-m",
            "u:1000:r,g:2000:rw",
            lower1.join("acl").to_str().unwrap(),
        ],
    );
    Image {
        fs,
        lower0,
        lower1,
        upper,
        work,
    }
}

impl Image {
    fn overlay<'a>(&self, m: &'a Mapping) -> Overlay<'a> {
        Overlay::new([&self.lower0, &self.lower1])
            .upper(&self.upper, &self.work)
            .mapping(m)
    }

    fn target(&self, name: &str) -> PathBuf {
        self.fs.scratch(name)
    }
}

/// Every entry below `dir`: (owner, mode, size, mtime, content, ACL text).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            let acl = run("getfacl", &["-n", "-p", "-c", p.to_str().unwrap()]);
            out.insert(
                p.strip_prefix(dir).unwrap().to_path_buf(),
                format!(
                    "{}:{} {:o} {} mtime {}.{} ctime {}.{} {:?} {acl}",
                    m.uid(),
                    m.gid(),
                    m.mode(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                    content
                ),
            );
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The view and the write rules through an overlay at `target` of `img`.
fn check_overlay(img: &Image, target: &Path) {
    // Owners seen through the mapping.
    assert_eq!(owner(&target.join("a")), (101000, 101000));
    assert_eq!(owner(&target.join("root-file")), (100000, 100000));
    assert_eq!(owner(&target.join("b")), (102000, 102000));
    // ACL entries too.
    let acl = run(
        "getfacl",
        &["-n", "-p", "-c", target.join("acl").to_str().unwrap()],
    );
    assert!(acl.contains("user:101000:r--"), "{acl}");
    assert!(acl.contains("group:102000:rw-"), "{acl}");
    // A mapped writer's new file lands in upper with on-disk ids.
    let t = target.to_path_buf();
    as_fsid(101000, 101000, move || {
        std::fs::write(t.join("new"), b"pod")
    })
    .unwrap();
    assert_eq!(owner(&target.join("new")), (101000, 101000));
    assert_eq!(owner(&img.upper.join("new")), (1000, 1000));
    // Modifying a lower file copies it up with its on-disk ids, not the seen ones.
    std::fs::write(target.join("a"), b"changed").unwrap();
    assert_eq!(owner(&img.upper.join("a")), (1000, 1000));
    assert_eq!(std::fs::read(img.lower0.join("a")).unwrap(), b"x");
    assert_eq!(std::fs::read(target.join("a")).unwrap(), b"changed");
    // Root of the pod (seen 100000) creates as on-disk 0.
    let t = target.to_path_buf();
    as_fsid(100000, 100000, move || {
        std::fs::create_dir(t.join("etc/pod.d"))
    })
    .unwrap();
    assert_eq!(owner(&img.upper.join("etc/pod.d")), (0, 0));
}

#[test]
#[serial]
fn overlay_of_idmapped_layers_by_every_rung_here() {
    privileged!();
    let rungs = overlay_rungs!();
    let m = mapping();
    for method in rungs {
        let img = image();
        let lowers_before = (snapshot(&img.lower0), snapshot(&img.lower1));
        let mounts_before = mount_count();
        let ov = img
            .overlay(&m)
            .create_by(method)
            .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        assert_eq!(ov.method(), method);
        // Nothing added to this namespace before the attach; nothing staged left.
        assert_eq!(mount_count(), mounts_before, "{method:?}");
        // No copy-up on mount: upper still empty.
        assert!(
            entries(&img.upper).is_empty(),
            "{method:?}: {:?}",
            entries(&img.upper)
        );
        match method {
            OverlayMethod::LayerFds => assert_eq!(ov.staged_mounts(), 0),
            // One clone per distinct mount (both lowers and upper/work are on one image).
            _ => assert_eq!(ov.staged_mounts(), 1, "{method:?}"),
        }
        let target = img.target("rootfs");
        ov.attach(&target).unwrap();
        // Exactly one mount more here: the overlay.
        assert_eq!(mount_count(), mounts_before + 1, "{method:?}");
        let line = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let ov_line = line
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
            .unwrap();
        // The overlay mount itself is not idmapped.
        let mount_options = ov_line.split(' ').nth(5).unwrap();
        assert!(
            !mount_options.split(',').any(|o| o == "idmapped"),
            "{ov_line}"
        );
        check_overlay(&img, &target);
        // The layers were never modified.
        assert_eq!(
            (snapshot(&img.lower0), snapshot(&img.lower1)),
            lowers_before,
            "{method:?}: a lower layer changed"
        );
        println!("rootfs: {method:?} ok");
    }
}

#[test]
#[serial]
fn create_picks_the_best_rung_and_the_result_is_writable() {
    privileged!();
    let best = overlay_rungs!()[0];
    let img = image();
    let m = mapping();
    let ov = img.overlay(&m).create().unwrap();
    assert_eq!(ov.method(), best);
    let want = if overlay_features().layer_fds == Availability::Available {
        OverlayMethod::LayerFds
    } else if overlay_features().lowerdir_plus == Availability::Available {
        OverlayMethod::StagedStrings
    } else {
        OverlayMethod::StagedMountData
    };
    assert_eq!(best, want);
    let target = img.target("rootfs");
    ov.attach(&target).unwrap();
    // The pod's root (seen 100000) writes: the creator was mapped.
    let t = target.clone();
    as_fsid(100000, 100000, move || {
        std::fs::write(t.join("by-root"), b"x")
    })
    .unwrap();
    assert_eq!(owner(&img.upper.join("by-root")), (0, 0));
    let st = rustix::fs::statvfs(&target).unwrap();
    assert!(!st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
}

#[test]
#[serial]
fn layers_on_two_filesystems() {
    privileged!();
    let rungs = overlay_rungs!();
    let m = mapping();
    for method in rungs {
        let img = image();
        let other = TestFs::ext4();
        let l2 = other.path("l2");
        std::fs::create_dir(&l2).unwrap();
        touch_owned(&l2.join("c"), 3000, 3000);
        let ov = Overlay::new([&img.lower0, &l2, &img.lower1])
            .upper(&img.upper, &img.work)
            .mapping(&m)
            .create_by(method)
            .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        if method != OverlayMethod::LayerFds {
            assert_eq!(ov.staged_mounts(), 2, "{method:?}: one clone per mount");
        }
        let target = img.target("rootfs");
        ov.attach(&target).unwrap();
        assert_eq!(owner(&target.join("c")), (103000, 103000));
        check_overlay(&img, &target);
    }
}

#[test]
#[serial]
fn read_only_overlay_of_lower_layers() {
    privileged!();
    let rungs = overlay_rungs!();
    let m = mapping();
    for method in rungs {
        let img = image();
        let ov = Overlay::new([&img.lower0, &img.lower1])
            .mapping(&m)
            .create_by(method)
            .unwrap_or_else(|e| panic!("{method:?}: {e}"));
        let target = img.target("ro");
        ov.attach(&target).unwrap();
        assert_eq!(owner(&target.join("a")), (101000, 101000));
        let e = std::fs::write(target.join("new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{method:?}");
    }
}

#[test]
#[serial]
fn a_layer_on_ramfs_is_refused_naming_it() {
    privileged!();
    let rungs = overlay_rungs!();
    let m = mapping();
    let img = image();
    let ram = TestFs::virtual_fs("ramfs");
    let bad = ram.path("layer");
    std::fs::create_dir(&bad).unwrap();
    for method in rungs {
        let before = mount_count();
        let err = Overlay::new([&img.lower0, &bad])
            .upper(&img.upper, &img.work)
            .mapping(&m)
            .create_by(method)
            .unwrap_err();
        let text = err.to_string();
        match err.kind() {
            ErrorKind::Layer { layer, cause } => {
                assert_eq!(layer, "lower layer 1", "{text}");
                assert!(
                    matches!(&**cause, ErrorKind::NotSupported { fs } if fs == "ramfs"),
                    "{text}"
                );
            }
            _ => panic!("{method:?}: {text}"),
        }
        assert_eq!(err.path(), Some(bad.as_path()));
        assert!(
            text.contains(bad.to_str().unwrap()) && text.contains("ramfs"),
            "{text}"
        );
        assert!(err.is_unsupported());
        assert_eq!(mount_count(), before);
        assert!(entries(&img.upper).is_empty() && entries(&img.work).is_empty());
    }
    // The per-layer check says the same, with no mapping.
    let checks = Overlay::new([&img.lower0, &bad])
        .upper(&img.upper, &img.work)
        .check()
        .unwrap();
    let verdicts: Vec<(LayerRole, bool)> = checks
        .iter()
        .map(|c| (c.role, c.support == idmapped::probe::Support::Supported))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (LayerRole::Lower(0), true),
            (LayerRole::Lower(1), false),
            (LayerRole::Upper, true),
            (LayerRole::Work, true)
        ]
    );
    assert_eq!(checks[1].fs, "ramfs");
}

#[test]
#[serial]
fn upper_and_work_on_different_mounts_are_refused() {
    privileged!();
    let _ = overlay_rungs!();
    let m = mapping();
    let img = image();
    let other = TestFs::ext4();
    let err = Overlay::new([&img.lower0, &img.lower1])
        .upper(&img.upper, other.path(""))
        .mapping(&m)
        .create()
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Layer { layer, .. } if layer == "work directory"),
        "{err}"
    );
}

#[test]
#[serial]
fn auto_and_chown_refuse_an_overlay_source() {
    privileged!();
    let img = image();
    // On the image, so that it is a submount of the image's root.
    let merged = img.fs.path("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        img.lower0.display(),
        img.lower1.display(),
        img.upper.display(),
        img.work.display()
    );
    run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            merged.to_str().unwrap(),
        ],
    );
    let before = (
        snapshot(&img.lower0),
        snapshot(&img.upper),
        snapshot(&merged),
    );
    let m = Mapping::parse_map_mount(["b:0:100000:65536"]).unwrap();
    // A kernel that can idmap the overlay mount itself (seen on 7.3) lets
    // auto idmap it: O(1), nothing shifted. Everywhere else auto, like
    // chown, must refuse before anything changes.
    let overlay_idmappable =
        idmapped::probe::idmap_support(&merged).unwrap() == idmapped::probe::Support::Supported;
    if overlay_idmappable {
        let target = img.target("t-auto-idmap");
        let outcome =
            mount_with_ownership(&merged, &target, &Plan::new(Strategy::Auto, &m)).unwrap();
        assert!(
            matches!(outcome, idmapped::strategy::Outcome::Idmapped { .. }),
            "{outcome:?}"
        );
        rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
    }
    let refusing: &[Strategy] = if overlay_idmappable {
        &[Strategy::Chown]
    } else {
        &[Strategy::Auto, Strategy::Chown]
    };
    for &strategy in refusing {
        let target = img.target(&format!("t-{}", strategy.name()));
        let mounts = mount_count();
        let err = mount_with_ownership(&merged, &target, &Plan::new(strategy, &m)).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::ShiftThroughOverlay, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("copy every file up") && text.contains("Overlay"),
            "{text}"
        );
        assert_eq!(mount_count(), mounts);
    }
    // Recursive: an overlay submount below the source is refused as well.
    let parent = img.fs.path("");
    let target = img.target("t-rec");
    let err = mount_with_ownership(
        &parent,
        &target,
        &Plan::new(Strategy::Chown, &m).recursive(true),
    )
    .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::ShiftThroughOverlay, "{err}");
    assert_eq!(err.path(), Some(merged.as_path()));
    assert_eq!(
        (
            snapshot(&img.lower0),
            snapshot(&img.upper),
            snapshot(&merged)
        ),
        before
    );
}

// ---------------------------------------------------------------- tmpfs

/// Whether this kernel can idmap a tmpfs (found by probing a fresh one).
fn tmpfs_idmappable() -> bool {
    let ns = UserNamespace::from_mapping(&mapping()).unwrap();
    match NewFilesystem::tmpfs().create(&MountAttr::new().idmap(&ns)) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                matches!(e.kind(), ErrorKind::NotSupported { fs } if fs == "tmpfs")
                    || matches!(e.kind(), ErrorKind::KernelTooOld { .. }),
                "{e}"
            );
            false
        }
    }
}

#[test]
#[serial]
fn tmpfs_keeps_its_options() {
    privileged!();
    let ns = UserNamespace::from_mapping(&mapping()).unwrap();
    let idmap = tmpfs_idmappable();
    let fs = NewFilesystem::tmpfs()
        .parse_options("size=16m,nr_inodes=1k")
        .unwrap()
        .mode(0o750)
        .uid(1000)
        .gid(2000);
    let attr = if idmap {
        MountAttr::new().idmap(&ns)
    } else {
        eprintln!("tmpfs cannot be idmapped here: checking its options without an idmap");
        MountAttr::new()
    };
    let dir = tempfile::tempdir().unwrap();
    let before = mount_count();
    let mount = fs.create(&attr).unwrap();
    assert_eq!(mount_count(), before, "detached until attached");
    mount.attach(dir.path()).unwrap();
    let st = rustix::fs::statfs(dir.path()).unwrap();
    assert_eq!(st.f_blocks as u64 * st.f_bsize as u64, 16 << 20);
    assert_eq!(st.f_files, 1024);
    let meta = std::fs::metadata(dir.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    let want = if idmap {
        (101000, 102000)
    } else {
        (1000, 2000)
    };
    assert_eq!(owner(dir.path()), want);
    if idmap {
        // A mapped writer's file is stored as its on-disk id (seen mapped).
        let p = dir.path().to_path_buf();
        as_fsid(101000, 102000, move || std::fs::write(p.join("f"), b"x")).unwrap();
        assert_eq!(owner(&dir.path().join("f")), (101000, 102000));
    }
    rustix::mount::unmount(dir.path(), rustix::mount::UnmountFlags::DETACH).unwrap();
}

#[test]
#[serial]
fn a_bad_tmpfs_option_gets_the_filesystems_own_message() {
    privileged!();
    let before = mount_count();
    let err = NewFilesystem::tmpfs()
        .parse_options("mode=0700,size=lots")
        .unwrap()
        .create(&MountAttr::new())
        .unwrap_err();
    match err.kind() {
        ErrorKind::FsRefused {
            fs,
            option,
            message,
        } => {
            assert_eq!(fs, "tmpfs");
            assert_eq!(option, "size=lots");
            let message = message.as_deref().unwrap_or("");
            assert!(message.contains("Bad value for 'size'"), "{err}");
        }
        _ => panic!("{err}"),
    }
    assert!(err.to_string().contains("size=lots"), "{err}");
    let err = NewFilesystem::tmpfs()
        .option("no_such_option", None)
        .create(&MountAttr::new())
        .unwrap_err();
    assert!(err.to_string().contains("no_such_option"), "{err}");
    let err = NewFilesystem::new("no-such-fs")
        .create(&MountAttr::new())
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::NoFilesystem { .. }),
        "{err}"
    );
    assert_eq!(mount_count(), before);
}

#[test]
#[serial]
fn a_silently_read_only_overlay_is_caught() {
    privileged!();
    let rungs = overlay_rungs!();
    // A namespace adopted from an fd: its mapping is unknown, so the overlay
    // is created as the caller (root, not mapped in the layers' idmapping):
    // the kernel gets EOVERFLOW on the work directory and mounts the overlay
    // read-only, reporting success. The library must not.
    let ns = UserNamespace::from_mapping(&mapping()).unwrap();
    let fd: std::os::fd::OwnedFd = ns.into();
    let adopted = UserNamespace::from_fd(fd).unwrap();
    assert!(adopted.mapping().is_none());
    for method in rungs {
        let img = image();
        let before = mount_count();
        let err = Overlay::new([&img.lower0, &img.lower1])
            .upper(&img.upper, &img.work)
            .userns(&adopted)
            .create_by(method)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err.kind(), ErrorKind::Layer { layer, .. } if layer == "upper layer"),
            "{method:?}: {text}"
        );
        assert!(text.contains("read-only"), "{text}");
        assert_eq!(mount_count(), before);
        // Nothing was written to the upper or work directory either.
        assert!(entries(&img.upper).is_empty(), "{:?}", entries(&img.upper));
        assert!(entries(&img.work).is_empty(), "{:?}", entries(&img.work));
    }
}

// ------------------------------------------------------------ the CLI

#[test]
#[serial]
fn cli_overlay_mounts_and_reports_its_method_and_layers() {
    privileged!();
    let best = overlay_rungs!()[0];
    let img = image();
    let target = img.target("rootfs");
    let before = mount_count();
    let run = common::cli(&[
        format!("--map-mount={MAP}"),
        "--nodev".into(),
        "--json".into(),
        format!(
            "--overlay=lowerdir={}:{},upperdir={},workdir={}",
            img.lower0.display(),
            img.lower1.display(),
            img.upper.display(),
            img.work.display()
        ),
        target.display().to_string(),
    ])
    .expect(0);
    assert_eq!(mount_count(), before + 1);
    assert!(
        run.stdout
            .contains(&format!("\"method\":\"{}\"", best.name())),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains(&format!("\"layer_options\":\"{}\"", best.layer_options())),
        "{run:?}"
    );
    for p in [&img.lower0, &img.lower1, &img.upper, &img.work] {
        assert!(run.stdout.contains(p.to_str().unwrap()), "{run:?}");
    }
    assert!(run.stdout.contains("\"nodev\":true"), "{run:?}");
    check_overlay(&img, &target);
}

#[test]
#[serial]
fn cli_overlay_errors_name_the_layer_and_leave_nothing() {
    privileged!();
    let _ = overlay_rungs!();
    let img = image();
    let ram = TestFs::virtual_fs("ramfs");
    let bad = ram.path("layer");
    std::fs::create_dir(&bad).unwrap();
    let target = img.target("rootfs");
    let before = mount_count();
    let run = common::cli(&[
        format!("--map-mount={MAP}"),
        format!(
            "--overlay=lowerdir={}:{},upperdir={},workdir={}",
            img.lower0.display(),
            bad.display(),
            img.upper.display(),
            img.work.display()
        ),
        target.display().to_string(),
    ])
    .expect(1);
    run.stderr_line_names(&[bad.to_str().unwrap(), "lower layer 1", "ramfs"]);
    assert_eq!(mount_count(), before);
    assert!(entries(&img.upper).is_empty() && entries(&img.work).is_empty());
    // A layer that does not exist.
    let missing = img.fs.path("no-such-layer");
    common::cli(&[
        format!("--map-mount={MAP}"),
        format!(
            "--overlay=lowerdir={}:{}",
            img.lower0.display(),
            missing.display()
        ),
        target.display().to_string(),
    ])
    .expect(1)
    .stderr_line_names(&[missing.to_str().unwrap(), "lower layer 1"]);
    assert_eq!(mount_count(), before);
    // --check: per layer, no --map-mount needed.
    let run = common::cli(&[
        "--check".to_string(),
        format!(
            "--overlay=lowerdir={}:{},upperdir={},workdir={}",
            img.lower0.display(),
            bad.display(),
            img.upper.display(),
            img.work.display()
        ),
    ])
    .expect(1);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{run:?}");
    assert!(lines[0].starts_with("lower layer 0") && lines[0].contains(": can be idmapped"));
    assert!(lines[1].starts_with("lower layer 1") && lines[1].contains("cannot be idmapped"));
    assert!(lines[1].contains("ramfs"), "{run:?}");
    assert!(lines[4].starts_with("overlay: would be built"), "{run:?}");
    let run = common::cli(&[
        "--check".to_string(),
        format!(
            "--overlay=lowerdir={}:{}",
            img.lower0.display(),
            img.lower1.display()
        ),
    ])
    .expect(0);
    assert!(!run.stdout.contains("cannot"), "{run:?}");
}

#[test]
#[serial]
fn cli_tmpfs_keeps_its_options_or_says_why_not() {
    privileged!();
    let dir = tempfile::tempdir().unwrap();
    let before = mount_count();
    let run = common::cli(&[
        format!("--map-mount={MAP}"),
        "--json".into(),
        "--tmpfs=size=16m,mode=0750,nr_inodes=1k,uid=1000,gid=2000".into(),
        dir.path().display().to_string(),
    ]);
    if tmpfs_idmappable() {
        let run = run.expect(0);
        assert!(run.stdout.contains("\"filesystem\":\"tmpfs\""), "{run:?}");
        assert!(
            run.stdout.contains("size=16m,mode=0750,nr_inodes=1k"),
            "{run:?}"
        );
        let st = rustix::fs::statfs(dir.path()).unwrap();
        assert_eq!(st.f_blocks as u64 * st.f_bsize as u64, 16 << 20);
        assert_eq!(st.f_files, 1024);
        let meta = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        assert_eq!(owner(dir.path()), (101000, 102000));
        rustix::mount::unmount(dir.path(), rustix::mount::UnmountFlags::DETACH).unwrap();
    } else {
        run.expect(1).stderr_line_names(&["tmpfs"]);
        assert_eq!(mount_count(), before);
    }
    // A bad option: tmpfs's own words, naming the option; nothing mounted.
    common::cli(&[
        format!("--map-mount={MAP}"),
        "--tmpfs=mode=0700,size=lots".into(),
        dir.path().display().to_string(),
    ])
    .expect(1)
    .stderr_line_names(&["size=lots", "Bad value for 'size'"]);
    assert_eq!(mount_count(), before);
}

#[test]
#[serial]
fn five_hundred_layers_by_every_rung() {
    privileged!();
    let rungs = overlay_rungs!();
    let m = mapping();
    let img = image();
    // Long paths, so that a classic lowerdir= string of them would be ~60 KiB.
    let deep = img.fs.path(&format!("layers/{}", "x".repeat(100)));
    let layers: Vec<PathBuf> = (0..idmapped::rootfs::MAX_LOWER_LAYERS)
        .map(|i| {
            let l = deep.join(format!("layer-{i:03}"));
            std::fs::create_dir_all(&l).unwrap();
            touch_owned(&l.join(format!("f{i}")), i as u32, i as u32);
            l
        })
        .collect();
    for method in rungs {
        let target = img.target(&format!("t-{method:?}"));
        Overlay::new(&layers)
            .upper(&img.upper, &img.work)
            .mapping(&m)
            .create_by(method)
            .unwrap_or_else(|e| panic!("{method:?}: {e}"))
            .attach(&target)
            .unwrap();
        for i in [0usize, 250, 499] {
            let f = target.join(format!("f{i}"));
            assert_eq!(
                owner(&f),
                (100000 + i as u32, 100000 + i as u32),
                "{method:?}"
            );
        }
        rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH).unwrap();
    }
}

#[test]
#[serial]
fn cli_new_filesystems_attach_beneath_a_root_with_mkdir() {
    privileged!();
    let _ = overlay_rungs!();
    let img = image();
    // A container's root whose "etc" is a symlink pointing outside it: the
    // target must be resolved inside the root, never on the host.
    let root = img.target("ctr-root");
    std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
    let before = mount_count();
    let run = common::cli(&[
        format!("--map-mount={MAP}"),
        "--json".into(),
        format!("--beneath={}", root.display()),
        "--mkdir".into(),
        format!(
            "--overlay=lowerdir={}:{},upperdir={},workdir={}",
            img.lower0.display(),
            img.lower1.display(),
            img.upper.display(),
            img.work.display()
        ),
        "/escape/rootfs".into(),
    ])
    .expect(0);
    assert!(run.stdout.contains("\"target\":\"rootfs\""), "{run:?}");
    assert!(run.stdout.contains("\"created\":true"), "{run:?}");
    assert_eq!(mount_count(), before + 1);
    // Inside the root, not at the host's /rootfs.
    assert!(!Path::new("/rootfs").exists());
    check_overlay(&img, &root.join("rootfs"));
    if tmpfs_idmappable() {
        common::cli(&[
            format!("--map-mount={MAP}"),
            format!("--beneath={}", root.display()),
            "--mkdir".into(),
            "--tmpfs=size=1m".into(),
            "run/secrets".into(),
        ])
        .expect(0);
        let st = rustix::fs::statfs(root.join("run/secrets")).unwrap();
        assert_eq!(st.f_blocks as u64 * st.f_bsize as u64, 1 << 20);
    }
}

/// `--tmpfs` with `--beneath`, `--mkdir` and `--replace`: the target is
/// resolved inside ROOT (an absolute symlink restarts at ROOT, never the
/// host), created there, and a second tmpfs replaces the first.
#[test]
#[serial]
fn cli_tmpfs_beneath_a_root_stays_inside_it() {
    privileged!();
    let dir = tempfile::tempdir().unwrap();
    let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let before = mount_count();
    let beneath = format!("--beneath={}", root.display());
    let tmpfs = |extra: &str| {
        common::cli(&[
            format!("--map-mount={MAP}"),
            "--json".into(),
            "--tmpfs=size=1m".into(),
            beneath.clone(),
            extra.into(),
            "/link/secrets".into(),
        ])
    };
    if !tmpfs_idmappable() {
        // Refused before anything is created or mounted.
        let run = tmpfs("--mkdir").expect(1);
        assert!(run.stderr.contains("tmpfs"), "{run:?}");
        assert_eq!(mount_count(), before);
        assert!(!outside.join("secrets").exists());
        return;
    }
    let run = tmpfs("--mkdir").expect(0);
    let inside = root
        .join(outside.strip_prefix("/").unwrap())
        .join("secrets");
    let shown = inside.strip_prefix(&root).unwrap().display().to_string();
    assert!(
        run.stdout.contains(&format!("\"target\":\"{shown}\"")),
        "{run:?}"
    );
    assert!(run.stdout.contains("\"created\":true"), "{run:?}");
    assert!(run.stdout.contains("\"replaced\":false"), "{run:?}");
    assert!(!outside.join("secrets").exists(), "created outside ROOT");
    assert_eq!(rustix::fs::statfs(&inside).unwrap().f_type, 0x0102_1994);
    assert_eq!(mount_count(), before + 1);
    if features::features().move_mount_beneath == Availability::Available {
        let run = tmpfs("--replace").expect(0);
        assert!(run.stdout.contains("\"replaced\":true"), "{run:?}");
        assert_eq!(mount_count(), before + 1, "the old tmpfs was detached");
    }
    rustix::mount::unmount(&inside, rustix::mount::UnmountFlags::DETACH).unwrap();
    assert_eq!(mount_count(), before);
}
