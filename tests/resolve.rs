//! Attaching beneath an untrusted root: every way out (intermediate and final
//! symlinks, `..`, absolute links, magic links) stays inside or fails naming
//! the component; `create` through symlinked parents stays inside; a racing
//! attacker exchanging a component with a symlink to outside never gets a
//! mount outside. Both resolvers, in each test (`openat2` where the kernel
//! has it, and the userspace one); `IDMAPPED_FORCE_FALLBACK=openat2` makes
//! the probed default the userspace one too. Root only; each test in its own
//! private mount namespace. Needs only open_tree/move_mount (Linux 5.2).

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::TestFs;
use idmapped::features::{self, Availability};
use idmapped::resolve::{self, Create, ResolveOptions, Resolver};
use idmapped::{AttachOptions, CloneFlags, DetachedMount, ErrorKind, ResolveReason};
use rustix::fs::{Mode, OFlags};
use serial_test::serial;

/// The resolvers this kernel can run: the userspace one always, openat2
/// where probing says it works (with IDMAPPED_FORCE_FALLBACK=openat2 it says
/// it does not).
fn resolvers() -> Vec<Resolver> {
    let mut v = vec![Resolver::Userspace];
    if features::features().openat2 == Availability::Available {
        v.push(Resolver::Openat2);
    } else {
        eprintln!(
            "openat2 not used: {:?} (IDMAPPED_FORCE_FALLBACK={:?})",
            features::features().openat2,
            std::env::var("IDMAPPED_FORCE_FALLBACK").ok()
        );
    }
    v
}

fn open_dir(p: &Path) -> OwnedFd {
    rustix::fs::open(
        p,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

/// A root to attach beneath, an outside directory next to it that the
/// attacker wants to reach, and a source tree whose `MARKER` file shows
/// where a mount of it landed.
struct Setup {
    fs: TestFs,
    root: PathBuf,
    outside: PathBuf,
    src: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let fs = TestFs::tmpfs();
        let root = fs.path("root");
        let outside = fs.path("outside");
        let src = fs.path("src");
        for d in [&root, &outside, &src] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(src.join("MARKER"), b"m").unwrap();
        std::fs::write(fs.path("srcfile"), b"f").unwrap();
        for d in ["t", "x/t"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            std::fs::create_dir_all(outside.join(d)).unwrap();
        }
        Setup {
            fs,
            root,
            outside,
            src,
        }
    }

    fn mount(&self) -> DetachedMount {
        DetachedMount::clone_tree(&self.src, CloneFlags::empty()).unwrap()
    }

    fn attach(&self, path: &str, opts: AttachOptions) -> idmapped::Result<idmapped::Attached> {
        let rootfd = open_dir(&self.root);
        self.mount().attach_beneath(&rootfd, path, &opts)
    }

    /// Nothing mounted at or below `outside`, and no marker there.
    fn assert_nothing_outside(&self) {
        assert!(
            common::mounts_below(&self.outside).is_empty(),
            "a mount landed outside the root: {:?}",
            common::mounts_below(&self.outside)
        );
        assert!(!self.outside.join("t/MARKER").exists());
        assert!(!self.outside.join("x/t/MARKER").exists());
    }

    /// Detach everything mounted below the root (retrying: an attacker
    /// may be renaming the directories the mount points are in).
    fn clear(&self) {
        for _ in 0..10_000 {
            let below = common::mounts_below(&self.root);
            if below.is_empty() {
                return;
            }
            for m in below.into_iter().rev() {
                let _ = rustix::mount::unmount(
                    &m,
                    rustix::mount::UnmountFlags::DETACH | rustix::mount::UnmountFlags::NOFOLLOW,
                );
            }
        }
        panic!("cannot unmount {:?}", common::mounts_below(&self.root));
    }
}

fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

fn assert_unresolvable(err: &idmapped::Error, component: &str, reason: ResolveReason) {
    match err.kind() {
        ErrorKind::Unresolvable {
            component: c,
            reason: r,
            ..
        } => {
            assert_eq!(c, Path::new(component), "{err}");
            assert_eq!(*r, reason, "{err}");
        }
        other => panic!("expected Unresolvable, got {other:?}: {err}"),
    }
    // One line naming the component.
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains(&format!("{component:?}")), "{text}");
}

