//! The `mount-idmapped` example, run as a program: exit status, messages,
//! `--json`, and what it mounts (or leaves unmounted).
//!
//! The binary is the one cargo builds next to this test:
//! `target/<profile>/examples/mount-idmapped`. A plain `cargo test` builds
//! every example; `cargo test --test cli` alone does **not** (and may run a
//! stale one), so run `cargo build --example mount-idmapped` first then.
//!
//! Privileged tests run in their own mount namespace ([`privileged!`]); the
//! program is spawned from the test's thread and inherits that namespace, so
//! its mounts are visible here and vanish with the test.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{cli, cli_in, mounts_below, owner, touch_owned, TestFs};
use serial_test::serial;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// DESIGN §2's mapping.
const EXAMPLE: &str = "--map-mount=b:0:10000:10000";

/// `src/` owned by on-disk 1000, with `a` owned by 1000 and `b` by 15000.
fn example_source(fs: &TestFs) -> PathBuf {
    let src = fs.path("src");
    std::fs::create_dir(&src).unwrap();
    std::os::unix::fs::chown(&src, Some(1000), Some(1000)).unwrap();
    touch_owned(&src.join("a"), 1000, 1000);
    touch_owned(&src.join("b"), 15000, 15000);
    src
}

/// DESIGN §2's example through the CLI: on-disk 1000 is seen as 11000,
/// 15000 as 65534, and a write by fsuid 11000 is stored as 1000.
fn design_example(relative: bool) {
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    if relative {
        // TestFs keeps its mount point and scratch dirs side by side.
        let base = fs.root.parent().unwrap();
        cli_in(Some(base), &[EXAMPLE, "mnt/src", "target"]).expect(0);
    } else {
        cli(&[EXAMPLE, s(&src), s(&target)]).expect(0);
    }
    common::assert_design_example(&src, &target);
}

#[test]
fn design_example_with_absolute_paths() {
    privileged!();
    needs_mount_setattr!();
    design_example(false);
}

#[test]
fn design_example_with_relative_paths() {
    privileged!();
    needs_mount_setattr!();
    design_example(true);
}

#[test]
fn map_mount_is_repeatable_in_both_spellings() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = fs.path("src");
    std::fs::create_dir(&src).unwrap();
    touch_owned(&src.join("low"), 1000, 1000);
    touch_owned(&src.join("high"), 6000, 6000);
    let target = fs.scratch("target");
    let args = [
        "--map-mount",
        "b:0:10000:5000",
        "--map-mount=b:5000:20000:5000",
        s(&src),
        s(&target),
    ];
    cli(&args).expect(0);
    assert_eq!(owner(&target.join("low")), (11000, 11000));
    assert_eq!(owner(&target.join("high")), (21000, 21000));
}

#[test]
fn uid_and_gid_maps_are_separate() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    let args = [
        "--map-mount=u:0:20000:5000",
        "--map-mount",
        "g:0:30000:5000",
        s(&src),
        s(&target),
    ];
    cli(&args).expect(0);
    assert_eq!(owner(&target.join("a")), (21000, 31000));
}

/// A process in a user namespace of its own, killed and reaped on drop.
struct UsernsHolder(Child);

impl UsernsHolder {
    /// `unshare --user sleep 30`, with `uid_map`/`gid_map` both set to
    /// `map` by us. (util-linux 2.38's `--map-users` would need
    /// newuidmap; writing the maps as root needs nothing.)
    ///
    /// A line `A B N` is written from the parent namespace, so `A` is the id
    /// inside the namespace and `B` the id outside. Idmapping a mount with
    /// the namespace makes on-disk `A + n` appear as `B + n`: the inside
    /// column is the on-disk one, as the assertions below show.
    fn spawn(map: &str) -> UsernsHolder {
        let child = common::spawn(Command::new("unshare").args(["--user", "sleep", "30"]));
        let holder = UsernsHolder(child);
        let ns = holder.ns_path();
        let mine = std::fs::metadata("/proc/self/ns/user").unwrap().ino();
        let moved = (0..400).any(|_| {
            let moved = std::fs::metadata(&ns).is_ok_and(|m| m.ino() != mine);
            if !moved {
                std::thread::sleep(Duration::from_millis(5));
            }
            moved
        });
        assert!(moved, "unshare did not enter a new user namespace");
        let proc_dir = ns.parent().and_then(Path::parent).unwrap().to_path_buf();
        std::fs::write(proc_dir.join("uid_map"), map).unwrap();
        std::fs::write(proc_dir.join("gid_map"), map).unwrap();
        holder
    }

    fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/user", self.0.id()))
    }
}

