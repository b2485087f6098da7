//! What a container runtime does with the crate: hand a mount to another
//! process (`SCM_RIGHTS`), attach into a container's mount namespace,
//! replace a mount atomically under a reader, and the OCI mount semantics
//! (`rbind`+`idmap` vs `ridmap`, `ro` vs `rro`, `src-nofollow`, the
//! `uidMappings` triples) on a real kernel. Root only; each test in its own
//! private mount namespace; expectations that depend on the kernel come from
//! probing it.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{owner, touch_owned, TestFs};
use idmapped::features::{self, Availability};
use idmapped::{
    read_idmap, AttachOptions, CloneFlags, CloneMethod, DetachedMount, ErrorKind, Mapping,
    MountAttr, MountAttrFlags, MountNamespace, OciIdMapping, UserNamespace,
};
use rustix::fs::{Mode, OFlags};
use serial_test::serial;

fn example_mapping() -> Mapping {
    Mapping::parse_map_mount(["b:0:10000:10000"]).unwrap()
}

fn open_dir(p: &Path) -> OwnedFd {
    rustix::fs::open(
        p,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

/// `stat -c %u:%g PATH` run inside `ns` (`nsenter --user`): the ids a
/// container whose user namespace is `ns` sees.
fn owner_inside(ns: &UserNamespace, path: &Path) -> String {
    let fd = ns.as_fd().as_raw_fd();
    let ns_path = format!("/proc/{}/fd/{fd}", std::process::id());
    common::run(
        "nsenter",
        &[
            &format!("--user={ns_path}"),
            "stat",
            "-c",
            "%u:%g",
            path.to_str().unwrap(),
        ],
    )
    .trim()
    .to_string()
}

// ---------------------------------------------------------------------------
// Hand over: make in one process, send, attach in another.

/// Not a test: the receiving process of `scm_rights_between_two_processes`
/// (run by it with `--ignored --exact`). Receives a mount on stdin (a Unix
/// socket) and attaches it at `$IDMAPPED_SCM_TARGET`.
#[test]
#[ignore = "helper process of scm_rights_between_two_processes"]
fn scm_child_helper() {
    let target = std::env::var_os("IDMAPPED_SCM_TARGET").expect("IDMAPPED_SCM_TARGET");
    let stdin = std::io::stdin();
    let m = DetachedMount::recv(stdin.as_fd()).expect("recv");
    assert_eq!(m.method(), CloneMethod::Adopted);
    m.attach(&target).expect("attach");
    println!("SCM-CHILD-ATTACHED");
}

#[test]
#[serial]
fn scm_rights_between_two_processes() {
    privileged!();
    let fs = TestFs::ext4();
    let src = fs.path("src");
    std::fs::create_dir(&src).unwrap();
    touch_owned(&src.join("a"), 1000, 1000);
    let target = fs.scratch("target");
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The child inherits this thread's (private) mount namespace.
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "scm_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IDMAPPED_SCM_TARGET", &target)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Idmapped where the kernel can, a plain clone where it cannot (5.10).
    let idmap = features::features().mount_setattr == Availability::Available;
    let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();
    let m = if idmap {
        DetachedMount::clone_with(&src, CloneFlags::empty(), &MountAttr::new().idmap(&ns)).unwrap()
    } else {
        DetachedMount::clone_tree(&src, CloneFlags::empty()).unwrap()
    };
    let fds_before = common::fd_count();
    m.send(&ours).unwrap();
    // Our copy is closed once sent.
    assert_eq!(common::fd_count(), fds_before - 1);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("SCM-CHILD-ATTACHED"),
        "child: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The other process attached our mount in our namespace.
    let seen = if idmap { (11000, 11000) } else { (1000, 1000) };
    assert_eq!(owner(&target.join("a")), seen);
    assert_eq!(read_idmap(&target).unwrap().is_idmapped(), idmap);

    // A socket that carries no fd, or two, is refused and leaks nothing.
    let (a, b) = UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut &a, b"x").unwrap();
    let e = DetachedMount::recv(&b).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidInput(_)), "{e}");
    drop(a);
    let e = DetachedMount::recv(&b).unwrap_err();
    assert!(e.to_string().contains("closed"), "{e}");
}

