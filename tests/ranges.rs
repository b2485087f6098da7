//! Per-pod id ranges: rules, durable state shared by many processes, replay
//! validation, subid discovery, and an allocated range used for a real
//! idmapped mount.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use idmapped::ranges::{
    Allocation, Allocator, Config, Pool, RuleViolation, StateProblem, SubidLookup, SubidProblem,
    SubidSource, Subids,
};
use idmapped::ErrorKind;

const L: u64 = 65536;
const TOP: u64 = 1 << 32;

/// Environment of a worker: `DIR PREFIX N` (allocate N keys PREFIX-0.. and
/// print "ALLOC KEY FIRST" for each, flushed, as soon as it is durable).
const WORKER_ENV: &str = "IDMAPPED_RANGES_WORKER";

/// Not a test on its own: the body of the worker processes the tests start
/// (they run it with `--ignored`; without the environment it does nothing).
#[test]
#[ignore = "the worker process of the multi-process tests"]
fn worker() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let mut parts = spec.split(' ');
    let (dir, prefix, n) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().parse::<usize>().unwrap(),
    );
    let mut alloc = Allocator::open(dir, &Config::new()).unwrap();
    for i in 0..n {
        let key = format!("{prefix}-{i}");
        let a = alloc.allocate(&key).unwrap();
        println!("ALLOC {} {}", a.key(), a.first());
    }
}