#[test]
#[serial]
fn symlinks_and_dotdot_stay_inside_the_root() {
    privileged!();
    let s = Setup::new();
    let out = s.outside.to_str().unwrap().to_string();
    // Intermediate: absolute to "/", relative far above the root, absolute to
    // the real outside path (which, inside the root, does not exist).
    symlink("/", s.root.join("abs_root"));
    symlink("../../../../../../..", s.root.join("up"));
    symlink(&out, s.root.join("abs_out"));
    // Final components: a link to a path inside (as "/"-rooted) and one out.
    symlink("/x/t", s.root.join("final_in"));
    symlink(format!("{out}/t"), s.root.join("final_out"));
    symlink("../../../..", s.root.join("x/up"));
    for r in resolvers() {
        let o = AttachOptions::new().resolver(r);
        for (path, lands) in [
            ("abs_root/t", "t"),
            ("up/t", "t"),
            ("up/x/t", "x/t"),
            ("../../t", "t"),
            ("/../x/../t", "t"),
            ("/t", "t"),
            ("t", "t"),
            ("final_in", "x/t"),
            ("x/up/up/x/t", "x/t"),
            ("abs_root/final_in", "x/t"),
        ] {
            let a = s
                .attach(path, o)
                .unwrap_or_else(|e| panic!("{r:?} {path}: {e}"));
            assert_eq!(a.target, Path::new(lands), "{r:?} {path}");
            assert_eq!(a.resolver, r);
            assert!(!a.replaced);
            assert!(
                s.root.join(lands).join("MARKER").exists(),
                "{r:?} {path} did not land at {lands}"
            );
            s.assert_nothing_outside();
            s.clear();
        }
        // The outside path, re-read inside the root, does not exist: the
        // error names the first missing component.
        let first = Path::new(&out)
            .components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .to_string();
        let e = s.attach("abs_out/t", o).unwrap_err();
        assert_unresolvable(&e, &first, ResolveReason::Missing);
        let e = s.attach("final_out", o).unwrap_err();
        assert_unresolvable(&e, &first, ResolveReason::Missing);
        let e = s.attach("x/missing/t", o).unwrap_err();
        assert_unresolvable(&e, "x/missing", ResolveReason::Missing);
        s.assert_nothing_outside();
        assert!(common::mounts_below(&s.root).is_empty());
    }
}

#[test]
#[serial]
fn loops_and_non_directories_are_named() {
    privileged!();
    let s = Setup::new();
    symlink("loop2", s.root.join("loop1"));
    symlink("/loop1", s.root.join("loop2"));
    std::fs::write(s.root.join("file"), b"").unwrap();
    // A chain of 41 links: one more than the kernel follows.
    for i in 0..41 {
        symlink(format!("c{}", i + 1), s.root.join(format!("c{i}")));
    }
    std::fs::create_dir(s.root.join("c41")).unwrap();
    for r in resolvers() {
        let o = AttachOptions::new().resolver(r);
        let e = s.attach("loop1/t", o).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Unresolvable {
                    reason: ResolveReason::SymlinkLoop,
                    ..
                }
            ),
            "{r:?}: {e}"
        );
        let e = s.attach("c0", o).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Unresolvable {
                    reason: ResolveReason::SymlinkLoop,
                    ..
                }
            ),
            "{r:?}: {e}"
        );
        // 40 links are fine.
        let a = s.attach("c1", o).unwrap();
        assert_eq!(a.target, Path::new("c41"));
        s.clear();
        let e = s.attach("file/t", o).unwrap_err();
        assert_unresolvable(&e, "file", ResolveReason::NotADirectory);
        assert!(common::mounts_below(&s.root).is_empty());
    }
}

