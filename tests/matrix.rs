//! The filesystem matrix: for each filesystem this kernel can mount, *probe*
//! whether it can be idmapped (nothing is hard-coded per kernel), then check
//! the outcome end to end, through the library and through the CLI:
//!
//! - idmap supported: the DESIGN §2 view (on-disk 1000 seen as 11000, 15000
//!   as 65534, a write by fsuid 11000 stored as 1000), and
//!   `mount-idmapped --strategy=idmap` succeeds;
//! - not supported: the library's typed error names the filesystem (or the
//!   missing system call), `--check` says why and exits 1, and
//!   `--strategy=auto` falls back to shifting on disk and gives the same view
//!   — except on overlay, where shifting would copy every file up: there
//!   auto is refused and nothing changes (`unsupported`).
//!
//! Each cell prints `matrix: <kernel release> <fs> <idmap|chown|unsupported> <pass|fail>`
//! (`unsupported`: neither idmapping nor shifting on disk can work there,
//! e.g. vfat, which stores no owners, on a kernel that cannot idmap it).
//! Run with `--nocapture` to see the lines; `ci/vm.sh` collects them.

mod common;

use std::path::{Path, PathBuf};

use common::{as_fsid, cli, owner, touch_owned, TestFs};
use idmapped::probe::{self, Reason, Support};
use idmapped::strategy::{mount_with_ownership, Outcome, Plan, Strategy};
use idmapped::{CloneFlags, DetachedMount, ErrorKind, Mapping, MountAttr, UserNamespace};
use serial_test::serial;

const FILESYSTEMS: &[&str] = &["ext4", "xfs", "btrfs", "vfat", "tmpfs", "overlay"];

/// DESIGN §2's mapping.
const MAP: &str = "b:0:10000:10000";

fn mapping() -> Mapping {
    Mapping::parse_map_mount([MAP]).unwrap()
}

/// A mounted filesystem of one kind, with `src/` inside.
struct Cell {
    fs: &'static str,
    /// The filesystem (and, for overlay, its lower one).
    _mounts: Vec<TestFs>,
    /// Where the overlay is mounted (for overlay; else the TestFs root).
    root: PathBuf,
    scratch: PathBuf,
    /// Whether files on it can have their own owners (vfat cannot).
    has_owners: bool,
}

/// Whether this kernel can mount `fs` at all (`/proc/filesystems`).
fn kernel_has(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|t| t.lines().any(|l| l.split_whitespace().last() == Some(fs)))
        .unwrap_or(false)
}

fn make_cell(fs: &'static str) -> Result<Cell, String> {
    let have = |tool: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false)
    };
    let cell = |m: TestFs, has_owners: bool| {
        let root = m.root.clone();
        let scratch = m.scratch("targets");
        Cell {
            fs,
            _mounts: vec![m],
            root,
            scratch,
            has_owners,
        }
    };
    Ok(match fs {
        "ext4" => cell(TestFs::image("ext4", &["-q", "-F"], 64), true),
        "xfs" | "btrfs" | "vfat" => {
            let tool = format!("mkfs.{fs}");
            if !have(&tool) {
                return Err(format!("{tool} is not installed"));
            }
            match fs {
                "xfs" => cell(TestFs::image("xfs", &["-q", "-f"], 320), true),
                "btrfs" => cell(TestFs::image("btrfs", &["-q", "-f"], 128), true),
                // vfat stores no owners: every file shows the mount's uid=/gid=.
                _ => cell(
                    TestFs::image_with_options("vfat", &[], 64, "uid=1000,gid=1000"),
                    false,
                ),
            }
        }
        "tmpfs" => cell(TestFs::tmpfs(), true),
        "overlay" => {
            let lower = TestFs::tmpfs();
            let dirs: Vec<PathBuf> = ["lower", "upper", "work", "merged"]
                .iter()
                .map(|d| lower.scratch(d))
                .collect();
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                dirs[0].display(),
                dirs[1].display(),
                dirs[2].display()
            );
            common::run(
                "mount",
                &[
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    &opts,
                    dirs[3].to_str().unwrap(),
                ],
            );
            let scratch = lower.scratch("targets");
            Cell {
                fs,
                root: dirs[3].clone(),
                _mounts: vec![lower],
                scratch,
                has_owners: true,
            }
        }
        _ => unreachable!("unknown filesystem {fs}"),
    })
}

