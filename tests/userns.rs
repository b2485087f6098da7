//! User namespaces from a mapping: the maps the kernel sees, reaping on every
//! path, threads, the cache. Root only.

mod common;

use std::os::unix::fs::MetadataExt;

use idmapped::{ErrorKind, Mapping, UserNamespace, UsernsCache};
use rustix::thread::{CapabilitySet, CapabilitySets};
use serial_test::serial;

fn mapping(spec: &[&str]) -> Mapping {
    Mapping::parse_map_mount(spec.iter().copied()).unwrap()
}

/// The kernel's view of a namespace's maps: enter it with a child and read
/// its /proc files (`unshare`/`nsenter` from util-linux).
fn kernel_maps(ns: &UserNamespace) -> (String, String) {
    let fd = rustix::fd::AsRawFd::as_raw_fd(&rustix::fd::AsFd::as_fd(ns));
    let path = format!("/proc/{}/fd/{fd}", std::process::id());
    let read = |file: &str| {
        common::run(
            "nsenter",
            &[
                &format!("--user={path}"),
                "cat",
                &format!("/proc/self/{file}"),
            ],
        )
    };
    (read("uid_map"), read("gid_map"))
}

fn normalize(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[serial]
fn maps_are_written_as_given() {
    privileged!();
    let m = mapping(&["u:0:100000:65536", "g:0:200000:1000", "g:1000:300000:5"]);
    let ns = UserNamespace::from_mapping(&m).unwrap();
    let (u, g) = kernel_maps(&ns);
    assert_eq!(normalize(&u), "0 100000 65536");
    assert_eq!(normalize(&g), "0 200000 1000\n1000 300000 5");
    assert_eq!(ns.mapping(), Some(&m));
    assert!(!ns.is_initial());
    assert!(!ns.lacks_map());

    // setgroups is left alone when the caller may write gid_map without it.
    let fd = rustix::fd::AsRawFd::as_raw_fd(&rustix::fd::AsFd::as_fd(&ns));
    let setgroups = common::run(
        "nsenter",
        &[
            &format!("--user=/proc/{}/fd/{fd}", std::process::id()),
            "cat",
            "/proc/self/setgroups",
        ],
    );
    assert_eq!(setgroups.trim(), "allow");

    // Opening the same namespace by path gives the same inode and mapping.
    let again = UserNamespace::open(format!("/proc/self/fd/{fd}")).unwrap();
    let a = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
    let b = rustix::fs::fstat(&again).unwrap();
    assert_eq!(a.ino(), b.st_ino);
}

#[test]
#[serial]
fn child_is_reaped_when_a_map_write_fails() {
    privileged!();
    let children = common::child_count();
    // A thread without CAP_SETUID/CAP_SETGID cannot map ids other than its own.
    let result = std::thread::spawn(|| {
        let empty = CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        };
        rustix::thread::set_capabilities(None, empty).unwrap();
        UserNamespace::from_mapping(&mapping(&["b:0:100000:1000"]))
    })
    .join()
    .unwrap();
    let err = result.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("uid_map"), "{err}");
    assert_eq!(common::child_count(), children, "a child was left behind");
    assert_no_zombies();
}

fn assert_no_zombies() {
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split(' ');
        let (state, ppid) = (f.next(), f.next());
        assert!(
            !(state == Some("Z") && ppid == Some(me.as_str())),
            "zombie child: {stat}"
        );
    }
}

#[test]
#[serial]
fn many_threads_at_once() {
    privileged!();
    let children = common::child_count();
    std::thread::scope(|s| {
        for t in 0..8u32 {
            s.spawn(move || {
                for i in 0..200u32 {
                    let base = 1_000_000 + (t * 200 + i) * 1000;
                    let m = mapping(&[&format!("b:0:{base}:1000")]);
                    let ns = UserNamespace::from_mapping(&m).unwrap();
                    assert_eq!(ns.mapping(), Some(&m));
                }
            });
        }
    });
    assert_eq!(common::child_count(), children);
    assert_no_zombies();
}

#[test]
#[serial]
fn cache_returns_one_namespace_per_mapping() {
    privileged!();
    let cache = UsernsCache::new();
    let a = cache
        .get(&mapping(&[
            "u:0:100000:10",
            "u:10:100010:10",
            "g:0:100000:20",
        ]))
        .unwrap();
    // Same mapping, other order and splitting: same namespace.
    let b = cache
        .get(&mapping(&["g:0:100000:20", "u:0:100000:20"]))
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    let c = cache.get(&mapping(&["b:0:200000:20"])).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &c));
    assert_eq!(cache.len(), 2);
    cache.clear();
    assert!(cache.is_empty());
}