#[test]
#[serial]
fn magic_links_are_refused_and_proc_self_is_not() {
    privileged!();
    let s = Setup::new();
    let proc_dir = s.root.join("proc");
    std::fs::create_dir(&proc_dir).unwrap();
    common::run("mount", &["-t", "proc", "proc", proc_dir.to_str().unwrap()]);
    let out = s.outside.to_str().unwrap().to_string();
    symlink("/proc/self/root", s.root.join("rootlink"));
    // An fd of ours that points outside: /proc/self/fd/N jumps there.
    let outfd = open_dir(&s.outside);
    let n = rustix::fd::AsRawFd::as_raw_fd(&outfd);
    for r in resolvers() {
        let o = AttachOptions::new().resolver(r);
        for (path, component) in [
            (format!("proc/self/root{out}/t"), "proc/self/root"),
            (format!("proc/self/fd/{n}/t"), "proc/self/fd"),
            ("proc/self/cwd".to_string(), "proc/self/cwd"),
            (format!("rootlink{out}/t"), "proc/self/root"),
        ] {
            let e = s.attach(&path, o).unwrap_err();
            match e.kind() {
                ErrorKind::Unresolvable {
                    reason: ResolveReason::MagicLink,
                    component: c,
                    ..
                } => {
                    // "proc/self" is an ordinary link to "PID": the
                    // component named is the magic link under proc/PID.
                    let c = c.to_str().unwrap();
                    let last = Path::new(component).file_name().unwrap().to_str().unwrap();
                    assert!(
                        c.starts_with("proc/") && (c.ends_with(last) || c.contains("/fd/")),
                        "{r:?} {path}: {e}"
                    );
                }
                other => panic!("{r:?} {path}: expected MagicLink, got {other:?}: {e}"),
            }
            s.assert_nothing_outside();
        }
        // /proc/self itself is an ordinary symlink: followed (to proc/PID).
        let rootfd = open_dir(&s.root);
        let res =
            resolve::resolve_in_root(&rootfd, "/proc/self", &ResolveOptions::new().resolver(r))
                .unwrap();
        assert_eq!(
            res.path(),
            Path::new(&format!("proc/{}", std::process::id())),
            "{r:?}"
        );
    }
    drop(outfd);
    rustix::mount::unmount(&proc_dir, rustix::mount::UnmountFlags::DETACH).unwrap();
}

#[test]
#[serial]
fn create_through_symlinked_parents_stays_inside() {
    privileged!();
    let s = Setup::new();
    let out = s.outside.to_str().unwrap().to_string();
    symlink("/a/b", s.root.join("ab"));
    symlink(&out, s.root.join("abs_out"));
    symlink("../../../../..", s.root.join("up"));
    symlink("/dtarget/sub", s.root.join("dangling"));
    for (i, r) in resolvers().into_iter().enumerate() {
        let o = AttachOptions::new().resolver(r).create(true);
        let a = s.attach(&format!("ab/c{i}/d"), o).unwrap();
        assert_eq!(a.target, Path::new(&format!("a/b/c{i}/d")));
        assert!(a.created);
        assert!(s.root.join(format!("a/b/c{i}/d/MARKER")).exists());
        // Through an absolute link to the outside: created inside.
        let a = s.attach(&format!("abs_out/n{i}"), o).unwrap();
        let rel = format!("{}/n{i}", out.trim_start_matches('/'));
        assert_eq!(a.target, Path::new(&rel));
        assert!(s.root.join(&rel).join("MARKER").exists());
        assert!(!s.outside.join(format!("n{i}")).exists());
        let a = s.attach(&format!("up/u{i}"), o).unwrap();
        assert_eq!(a.target, Path::new(&format!("u{i}")));
        s.clear();
        // A dangling final link: its target is created, inside.
        if i == 0 {
            let a = s.attach("dangling", o).unwrap();
            assert_eq!(a.target, Path::new("dtarget/sub"));
            assert!(s.root.join("dtarget/sub/MARKER").exists());
            s.clear();
        }
        // A file mount gets an empty file as its mount point.
        let file = DetachedMount::clone_tree(s.fs.path("srcfile"), CloneFlags::empty()).unwrap();
        let rootfd = open_dir(&s.root);
        let a = file
            .attach_beneath(&rootfd, format!("abs_out/f{i}/file"), &o)
            .unwrap();
        let p = s.root.join(&a.target);
        assert!(p.is_file());
        assert_eq!(std::fs::read(&p).unwrap(), b"f");
        s.clear();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        s.assert_nothing_outside();
        assert!(std::fs::read_dir(&s.outside).unwrap().count() == 2); // t, x
    }
    // Directories are made 0755 (less the umask: the test's is 022 or tighter).
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.root.join("a/b")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o7000, 0);
    assert_eq!(mode & !0o755 & 0o777, 0, "{mode:o}");
}

