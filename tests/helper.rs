//! The namespace helper's lifetime, namespace files that are not namespaces,
//! pidfds, and a /proc the crate must not trust. Root only.
//!
//! Several tests re-run this test binary as a child process (`--exact NAME`
//! with `IDMAPPED_TEST_ROLE` set): to be killed at random points, to run a
//! `__WALL` reaper, or to see a fake /proc from a fresh process (the crate's
//! procfs handle and feature probes are made once per process).

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use idmapped::features::{self, Availability};
use idmapped::{ErrorKind, Mapping, UserNamespace};
use serial_test::serial;

/// The outside id the killed callers map: unique to this test, so a leaked
/// namespace shows up as a uid_map line anywhere on the system.
const KILL_TEST_BASE: u32 = 3_999_000_000;

fn role() -> Option<String> {
    std::env::var("IDMAPPED_TEST_ROLE").ok()
}

/// This test binary again, running only `test` with `role` (and `env`).
fn rerun(test: &str, role: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("IDMAPPED_TEST_ROLE", role);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// (pid, state, ppid) of every process.
fn processes() -> Vec<(u32, char, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut f = rest.split(' ');
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, state, ppid));
    }
    out
}

/// Processes anywhere whose uid_map maps to `base`: namespaces of ours still alive.
fn namespaces_mapping_to(base: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for (pid, _, _) in processes() {
        let Ok(map) = std::fs::read_to_string(format!("/proc/{pid}/uid_map")) else {
            continue;
        };
        if map
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&base.to_string()))
        {
            out.push(pid);
        }
    }
    out
}

/// A tiny xorshift generator: no dependency for random delays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
#[serial]
fn killed_callers_leave_no_helper_zombie_or_namespace() {
    if role().as_deref() == Some("caller") {
        // The caller: make namespaces forever, saying once when it is going.
        let m = Mapping::parse_map_mount([format!("b:0:{KILL_TEST_BASE}:1").as_str()]).unwrap();
        let mut said = false;
        loop {
            let ns = UserNamespace::from_mapping(&m).expect("from_mapping");
            drop(ns);
            if !said {
                println!("READY");
                said = true;
            }
        }
    }
    privileged!();
    // Orphans of the killed callers come to us, so we see what survives.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let me = std::process::id();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(me));
    let mut orphans_reaped = 0;
    const KILLS: usize = 250;
    for round in 0..KILLS {
        let mut child = rerun(
            "killed_callers_leave_no_helper_zombie_or_namespace",
            "caller",
            &[],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.ends_with("READY"))),
            "round {round}: the caller never got going"
        );
        // Somewhere inside from_mapping (each call takes ~0.1 ms).
        std::thread::sleep(Duration::from_micros(rng.next() % 3000));
        child.kill().unwrap();
        child.wait().unwrap();
        // What the caller left: anything whose parent is now us.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<_> = processes()
                .into_iter()
                .filter(|&(_, _, ppid)| ppid == me)
                .collect();
            for &(pid, state, _) in &left {
                if state == 'Z' {
                    // Killed by its parent-death signal after reparenting.
                    let p = rustix::process::Pid::from_raw(pid as i32).unwrap();
                    let flags = rustix::process::WaitOptions::NOHANG;
                    let _ = rustix::process::waitpid(Some(p), flags);
                    orphans_reaped += 1;
                }
            }
            let alive: Vec<_> = left.iter().filter(|p| p.1 != 'Z').collect();
            if alive.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: helper(s) survived their killed caller: {alive:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    rustix::process::set_child_subreaper(None).unwrap();
    let leaked = namespaces_mapping_to(KILL_TEST_BASE);
    assert!(
        leaked.is_empty(),
        "processes still in a namespace of a killed caller: {leaked:?}"
    );
    let zombies: Vec<_> = processes()
        .into_iter()
        .filter(|&(_, s, ppid)| s == 'Z' && ppid == me)
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    eprintln!(
        "{KILLS} callers killed; {orphans_reaped} orphaned helpers died and were reaped by us"
    );
}

