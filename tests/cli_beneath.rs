//! `mount-idmapped --beneath=ROOT`, `--mkdir`, `--replace`: TARGET resolved
//! inside ROOT as if it were "/", created if asked, a mount on it replaced;
//! unresolvable targets exit 1 with one line naming the component and
//! nothing mounted; `--json` always says `"replaced"`. Root only; each test
//! in its own private mount namespace. `--strategy=auto` so the same checks
//! run on kernels that cannot idmap (there the source is shifted on disk).

mod common;

use std::path::{Path, PathBuf};

use common::{cli, TestFs};
use idmapped::features::{self, Availability};
use serial_test::serial;

struct Setup {
    fs: TestFs,
    root: PathBuf,
    outside: PathBuf,
    src: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let fs = TestFs::tmpfs();
        let (root, outside, src) = (fs.path("root"), fs.path("outside"), fs.path("src"));
        for d in [&root, &outside, &src] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(src.join("MARKER"), b"m").unwrap();
        std::fs::create_dir_all(root.join("t")).unwrap();
        std::fs::create_dir_all(outside.join("t")).unwrap();
        Setup {
            fs,
            root,
            outside,
            src,
        }
    }

    fn run(&self, extra: &[&str], target: &str) -> common::Run {
        let beneath = format!("--beneath={}", self.root.display());
        let mut args = vec![
            "--strategy=auto",
            "--map-mount=b:0:10000:10000",
            beneath.as_str(),
        ];
        args.extend_from_slice(extra);
        args.push(self.src.to_str().unwrap());
        args.push(target);
        cli(&args)
    }

    /// Mounts below ROOT (ROOT itself is not a mount here).
    fn mounts(&self) -> Vec<PathBuf> {
        common::mounts_below(&self.root)
    }

    fn assert_nothing_outside(&self) {
        assert!(common::mounts_below(&self.outside).is_empty());
        assert!(!self.outside.join("t/MARKER").exists());
    }

    fn clear(&self) {
        for m in self.mounts().into_iter().rev() {
            rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH).unwrap();
        }
    }
}

fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[test]
#[serial]
fn beneath_keeps_every_link_inside_root() {
    privileged!();
    let s = Setup::new();
    symlink("../../../../../..", s.root.join("up"));
    symlink("/", s.root.join("abs"));
    symlink("/t", s.root.join("final"));
    for target in ["/up/t", "up/t", "abs/t", "/../t", "final", "/final"] {
        let r = s.run(&["--json"], target).expect(0);
        assert!(s.root.join("t/MARKER").exists(), "{target}");
        assert!(
            r.stdout.contains(r#""target":"t""#),
            "{target}: {}",
            r.stdout
        );
        assert!(r.stdout.contains(r#""replaced":false"#), "{}", r.stdout);
        // The probed resolver (IDMAPPED_FORCE_FALLBACK=openat2 reaches the
        // program through the environment too).
        let resolver = match features::features().openat2 {
            Availability::Available => r#""resolver":"openat2""#,
            _ => r#""resolver":"userspace""#,
        };
        assert!(r.stdout.contains(resolver), "{}", r.stdout);
        let root = format!(r#""beneath":"{}""#, s.root.display());
        assert!(r.stdout.contains(&root), "{}", r.stdout);
        s.assert_nothing_outside();
        s.clear();
    }
    // Without --beneath, --json says "replaced" too.
    let t = s.fs.scratch("plain");
    let r = cli(&[
        "--json",
        "--strategy=auto",
        "--map-mount=b:0:10000:10000",
        s.src.to_str().unwrap(),
        t.to_str().unwrap(),
    ])
    .expect(0);
    assert!(r.stdout.contains(r#""replaced":false"#), "{}", r.stdout);
}

#[test]
#[serial]
fn unresolvable_targets_exit_1_naming_the_component() {
    privileged!();
    let s = Setup::new();
    let out = s.outside.to_str().unwrap().to_string();
    symlink(&out, s.root.join("evil"));
    symlink(format!("{out}/t"), s.root.join("final_out"));
    symlink("loop", s.root.join("loop"));
    let proc_dir = s.root.join("proc");
    std::fs::create_dir(&proc_dir).unwrap();
    common::run("mount", &["-t", "proc", "proc", proc_dir.to_str().unwrap()]);
    let first = Path::new(&out)
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap()
        .to_string();
    for (target, names) in [
        ("t/missing/x", vec!["\"t/missing\"", "does not exist"]),
        ("evil/t", vec![first.as_str(), "evil"]),
        ("final_out", vec![first.as_str(), "final_out"]),
        ("/loop", vec!["\"loop\"", "40 symlinks"]),
        ("/proc/self/cwd", vec!["/cwd\"", "magic link"]),
        ("/proc/self/root/t", vec!["/root\"", "magic link"]),
    ] {
        let r = s.run(&[], target).expect(1);
        r.stderr_line_names(&names);
        assert!(r.stdout.is_empty());
        assert_eq!(s.mounts(), std::slice::from_ref(&proc_dir), "{target}");
        s.assert_nothing_outside();
    }
    assert!(!s.root.join("t/missing").exists());
    rustix::mount::unmount(&proc_dir, rustix::mount::UnmountFlags::DETACH).unwrap();
}

#[test]
#[serial]
fn mkdir_through_symlinked_parents_stays_inside() {
    privileged!();
    let s = Setup::new();
    let out = s.outside.to_str().unwrap().to_string();
    symlink("/a/b", s.root.join("ab"));
    symlink(&out, s.root.join("evil"));
    let r = s.run(&["--mkdir", "--json"], "ab/c/d").expect(0);
    assert!(s.root.join("a/b/c/d/MARKER").exists());
    assert!(r.stdout.contains(r#""target":"a/b/c/d""#), "{}", r.stdout);
    assert!(r.stdout.contains(r#""created":true"#), "{}", r.stdout);
    let r = s.run(&["--mkdir"], "/evil/new").expect(0);
    assert!(r.stderr.is_empty() || !r.stderr.contains("error"), "{r:?}");
    let inside = s.root.join(out.trim_start_matches('/')).join("new");
    assert!(inside.join("MARKER").exists());
    assert!(!s.outside.join("new").exists());
    s.assert_nothing_outside();
    s.clear();
    // A file SOURCE onto a directory: said before any mount call.
    let file = s.fs.path("srcfile");
    std::fs::write(&file, b"content").unwrap();
    let beneath = format!("--beneath={}", s.root.display());
    let r = cli(&[
        "--map-mount=b:0:10000:10000",
        beneath.as_str(),
        file.to_str().unwrap(),
        "/t",
    ])
    .expect(1);
    r.stderr_line_names(&["mount point is a directory"]);
    assert!(s.mounts().is_empty());
    // A file SOURCE gets an empty file as its mount point. (Only where the
    // file can be idmapped: the chown fallback walks directories only.)
    match idmapped::probe::idmap_support(&file) {
        Ok(idmapped::probe::Support::Supported) => {}
        other => {
            eprintln!(
                "file SOURCE part skipped: {} cannot be idmapped here: {other:?}",
                file.display()
            );
            return;
        }
    }
    cli(&[
        "--strategy=auto",
        "--map-mount=b:0:10000:10000",
        beneath.as_str(),
        "--mkdir",
        file.to_str().unwrap(),
        "/evil/dir/file",
    ])
    .expect(0);
    let p = s.root.join(out.trim_start_matches('/')).join("dir/file");
    assert_eq!(std::fs::read(&p).unwrap(), b"content");
    s.clear();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    s.assert_nothing_outside();
}

#[test]
#[serial]
fn replace_swaps_the_mount_or_says_the_kernel_is_too_old() {
    privileged!();
    let s = Setup::new();
    // Nothing mounted on t: a plain attach.
    let r = s.run(&["--replace", "--json"], "/t").expect(0);
    assert!(r.stdout.contains(r#""replaced":false"#), "{}", r.stdout);
    assert_eq!(s.mounts().len(), 1);
    std::fs::write(s.src.join("SECOND"), b"2").unwrap();
    if features::features().move_mount_beneath == Availability::Available {
        let r = s.run(&["--replace", "--json"], "/t").expect(0);
        assert!(r.stdout.contains(r#""replaced":true"#), "{}", r.stdout);
        // One mount on t, not two stacked.
        assert_eq!(s.mounts().len(), 1, "{:?}", s.mounts());
        assert!(s.root.join("t/SECOND").exists());
    } else {
        let r = s.run(&["--replace"], "/t").expect(1);
        r.stderr_line_names(&["MOVE_MOUNT_BENEATH", "6.5"]);
        assert_eq!(s.mounts().len(), 1);
    }
}

#[test]
#[serial]
fn new_options_are_usage_errors_where_they_make_no_sense() {
    privileged!();
    let s = Setup::new();
    for args in [
        vec!["--check", "--mkdir", "/x"],
        vec!["--demo", "--replace"],
        vec!["--check", "--beneath=/", "/x"],
        vec!["--beneath=", "a", "b"],
    ] {
        let r = cli(&args).expect(2);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
    }
    drop(s);
}