impl Cell {
    /// `src/` owned by on-disk 1000 with `a` (1000) and `b` (`unmapped`).
    ///
    /// The idmap cells use DESIGN §2's 15000. The chown cells use 25000: the
    /// walker takes an id inside the mapping's *seen* range (10000..19999)
    /// to be shifted already — that is what makes re-runs safe — so only an
    /// id outside both ranges shows the overflow policy.
    fn source(&self, name: &str, unmapped: u32) -> PathBuf {
        let src = self.root.join(name);
        std::fs::create_dir(&src).unwrap();
        if self.has_owners {
            std::os::unix::fs::chown(&src, Some(1000), Some(1000)).unwrap();
            touch_owned(&src.join("a"), 1000, 1000);
            touch_owned(&src.join("b"), unmapped, unmapped);
        } else {
            std::fs::write(src.join("a"), b"x").unwrap();
        }
        src
    }

    fn target(&self, name: &str) -> PathBuf {
        let t = self.scratch.join(name);
        std::fs::create_dir(&t).unwrap();
        t
    }
}

/// The DESIGN §2 view through `target` of a source made by [`Cell::source`].
fn check_view(cell: &Cell, target: &Path) -> Result<(), String> {
    let expect = |name: &str, want: (u32, u32)| {
        let got = owner(&target.join(name));
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "{}: {name} seen as {got:?}, want {want:?}",
                cell.fs
            ))
        }
    };
    expect("a", (11000, 11000))?;
    if cell.has_owners {
        expect("b", (65534, 65534))?;
        // A caller with fsuid 11000 creates a file that shows as 11000.
        let t = target.to_path_buf();
        as_fsid(11000, 11000, move || std::fs::write(t.join("new"), b"y"))
            .map_err(|e| format!("{}: write as fsuid 11000: {e}", cell.fs))?;
        expect("new", (11000, 11000))?;
    }
    Ok(())
}

fn idmap_cell(cell: &Cell, release: &str) -> Result<&'static str, String> {
    // Library: the view, and that nothing on disk changed.
    let src = cell.source("lib", 15000);
    let target = cell.target("lib");
    let ns = UserNamespace::from_mapping(&mapping()).map_err(|e| e.to_string())?;
    DetachedMount::clone_with(&src, CloneFlags::empty(), &MountAttr::new().idmap(&ns))
        .and_then(|m| m.attach(&target))
        .map_err(|e| format!("{}: probe said supported, idmap failed: {e}", cell.fs))?;
    check_view(cell, &target)?;
    if cell.has_owners && owner(&src.join("new")) != (1000, 1000) {
        return Err(format!(
            "{}: a write by 11000 was not stored as 1000",
            cell.fs
        ));
    }
    // CLI.
    let src = cell.source("cli", 15000);
    let target = cell.target("cli");
    let run = cli(&[
        "--strategy=idmap",
        &format!("--map-mount={MAP}"),
        src.to_str().unwrap(),
        target.to_str().unwrap(),
    ]);
    if run.code != Some(0) {
        return Err(format!(
            "{}: CLI --strategy=idmap on {release}: {run:?}",
            cell.fs
        ));
    }
    check_view(cell, &target)?;
    Ok("idmap")
}

