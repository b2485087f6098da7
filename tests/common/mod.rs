//! Shared harness for the privileged tests.
//!
//! Every privileged test calls [`privileged!`] first: it skips (printing why)
//! when not root, and *fails* instead when `CI` is set, so a CI run can never
//! pass by skipping. It then moves the test's thread into a private mount
//! namespace (`unshare(CLONE_NEWNS)` + `/` recursively private), so nothing the
//! test mounts reaches the host, and everything is gone when the thread ends.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;
use tempfile::TempDir;

/// Why this process cannot run privileged tests, if it cannot.
pub fn privilege_problem() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID)".into());
    }
    None
}

/// Skip the test with a reason, or fail when running on CI.
#[macro_export]
macro_rules! privileged {
    () => {
        if let Some(why) = $crate::common::privilege_problem() {
            if std::env::var_os("CI").is_some() {
                panic!("privileged test cannot run on CI: {why}");
            }
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
        $crate::common::private_mount_namespace();
    };
}

/// Skip (printing why) when the kernel lacks `mount_setattr` (Linux < 5.12),
/// so the test cannot idmap at all; with `CI` set (CI runs on a kernel that
/// has it) fail instead. The test VMs run these tests on 5.10 too, where
/// they say so and the matrix test checks the typed "kernel too old" errors.
#[macro_export]
macro_rules! needs_mount_setattr {
    () => {
        if idmapped::features::features().mount_setattr
            != idmapped::features::Availability::Available
        {
            let why = format!(
                "the kernel lacks mount_setattr (Linux 5.12): {:?}",
                idmapped::features::features()
            );
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED {}: {why}", module_path!());
            return;
        }
    };
}

/// Give the calling thread its own mount namespace with `/` recursively
/// private, so mounts made by this test propagate nowhere.
pub fn private_mount_namespace() {
    // SAFETY: CLONE_NEWNS only detaches this thread's fs context (cwd, root,
    // mount namespace) from the other threads; it shares no memory state
    // that Rust relies on.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }.expect("unshare(CLONE_NEWNS)");
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .expect("make / rprivate");
}

/// The Debian package of each program the tests run. `ci/packages.sh`
/// installs these (`ci/test.sh` calls it when run as root); a test
/// (`tests/cli.rs`) checks that the two lists agree.
pub const TOOLS: &[(&str, &str)] = &[
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("mkfs.vfat", "dosfstools"),
    ("mount", "mount"),
    ("losetup", "mount"),
    ("unshare", "util-linux"),
    ("setfacl", "acl"),
    ("getfacl", "acl"),
    ("getcap", "libcap2-bin"),
    ("chown", "coreutils"),
    ("sleep", "coreutils"),
    ("getsubids", "uidmap"),
];

/// Why `program` could not be started, for a panic message: a program that
/// is not installed is named with the package that has it.
pub fn spawn_failure(program: &OsStr, e: &std::io::Error) -> String {
    let name = program.to_string_lossy();
    if e.kind() != std::io::ErrorKind::NotFound {
        return format!("cannot run {name}: {e}");
    }
    let base = Path::new(program)
        .file_name()
        .map_or_else(|| name.clone(), |b| b.to_string_lossy());
    match TOOLS.iter().find(|(tool, _)| *tool == base) {
        Some((_, package)) => format!(
            "{name} is not installed (not found on PATH): the tests need the Debian package \
             {package}; `apt-get install {package}`, or run `ci/test.sh` as root, which \
             installs every missing package"
        ),
        None => format!("{name} is not installed (not found on PATH): {e}"),
    }
}

/// `cmd.output()`, panicking with [`spawn_failure`]'s message when the
/// program cannot be started.
pub fn output(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{}", spawn_failure(cmd.get_program(), &e)))
}

/// `cmd.spawn()`, panicking with [`spawn_failure`]'s message when the
/// program cannot be started.
pub fn spawn(cmd: &mut Command) -> std::process::Child {
    cmd.spawn()
        .unwrap_or_else(|e| panic!("{}", spawn_failure(cmd.get_program(), &e)))
}

/// Run a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = output(Command::new(cmd).args(args));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Text bind-mounted over `/etc/subuid` and `/etc/subgid` in this thread's
/// private mount namespace; on drop both mounts come off and the files go.
/// Guards stack (a later one covers an earlier one): drop them in reverse,
/// as locals are. The files must be unmounted first: a file under a stacked
/// bind mount is a mount point, and unlinking it fails with `EBUSY`.
pub struct SubidFiles {
    dir: TempDir,
}

impl SubidFiles {
    pub const TARGETS: [&'static str; 2] = ["/etc/subuid", "/etc/subgid"];

    pub fn bind(subuid: &str, subgid: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (target, text) in Self::TARGETS.iter().zip([subuid, subgid]) {
            assert!(
                Path::new(target).exists(),
                "{target} must exist as a bind-mount target"
            );
            let src = dir.path().join(Path::new(target).file_name().unwrap());
            std::fs::write(&src, text).unwrap();
            run("mount", &["--bind", src.to_str().unwrap(), target]);
        }
        SubidFiles { dir }
    }
}

impl Drop for SubidFiles {
    fn drop(&mut self) {
        for target in Self::TARGETS {
            if let Err(e) = rustix::mount::unmount(target, UnmountFlags::empty()) {
                eprintln!("SubidFiles: umount {target}: {e}");
            }
        }
    }
}

/// A filesystem mounted for one test, unmounted (and its loop device
/// released, for images) on drop.
pub struct TestFs {
    /// Where it is mounted.
    pub root: PathBuf,
    /// Holds the mount point and the image; removed last.
    dir: TempDir,
}

impl TestFs {
    /// A fresh ext4 loop image (mounted with `-o loop`: util-linux sets
    /// autoclear, so the loop device goes with the mount).
    pub fn ext4() -> TestFs {
        Self::image("ext4", &["-q", "-F"], 64)
    }

    /// An ext4 loop image of `size_mib` MiB with at least `inodes` inodes.
    pub fn ext4_sized(size_mib: u64, inodes: u64) -> TestFs {
        Self::image("ext4", &["-q", "-F", "-N", &inodes.to_string()], size_mib)
    }

    /// A loop image of `fs` made with `mkfs.<fs> <mkfs_args>`.
    pub fn image(fs: &str, mkfs_args: &[&str], size_mib: u64) -> TestFs {
        Self::image_with_options(fs, mkfs_args, size_mib, "")
    }

    /// [`image`](Self::image), mounted with extra options (e.g. `uid=1000` for vfat).
    pub fn image_with_options(
        fs: &str,
        mkfs_args: &[&str],
        size_mib: u64,
        mount_options: &str,
    ) -> TestFs {
        let dir = tempfile::Builder::new()
            .prefix("idmapped-test-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("fs.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size_mib << 20).unwrap();
        drop(f);
        let mut args: Vec<&str> = mkfs_args.to_vec();
        let img_s = img.to_str().unwrap();
        args.push(img_s);
        run(&format!("mkfs.{fs}"), &args);
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        let options = if mount_options.is_empty() {
            "loop".to_string()
        } else {
            format!("loop,{mount_options}")
        };
        run(
            "mount",
            &["-t", fs, "-o", &options, img_s, root.to_str().unwrap()],
        );
        TestFs { root, dir }
    }

    /// A fresh tmpfs.
    pub fn tmpfs() -> TestFs {
        Self::virtual_fs("tmpfs")
    }

    /// A fresh mount of a filesystem without a device (`tmpfs`, `ramfs`, `proc`, ...).
    pub fn virtual_fs(fs: &str) -> TestFs {
        let dir = tempfile::Builder::new()
            .prefix("idmapped-test-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("mnt");
        std::fs::create_dir(&root).unwrap();
        run("mount", &["-t", fs, fs, root.to_str().unwrap()]);
        TestFs { root, dir }
    }

    /// A path below the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// A scratch directory next to (not on) the filesystem.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        // Everything mounted below the root first (a test may leave attached
        // clones there), then the filesystem itself. NOFOLLOW: a mount of a
        // symlink (OCI src-nofollow) must be unmounted, not the path it names.
        for m in mounts_below(self.dir.path()).into_iter().rev() {
            let _ = rustix::mount::unmount(&m, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
        }
    }
}

/// Mount points at or below `dir`, in mountinfo order (parents first).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Create a file owned by `uid:gid`.
pub fn touch_owned(path: &Path, uid: u32, gid: u32) {
    std::fs::write(path, b"x").unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

/// `(uid, gid)` of `path`, not following a final symlink.
pub fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

/// Number of open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Number of lines in this thread's mountinfo.
pub fn mount_count() -> usize {
    std::fs::read_to_string("/proc/thread-self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

/// Number of children of this process (any state, zombies included).
pub fn child_count() -> usize {
    let me = std::process::id().to_string();
    let mut n = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = task.path().join("children");
        if let Ok(s) = std::fs::read_to_string(children) {
            n += s.split_whitespace().count();
        }
    }
    let _ = me;
    n
}

// ---------------------------------------------------------------------------
// The mount-idmapped program

/// The `mount-idmapped` example binary: `$MOUNT_IDMAPPED_BIN` (set in the
/// test VMs), else the one `cargo test` builds next to this test's directory.
pub fn cli_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("MOUNT_IDMAPPED_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/cli-HASH -> target/<profile>/examples/mount-idmapped
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("examples").join("mount-idmapped");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified());
    let stale = match built {
        Ok(built) => newest_source(profile_dir).is_some_and(|source| source > built),
        Err(_) => true,
    };
    assert!(
        !stale,
        "{} is missing or older than its sources: `cargo test` builds the examples, \
         but `cargo test --test NAME` alone does not; run `cargo build --example \
         mount-idmapped` first",
        bin.display()
    );
    bin
}

/// When the example's inputs last changed: its source files
/// (`examples/mount-idmapped/*.rs`), or the library it links (cargo rebuilds `libidmapped-*.rlib` in `deps/` whenever any module
/// the crate compiles changes).
fn newest_source(profile_dir: &Path) -> Option<std::time::SystemTime> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rlibs = std::fs::read_dir(profile_dir.join("deps"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(OsStr::to_str).unwrap_or("");
            name.starts_with("libidmapped-") && name.ends_with(".rlib")
        });
    // One level of subdirectories too (the demo's parts live in demo/).
    let sources = std::fs::read_dir(root.join("examples/mount-idmapped"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .flat_map(|p| match std::fs::read_dir(&p) {
            Ok(sub) => sub.flatten().map(|e| e.path()).collect::<Vec<_>>(),
            Err(_) => vec![p],
        });
    sources
        .chain(rlibs)
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

/// How a run of the program ended.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts exit status `code` and returns `self` for more checks.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, Some(code), "unexpected exit status: {self:#?}");
        self
    }

    /// Asserts stderr is exactly one line containing every one of `parts`.
    pub fn stderr_line_names(&self, parts: &[&str]) {
        assert_eq!(self.stderr.lines().count(), 1, "{self:#?}");
        for part in parts {
            assert!(
                self.stderr.contains(part),
                "stderr lacks {part:?}: {self:#?}"
            );
        }
    }
}

pub fn cli<S: AsRef<OsStr>>(args: &[S]) -> Run {
    cli_in(None, args)
}

pub fn cli_in<S: AsRef<OsStr>>(dir: Option<&Path>, args: &[S]) -> Run {
    let mut cmd = Command::new(cli_binary());
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd.output().expect("run mount-idmapped");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run `f` on a thread whose fsuid/fsgid are `uid`/`gid` (setfsuid affects
/// only the calling thread, which stays in the test's mount namespace).
pub fn as_fsid<T: Send + 'static>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        rustix::thread::set_thread_gid(rustix::fs::Gid::from_raw(gid)).unwrap();
        rustix::thread::set_thread_uid(rustix::fs::Uid::from_raw(uid)).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// DESIGN §2's example, checked through `target` (an idmapped mount of
/// `src` with `b:0:10000:10000`, where `src/a` is on-disk 1000 and `src/b`
/// 15000): 1000 is seen as 11000, 15000 as 65534, the source is untouched,
/// and a file created by fsuid 11000 is stored as 1000.
pub fn assert_design_example(src: &Path, target: &Path) {
    assert_eq!(owner(&target.join("a")), (11000, 11000));
    assert_eq!(owner(&target.join("b")), (65534, 65534));
    assert_eq!(owner(&src.join("a")), (1000, 1000));
    let t = target.to_path_buf();
    as_fsid(11000, 11000, move || {
        std::fs::write(t.join("new"), b"y").unwrap()
    });
    assert_eq!(owner(&src.join("new")), (1000, 1000));
    assert_eq!(owner(&target.join("new")), (11000, 11000));
}

/// Whether the running kernel is at least `major.minor` (for tests whose
/// expectation changed with a kernel release; the library itself probes).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

// ---------------------------------------------------------------------------
// The id-ranges program

/// The `id-ranges` example binary: `$ID_RANGES_BIN` (for the test VMs),
/// else the one `cargo test` builds in `target/<profile>/examples`.
pub fn id_ranges_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ID_RANGES_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("examples").join("id-ranges");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // Its source, or the library it links (rebuilt whenever a module changes).
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/id-ranges.rs");
    let rlibs = std::fs::read_dir(profile_dir.join("deps"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(OsStr::to_str).unwrap_or("");
            name.starts_with("libidmapped-") && name.ends_with(".rlib")
        });
    let newest = std::iter::once(source)
        .chain(rlibs)
        .filter_map(|p| modified(&p))
        .max();
    let fresh = match (modified(&bin), newest) {
        (Some(built), Some(src)) => built >= src,
        _ => false,
    };
    assert!(
        fresh,
        "{} is missing or older than its sources: run `cargo build --example id-ranges` \
         (plain `cargo test` builds it)",
        bin.display()
    );
    bin
}

/// Run `id-ranges` with `args` and extra environment `env`.
pub fn id_ranges<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(id_ranges_binary());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run id-ranges");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `src` on one ext4 with `src/top` (on-disk 1000), another ext4 mounted at
/// `src/sub` with `deep` (on-disk 1000).
pub fn tree_with_submount() -> (TestFs, TestFs, PathBuf) {
    let outer = TestFs::ext4();
    let inner = TestFs::ext4();
    let src = outer.path("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    touch_owned(&src.join("top"), 1000, 1000);
    touch_owned(&inner.path("deep"), 1000, 1000);
    run(
        "mount",
        &[
            "--bind",
            inner.root.to_str().unwrap(),
            src.join("sub").to_str().unwrap(),
        ],
    );
    (outer, inner, src)
}