fn spawn_worker(dir: &Path, prefix: &str, n: usize) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WORKER_ENV, format!("{} {prefix} {n}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The "ALLOC KEY FIRST" lines of a worker's output.
fn allocations_of(out: &str) -> Vec<(String, u32)> {
    out.lines()
        // libtest's "test worker ... " may precede the first line.
        .filter_map(|l| l.find("ALLOC ").map(|at| &l[at + 6..]))
        .filter_map(|l| {
            let (k, f) = l.split_once(' ')?;
            Some((k.to_owned(), f.parse().ok()?))
        })
        .collect()
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("state");
    (t, d)
}

/// No two allocations share an id, each is one aligned block of the layout.
fn assert_disjoint(list: &[Allocation], ids_per_pod: u64) {
    let mut firsts = HashSet::new();
    for a in list {
        assert_eq!(u64::from(a.count()), ids_per_pod, "{a:?}");
        assert_eq!(u64::from(a.first()) % ids_per_pod, 0, "{a:?}");
        assert!(u64::from(a.first()) >= ids_per_pod, "{a:?}");
        assert!(
            u64::from(a.first()) + u64::from(a.count()) < TOP,
            "{a:?} reaches 4294967295"
        );
        assert!(firsts.insert(a.first()), "two keys share {}", a.first());
    }
    let mut sorted: Vec<_> = list.iter().map(|a| a.first()).collect();
    let before = sorted.clone();
    sorted.sort_unstable();
    assert_eq!(before, sorted, "list() is sorted by first id");
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn state_error(r: idmapped::Result<Allocator>) -> (String, StateProblem, idmapped::Error) {
    let e = r.unwrap_err();
    match e.kind() {
        ErrorKind::InvalidState { file, problem } => (file.clone(), problem.clone(), e),
        other => panic!("expected InvalidState, got {other:?}: {e}"),
    }
}

fn record(first: u64, count: u64) -> String {
    let m = format!(r#"[{{"hostId":{first},"containerId":0,"length":{count}}}]"#);
    format!("{{\"uidMappings\":{m},\"gidMappings\":{m}}}\n")
}

// ------------------------------------------------------------ one process

#[test]
fn allocate_is_durable_idempotent_and_released() {
    let (_t, dir) = state_dir();
    let mut a = Allocator::open(&dir, &Config::new()).unwrap();
    let p1 = a.allocate("pod-1").unwrap();
    assert_eq!(a.allocate("pod-1").unwrap(), p1, "same key, same range");
    let p2 = a.allocate("pod-2").unwrap();
    assert_ne!(p1.first(), p2.first());
    // The record is in the kubelet's format, under the key's name.
    let text = std::fs::read_to_string(dir.join("pod-1")).unwrap();
    assert_eq!(text, record(p1.first().into(), L));
    // Another allocator (as after a restart) sees the same ranges.
    let mut b = Allocator::open(&dir, &Config::new()).unwrap();
    assert_eq!(b.allocate("pod-1").unwrap(), p1);
    assert_eq!(b.list().unwrap().len(), 2);
    // A release through one is seen by the other.
    assert_eq!(b.release("pod-1").unwrap(), Some(p1.clone()));
    assert_eq!(
        b.release("pod-1").unwrap(),
        None,
        "no error without a range"
    );
    assert_eq!(a.list().unwrap(), vec![p2.clone()]);
    // reconcile releases every key not listed.
    a.allocate("pod-3").unwrap();
    a.allocate("pod-4").unwrap();
    let gone = a.reconcile(["pod-3"]).unwrap();
    let mut gone_keys: Vec<_> = gone.iter().map(|x| x.key().to_owned()).collect();
    gone_keys.sort();
    assert_eq!(gone_keys, ["pod-2", "pod-4"]);
    assert_eq!(
        b.list()
            .unwrap()
            .iter()
            .map(Allocation::key)
            .collect::<Vec<_>>(),
        ["pod-3"]
    );
    assert!(matches!(
        a.allocate("../x").unwrap_err().kind(),
        ErrorKind::InvalidKey { .. }
    ));
}

#[test]
fn released_and_reallocated_elsewhere_is_seen() {
    // A key released and allocated again by another allocator may get a new
    // range under the same file name: the first allocator must not go on
    // believing the old one.
    let (_t, dir) = state_dir();
    let small = Config::new().pool(Pool::new(L, 3 * L)).max_pods(3);
    let mut a = Allocator::open(&dir, &small).unwrap();
    let mut b = Allocator::open(&dir, &small).unwrap();
    let k = a.allocate("k").unwrap();
    for _ in 0..20 {
        b.release("k").unwrap();
        let other = b.allocate("other").unwrap();
        let again = b.allocate("k").unwrap();
        assert_eq!(a.allocate("k").unwrap(), again);
        let third = a.allocate("third").unwrap();
        assert_disjoint(&a.list().unwrap(), L);
        assert_eq!(
            HashSet::from([other.first(), again.first(), third.first()]).len(),
            3
        );
        a.release("other").unwrap();
        a.release("third").unwrap();
    }
    drop(k);
}

#[test]
fn views_kept_current_across_allocators() {
    // b changes the state a few allocations at a time, then many, then by
    // hand; a must see each change exactly (the paths through
    // `.~generation`: nothing new, a few recent records, a directory scan).
    let (_t, dir) = state_dir();
    let mut a = Allocator::open(&dir, &Config::new()).unwrap();
    let mut b = Allocator::open(&dir, &Config::new()).unwrap();
    for (round, n) in [1usize, 5, 31, 32, 33, 100].into_iter().enumerate() {
        for i in 0..n {
            b.allocate(&format!("b{round}-{i}")).unwrap();
        }
        let mine = a.allocate(&format!("a{round}")).unwrap();
        assert_eq!(a.list().unwrap(), b.list().unwrap(), "after {n}");
        assert_disjoint(&a.list().unwrap(), L);
        assert_eq!(b.allocate(mine.key()).unwrap(), mine);
    }
    // A record removed by hand is noticed when its key is asked for.
    let gone = a.allocate("by-hand").unwrap();
    std::fs::remove_file(dir.join("by-hand")).unwrap();
    let again = b.allocate("by-hand").unwrap();
    assert!(dir.join("by-hand").exists());
    assert_eq!(a.allocate("by-hand").unwrap(), again);
    drop(gone);
    // A damaged .~generation only costs a full read.
    std::fs::write(dir.join(".~generation"), "garbage").unwrap();
    let x = a.allocate("after-damage").unwrap();
    assert_eq!(b.allocate("after-damage").unwrap(), x);
    assert_eq!(a.list().unwrap(), b.list().unwrap());
    assert_eq!(
        Allocator::open(&dir, &Config::new())
            .unwrap()
            .list()
            .unwrap(),
        a.list().unwrap()
    );
}

#[test]
fn exhaustion_and_the_last_block() {
    // A pool of the top 111 blocks: the last one contains 4294967295 and is
    // never handed out, so 110 pods fit, exactly.
    let (_t, dir) = state_dir();
    let first = TOP - 111 * L;
    let cfg = Config::new().pool(Pool::new(first, 111 * L));
    assert_eq!(cfg.layout().unwrap().usable_blocks(), 110);
    let mut a = Allocator::open(&dir, &cfg).unwrap();
    let mut all = Vec::new();
    for i in 0..110 {
        all.push(a.allocate(&format!("p{i}")).unwrap());
    }
    assert!(all.iter().all(|x| u64::from(x.first()) != TOP - L));
    assert_disjoint(&a.list().unwrap(), L);
    let e = a.allocate("one-more").unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::PoolExhausted { usable: 110, .. }),
        "{e}"
    );
    assert!(!dir.join("one-more").exists());
    // Every block was used once: the free one after a release is that block.
    let freed = a.release("p42").unwrap().unwrap();
    assert_eq!(a.allocate("one-more").unwrap().first(), freed.first());

    // The default pool leaves its last block out as well.
    assert_eq!(
        Config::new().layout().unwrap().block_first(65533),
        Some(4294836224)
    );
    assert_eq!(Config::new().layout().unwrap().block_first(65534), None);
}

#[test]
fn the_wrap_case_is_refused() {
    // 327680 + 4294836224 = 4295163904 > 2^32: in 32 bits the top blocks of
    // this pool would be host ids 0, 65536, 131072.
    let (_t, dir) = state_dir();
    let e = Allocator::open(&dir, &Config::new().pool(Pool::new(327680, 4294836224))).unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::RangeRule(RuleViolation::PastIdSpace {
            first: 327680,
            count: 4294836224
        })
    );
    assert!(e.to_string().contains("4295163904"), "{e}");
    assert!(!dir.exists(), "a refused setting creates nothing");
}