fn unsupported_cell(cell: &Cell, reason: &Reason) -> Result<&'static str, String> {
    // Library: the typed error names the cause.
    let src = cell.source("lib", 25000);
    let ns = UserNamespace::from_mapping(&mapping()).map_err(|e| e.to_string())?;
    let err = DetachedMount::clone_with(&src, CloneFlags::empty(), &MountAttr::new().idmap(&ns))
        .err()
        .ok_or_else(|| format!("{}: probe said unsupported, idmap succeeded", cell.fs))?;
    // The mount call classifies without probing; diagnose narrows it down.
    let err = probe::diagnose(err, &src, false);
    match (err.kind(), reason) {
        (ErrorKind::NotSupported { fs }, Reason::Filesystem { fs: probed }) if fs == probed => {
            if fs != cell.fs {
                return Err(format!("{}: error names filesystem {fs}", cell.fs));
            }
        }
        (ErrorKind::KernelTooOld { feature, .. }, Reason::KernelTooOld { .. })
            if *feature == "mount_setattr" => {}
        _ => {
            return Err(format!(
                "{}: error {err} does not match probe {reason}",
                cell.fs
            ))
        }
    }
    // CLI --check says why and exits 1.
    let run = cli(&["--check", src.to_str().unwrap()]);
    let why_named = match reason {
        Reason::Filesystem { fs } => run.stdout.contains(fs.as_str()),
        _ => run.stdout.contains("mount_setattr"),
    };
    if run.code != Some(1) || !why_named {
        return Err(format!("{}: --check: {run:?}", cell.fs));
    }
    // Shifting through overlayfs would copy every file up: auto (library
    // and CLI) refuses it, and nothing changes. The overlay helper
    // (tests/rootfs.rs and the matrix-rootfs columns) is the way there.
    if cell.fs == "overlay" {
        let src = cell.source("auto-lib", 25000);
        let target = cell.target("auto-lib");
        let m = mapping();
        let err = mount_with_ownership(&src, &target, &Plan::new(Strategy::Auto, &m))
            .err()
            .ok_or_else(|| "overlay: auto did not refuse".to_string())?;
        if err.kind() != &ErrorKind::ShiftThroughOverlay {
            return Err(format!("overlay: auto: {err}"));
        }
        let run = cli(&[
            "--strategy=auto",
            &format!("--map-mount={MAP}"),
            src.to_str().unwrap(),
            target.to_str().unwrap(),
        ]);
        if run.code != Some(1) || !run.stderr.contains("copy every file up") {
            return Err(format!("overlay: CLI --strategy=auto: {run:?}"));
        }
        if owner(&src.join("a")) != (1000, 1000) || owner(&src.join("b")) != (25000, 25000) {
            return Err("overlay: the source changed".into());
        }
        return Ok("unsupported");
    }
    // Library auto and CLI auto fall back to shifting on disk: same view.
    let src = cell.source("auto-lib", 25000);
    let target = cell.target("auto-lib");
    let m = mapping();
    let plan = Plan::new(Strategy::Auto, &m).shift_options(idmapped::chown::ShiftOptions {
        out_of_range: idmapped::chown::OutOfRange::Overflow,
        ..Default::default()
    });
    match mount_with_ownership(&src, &target, &plan) {
        Ok(Outcome::Chowned {
            because: Some(_), ..
        }) if cell.has_owners => {}
        Ok(other) => return Err(format!("{}: auto did {other:?}", cell.fs)),
        // Nothing can give a filesystem without owners this view.
        Err(e) if !cell.has_owners => {
            let _ = e;
            return Ok("unsupported");
        }
        // The walker never chowns through overlayfs (it would copy every
        // file up): refused before anything changes, naming the type.
        Err(e)
            if cell.fs == "overlay"
                && matches!(e.kind(), ErrorKind::NotShiftable { fs, .. } if fs == "overlay") =>
        {
            return Ok("refused");
        }
        Err(e) => return Err(format!("{}: auto: {e}", cell.fs)),
    }
    check_view(cell, &target)?;
    let src = cell.source("auto-cli", 25000);
    let target = cell.target("auto-cli");
    let run = cli(&[
        "--strategy=auto",
        "--out-of-range=overflow",
        &format!("--map-mount={MAP}"),
        src.to_str().unwrap(),
        target.to_str().unwrap(),
    ]);
    if run.code != Some(0) {
        return Err(format!("{}: CLI --strategy=auto: {run:?}", cell.fs));
    }
    check_view(cell, &target)?;
    Ok("chown")
}

