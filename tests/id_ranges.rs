//! The `id-ranges` example binary, black-box: commands, output, exit status.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{id_ranges, Run};

const TOP: u64 = 1 << 32;

fn run(state: &Path, args: &[&str]) -> Run {
    let mut all = vec![format!("--state={}", state.display())];
    all.extend(args.iter().map(|s| s.to_string()));
    id_ranges(&all, &[])
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    // Nested and missing: DIR is created.
    let d = t.path().join("var/lib/ranges");
    (t, d)
}

/// `b:0:FIRST:COUNT` -> (FIRST, COUNT).
fn parse_map_mount(line: &str) -> (u64, u64) {
    let rest = line.trim_end().strip_prefix("b:0:").expect(line);
    let (f, c) = rest.split_once(':').expect(line);
    (f.parse().unwrap(), c.parse().unwrap())
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn allocate_prints_a_map_mount_value_and_is_idempotent() {
    let (_t, dir) = state_dir();
    let r = run(&dir, &["allocate", "pod-a"]).expect(0);
    assert!(dir.is_dir(), "DIR is created");
    let (first, count) = parse_map_mount(&r.stdout);
    assert_eq!(r.stdout, format!("b:0:{first}:{count}\n"));
    assert_eq!(count, 65536);
    assert_eq!(first % 65536, 0);
    assert!(first >= 65536 && first + count < TOP, "{first}");
    assert_eq!(run(&dir, &["allocate", "pod-a"]).expect(0).stdout, r.stdout);
    let other = run(&dir, &["allocate", "pod-b"]).expect(0);
    assert_ne!(other.stdout, r.stdout);
    // The value is a valid --map-mount value, with the columns of one.
    let m = idmapped::Mapping::parse_map_mount([r.stdout.trim()]).unwrap();
    assert_eq!(m.uids().seen(0), Some(first as u32));
}

#[test]
fn json_shapes() {
    let (_t, dir) = state_dir();
    assert_eq!(run(&dir, &["--json", "list"]).expect(0).stdout, "[]\n");
    let r = run(&dir, &["--json", "allocate", "k1"]).expect(0);
    let (first, _) = parse_map_mount(&run(&dir, &["allocate", "k1"]).expect(0).stdout);
    let one =
        format!(r#"{{"key":"k1","first":{first},"count":65536,"map_mount":"b:0:{first}:65536"}}"#);
    assert_eq!(r.stdout, format!("{one}\n"));
    let r2 = run(&dir, &["allocate", "k2", "--json"]).expect(0);
    let list = run(&dir, &["list", "--json"]).expect(0).stdout;
    assert!(list.starts_with('[') && list.ends_with("]\n"), "{list}");
    assert!(list.contains(&one), "{list}");
    assert!(list.contains(r2.stdout.trim()), "{list}");
    let rel = run(&dir, &["--json", "release", "k1"]).expect(0).stdout;
    assert!(rel.contains(r#""key":"k1","released":true"#), "{rel}");
    let rel = run(&dir, &["--json", "release", "k1"]).expect(0).stdout;
    assert_eq!(rel, "{\"key\":\"k1\",\"released\":false}\n");
    let rec = run(&dir, &["--json", "reconcile"]).expect(0).stdout;
    assert!(rec.starts_with("{\"released\":[{\"key\":\"k2\""), "{rec}");
}

#[test]
fn list_release_reconcile() {
    let (_t, dir) = state_dir();
    let mut firsts = Vec::new();
    for k in ["c", "a", "b", "d"] {
        let (f, _) = parse_map_mount(&run(&dir, &["allocate", k]).expect(0).stdout);
        firsts.push((f, k.to_string()));
    }
    firsts.sort();
    let expected: String = firsts
        .iter()
        .map(|(f, k)| format!("{k} {f} 65536\n"))
        .collect();
    assert_eq!(
        run(&dir, &["list"]).expect(0).stdout,
        expected,
        "sorted by FIRST"
    );
    let r = run(&dir, &["release", "never-allocated"]).expect(0);
    assert_eq!(r.stdout, "");
    run(&dir, &["release", "a"]).expect(0);
    run(&dir, &["reconcile", "b", "x"]).expect(0);
    let left = run(&dir, &["list"]).expect(0).stdout;
    assert!(
        left.starts_with("b ") && left.lines().count() == 1,
        "{left}"
    );
    run(&dir, &["reconcile"]).expect(0);
    assert_eq!(run(&dir, &["list"]).expect(0).stdout, "");
}

#[test]
fn usage_errors_exit_2_and_create_nothing() {
    let (_t, dir) = state_dir();
    let long = "k".repeat(254);
    let cases: Vec<Vec<&str>> = vec![
        vec!["allocate", "."],
        vec!["allocate", ".."],
        vec!["allocate", "a/b"],
        vec!["allocate", "a b"],
        vec!["allocate", ""],
        vec!["allocate", &long],
        vec!["release", "é"],
        vec!["reconcile", "ok", "../x"],
        vec!["allocate"],
        vec!["allocate", "a", "b"],
        vec!["list", "x"],
        vec!["frobnicate"],
        vec![],
        vec!["--bogus", "list"],
        vec!["--pool=327680:4294836224", "list"],
        vec!["--pool=327680:4294836224", "allocate", "k"],
        vec!["--pool=100000:7208960", "list"],
        vec!["--pool=0:7208960", "list"],
        vec!["--pool=65536:65537", "list"],
        vec!["--pool=65536", "list"],
        vec!["--pool=x:y", "list"],
        vec!["--ids-per-pod=65537", "list"],
        vec!["--ids-per-pod=0", "list"],
        vec!["--ids-per-pod=4294967296", "list"],
        vec!["--max-pods=70000", "list"],
        vec!["--max-pods=-1", "list"],
        vec!["--pool=65536:7208960", "--subids=kubelet", "list"],
        vec!["--json=yes", "list"],
    ];
    for args in cases {
        let r = run(&dir, &args);
        assert_eq!(r.code, Some(2), "{args:?}: {r:#?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:#?}");
        assert!(r.stderr.starts_with("id-ranges: "), "{r:#?}");
        assert!(!dir.exists(), "{args:?} created DIR");
    }
    let r = id_ranges(&["list"], &[]);
    assert_eq!(r.code, Some(2), "--state is required: {r:#?}");
    // The wrap case names the value.
    let r = run(&dir, &["--pool=327680:4294836224", "list"]);
    r.stderr_line_names(&["327680:4294836224", "4295163904"]);
    // A key may start with '-', after "--".
    let dash = run(&dir, &["allocate", "--", "-k"]).expect(0).stdout;
    assert_eq!(
        run(&dir, &["list"]).expect(0).stdout.split(' ').next(),
        Some("-k")
    );
    run(&dir, &["release", "--", "-k"]).expect(0);
    drop(dash);
    // 253 characters is a key.
    run(&dir, &["allocate", &"k".repeat(253)]).expect(0);
    assert!(id_ranges(&["--help"], &[])
        .expect(0)
        .stdout
        .contains("reconcile KEY..."));
}

#[test]
fn exhaustion_exits_1() {
    let (_t, dir) = state_dir();
    let p = ["--pool=65536:131072", "--max-pods=2"];
    let a = run(&dir, &[p[0], p[1], "allocate", "a"]).expect(0);
    let b = run(&dir, &[p[0], p[1], "allocate", "b"]).expect(0);
    assert_ne!(a.stdout, b.stdout);
    let r = run(&dir, &[p[0], p[1], "allocate", "c"]).expect(1);
    r.stderr_line_names(&["exhausted"]);
    // The last block of a pool ending at 2^32 is never handed out.
    let (_t2, dir2) = state_dir();
    let top = format!("--pool={}:{}", TOP - 3 * 65536, 3 * 65536);
    let mut got = HashSet::new();
    for k in ["x", "y"] {
        let out = run(&dir2, &[&top, "--max-pods=2", "allocate", k])
            .expect(0)
            .stdout;
        got.insert(parse_map_mount(&out).0);
    }
    assert_eq!(got, HashSet::from([TOP - 3 * 65536, TOP - 2 * 65536]));
    run(&dir2, &[&top, "--max-pods=2", "allocate", "z"]).expect(1);
}

#[test]
fn invalid_state_or_other_settings_exit_1_and_change_nothing() {
    let (_t, dir) = state_dir();
    // Blocks 100..209; the last case below sees only blocks 1..100.
    run(&dir, &["--pool=6553600:7208960", "allocate", "pod"]).expect(0);
    run(&dir, &["--pool=6553600:7208960", "allocate", "pod2"]).expect(0);
    let before = snapshot(&dir);
    for args in [
        vec!["--ids-per-pod=131072", "release", "pod"],
        vec!["--ids-per-pod=131072", "reconcile"],
        vec!["--ids-per-pod=131072", "allocate", "new"],
        vec!["--ids-per-pod=131072", "list"],
        vec!["--pool=65536:6553600", "--max-pods=100", "release", "pod"],
    ] {
        run(&dir, &args).expect(1).stderr_line_names(&["pod"]);
        assert_eq!(snapshot(&dir), before, "{args:?} changed the state");
    }
    // A corrupt record: every command refuses, naming the file.
    std::fs::write(dir.join("broken"), "{not json").unwrap();
    let before = snapshot(&dir);
    for args in [
        vec!["release", "pod"],
        vec!["list"],
        vec!["allocate", "x"],
        vec!["reconcile"],
    ] {
        run(&dir, &args).expect(1).stderr_line_names(&["broken"]);
        assert_eq!(snapshot(&dir), before);
    }
}

#[test]
fn leftover_temporary_files_are_not_state() {
    let (_t, dir) = state_dir();
    run(&dir, &["allocate", "pod"]).expect(0);
    std::fs::write(dir.join(".~tmp-99999-1"), "{\"uidMap").unwrap();
    let r = run(&dir, &["list"]).expect(0);
    assert_eq!(r.stdout.lines().count(), 1, "{r:#?}");
    run(&dir, &["allocate", "pod2"]).expect(0);
    assert!(!dir.join(".~tmp-99999-1").exists(), "cleaned up");
    // What `ls` shows is one file per key; the bookkeeping is hidden.
    let mut visible: Vec<String> = snapshot(&dir)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with('.'))
        .collect();
    visible.sort();
    assert_eq!(visible, ["pod", "pod2"]);
}

#[test]
fn many_processes_at_once() {
    let (_t, dir) = state_dir();
    let bin = common::id_ranges_binary();
    let state = format!("--state={}", dir.display());
    // Sixteen at once; every other one asks for the same key.
    let children: Vec<_> = (0..16)
        .map(|i| {
            let key = if i % 2 == 0 {
                "shared2".to_string()
            } else {
                format!("own2-{i}")
            };
            Command::new(&bin)
                .args([state.as_str(), "allocate", key.as_str()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success());
            String::from_utf8(o.stdout).unwrap()
        })
        .collect();
    let shared: HashSet<_> = outs.iter().step_by(2).collect();
    assert_eq!(shared.len(), 1, "one key, one range: {outs:?}");
    let list = run(&dir, &["list"]).expect(0).stdout;
    let firsts: Vec<&str> = list.lines().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert_eq!(firsts.len(), 1 + 8, "{list}");
    assert_eq!(
        firsts.iter().collect::<HashSet<_>>().len(),
        firsts.len(),
        "{list}"
    );
}

#[test]
fn sigkill_at_random_points_then_every_command_works() {
    let (_t, dir) = state_dir();
    let bin = common::id_ranges_binary();
    let state = format!("--state={}", dir.display());
    let mut printed = Vec::new();
    for i in 0..60 {
        let key = format!("k{i}");
        let mut child = Command::new(&bin)
            .args([state.as_str(), "allocate", key.as_str()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = [0u8; 8];
        rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(
            u64::from_ne_bytes(b) % 3000,
        ));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.is_empty() {
            printed.push((key, parse_map_mount(&text).0));
        }
        // Whatever was killed when, the state is valid and holds every
        // range that was printed.
        let list = run(&dir, &["list"]).expect(0).stdout;
        for (k, f) in &printed {
            assert!(
                list.contains(&format!("{k} {f} 65536\n")),
                "{k} {f} lost: {list}"
            );
        }
        let firsts: Vec<&str> = list.lines().map(|l| l.split(' ').nth(1).unwrap()).collect();
        assert_eq!(
            firsts.iter().collect::<HashSet<_>>().len(),
            firsts.len(),
            "{list}"
        );
    }
    eprintln!("{} of 60 killed runs printed their range", printed.len());
    assert!(snapshot(&dir).iter().all(|(n, _)| !n.starts_with(".~tmp-")));
}

// ------------------------------------------------------------------ root

const USER: &str = "idmapped-cli-kubelet";

#[test]
fn subids_from_etc_with_and_without_getsubids() {
    privileged!();
    if !Path::new("/etc/subuid").exists() || !Path::new("/etc/subgid").exists() {
        let why = "/etc/subuid or /etc/subgid is missing: nothing to bind-mount over";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED subids_from_etc: {why}");
        return;
    }
    let (_s, dir) = state_dir();
    let subids = format!("--subids={USER}");
    // With the PATH of the test (getsubids used if installed) and with a
    // PATH where no getsubids can be found (the files are read).
    let paths = [
        std::env::var("PATH").unwrap_or_default(),
        "/nonexistent".to_string(),
    ];
    let with = |path: &str, args: &[&str]| {
        let mut all = vec![format!("--state={}", dir.display()), subids.clone()];
        all.extend(args.iter().map(|s| s.to_string()));
        id_ranges(&all, &[("PATH", path)])
    };
    let line = format!("{USER}:327680:7208960\n");
    let _m = common::SubidFiles::bind(&line, &line);
    for path in &paths {
        let out = with(path, &["allocate", "pod"]).expect(0).stdout;
        let (first, _) = parse_map_mount(&out);
        assert!((327680..327680 + 7208960).contains(&first), "{out}");
    }
    let _m2 = common::SubidFiles::bind(&line, &format!("{USER}:393216:7208960\n"));
    for path in &paths {
        with(path, &["list"])
            .expect(1)
            .stderr_line_names(&["differ"]);
    }
    let _m3 = common::SubidFiles::bind("", "");
    for path in &paths {
        with(path, &["list"]).expect(1).stderr_line_names(&[USER]);
    }
    let wrap = format!("{USER}:327680:4294836224\n");
    let _m4 = common::SubidFiles::bind(&wrap, &wrap);
    for path in &paths {
        with(path, &["list"])
            .expect(2)
            .stderr_line_names(&["4295163904"]);
    }
}

#[test]
fn allocate_output_goes_into_mount_idmapped() {
    privileged!();
    needs_mount_setattr!();
    let fs = common::TestFs::ext4();
    let src = fs.path("vol");
    std::fs::create_dir(&src).unwrap();
    common::touch_owned(&src.join("f"), 0, 0);
    let target = fs.scratch("target");
    let state = fs.scratch("state");
    let value = run(&state, &["allocate", "pod"]).expect(0).stdout;
    let (first, _) = parse_map_mount(&value);
    let map = format!("--map-mount={}", value.trim());
    common::cli(&[
        map.as_str(),
        src.to_str().unwrap(),
        target.to_str().unwrap(),
    ])
    .expect(0);
    assert_eq!(
        common::owner(&target.join("f")),
        (first as u32, first as u32)
    );
    let _ = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH);
}

/// `mount-idmapped --demo`'s second part: two pods from an allocator, one
/// volume idmapped for each, each pod's root writing a file.
#[test]
fn demo_tells_the_seed_story_and_cleans_up() {
    privileged!();
    needs_mount_setattr!();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(common::cli_binary())
        .arg("--demo")
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let words = |first: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_else(|| panic!("no line for {first}: {stdout}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // On disk both files are 0:0; both pods see both as root's.
    for file in ["pod-a.txt", "pod-b.txt"] {
        assert_eq!(words(file)[1..], ["0:0", "0:0", "0:0"], "{stdout}");
    }
    // On the host each pod's root runs as the first id of its range.
    let mut firsts = HashSet::new();
    for pod in ["pod-a", "pod-b"] {
        let line = words(pod).join(" ");
        let value = line.split("--map-mount=").nth(1).unwrap();
        let (first, count) = parse_map_mount(value.split(' ').next().unwrap());
        assert_eq!(count, 65536);
        assert!(first >= 65536, "{line}");
        assert!(
            line.contains(&format!("uid {first}, gid {first}")),
            "{line}"
        );
        firsts.insert(first);
    }
    assert_eq!(firsts.len(), 2, "two pods, two ranges: {stdout}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        common::mounts_below(tmp.path()).is_empty(),
        "mounts left behind"
    );
}