#[test]
fn ids_per_pod_131072() {
    let (_t, dir) = state_dir();
    let cfg = Config::new().ids_per_pod(131072);
    let mut a = Allocator::open(&dir, &cfg).unwrap();
    for i in 0..50 {
        let x = a.allocate(&format!("p{i}")).unwrap();
        assert_eq!(x.count(), 131072);
        assert_eq!(x.map_mount(), format!("b:0:{}:131072", x.first()));
        assert_eq!(x.mapping().uids().seen(131071), Some(x.first() + 131071));
    }
    assert_disjoint(&a.list().unwrap(), 131072);
    assert_eq!(
        Allocator::open(&dir, &cfg).unwrap().list().unwrap().len(),
        50
    );
}

#[test]
fn changed_ids_per_pod_against_existing_state_is_refused() {
    let (_t, dir) = state_dir();
    let mut a = Allocator::open(&dir, &Config::new()).unwrap();
    let p = a.allocate("pod").unwrap();
    let before = names_in(&dir);
    let (file, problem, e) = state_error(Allocator::open(&dir, &Config::new().ids_per_pod(131072)));
    assert_eq!(file, "pod");
    assert_eq!(
        problem,
        StateProblem::WrongSize {
            first: p.first().into(),
            count: L,
            ids_per_pod: 131072
        }
    );
    assert_eq!(e.path(), Some(dir.join("pod").as_path()));
    assert_eq!(names_in(&dir), before, "nothing changed");
    // And back with the settings it was written with.
    assert_eq!(
        Allocator::open(&dir, &Config::new())
            .unwrap()
            .list()
            .unwrap(),
        vec![p]
    );
}

// ------------------------------------------------------- replay rejections

/// Writes `name` with `content` into a fresh state holding one valid record
/// ("good" at block 2), opens it, checks the refusal names `name`, and that
/// nothing in the directory changed.
fn rejected(name: &str, content: &str) -> StateProblem {
    let (_t, dir) = state_dir();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("good"), record(2 * L, L)).unwrap();
    std::fs::write(dir.join(name), content).unwrap();
    let before = names_in(&dir);
    let contents: Vec<_> = before
        .iter()
        .map(|n| std::fs::read(dir.join(n)).ok())
        .collect();
    let (file, problem, e) = state_error(Allocator::open(&dir, &Config::new()));
    assert_eq!(file, name);
    assert!(e.to_string().contains(name), "{e}");
    assert_eq!(names_in(&dir), before);
    let after: Vec<_> = before
        .iter()
        .map(|n| std::fs::read(dir.join(n)).ok())
        .collect();
    assert_eq!(contents, after);
    problem
}