#[test]
#[serial]
fn a_wall_reaper_in_the_caller_cannot_misdirect_the_helper() {
    if role().as_deref() == Some("wall-reaper") {
        // Another thread reaps every child of ours, __WALL, as a careless
        // runtime (or a subreaper thread) might.
        std::thread::spawn(|| loop {
            // SAFETY: waitid with a valid out-pointer.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::__WALL) };
            if r < 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        for i in 0..500u32 {
            let m =
                Mapping::parse_map_mount([format!("b:0:{}:1", 3_000_000 + i).as_str()]).unwrap();
            let ns = UserNamespace::from_mapping(&m).expect("from_mapping with a __WALL reaper");
            assert_eq!(ns.mapping(), Some(&m));
        }
        println!("DONE");
        return;
    }
    privileged!();
    let before = common::child_count();
    let out = rerun(
        "a_wall_reaper_in_the_caller_cannot_misdirect_the_helper",
        "wall-reaper",
        &[],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("DONE"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(common::child_count(), before);
}

/// `UserNamespace::open` on `path` must fail at once, naming the path and `what`.
fn refused(path: &Path, what: &str) {
    let p = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(UserNamespace::open(&p));
    });
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("UserNamespace::open({path:?}) blocked"));
    let err = result.expect_err("not a user namespace");
    assert_eq!(err.kind(), &ErrorKind::NotUserns, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(what), "{msg} should say {what}");
}

#[test]
#[serial]
fn namespace_paths_that_are_not_user_namespaces() {
    privileged!();
    let dir = tempfile::tempdir().unwrap();
    // A FIFO: open(O_RDONLY) would block forever waiting for a writer.
    let fifo = dir.path().join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    refused(&fifo, "a FIFO");
    // A device: the driver's open must not run (a tty's would, for one).
    refused(Path::new("/dev/null"), "a character device");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a namespace").unwrap();
    refused(&file, "a regular file");
    refused(dir.path(), "a directory");
    refused(Path::new("/proc/self/ns/mnt"), "a mount namespace");
    refused(Path::new("/proc/self/ns/net"), "a network namespace");
    // A symlink to a user namespace is followed, as a path should be.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("/proc/self/ns/user", &link).unwrap();
    assert!(UserNamespace::open(&link).unwrap().is_initial());
    // The real thing, with its maps.
    let ns = UserNamespace::open("/proc/self/ns/user").unwrap();
    assert!(ns.is_initial());
    assert!(ns.mapping().is_some());
    // An O_PATH fd adopted with from_fd is checked and re-opened too.
    let opath = rustix::fs::open(
        &fifo,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let err = UserNamespace::from_fd(opath).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NotUserns, "{err}");
    assert!(err.to_string().contains("a FIFO"), "{err}");
    let opath = rustix::fs::open(
        "/proc/self/ns/user",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    assert!(UserNamespace::from_fd(opath).unwrap().is_initial());
}

#[test]
#[serial]
fn from_pidfd_takes_the_namespace_of_that_process_and_no_other() {
    privileged!();
    eprintln!(
        "PIDFD_GET_USER_NAMESPACE: {:?}",
        features::features().pidfd_get_user_namespace
    );
    // A process in a namespace of ours, with known maps.
    let m = Mapping::parse_map_mount(["b:0:200000:1000"]).unwrap();
    let target = UserNamespace::from_mapping(&m).unwrap();
    let fd = rustix::fd::AsRawFd::as_raw_fd(&target.as_fd());
    let mut child = Command::new("nsenter")
        .args([
            &format!("--user=/proc/{}/fd/{fd}", std::process::id()),
            "sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
    let want = rustix::fs::fstat(&target).unwrap().st_ino;
    let deadline = Instant::now() + Duration::from_secs(10);
    let ns = loop {
        // nsenter enters the namespace just after it starts.
        let ns = UserNamespace::from_pidfd(&pidfd).unwrap();
        if rustix::fs::fstat(&ns).unwrap().st_ino == want || Instant::now() > deadline {
            break ns;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(rustix::fs::fstat(&ns).unwrap().st_ino, want);
    assert_eq!(ns.mapping(), Some(&m));
    assert!(!ns.is_initial());
    // Once the process is reaped, its pid may be anybody's: refused.
    child.kill().unwrap();
    child.wait().unwrap();
    let err = UserNamespace::from_pidfd(&pidfd).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NotFound, "{err}");
    // Our own process: the initial namespace.
    let me = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    assert!(UserNamespace::from_pidfd(&me).unwrap().is_initial());
    // Not a pidfd at all.
    let file = std::fs::File::open("/dev/null").unwrap();
    assert!(UserNamespace::from_pidfd(&file).is_err());
}

/// In a fresh process: a tmpfs over /proc, or a fake mountinfo bound over
/// the one the crate reads; the crate works correctly or refuses clearly.
#[test]
#[serial]
fn a_fake_proc_is_never_used() {
    match role().as_deref() {
        Some("tmpfs-over-proc") => return fake_proc_child(true),
        Some("fake-mountinfo") => return fake_proc_child(false),
        _ => {}
    }
    privileged!();
    let fallbacks = [
        "",
        // The checked /proc instead of a private procfs instance.
        "fsopen_proc",
        // ...with mountinfo instead of listmount, and no openat2 either.
        "fsopen_proc,listmount,statmount",
        "fsopen_proc,listmount,statmount,openat2",
        "fsopen_proc,listmount,statmount,openat2,pidfd,pidfd_get_user_namespace",
    ];
    for role in ["tmpfs-over-proc", "fake-mountinfo"] {
        for forced in fallbacks {
            let out = rerun(
                "a_fake_proc_is_never_used",
                role,
                &[("IDMAPPED_FORCE_FALLBACK", forced)],
            )
            .output()
            .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && text.contains("VERDICT"),
                "{role}, IDMAPPED_FORCE_FALLBACK={forced:?}:\n{text}"
            );
            for line in text.lines().filter(|l| l.starts_with("VERDICT")) {
                eprintln!("{role}, forced {forced:?}: {line}");
            }
        }
    }
}

fn fake_proc_child(tmpfs: bool) {
    common::private_mount_namespace();
    let fs = common::TestFs::tmpfs();
    let forced = std::env::var("IDMAPPED_FORCE_FALLBACK").unwrap_or_default();
    let private_proc = !forced.contains("fsopen_proc");
    if tmpfs {
        // Something that is not procfs where /proc should be, with a
        // planted "uid_map" for every pid the helper might get.
        common::run("mount", &["-t", "tmpfs", "fake", "/proc"]);
        std::fs::create_dir_all("/proc/self").unwrap();
        std::fs::write("/proc/self/mountinfo", "1 1 0:1 / / rw - fake fake rw\n").unwrap();
    } else {
        // A fake mountinfo over the one the crate reads (our thread's),
        // claiming the tmpfs is idmapped.
        let fake = fs.scratch("fake");
        let line = format!(
            "1 1 0:1 / / rw - ext4 /dev/fake rw\n999 1 0:2 / {} rw,idmapped - tmpfs tmpfs rw\n",
            fs.root.display()
        );
        std::fs::write(fake.join("mountinfo"), line).unwrap();
        let tid = rustix::thread::gettid().as_raw_nonzero();
        for target in [
            format!("/proc/{}/task/{tid}/mountinfo", std::process::id()),
            format!("/proc/{}/mountinfo", std::process::id()),
        ] {
            common::run(
                "mount",
                &["--bind", fake.join("mountinfo").to_str().unwrap(), &target],
            );
        }
    }
    // 1. A namespace from a mapping: made correctly, or refused clearly.
    let m = Mapping::parse_map_mount(["b:0:100000:65536"]).unwrap();
    match UserNamespace::from_mapping(&m) {
        Ok(ns) => {
            assert!(
                private_proc || !tmpfs,
                "from_mapping worked through a tmpfs /proc"
            );
            assert_eq!(ns.mapping(), Some(&m));
            assert!(!ns.is_initial());
            println!("VERDICT from_mapping: works");
        }
        Err(e) => {
            assert!(!private_proc, "a private procfs is available, yet: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("proc") && (msg.contains("refusing") || msg.contains("ENOENT")),
                "unclear refusal: {msg}"
            );
            println!("VERDICT from_mapping: refused: {msg}");
        }
    }
    // 2. The read-back of the tmpfs: never the fake's "idmapped".
    match idmapped::read_idmap(&fs.root) {
        Ok(r) => {
            assert!(!r.is_idmapped(), "the fake mountinfo was believed");
            println!("VERDICT read_idmap: {r:?}");
        }
        Err(e) => {
            let listmount = features::features().listmount == Availability::Available;
            assert!(
                !listmount && !private_proc,
                "statmount or a private procfs could have answered: {e}"
            );
            println!("VERDICT read_idmap: refused: {e}");
        }
    }
    // 3. fs_type names the real filesystem or nothing.
    let t = idmapped::probe::fs_type(&fs.root);
    assert!(t == "tmpfs" || t == "unknown", "{t}");
    println!("VERDICT fs_type: {t}");
    if tmpfs {
        let _ = rustix::mount::unmount("/proc", rustix::mount::UnmountFlags::DETACH);
    }
}

/// The subtree listing (listmount on Linux >= 6.8, else mountinfo) finds
/// mounts nested below submounts, only below the path asked about, and the
/// probe names the deepest blocker.
#[test]
#[serial]
fn recursive_probe_sees_nested_submounts_only_below_the_path() {
    privileged!();
    needs_mount_setattr!();
    eprintln!("listmount: {:?}", features::features().listmount);
    let fs = common::TestFs::ext4();
    let tree = fs.path("tree");
    let deep = tree.join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    let beside = fs.path("beside");
    std::fs::create_dir_all(&beside).unwrap();
    // A proc mount beside the tree must not count.
    common::run("mount", &["-t", "proc", "proc", beside.to_str().unwrap()]);
    assert_eq!(
        idmapped::probe::first_unsupported(&tree, true).unwrap(),
        None
    );
    let ext4 = common::TestFs::ext4();
    common::run(
        "mount",
        &[
            "--bind",
            ext4.root.to_str().unwrap(),
            tree.join("a").to_str().unwrap(),
        ],
    );
    std::fs::create_dir_all(&deep).unwrap();
    common::run("mount", &["-t", "proc", "proc", deep.to_str().unwrap()]);
    let (at, reason) = idmapped::probe::first_unsupported(&tree, true)
        .unwrap()
        .expect("the proc mount two levels down blocks the tree");
    assert_eq!(at, deep);
    assert!(
        matches!(&reason, idmapped::probe::Reason::Filesystem { fs } if fs == "proc"),
        "{reason:?}"
    );
    // Without recursion only the tree's own mount counts.
    assert_eq!(
        idmapped::probe::first_unsupported(&tree, false).unwrap(),
        None
    );
    for m in [deep.as_path(), tree.join("a").as_path(), beside.as_path()] {
        rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH).unwrap();
    }
}