#[test]
#[serial]
fn from_fd_checks_it_is_a_mount_root() {
    privileged!();
    let fs = TestFs::tmpfs();
    std::fs::create_dir(fs.path("d")).unwrap();
    std::fs::write(fs.path("d/f"), b"x").unwrap();
    // A subdirectory is not the root of a mount.
    let e = DetachedMount::from_fd(open_dir(&fs.path("d"))).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotAMount, "{e}");
    // An attached mount's root: refused where the kernel can tell
    // (statmount, Linux 6.8, finds mounts of our namespace by id).
    let statmount = rustix::fs::statx(
        rustix::fs::CWD,
        &fs.root,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::from_bits_retain(0x4000),
    )
    .is_ok_and(|st| st.stx_mask & 0x4000 != 0);
    match DetachedMount::from_fd(open_dir(&fs.root)) {
        Err(e) => {
            assert!(statmount, "refused without statmount: {e}");
            assert_eq!(e.kind(), &ErrorKind::NotDetached, "{e}");
        }
        Ok(_) => assert!(
            !statmount,
            "an attached mount passed although statmount exists"
        ),
    }
    // A clone's fd is; re-wrapped, it attaches like the original.
    let m = DetachedMount::clone_tree(fs.path("d"), CloneFlags::empty()).unwrap();
    let m = DetachedMount::from_fd(OwnedFd::from(m)).unwrap();
    let t = fs.scratch("t");
    m.attach_to(open_dir(&t)).unwrap();
    assert_eq!(std::fs::read(t.join("f")).unwrap(), b"x");
}

// ---------------------------------------------------------------------------
// Another mount namespace.

/// A process in a mount namespace of its own whose root is `root`
/// (`unshare --mount` + `pivot_root`), like a container's init. The
/// programs it needs are reached through links to the old root.
struct Container {
    child: Child,
}