#[test]
fn replay_rejects_malformed() {
    for bad in [
        "",
        "{",
        "garbage",
        r#"{"uidMappings":[]}"#,
        &record(3 * L, L).replace("\"containerId\":0", "\"containerId\":1"),
    ] {
        assert!(
            matches!(rejected("pod-x", bad), StateProblem::Malformed { .. }),
            "{bad:?}"
        );
    }
    let differ = record(3 * L, L).replacen(&(3 * L).to_string(), &(4 * L).to_string(), 1);
    assert!(
        matches!(rejected("pod-x", &differ), StateProblem::Malformed { detail } if detail.contains("differ"))
    );
    let huge = format!("{}{}", record(3 * L, L), " ".repeat(5000));
    assert!(matches!(
        rejected("pod-x", &huge),
        StateProblem::Malformed { .. }
    ));
}

#[test]
fn replay_rejects_misaligned() {
    assert_eq!(
        rejected("pod-x", &record(3 * L + 4096, L)),
        StateProblem::Misaligned {
            first: 3 * L + 4096,
            ids_per_pod: 65536
        }
    );
}

#[test]
fn replay_rejects_outside_the_pool() {
    assert!(matches!(
        rejected("pod-x", &record(0, L)),
        StateProblem::OutsidePool { first: 0, .. }
    ));
    assert!(matches!(
        rejected("pod-x", &record(TOP, L)),
        StateProblem::OutsidePool { .. }
    ));
    assert!(matches!(
        rejected("pod-x", &record(u64::MAX - L + 1, L)),
        StateProblem::OutsidePool { .. }
    ));
}

#[test]
fn replay_rejects_the_block_containing_4294967295() {
    assert_eq!(
        rejected("pod-x", &record(TOP - L, L)),
        StateProblem::UnusableBlock {
            first: TOP - L,
            count: L
        }
    );
}

#[test]
fn replay_rejects_wrong_size() {
    assert!(matches!(
        rejected("pod-x", &record(4 * L, 2 * L)),
        StateProblem::WrongSize { count: 131072, .. }
    ));
}

#[test]
fn replay_rejects_overlap() {
    // "good" sorts before "pod-x": the later file is the one named.
    assert_eq!(
        rejected("pod-x", &record(2 * L, L)),
        StateProblem::Overlap {
            first: 2 * L,
            count: L,
            other: "good".into()
        }
    );
}

#[test]
fn replay_rejects_names_that_are_not_keys_and_non_files() {
    assert!(matches!(
        rejected("bad name", &record(3 * L, L)),
        StateProblem::NotAKey { .. }
    ));
    let (_t, dir) = state_dir();
    std::fs::create_dir_all(dir.join("subdir")).unwrap();
    assert_eq!(
        state_error(Allocator::open(&dir, &Config::new())).1,
        StateProblem::NotRegularFile
    );
    std::fs::remove_dir(dir.join("subdir")).unwrap();
    std::fs::write(dir.join("target"), record(3 * L, L)).unwrap();
    std::os::unix::fs::symlink("target", dir.join("link")).unwrap();
    let (file, problem, _) = state_error(Allocator::open(&dir, &Config::new()));
    assert_eq!(
        (file.as_str(), problem),
        ("link", StateProblem::NotRegularFile)
    );
}

#[test]
fn leftover_temporary_files_are_ignored_and_cleaned() {
    let (_t, dir) = state_dir();
    let mut a = Allocator::open(&dir, &Config::new()).unwrap();
    let p = a.allocate("pod").unwrap();
    drop(a);
    // What a run killed between create and rename leaves: possibly empty,
    // possibly a complete record for a key that then has none.
    std::fs::write(dir.join(".~tmp-4242-1"), "").unwrap();
    std::fs::write(dir.join(".~tmp-4242-2"), record(3 * L, L)).unwrap();
    let mut a = Allocator::open(&dir, &Config::new()).unwrap();
    assert_eq!(a.list().unwrap(), vec![p]);
    assert!(
        names_in(&dir).iter().all(|n| !n.starts_with(".~tmp-")),
        "{:?}",
        names_in(&dir)
    );
}

// ----------------------------------------------------------- many processes