impl Drop for UsernsHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn map_mount_accepts_a_user_namespace_path() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    let holder = UsernsHolder::spawn("0 50000 2000\n");
    let ns = holder.ns_path();
    let run = cli(&[
        format!("--map-mount={}", s(&ns)).as_str(),
        "--json",
        s(&src),
        s(&target),
    ])
    .expect(0);
    drop(holder);
    // Inside (first) column = on disk: on-disk 1000 is seen as 51000.
    assert_eq!(owner(&target.join("a")), (51000, 51000));
    assert_eq!(owner(&target.join("b")), (65534, 65534));
    let json = one_json_object(&run.stdout);
    assert!(
        json.contains(&format!("\"userns\":\"{}\"", s(&ns))),
        "{json}"
    );
    assert!(
        json.contains(r#""uid":[{"on_disk":0,"seen":50000,"count":2000}]"#),
        "{json}"
    );
}

#[test]
fn check_says_whether_and_why() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let run = cli(&["--check", s(&fs.root)]).expect(0);
    assert!(run.stdout.contains("can be idmapped"), "{run:#?}");
    let json = one_json_object(&cli(&["--check", "--json", s(&fs.root)]).expect(0).stdout);
    for key in [r#""supported":true"#, r#""reason":null"#, r#""fs":"ext4""#] {
        assert!(json.contains(key), "{key} missing: {json}");
    }
    for kind in ["proc", "ramfs"] {
        let vfs = TestFs::virtual_fs(kind);
        let run = cli(&["--check", s(&vfs.root)]).expect(1);
        assert!(run.stdout.contains("cannot be idmapped"), "{run:#?}");
        assert!(
            run.stdout.contains(&format!("filesystem type {kind}")),
            "{run:#?}"
        );
        let json = one_json_object(&cli(&["--check", "--json", s(&vfs.root)]).expect(1).stdout);
        let fs_key = format!(r#""fs":"{kind}""#);
        for key in [r#""supported":false"#, fs_key.as_str()] {
            assert!(json.contains(key), "{key} missing: {json}");
        }
        assert!(
            mounts_below(&vfs.root).len() == 1,
            "--check mounted something"
        );
    }
}

#[test]
fn check_recursive_names_the_blocking_submount() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let blocker = fs.path("proc");
    std::fs::create_dir(&blocker).unwrap();
    common::run("mount", &["-t", "proc", "proc", s(&blocker)]);
    cli(&["--check", s(&fs.root)]).expect(0);
    let run = cli(&["--check", "--recursive", s(&fs.root)]).expect(1);
    assert!(run.stdout.contains(s(&blocker)), "{run:#?}");
    assert!(run.stdout.contains("filesystem type proc"), "{run:#?}");
}

/// Each case: arguments, and what the one line on stderr must contain.
const USAGE_ERRORS: &[(&[&str], &[&str])] = &[
    (&["--bogus", "a", "b"], &["unknown option --bogus"]),
    (&["-x"], &["unknown option -x"]),
    (&["--map-mount=b:0:x:1", "a", "b"], &["`b:0:x:1`", "TO `x`"]),
    (
        &["--map-mount=b:0:1:1", "--map-mount", "q:0:1:1", "a", "b"],
        &["value 2", "`q:0:1:1`"],
    ),
    (&["--map-mount=b:0:1", "a", "b"], &["`b:0:1`"]),
    (
        &["--map-mount=b:0:1:1\nb:2:3:4", "a", "b"],
        &["`b:0:1:1\\nb:2:3:4`"],
    ),
    (&[EXAMPLE, "a"], &["missing TARGET"]),
    (&[EXAMPLE], &["missing SOURCE and TARGET"]),
    (&[EXAMPLE, "a", "b", "c"], &["unexpected operand `c`"]),
    (
        &["--map-mount=/proc/1/ns/user", EXAMPLE, "a", "b"],
        &["/proc/1/ns/user", "cannot be mixed"],
    ),
    (
        &[EXAMPLE, "--propagation=sideways", "a", "b"],
        &["`sideways`", "private, shared, slave or unbindable"],
    ),
    (
        &[EXAMPLE, "--propagation"],
        &["--propagation needs a value"],
    ),
    (&["a", "b"], &["no --map-mount"]),
    (&[EXAMPLE, "--recursive=yes", "a", "b"], &["takes no value"]),
    (&[EXAMPLE, "--strategy=rsync", "a", "b"], &["`rsync`"]),
    (
        &[EXAMPLE, "--out-of-range=drop", "a", "b"],
        &["`drop`", "keep, fail or overflow"],
    ),
    (&["--check"], &["missing SOURCE"]),
    (&["--check", "a", "b"], &["unexpected operand `b`"]),
    (&["--check", EXAMPLE, "a"], &["--check cannot be combined"]),
    (&["--demo", "--json"], &["--demo cannot be combined"]),
];