impl Container {
    fn start(root: &Path) -> Container {
        std::fs::create_dir_all(root.join(".old")).unwrap();
        for d in ["bin", "sbin", "usr", "lib", "lib64"] {
            if Path::new("/").join(d).exists() {
                std::os::unix::fs::symlink(format!(".old/{d}"), root.join(d)).unwrap();
            }
        }
        let script = format!(
            "cd '{}' && pivot_root . .old && cd / && exec sleep 1000",
            root.display()
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let c = Container { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        let comm = format!("/proc/{}/comm", c.pid());
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
            assert!(Instant::now() < deadline, "the container did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        c
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A path as the container sees it (through `/proc/PID/root`).
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(p.trim_start_matches('/'))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[serial]
fn attach_into_a_containers_mount_namespace() {
    privileged!();
    let fs = TestFs::tmpfs();
    let src = fs.scratch("src");
    std::fs::write(src.join("MARKER"), b"m").unwrap();
    let root = fs.path("");
    std::fs::create_dir_all(root.join("t")).unwrap();
    // Inside the container "/t"; in our namespace that is the host's /t.
    std::os::unix::fs::symlink("/t", root.join("abs")).unwrap();
    let c = Container::start(&root);
    let mount = || DetachedMount::clone_tree(&src, CloneFlags::empty()).unwrap();

    // By pid: the final symlink is resolved beneath the container's root.
    let a = mount()
        .attach_in_namespace(MountNamespace::Pid(c.pid()), "abs", &AttachOptions::new())
        .unwrap();
    assert_eq!(a.target, Path::new("t"));
    assert!(c.path("t/MARKER").exists());
    // Not in our namespace.
    assert!(!root.join("t/MARKER").exists());
    assert!(common::mounts_below(&root.join("t")).is_empty());

    // By a mount-namespace fd, creating the target.
    let nsfd = rustix::fs::open(
        format!("/proc/{}/ns/mnt", c.pid()).as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    let a = mount()
        .attach_in_namespace(
            MountNamespace::Fd(nsfd.as_fd()),
            "/new/dir",
            &AttachOptions::new().create(true),
        )
        .unwrap();
    assert!(a.created);
    assert!(c.path("new/dir/MARKER").exists());
    assert!(!root.join("new/dir/MARKER").exists());

    // By pidfd; a failure names the namespace and the component.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(c.pid()).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let e = mount()
        .attach_in_namespace(
            MountNamespace::Pidfd(pidfd.as_fd()),
            "missing/x",
            &AttachOptions::new(),
        )
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("mount namespace of pidfd"), "{text}");
    assert!(text.contains("\"missing\""), "{text}");
    assert!(e.context().is_some());
    // Our thread's namespace never changed.
    assert!(!root.join("missing").exists());
    assert_eq!(common::mounts_below(&root), std::slice::from_ref(&root));
}

// ---------------------------------------------------------------------------
// Atomic replace.

#[test]
#[serial]
fn replace_under_a_concurrent_reader() {
    privileged!();
    let fs = TestFs::tmpfs();
    let srcs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let s = fs.scratch(&format!("src{i}"));
            std::fs::write(s.join("gen"), format!("{i}")).unwrap();
            s
        })
        .collect();
    let target = fs.path("t");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("UNDER"), b"the directory underneath").unwrap();
    let rootfd = open_dir(&fs.root);
    let replace = AttachOptions::new().replace(true);
    let mount = |i: usize| DetachedMount::clone_tree(&srcs[i % 2], CloneFlags::empty()).unwrap();

    // Nothing mounted on the target: a plain attach, on every kernel.
    let a = mount(0).attach_beneath(&rootfd, "t", &replace).unwrap();
    assert!(!a.replaced);
    assert_eq!(common::mounts_below(&target).len(), 1);

    if features::features().move_mount_beneath != Availability::Available {
        // Probed: no MOVE_MOUNT_BENEATH (Linux < 6.5). Refused, nothing changed.
        let e = mount(1).attach_beneath(&rootfd, "t", &replace).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::KernelTooOld { since: "6.5", .. }),
            "{e}"
        );
        assert_eq!(std::fs::read(target.join("gen")).unwrap(), b"0");
        assert_eq!(common::mounts_below(&target).len(), 1);
        eprintln!(
            "replace: {:?} here, KernelTooOld checked",
            features::features().move_mount_beneath
        );
        return;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, reads, bad, target) = (stop.clone(), reads.clone(), bad.clone(), target.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let names: Vec<_> = std::fs::read_dir(&target)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                if names != ["gen"] {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for i in 1..=100 {
        let a = mount(i).attach_beneath(&rootfd, "t", &replace).unwrap();
        assert!(a.replaced, "replace {i}");
        assert_eq!(
            std::fs::read(target.join("gen")).unwrap(),
            format!("{}", i % 2).as_bytes()
        );
        // The old top is gone: one mount on the target, not a stack.
        assert_eq!(common::mounts_below(&target).len(), 1, "after replace {i}");
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let (reads, bad) = (reads.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    eprintln!("100 replaces, {reads} reads of the target, {bad} saw anything but the mount");
    assert!(reads > 0);
    assert_eq!(bad, 0);
}

// ---------------------------------------------------------------------------
// OCI semantics.

#[test]
#[serial]
fn rbind_idmap_maps_the_top_only_and_ridmap_every_mount() {
    privileged!();
    needs_mount_setattr!();
    let (outer, _inner, src) = common::tree_with_submount();
    let ns = UserNamespace::from_mapping(&example_mapping()).unwrap();

    // OCI ["rbind", "idmap"]: the submount is cloned but not idmapped.
    let t = outer.scratch("idmap");
    DetachedMount::clone_with(&src, CloneFlags::RECURSIVE, &MountAttr::new().idmap(&ns))
        .unwrap()
        .attach(&t)
        .unwrap();
    assert_eq!(owner(&t.join("top")), (11000, 11000));
    assert_eq!(owner(&t.join("sub/deep")), (1000, 1000));
    assert!(read_idmap(&t).unwrap().is_idmapped());
    assert!(!read_idmap(t.join("sub")).unwrap().is_idmapped());
    // What the container (user namespace 0 10000 10000) sees: its own 1000
    // on top, and the overflow id for the un-idmapped submount.
    assert_eq!(owner_inside(&ns, &t.join("top")), "1000:1000");
    assert_eq!(owner_inside(&ns, &t.join("sub/deep")), "65534:65534");

    // OCI ["rbind", "ridmap"]: every mount idmapped.
    let t2 = outer.scratch("ridmap");
    DetachedMount::clone_with(
        &src,
        CloneFlags::RECURSIVE,
        &MountAttr::new().idmap_recursive(&ns),
    )
    .unwrap()
    .attach(&t2)
    .unwrap();
    assert_eq!(owner(&t2.join("sub/deep")), (11000, 11000));
    assert_eq!(owner_inside(&ns, &t2.join("sub/deep")), "1000:1000");
    assert!(read_idmap(t2.join("sub")).unwrap().is_idmapped());

    // The same two through the two-call path on a clone (mount_setattr).
    let t3 = outer.scratch("idmap2");
    let mut m = DetachedMount::clone_tree(&src, CloneFlags::RECURSIVE).unwrap();
    m.set_attr(&MountAttr::new().idmap(&ns)).unwrap();
    m.attach(&t3).unwrap();
    assert_eq!(owner(&t3.join("top")), (11000, 11000));
    assert_eq!(owner(&t3.join("sub/deep")), (1000, 1000));
}

#[test]
#[serial]
fn ro_is_the_top_mount_and_rro_every_mount() {
    privileged!();
    needs_mount_setattr!();
    let (outer, _inner, src) = common::tree_with_submount();
    let write = |p: PathBuf| std::fs::write(p, b"w").map_err(|e| e.raw_os_error());

    let t = outer.scratch("ro");
    DetachedMount::clone_with(
        &src,
        CloneFlags::RECURSIVE,
        &MountAttr::new().set(MountAttrFlags::RDONLY),
    )
    .unwrap()
    .attach(&t)
    .unwrap();
    assert_eq!(write(t.join("new")), Err(Some(libc::EROFS)));
    assert_eq!(write(t.join("sub/new")), Ok(()));

    let t2 = outer.scratch("rro");
    DetachedMount::clone_with(
        &src,
        CloneFlags::RECURSIVE,
        &MountAttr::new().set_recursive(MountAttrFlags::RDONLY),
    )
    .unwrap()
    .attach(&t2)
    .unwrap();
    assert_eq!(write(t2.join("new")), Err(Some(libc::EROFS)));
    assert_eq!(write(t2.join("sub/new2")), Err(Some(libc::EROFS)));
}

#[test]
#[serial]
fn src_nofollow_clones_the_link_itself() {
    privileged!();
    let fs = TestFs::tmpfs();
    std::fs::write(fs.path("file"), b"content").unwrap();
    std::os::unix::fs::symlink("file", fs.path("link")).unwrap();
    let t = fs.scratch("t");
    for (flags, expect_link) in [(CloneFlags::empty(), false), (CloneFlags::NO_FOLLOW, true)] {
        let target = t.join(format!("target{}", u8::from(expect_link)));
        std::fs::write(&target, b"").unwrap();
        DetachedMount::clone_tree(fs.path("link"), flags)
            .unwrap()
            .attach(&target)
            .unwrap();
        let is_link = std::fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink();
        assert_eq!(is_link, expect_link, "{flags:?}");
        if expect_link {
            assert_eq!(std::fs::read_link(&target).unwrap(), Path::new("file"));
        } else {
            assert_eq!(std::fs::read(&target).unwrap(), b"content");
        }
    }
}

#[test]
#[serial]
fn oci_mappings_mean_on_disk_container_id_seen_host_id() {
    privileged!();
    // "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    // "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}]
    let uid = OciIdMapping {
        container_id: 0,
        host_id: 100000,
        size: 65536,
    };
    let gid = OciIdMapping {
        container_id: 0,
        host_id: 200000,
        size: 65536,
    };
    let mapping = Mapping::from_oci(&[uid], &[gid]).unwrap();
    assert_eq!(mapping.uids().seen(1000), Some(101000));
    let ns = UserNamespace::from_mapping(&mapping).unwrap();
    // The kernel's maps: containerID is the first ("inside") column.
    let fd = ns.as_fd().as_raw_fd();
    let ns_path = format!("--user=/proc/{}/fd/{fd}", std::process::id());
    let uid_map = common::run("nsenter", &[&ns_path, "cat", "/proc/self/uid_map"]);
    let gid_map = common::run("nsenter", &[&ns_path, "cat", "/proc/self/gid_map"]);
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(words(&uid_map), ["0", "100000", "65536"]);
    assert_eq!(words(&gid_map), ["0", "200000", "65536"]);
    // Invalid triples are refused before any system call.
    let bad = OciIdMapping { size: 0, ..uid };
    assert!(Mapping::from_oci(&[bad], &[gid]).is_err());
    assert!(Mapping::from_oci(&[uid], &[]).is_err());

    needs_mount_setattr!();
    // A mount idmapped with it: on-disk containerID+n is seen as hostID+n,
    // and the container sees its own id containerID+n.
    let fs = TestFs::ext4();
    let src = fs.path("src");
    std::fs::create_dir(&src).unwrap();
    touch_owned(&src.join("f"), 1000, 1000);
    let t = fs.scratch("t");
    DetachedMount::clone_with(&src, CloneFlags::empty(), &MountAttr::new().idmap(&ns))
        .unwrap()
        .attach(&t)
        .unwrap();
    assert_eq!(owner(&t.join("f")), (101000, 201000));
    assert_eq!(owner_inside(&ns, &t.join("f")), "1000:1000");
}