#[test]
fn many_processes_at_once_no_overlap_none_lost() {
    let (_t, dir) = state_dir();
    Allocator::open(&dir, &Config::new()).unwrap();
    // Eight processes; pairs share their key names, so every key is asked
    // for by two processes at once and must get one range.
    let children: Vec<_> = (0..8)
        .map(|i| spawn_worker(&dir, &format!("w{}", i / 2), 60))
        .collect();
    let mut seen: HashMap<String, u32> = HashMap::new();
    for mut c in children {
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(c.wait().unwrap().success());
        let got = allocations_of(&out);
        assert_eq!(got.len(), 60, "{out}");
        for (k, f) in got {
            if let Some(prev) = seen.insert(k.clone(), f) {
                assert_eq!(prev, f, "{k} got two ranges");
            }
        }
    }
    assert_eq!(seen.len(), 4 * 60);
    let list = Allocator::open(&dir, &Config::new())
        .unwrap()
        .list()
        .unwrap();
    assert_disjoint(&list, L);
    let listed: HashMap<String, u32> = list
        .iter()
        .map(|a| (a.key().to_owned(), a.first()))
        .collect();
    assert_eq!(listed, seen, "none lost, none extra");
}

#[test]
fn sigkill_at_random_points_then_reopen() {
    let (_t, dir) = state_dir();
    Allocator::open(&dir, &Config::new()).unwrap();
    let mut promised: HashMap<String, u32> = HashMap::new();
    let mut temps_seen = 0;
    for round in 0..40 {
        // Two writers at once, each killed after a random delay.
        let children: Vec<_> = (0..2)
            .map(|j| spawn_worker(&dir, &format!("r{round}-{j}"), 1000))
            .collect();
        let delay = random_u64() % 40_000;
        std::thread::sleep(Duration::from_micros(2_000 + delay));
        for mut c in children {
            let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let mut out = String::new();
            c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            c.wait().unwrap();
            for (k, f) in allocations_of(&out) {
                promised.insert(k, f);
            }
        }
        temps_seen += names_in(&dir)
            .iter()
            .filter(|n| n.starts_with(".~tmp-"))
            .count();
        // Reopen: valid, and everything a killed process printed is there,
        // with the range it printed.
        let mut a = Allocator::open(&dir, &Config::new()).unwrap();
        let list = a.list().unwrap();
        assert_disjoint(&list, L);
        let listed: HashMap<&str, u32> = list.iter().map(|x| (x.key(), x.first())).collect();
        for (k, f) in &promised {
            assert_eq!(listed.get(k.as_str()), Some(f), "{k} was handed out as {f}");
        }
        assert!(names_in(&dir).iter().all(|n| !n.starts_with(".~tmp-")));
    }
    eprintln!(
        "sigkill: {} allocations promised, {temps_seen} temporary files left by killed runs and cleaned",
        promised.len()
    );
    assert!(!promised.is_empty());
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).unwrap();
    u64::from_ne_bytes(b)
}

// ------------------------------------------------------------ subids

const USER: &str = "idmapped-test-kubelet";

fn subid_problem(r: idmapped::Result<Subids>) -> SubidProblem {
    match r.unwrap_err().kind() {
        ErrorKind::Subids(p) => p.clone(),
        other => panic!("{other:?}"),
    }
}