/// The attacker exchanges the real directory `root/dir` with a symlink to
/// the outside (`root/swap`), as fast as it can; the victim attaches at
/// `dir/t` again and again. Every attach either fails or lands inside.
#[test]
#[serial]
fn racing_attacker_never_gets_a_mount_outside() {
    privileged!();
    let s = Setup::new();
    std::fs::create_dir_all(s.root.join("dir/t")).unwrap();
    let out = s.outside.to_str().unwrap().to_string();
    let targets = [out.clone(), "../../../../../../..".to_string()];
    for r in resolvers() {
        for target in &targets {
            let swap = s.root.join("swap");
            let _ = std::fs::remove_file(&swap);
            symlink(target, &swap);
            let stop = Arc::new(AtomicBool::new(false));
            let root = s.root.clone();
            let st = stop.clone();
            let attacker = std::thread::spawn(move || {
                let dirfd = open_dir(&root);
                let mut n = 0u64;
                while !st.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(
                        &dirfd,
                        "dir",
                        &dirfd,
                        "swap",
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                    n += 1;
                }
                n
            });
            let (mut inside, mut failed) = (0, 0);
            for _ in 0..1000 {
                match s.attach("dir/t", AttachOptions::new().resolver(r)) {
                    Ok(a) => {
                        inside += 1;
                        // Inside the root: the real directory under one of
                        // its names, or (through the relative link, which
                        // `..` clamps at the root) the root's own `t`.
                        assert!(
                            [Path::new("dir/t"), Path::new("swap/t"), Path::new("t")]
                                .contains(&a.target.as_path()),
                            "{r:?}: landed at {:?}",
                            a.target
                        );
                        let below = common::mounts_below(&s.root);
                        assert_eq!(below.len(), 1, "{below:?}");
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), ErrorKind::Unresolvable { .. }),
                            "{r:?}: {e}"
                        );
                        failed += 1;
                    }
                }
                s.assert_nothing_outside();
                s.clear();
            }
            stop.store(true, Ordering::Relaxed);
            let swaps = attacker.join().unwrap();
            eprintln!(
                "{r:?}, link to {target}: 1000 attempts, {inside} inside, {failed} refused, 0 outside; {swaps} exchanges"
            );
            assert!(swaps > 0);
            if target == &out && r == Resolver::Userspace {
                // Control: the same race against a path-based attach, which
                // follows the exchanged symlink, does land outside, so this
                // test can see an escape.
                let stop = Arc::new(AtomicBool::new(false));
                let (root, st) = (s.root.clone(), stop.clone());
                let attacker = std::thread::spawn(move || {
                    let dirfd = open_dir(&root);
                    while !st.load(Ordering::Relaxed) {
                        let _ = rustix::fs::renameat_with(
                            &dirfd,
                            "dir",
                            &dirfd,
                            "swap",
                            rustix::fs::RenameFlags::EXCHANGE,
                        );
                    }
                });
                let rootfd = open_dir(&s.root);
                let mut escaped = 0;
                for _ in 0..1000 {
                    if s.mount().attach_at(&rootfd, "dir/t").is_ok()
                        && s.outside.join("t/MARKER").exists()
                    {
                        escaped += 1;
                    }
                    for m in common::mounts_below(&s.outside) {
                        let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
                    }
                    s.clear();
                    if escaped > 0 {
                        break;
                    }
                }
                stop.store(true, Ordering::Relaxed);
                attacker.join().unwrap();
                assert!(escaped > 0, "the control attack never escaped");
                s.assert_nothing_outside();
            }
            // Put the directory back under its name for the next round.
            if s.root.join("dir").is_symlink() {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    s.root.join("dir"),
                    rustix::fs::CWD,
                    s.root.join("swap"),
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
            }
        }
    }
}

#[test]
#[serial]
fn attach_to_an_fd_and_resolve_only() {
    privileged!();
    let s = Setup::new();
    // An O_PATH fd resolved by the caller is enough (MOVE_MOUNT_T_EMPTY_PATH).
    let rootfd = open_dir(&s.root);
    let target = resolve::resolve_in_root(&rootfd, "x/t", &ResolveOptions::new()).unwrap();
    assert_eq!(target.resolver(), resolve::best_resolver());
    s.mount().attach_to(&target).unwrap();
    assert!(s.root.join("x/t/MARKER").exists());
    s.clear();
    // Missing without create: nothing is created.
    let e = resolve::resolve_in_root(&rootfd, "new/dir", &ResolveOptions::new()).unwrap_err();
    assert_unresolvable(&e, "new", ResolveReason::Missing);
    assert!(!s.root.join("new").exists());
    let r = resolve::resolve_in_root(
        &rootfd,
        "new/dir",
        &ResolveOptions::new().create(Create::Directory),
    )
    .unwrap();
    assert!(r.created());
    assert!(s.root.join("new/dir").is_dir());
    // The root itself.
    for p in ["", "/", "..", "/.."] {
        let r = resolve::resolve_in_root(&rootfd, p, &ResolveOptions::new()).unwrap();
        assert_eq!(r.path(), Path::new(""), "{p:?}");
    }
}