/// Needs no privilege: every case is refused before any system call.
#[test]
fn usage_errors_exit_2_and_name_the_value() {
    for (args, parts) in USAGE_ERRORS {
        let run = cli(args).expect(2);
        run.stderr_line_names(parts);
        assert!(run.stdout.is_empty(), "{args:?}: {run:#?}");
    }
}

#[test]
fn help_and_version() {
    let help = cli(&["--help"]).expect(0).stdout;
    for option in [
        "--map-mount=<b|u|g>:FROM:TO:RANGE",
        "--map-mount=FROM:TO:RANGE",
        "--map-mount=PATH",
        "--recursive",
        "--read-only",
        "--nosuid",
        "--nodev",
        "--noexec",
        "--nosymfollow",
        "--propagation=private|shared|slave|unbindable",
        "--strategy=idmap|chown|auto",
        "--check",
        "--json",
        "--demo",
        "-h, --help",
        "--version",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
    assert_eq!(cli(&["-h"]).expect(0).stdout, help);
    let version = cli(&["--version"]).expect(0).stdout;
    assert_eq!(
        version,
        format!("mount-idmapped {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn failures_exit_1_and_leave_nothing_mounted() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let target = fs.scratch("target");

    // A filesystem that cannot be idmapped.
    let proc_fs = TestFs::virtual_fs("proc");
    let run = cli(&[EXAMPLE, s(&proc_fs.root), s(&target)]).expect(1);
    run.stderr_line_names(&["proc", "does not support idmapped mounts"]);
    assert!(mounts_below(&target).is_empty());

    // Recursive: one proc submount fails the whole tree, and is named.
    let src = example_source(&fs);
    let blocker = src.join("proc");
    std::fs::create_dir(&blocker).unwrap();
    common::run("mount", &["-t", "proc", "proc", s(&blocker)]);
    let run = cli(&[EXAMPLE, "--recursive", s(&src), s(&target)]).expect(1);
    run.stderr_line_names(&[s(&blocker), "filesystem type proc"]);
    assert!(mounts_below(&target).is_empty());

    // A directory cannot be attached onto a file: said before any mount call.
    let file_target = fs.scratch("t2").join("file");
    std::fs::write(&file_target, b"").unwrap();
    let run = cli(&[EXAMPLE, s(&src), s(&file_target)]).expect(1);
    run.stderr_line_names(&["is a regular file", "is a directory"]);
    assert!(mounts_below(&file_target).is_empty());

    // Not a user namespace.
    let run = cli(&["--map-mount=/proc/self/ns/mnt", s(&src), s(&target)]).expect(1);
    run.stderr_line_names(&["not a user namespace"]);
    assert!(mounts_below(&target).is_empty());

    // The --json report cannot be written (stdout is /dev/full): the mount
    // made a moment before is taken away again.
    let out = Command::new(common::cli_binary())
        .args(["--json", EXAMPLE, s(&src), s(&target)])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write to stdout"));
    assert!(mounts_below(&target).is_empty());

    // Missing source.
    let run = cli(&[EXAMPLE, s(&fs.path("nonexistent")), s(&target)]).expect(1);
    run.stderr_line_names(&["nonexistent", "ENOENT"]);
    assert!(mounts_below(&target).is_empty());
}

/// The namespace named by `--map-mount=PATH` is the one used (its fd), so
/// the kernel's refusal of the initial namespace reaches the user; paths
/// that are not namespaces fail at once without being opened.
#[test]
#[serial]
fn map_mount_path_uses_that_namespace_and_opens_nothing_else() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    for strategy in ["idmap", "auto"] {
        let run = cli(&[
            "--map-mount=/proc/self/ns/user",
            &format!("--strategy={strategy}"),
            s(&src),
            s(&target),
        ])
        .expect(1);
        run.stderr_line_names(&["the initial user namespace cannot be used to idmap a mount"]);
        assert!(
            mounts_below(&target).is_empty(),
            "{strategy}: something was mounted"
        );
    }
    // A FIFO would block an open(2) forever; a device's driver would run.
    let fifo = fs.scratch("ns").join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    for (path, what) in [(s(&fifo), "a FIFO"), ("/dev/null", "a character device")] {
        let start = std::time::Instant::now();
        let run = cli(&[&format!("--map-mount={path}"), s(&src), s(&target)]).expect(1);
        run.stderr_line_names(&[path, "not a user namespace", what]);
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(mounts_below(&target).is_empty());
    }
}

#[test]
fn json_says_what_was_done() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    let base = fs.root.parent().unwrap();
    let run = cli_in(
        Some(base),
        &["--json", EXAMPLE, "--nodev", "mnt/src", "target"],
    )
    .expect(0);
    let json = one_json_object(&run.stdout);
    let kernel_path = match idmapped::features::features().open_tree_attr {
        idmapped::features::Availability::Available => "open_tree_attr",
        _ => "open_tree+mount_setattr",
    };
    let expected = [
        format!(r#""source":"{}""#, s(&src)),
        format!(r#""target":"{}""#, s(&target)),
        r#""strategy":"idmap""#.to_owned(),
        r#""recursive":false"#.to_owned(),
        r#""mapping":{"uid":[{"on_disk":0,"seen":10000,"count":10000}],"gid":[{"on_disk":0,"seen":10000,"count":10000}]}"#.to_owned(),
        r#""userns":null"#.to_owned(),
        r#""read_only":false"#.to_owned(),
        r#""nodev":true"#.to_owned(),
        r#""propagation":null"#.to_owned(),
        format!(r#""kernel_path":"{kernel_path}""#),
    ];
    for key in &expected {
        assert!(json.contains(key.as_str()), "{key} missing: {json}");
    }
}

#[test]
fn file_onto_file() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("t").join("target");
    std::fs::write(&target, b"").unwrap();
    cli(&[EXAMPLE, s(&src.join("a")), s(&target)]).expect(0);
    assert_eq!(owner(&target), (11000, 11000));
    assert_eq!(std::fs::read(&target).unwrap(), b"x");
}

/// The per-mount options and optional fields (`shared:N`, ...) of the mount
/// at `path`, from mountinfo.
fn mount_options(path: &Path) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let line = text
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(s(path)))
        .unwrap_or_else(|| panic!("{} is not a mount point", path.display()));
    let fields: Vec<&str> = line.split(' ').collect();
    let options = fields[5].split(',').map(str::to_owned).collect();
    let optional = fields[6..]
        .iter()
        .take_while(|f| **f != "-")
        .map(|f| f.to_string())
        .collect();
    (options, optional)
}

#[test]
fn mount_attributes_take_effect() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    std::os::unix::fs::symlink("a", src.join("link")).unwrap();
    let target = fs.scratch("target");
    let args = [
        EXAMPLE,
        "--read-only",
        "--nosuid",
        "--nodev",
        "--noexec",
        "--nosymfollow",
        "--propagation=shared",
        s(&src),
        s(&target),
    ];
    cli(&args).expect(0);
    let err = std::fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::fs::read(target.join("link")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
    let (options, optional) = mount_options(&target);
    for option in ["ro", "nosuid", "nodev", "noexec", "nosymfollow", "idmapped"] {
        assert!(options.iter().any(|o| o == option), "{option}: {options:?}");
    }
    assert!(
        optional.iter().any(|f| f.starts_with("shared:")),
        "{optional:?}"
    );
}

#[test]
#[serial]
fn demo_prints_on_disk_and_seen_owners_and_cleans_up() {
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
    assert!(stdout.contains("ON DISK"), "{stdout}");
    assert!(stdout.contains("SEEN"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {stdout}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    assert_eq!(row("user-dir/file"), ["1000:1000", "11000:11000"]);
    assert_eq!(row("outside-file"), ["15000:15000", "65534:65534"]);
    assert_eq!(row("root-file"), ["0:0", "10000:10000"]);
    // Nothing left behind: no temporary directory, no loop device on its image.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let loops = common::run(
        "losetup",
        &["--list", "--noheadings", "--output", "BACK-FILE"],
    );
    assert!(
        !loops.contains(s(tmp.path())),
        "loop device left behind: {loops}"
    );
}

/// Checks that `text` is exactly one JSON object on one line (a small
/// validating parser: the crate has no JSON dependency) and returns it.
fn one_json_object(text: &str) -> String {
    let line = text.strip_suffix('\n').unwrap_or(text);
    assert!(!line.contains('\n'), "more than one line: {text}");
    let rest = json::value(line.as_bytes()).unwrap_or_else(|| panic!("not JSON: {text}"));
    assert!(rest.is_empty(), "trailing text after the object: {text}");
    assert!(line.starts_with('{'), "not an object: {text}");
    line.to_owned()
}

mod json {
    //! Returns the input left after one JSON value, or `None` if invalid.

    fn ws(s: &[u8]) -> &[u8] {
        let n = s.iter().take_while(|b| b" \t\r\n".contains(b)).count();
        &s[n..]
    }

    pub fn value(s: &[u8]) -> Option<&[u8]> {
        let s = ws(s);
        let rest = match s.first()? {
            b'{' => seq(&s[1..], b'}', |s| {
                let s = string(ws(s))?;
                let s = ws(s).strip_prefix(b":")?;
                value(s)
            })?,
            b'[' => seq(&s[1..], b']', value)?,
            b'"' => string(s)?,
            b't' => s.strip_prefix(b"true")?,
            b'f' => s.strip_prefix(b"false")?,
            b'n' => s.strip_prefix(b"null")?,
            _ => number(s)?,
        };
        Some(ws(rest))
    }

    /// Comma-separated `item`s up to `close`.
    fn seq(s: &[u8], close: u8, item: impl Fn(&[u8]) -> Option<&[u8]>) -> Option<&[u8]> {
        let s = ws(s);
        if let Some(rest) = s.strip_prefix(&[close]) {
            return Some(rest);
        }
        let mut s = s;
        loop {
            s = ws(item(s)?);
            match s.first()? {
                b',' => s = &s[1..],
                c if *c == close => return Some(&s[1..]),
                _ => return None,
            }
        }
    }

    fn string(s: &[u8]) -> Option<&[u8]> {
        let mut s = s.strip_prefix(b"\"")?;
        loop {
            match s.first()? {
                b'"' => return Some(&s[1..]),
                b'\\' => s = s.get(2..)?,
                c if *c < 0x20 => return None,
                _ => s = &s[1..],
            }
        }
    }

    fn number(s: &[u8]) -> Option<&[u8]> {
        let s = s.strip_prefix(b"-").unwrap_or(s);
        let n = s
            .iter()
            .take_while(|b| b.is_ascii_digit() || b".eE+-".contains(b))
            .count();
        (n > 0).then(|| &s[n..])
    }
}

/// `--strategy=chown` shifts SOURCE on disk and bind-mounts it: the same
/// view as the idmapped mount, the disk changed, and `--json` carries the
/// walker's report; `--strategy=auto` on ext4 idmaps.
#[test]
#[serial]
fn chown_and_auto_strategies() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    let run = cli(&[
        "--json",
        "--strategy=chown",
        "--out-of-range=overflow",
        "--nodev",
        EXAMPLE,
        s(&src),
        s(&target),
    ])
    .expect(0);
    // Seen through TARGET as through an idmapped mount...
    assert_eq!(owner(&target.join("a")), (11000, 11000));
    // ...because SOURCE itself was shifted; 15000 lies in the seen range but
    // is not an on-disk id of the mapping: the view shows 65534, and so
    // does the shifted tree (it used to be taken as shifted already).
    assert_eq!(owner(&src.join("a")), (11000, 11000));
    assert_eq!(owner(&src.join("b")), (65534, 65534));
    assert_eq!(owner(&target.join("b")), (65534, 65534));
    assert!(mount_options(&target).0.iter().any(|o| o == "nodev"));
    let json = one_json_object(&run.stdout);
    for key in [
        r#""strategy":"chown""#,
        r#""requested_strategy":"chown""#,
        r#""fallback":null"#,
        r#""visited":3"#,
        r#""already_shifted":0"#,
        r#""changed":3"#,
        r#""out_of_range":2"#,
        r#""completed_before":false"#,
        r#""kernel_path":null"#,
    ] {
        assert!(json.contains(key), "{key} missing: {json}");
    }

    let src2 = fs.path("src2");
    std::fs::create_dir(&src2).unwrap();
    touch_owned(&src2.join("a"), 1000, 1000);
    let target2 = fs.scratch("target2");
    let run = cli(&["--json", "--strategy=auto", EXAMPLE, s(&src2), s(&target2)]).expect(0);
    let json = one_json_object(&run.stdout);
    assert!(json.contains(r#""strategy":"idmap""#), "{json}");
    assert!(json.contains(r#""requested_strategy":"auto""#), "{json}");
    assert_eq!(owner(&target2.join("a")), (11000, 11000));
    assert_eq!(
        owner(&src2.join("a")),
        (1000, 1000),
        "auto must not chown here"
    );
}

/// `--strategy=chown` again with the same mapping is an O(1) check that says
/// so; another mapping is refused naming the recorded one; `--unshift`
/// restores the source and removes the record; `--outside-links` and
/// `--out-of-range=fail` change nothing when they refuse.
#[test]
#[serial]
fn chown_record_unshift_and_refusals() {
    privileged!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let t1 = fs.scratch("t1");
    let t2 = fs.scratch("t2");
    let first = cli(&["--json", "--strategy=chown", EXAMPLE, s(&src), s(&t1)]).expect(0);
    assert_eq!(owner(&src.join("a")), (11000, 11000));
    // 15000 is kept (--out-of-range=keep) but lies in the seen range: reported.
    assert!(
        first.stdout.contains(r#""kind":"uid","id":15000"#),
        "{}",
        first.stdout
    );
    assert!(
        first.stderr.contains("inside a seen range"),
        "{}",
        first.stderr
    );
    let again = cli(&["--json", "--strategy=chown", EXAMPLE, s(&src), s(&t2)]).expect(0);
    assert!(
        again.stdout.contains(r#""completed_before":true"#),
        "{}",
        again.stdout
    );
    assert!(again.stderr.contains("already shifted"), "{}", again.stderr);
    let _ = rustix::mount::unmount(&t1, rustix::mount::UnmountFlags::DETACH);
    let _ = rustix::mount::unmount(&t2, rustix::mount::UnmountFlags::DETACH);
    let other = cli(&[
        "--strategy=chown",
        "--map-mount=b:0:20000:10000",
        s(&src),
        s(&t1),
    ])
    .expect(1);
    assert!(
        other.stderr.contains("b:0:10000:10000") && other.stderr.contains("--unshift"),
        "{}",
        other.stderr
    );
    cli(&["--unshift", s(&src)]).expect(0);
    assert_eq!(owner(&src.join("a")), (1000, 1000));
    // ...except the id reported as kept inside a seen range.
    assert_eq!(owner(&src.join("b")), (5000, 5000));
    assert_eq!(owner(&src), (1000, 1000));
    touch_owned(&src.join("b"), 15000, 15000);
    cli(&["--unshift", s(&src)]).expect(1);

    // A bad TARGET: nothing shifted.
    let missing = fs.root.join("no-such-target");
    cli(&["--strategy=chown", EXAMPLE, s(&src), s(&missing)]).expect(1);
    assert_eq!(owner(&src.join("a")), (1000, 1000));

    // fail: nothing changed, the first path, the id and the count named.
    let run = cli(&[
        "--strategy=chown",
        "--out-of-range=fail",
        EXAMPLE,
        s(&src),
        s(&t1),
    ])
    .expect(1);
    assert!(
        run.stderr.contains("15000") && run.stderr.contains("2 uncovered ids"),
        "{}",
        run.stderr
    );
    assert_eq!(owner(&src.join("a")), (1000, 1000));

    // A hard link from outside: left and reported by default, refused with fail.
    std::fs::hard_link(src.join("a"), fs.root.join("outside-link")).unwrap();
    cli(&[
        "--strategy=chown",
        "--outside-links=fail",
        EXAMPLE,
        s(&src),
        s(&t1),
    ])
    .expect(1);
    assert_eq!(owner(&src.join("a")), (1000, 1000));
    let run = cli(&["--json", "--strategy=chown", EXAMPLE, s(&src), s(&t1)]).expect(0);
    assert!(
        run.stdout.contains(r#""outside_links":["#),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("hard-linked from outside"),
        "{}",
        run.stderr
    );
    assert_eq!(owner(&fs.root.join("outside-link")), (1000, 1000));
    let _ = rustix::mount::unmount(&t1, rustix::mount::UnmountFlags::DETACH);
    cli(&["--outside-links=sometimes", EXAMPLE, s(&src), s(&t1)]).expect(2);
}

// ---------------------------------------------------------------------------
// A newcomer's first run (issue 13)

/// `--help` groups the options (mapping, what to mount, where, attributes,
/// strategy, output), in that order, and shows an example of each form.
#[test]
fn help_groups_the_options_and_shows_one_example_per_form() {
    let help = cli(&["--help"]).expect(0).stdout;
    let groups = [
        ("Mapping", "--map-mount=<b|u|g>:FROM:TO:RANGE"),
        ("What to mount:", "--recursive"),
        ("Where:", "TARGET"),
        ("Attributes", "--read-only"),
        ("Strategy:", "--strategy=idmap|chown|auto"),
        ("Output:", "--json"),
    ];
    let mut from = 0;
    for (heading, member) in groups {
        let at = help[from..]
            .find(&format!("\n{heading}"))
            .unwrap_or_else(|| panic!("no group {heading:?} after byte {from}:\n{help}"));
        from += at + 1;
        let body_end = help[from..].find("\n\n").map_or(help.len(), |e| from + e);
        assert!(
            help[from..body_end].contains(member),
            "{member} is not in group {heading}:\n{help}"
        );
    }
    let examples = &help[help.find("Examples").expect("an Examples section")..];
    let commands: Vec<&str> = examples
        .lines()
        .filter(|l| l.trim_start().starts_with("mount-idmapped "))
        .collect();
    for form in [
        "--map-mount=b:",
        "--map-mount=0:",
        "--map-mount=u:",
        "--map-mount=/proc/",
        "--check",
        "--demo",
        "--strategy=auto",
        "--recursive",
    ] {
        assert!(
            commands.iter().any(|c| c.contains(form)),
            "no example with {form}:\n{examples}"
        );
    }
    assert!(
        help.lines().all(|l| l.chars().count() <= 80),
        "lines over 80 columns:\n{help}"
    );
}

/// SOURCE and TARGET of kinds that cannot be mounted onto each other: each
/// is named with what it is and what would work, before any mount call
/// (so this needs no privilege), and nothing is mounted or changed.
#[test]
fn file_kinds_that_do_not_fit_are_named_with_what_would_work() {
    if common::privilege_problem().is_none() {
        // As root a regression could mount: keep it out of the host.
        common::private_mount_namespace();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::create_dir(path("dir")).unwrap();
    std::fs::create_dir(path("dir2")).unwrap();
    std::fs::write(path("file"), b"x").unwrap();
    std::fs::write(path("file2"), b"").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    std::os::unix::fs::symlink("nowhere", path("dangling")).unwrap();
    let p = |name: &str| path(name).to_str().unwrap().to_owned();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[EXAMPLE, &p("file"), &p("dir")],
            &[
                "the mount point is a directory",
                "is a regular file",
                "mount a file onto a file",
            ],
        ),
        (
            &[EXAMPLE, &p("dir"), &p("file2")],
            &[
                "the mount point is a regular file",
                "is a directory",
                "only onto a directory",
            ],
        ),
        (
            &[EXAMPLE, &p("fifo"), &p("dir")],
            &["is a FIFO", "only a directory, or a regular file"],
        ),
        (
            &[EXAMPLE, &p("fifo"), &p("file2")],
            &["is a FIFO", "only a directory, or a regular file"],
        ),
        (
            &[EXAMPLE, &p("dir"), &p("dangling")],
            &["is a symlink to nowhere", "cannot be followed"],
        ),
        (
            &[EXAMPLE, "--strategy=chown", &p("file"), &p("file2")],
            &["is a regular file", "takes a directory", "strategy idmap"],
        ),
        (&[EXAMPLE, &p("dir"), &p("missing")], &["missing", "ENOENT"]),
    ];
    for (args, parts) in cases {
        let run = cli(args).expect(1);
        run.stderr_line_names(parts);
        assert!(run.stdout.is_empty(), "{run:#?}");
        assert!(
            mounts_below(dir.path()).is_empty(),
            "{args:?} mounted something"
        );
    }
    assert_eq!(std::fs::read(path("file")).unwrap(), b"x");
    assert_eq!(std::fs::read(path("file2")).unwrap(), b"");
}

/// The strategy that makes a mount on this kernel: `idmap` where it has
/// `mount_setattr`, else `chown` (Linux 5.10 in the test VMs), for tests of
/// paths that do not depend on idmapping.
fn working_strategy() -> &'static str {
    match idmapped::features::features().mount_setattr {
        idmapped::features::Availability::Available => "--strategy=idmap",
        _ => "--strategy=chown",
    }
}

/// A symlink as TARGET is followed, as util-linux's mount(8) does: the
/// mount is made on the directory (or file) it points to.
#[test]
fn a_symlink_as_target_is_followed_like_util_linux() {
    privileged!();
    let strategy = working_strategy();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let real = fs.scratch("real-target");
    let link = fs.scratch("links").join("target");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let run = cli(&["--json", strategy, EXAMPLE, s(&src), s(&link)]).expect(0);
    assert_eq!(mounts_below(&real), std::slice::from_ref(&real), "{run:#?}");
    assert_eq!(owner(&real.join("a")), (11000, 11000));
    // The symlink itself is left as it was.
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let file = fs.scratch("f").join("file");
    std::fs::write(&file, b"").unwrap();
    let file_link = fs.scratch("f").join("link");
    std::os::unix::fs::symlink("file", &file_link).unwrap();
    // A symlink to a file, for a directory SOURCE: named as the mismatch it is.
    let run = cli(&[strategy, EXAMPLE, s(&src), s(&file_link)]).expect(1);
    run.stderr_line_names(&["is a regular file", "is a directory"]);
    // A relative symlink to a file, for a file SOURCE (idmap only).
    if strategy == "--strategy=idmap" {
        let other = fs.path("other");
        touch_owned(&other, 1000, 1000);
        cli(&[EXAMPLE, s(&other), s(&file_link)]).expect(0);
        assert_eq!(owner(&file), (11000, 11000));
    }
}

/// util-linux's syntax without a kind (`FROM:TO:RANGE`) means uids and
/// gids, as `b:` does.
#[test]
fn map_mount_without_a_kind_means_uids_and_gids() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    let run = cli(&["--json", "--map-mount=0:10000:10000", s(&src), s(&target)]).expect(0);
    common::assert_design_example(&src, &target);
    let json = one_json_object(&run.stdout);
    assert!(
        json.contains(r#""mapping":{"uid":[{"on_disk":0,"seen":10000,"count":10000}],"gid":[{"on_disk":0,"seen":10000,"count":10000}]}"#),
        "{json}"
    );
    // Mixed with kinds.
    let target2 = fs.scratch("target2");
    let args = [
        "--map-mount=0:10000:10000",
        "--map-mount",
        "u:20000:0:1",
        s(&src),
        s(&target2),
    ];
    cli(&args).expect(0);
    assert_eq!(owner(&target2.join("a")), (11000, 11000));
}

/// Runs the program with fd 1 closed (`>&-`), through sh, as a caller
/// that closed its stdout would.
fn cli_with_stdout_closed(args: &[&str]) -> common::Run {
    let out = common::output(
        Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" >&-")
            .arg(common::cli_binary())
            .args(args),
    );
    common::Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Output that cannot be written is a failure: exit 1 with one line on
/// stderr, for a closed stdout (which Rust's runtime would otherwise turn
/// into /dev/null) as for a full one.
#[test]
fn output_to_a_closed_stdout_fails() {
    for args in [&["--version"][..], &["--help"]] {
        let run = cli_with_stdout_closed(args).expect(1);
        run.stderr_line_names(&["cannot write to stdout", "closed"]);
    }
    let out = common::output(
        Command::new(common::cli_binary())
            .arg("--help")
            .stdout(std::fs::File::create("/dev/full").unwrap()),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
    // Redirected to /dev/null on purpose: written, exit 0.
    let out = common::output(
        Command::new(common::cli_binary())
            .arg("--version")
            .stdout(std::process::Stdio::null()),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// `--json` with stdout closed: refused before anything is mounted (or
/// shifted on disk), exit 1, one line on stderr.
#[test]
fn json_with_stdout_closed_mounts_nothing_and_exits_1() {
    privileged!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let target = fs.scratch("target");
    for strategy in ["--strategy=idmap", "--strategy=chown"] {
        let run =
            cli_with_stdout_closed(&["--json", strategy, EXAMPLE, s(&src), s(&target)]).expect(1);
        run.stderr_line_names(&["cannot write to stdout", "closed"]);
        assert!(mounts_below(&target).is_empty(), "{strategy}: {run:#?}");
        assert_eq!(owner(&src.join("a")), (1000, 1000), "{strategy} shifted");
    }
    // Without --json nothing is written to stdout, so a closed one is fine.
    cli_with_stdout_closed(&[working_strategy(), EXAMPLE, s(&src), s(&target)]).expect(0);
    assert_eq!(owner(&target.join("a")), (11000, 11000));
}

/// A test that cannot find a program fails naming the program and the
/// Debian package that has it.
#[test]
fn a_missing_tool_is_named_with_its_package() {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("setfacl");
    cmd.arg("--version").env("PATH", empty.path());
    // The message `common::output` panics with, built without panicking (a
    // caught panic still prints "panicked at" into the test's output).
    let error = cmd.output().expect_err("setfacl found on an empty PATH");
    let message = common::spawn_failure(cmd.get_program(), &error);
    assert!(message.contains("setfacl"), "{message}");
    assert!(message.contains("package acl"), "{message}");
    assert!(message.contains("ci/test.sh"), "{message}");
}

/// The packages `ci/packages.sh` installs are exactly those the harness
/// names for the programs the tests run.
#[test]
fn the_install_script_installs_every_package_the_tests_name() {
    // Compiled in: the test VMs have the test binaries, not the sources.
    let script = include_str!("../ci/packages.sh");
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix("PACKAGES=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("a PACKAGES=(...) line in ci/packages.sh");
    let mut installed: Vec<&str> = line.split_whitespace().collect();
    installed.sort_unstable();
    let mut needed: Vec<&str> = common::TOOLS.iter().map(|&(_, p)| p).collect();
    needed.sort_unstable();
    needed.dedup();
    assert_eq!(installed, needed);
}

/// A user namespace whose maps cannot be read (a bind mount of its ns file,
/// not a `/proc/PID/ns/user` path) idmaps through the library's
/// `Plan::with_userns`, also with `--strategy=auto`; a shift on disk by it
/// is refused before anything changes.
#[test]
fn a_user_namespace_with_unknown_maps_idmaps_and_refuses_to_shift() {
    privileged!();
    needs_mount_setattr!();
    let fs = TestFs::ext4();
    let src = example_source(&fs);
    let holder = UsernsHolder::spawn("0 50000 2000\n");
    let ns_file = fs.scratch("ns").join("user");
    std::fs::write(&ns_file, b"").unwrap();
    common::run("mount", &["--bind", s(&holder.ns_path()), s(&ns_file)]);
    let map = format!("--map-mount={}", s(&ns_file));
    for (strategy, n) in [("--strategy=idmap", 1), ("--strategy=auto", 2)] {
        let target = fs.scratch(&format!("target{n}"));
        let run = cli(&["--json", strategy, &map, s(&src), s(&target)]).expect(0);
        assert_eq!(owner(&target.join("a")), (51000, 51000), "{strategy}");
        let json = one_json_object(&run.stdout);
        assert!(json.contains(r#""mapping":null"#), "{json}");
        assert!(json.contains(r#""strategy":"idmap""#), "{json}");
    }
    let target = fs.scratch("target3");
    let run = cli(&["--strategy=chown", &map, s(&src), s(&target)]).expect(2);
    run.stderr_line_names(&["cannot be read", "shifted on disk"]);
    assert_eq!(owner(&src.join("a")), (1000, 1000));
    assert!(mounts_below(&target).is_empty());
}