#[test]
#[serial]
fn filesystem_matrix() {
    privileged!();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut failures = Vec::new();
    // In the test VMs every filesystem must be there (ci/vm.sh loads the
    // modules); elsewhere a kernel built without one has no cell for it.
    let in_vm = std::env::var_os("VM_KERNEL").is_some();
    for &fs in FILESYSTEMS {
        if !kernel_has(fs) && !in_vm {
            println!("matrix-note: {release} {fs}: this kernel has no {fs} driver; no cell");
            continue;
        }
        let (mode, result) = match make_cell(fs) {
            Err(why) => ("unsupported", Err(format!("{fs}: cannot set up: {why}"))),
            Ok(cell) => match probe::idmap_support(&cell.root) {
                Ok(Support::Supported) => match idmap_cell(&cell, &release) {
                    Ok(mode) => (mode, Ok(())),
                    Err(e) => ("idmap", Err(e)),
                },
                Ok(Support::Unsupported(reason)) => match unsupported_cell(&cell, &reason) {
                    Ok(mode) => (mode, Ok(())),
                    Err(e) => ("chown", Err(e)),
                },
                Err(e) => ("unsupported", Err(format!("{fs}: probe failed: {e}"))),
            },
        };
        let verdict = if result.is_ok() { "pass" } else { "fail" };
        println!("matrix: {release} {fs} {mode} {verdict}");
        if let Err(e) = result {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The two root-filesystem columns, filled by probing: how this kernel
/// builds an overlay of idmapped layers (`fds`: layer fds, 6.13;
/// `strings`: staged clones and `lowerdir+`, 6.8; `staging`: staged clones
/// and one `lowerdir=` page, 5.19; `no`), and whether a fresh tmpfs can be
/// idmapped (`idmap`, 6.3; `no`). Each is checked end to end (the view
/// through it, a mapped writer) or, where the kernel cannot, that the
/// library's error says why. Prints
/// `matrix-rootfs: <release> overlay=<fds|strings|staging|no> tmpfs=<idmap|no> <pass|fail>`.
#[test]
#[serial]
fn rootfs_matrix() {
    use idmapped::rootfs::{Overlay, OverlayMethod};
    use idmapped::NewFilesystem;
    privileged!();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let m = mapping();
    let mut failures = Vec::new();

    // Overlay root filesystem.
    let img = TestFs::ext4();
    let (lower0, lower1, upper, work) = (
        img.path("l0"),
        img.path("l1"),
        img.path("upper"),
        img.path("work"),
    );
    for d in [&lower0, &lower1, &upper, &work] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    touch_owned(&lower0.join("a"), 1000, 1000);
    touch_owned(&lower1.join("b"), 15000, 15000);
    let overlay = Overlay::new([&lower0, &lower1])
        .upper(&upper, &work)
        .mapping(&m);
    let overlay_cell = match overlay.create() {
        Ok(ov) => {
            let name = match ov.method() {
                OverlayMethod::LayerFds => "fds",
                OverlayMethod::StagedStrings => "strings",
                OverlayMethod::StagedMountData => "staging",
            };
            let target = img.scratch("rootfs");
            let r = ov
                .attach(&target)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    if owner(&target.join("a")) != (11000, 11000)
                        || owner(&target.join("b")) != (65534, 65534)
                    {
                        return Err(format!("overlay view {:?}", owner(&target.join("a"))));
                    }
                    let t = target.clone();
                    as_fsid(11000, 11000, move || std::fs::write(t.join("new"), b"y"))
                        .map_err(|e| format!("mapped writer: {e}"))?;
                    if owner(&upper.join("new")) != (1000, 1000) {
                        return Err("a write by 11000 not stored as 1000 in upper".into());
                    }
                    Ok(())
                });
            (name, r)
        }
        Err(e) => {
            // Only a kernel too old is an acceptable reason, and the probe agrees.
            let agrees = OverlayMethod::for_this_kernel().is_err();
            let r = if matches!(e.kind(), ErrorKind::KernelTooOld { .. }) && agrees {
                Ok(())
            } else {
                Err(format!("overlay: {e}"))
            };
            ("no", r)
        }
    };
    if let Err(e) = &overlay_cell.1 {
        failures.push(e.clone());
    }

    // Fresh tmpfs.
    let ns = UserNamespace::from_mapping(&m).unwrap();
    let fresh = NewFilesystem::tmpfs()
        .size(8 << 20)
        .uid(1000)
        .gid(1000)
        .create(&MountAttr::new().idmap(&ns));
    let tmpfs_cell = match fresh {
        Ok(mount) => {
            let dir = img.scratch("tmpfs");
            let r = mount
                .attach(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    if owner(&dir) == (11000, 11000) {
                        Ok(())
                    } else {
                        Err(format!("fresh tmpfs root seen as {:?}", owner(&dir)))
                    }
                });
            ("idmap", r)
        }
        Err(e) => {
            // The probe of a mounted tmpfs must say the same.
            let t = TestFs::tmpfs();
            let probed = probe::idmap_support(&t.root).unwrap();
            let r = match (e.kind(), probed) {
                (
                    ErrorKind::NotSupported { fs },
                    Support::Unsupported(Reason::Filesystem { .. }),
                ) if fs == "tmpfs" => Ok(()),
                (
                    ErrorKind::KernelTooOld { .. },
                    Support::Unsupported(Reason::KernelTooOld { .. }),
                ) => Ok(()),
                (_, probed) => Err(format!("fresh tmpfs: {e}, probe: {probed:?}")),
            };
            ("no", r)
        }
    };
    if let Err(e) = &tmpfs_cell.1 {
        failures.push(e.clone());
    }
    let verdict = if failures.is_empty() { "pass" } else { "fail" };
    println!(
        "matrix-rootfs: {release} overlay={} tmpfs={} {verdict}",
        overlay_cell.0, tmpfs_cell.0
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