/// `/etc/subuid` and `/etc/subgid` in a private mount namespace: matching,
/// mismatching, missing; through `getsubids` when it is installed, and by
/// reading the files without it.
#[test]
fn subids_discovery_in_a_private_mount_namespace() {
    privileged!();
    if !Path::new("/etc/subuid").exists() || !Path::new("/etc/subgid").exists() {
        let why = "/etc/subuid or /etc/subgid is missing: nothing to bind-mount over";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED subids_discovery: {why}");
        return;
    }
    let system = SubidLookup::system();
    let installed = ["/usr/bin/getsubids", "/bin/getsubids"]
        .iter()
        .any(|p| Path::new(p).exists());
    assert_eq!(system.getsubids.is_some(), installed, "{system:?}");
    if !installed {
        // CI installs it (ci/packages.sh): there both lookups must run.
        assert!(
            std::env::var_os("CI").is_none(),
            "getsubids is not installed (Debian: package uidmap; ci/packages.sh installs it)"
        );
        eprintln!("getsubids is not installed (Debian: package uidmap): files only");
    }
    let mut lookups = vec![SubidLookup::files_only()];
    if installed {
        lookups.push(system.clone());
    }
    let range = "327680:7208960";
    let line = format!("root:1:2\n{USER}:{range}\n");
    let _m = common::SubidFiles::bind(&line, &line);
    for lookup in &lookups {
        let s = Subids::lookup(USER, lookup).unwrap();
        assert_eq!(s.pool, Pool::new(327680, 7208960));
        assert_eq!(
            matches!(s.source, SubidSource::Getsubids(_)),
            lookup.getsubids.is_some()
        );
        // And the pool works.
        let (_t, dir) = state_dir();
        let mut a = Allocator::open(&dir, &Config::new().pool(s.pool)).unwrap();
        let x = a.allocate("p").unwrap();
        assert!((327680..327680 + 7208960).contains(&u64::from(x.first())));
    }
    assert_eq!(Pool::from_subids(USER).unwrap(), Pool::new(327680, 7208960));
    // Mismatching.
    let gid_line = format!("{USER}:393216:7208960\n");
    let _m2 = common::SubidFiles::bind(&line, &gid_line);
    for lookup in &lookups {
        assert!(
            matches!(
                subid_problem(Subids::lookup(USER, lookup)),
                SubidProblem::Mismatch { .. }
            ),
            "{lookup:?}"
        );
    }
    // Missing (no gid range for the user, then none at all).
    let _m3 = common::SubidFiles::bind(&line, "root:1:2\n");
    for lookup in &lookups {
        assert!(matches!(
            subid_problem(Subids::lookup(USER, lookup)),
            SubidProblem::Missing { kind: "gid", .. }
        ));
    }
    let _m4 = common::SubidFiles::bind("", "");
    for lookup in &lookups {
        assert!(matches!(
            subid_problem(Subids::lookup(USER, lookup)),
            SubidProblem::Missing { kind: "uid", .. }
        ));
    }
    // The wrap case from a subuid file: found, then refused by the rules.
    let wrap = format!("{USER}:327680:4294836224\n");
    let _m5 = common::SubidFiles::bind(&wrap, &wrap);
    for lookup in &lookups {
        let pool = Subids::lookup(USER, lookup).unwrap().pool;
        assert!(matches!(
            Config::new().pool(pool).layout().unwrap_err().kind(),
            ErrorKind::RangeRule(RuleViolation::PastIdSpace { .. })
        ));
    }
    // Bind mounts stacked on /etc/sub[ug]id go with this thread's namespace.
}

// ------------------------------------------------ a real idmapped mount

#[test]
fn an_allocated_range_idmaps_a_real_mount() {
    privileged!();
    needs_mount_setattr!();
    use idmapped::{CloneFlags, DetachedMount, MountAttr, UserNamespace};
    let fs = common::TestFs::ext4();
    let vol = fs.path("vol");
    std::fs::create_dir(&vol).unwrap();
    common::touch_owned(&vol.join("root-file"), 0, 0);
    common::touch_owned(&vol.join("user-file"), 1000, 1000);
    let state = fs.scratch("state");
    let mut a = Allocator::open(&state, &Config::new()).unwrap();
    let pod = a.allocate("pod").unwrap();
    let first = pod.first();
    let userns = UserNamespace::from_mapping(pod.mapping()).unwrap();
    let target = fs.scratch("target");
    let mount =
        DetachedMount::clone_with(&vol, CloneFlags::empty(), &MountAttr::new().idmap(&userns))
            .unwrap();
    mount.attach(&target).unwrap();
    // On-disk 0 is seen as the pod's root on the host, 1000 as first + 1000.
    assert_eq!(common::owner(&target.join("root-file")), (first, first));
    assert_eq!(
        common::owner(&target.join("user-file")),
        (first + 1000, first + 1000)
    );
    // The pod's root (host id first) writes through the mount: stored as 0.
    let t = target.clone();
    common::as_fsid(first, first, move || {
        std::fs::write(t.join("new"), b"pod").unwrap()
    });
    assert_eq!(common::owner(&vol.join("new")), (0, 0));
    assert_eq!(common::owner(&target.join("new")), (first, first));
    let _ = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH);
}
