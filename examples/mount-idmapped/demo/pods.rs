//! The seed story: two pods get id ranges from an allocator, each its
//! own user namespace and its own idmapped mount of one volume; each
//! pod's root writes a file. On disk both files are 0:0, each pod sees
//! both as its root's, and on the host the pods run as unprivileged ids.
//!
//! Each pod's volume is a plain attach into a per-pod directory. The pod
//! processes are this program again ([`HELPER`]): a fresh single-threaded
//! process can join a user namespace (`setns`), which a threaded one cannot.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command as Process, ExitCode, Stdio};

use idmapped::ranges::{Allocation, Allocator, Config};
use idmapped::{CloneFlags, DetachedMount, MountAttr, UserNamespace};
use rustix::thread::LinkNameSpaceType;

use super::Mounted;
use crate::Failure;

/// The hidden first argument that makes this program a pod process.
pub const HELPER: &str = "--demo-pod-helper";

const PODS: [&str; 2] = ["pod-a", "pod-b"];

/// Part two of the demo, in `dir` (the demo's temporary directory),
/// with the volume on `fs_root`; everything it makes goes before it
/// returns.
pub fn run(dir: &Path, fs_root: &Path) -> Result<String, Failure> {
    let volume = fs_root.join("volume");
    std::fs::create_dir(&volume).map_err(Failure::io(volume.display()))?;
    let mut ranges = Allocator::open(dir.join("ranges"), &Config::new())?;
    let pods: Vec<Allocation> = PODS
        .iter()
        .map(|key| ranges.allocate(key))
        .collect::<Result<_, _>>()?;
    let mut namespaces = Vec::new();
    let mut mounts = Vec::new();
    for pod in &pods {
        let ns = UserNamespace::from_mapping(pod.mapping())?;
        let target = dir.join("pods").join(pod.key()).join("volume");
        std::fs::create_dir_all(&target).map_err(Failure::io(target.display()))?;
        DetachedMount::clone_with(&volume, CloneFlags::empty(), &MountAttr::new().idmap(&ns))?
            .attach(&target)?;
        mounts.push(Mounted::new(target));
        namespaces.push(ns);
    }
    // Each pod's root writes its file, then each pod looks at both.
    let mut host_ids = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let file = format!("{}.txt", pod.key());
        let seen = in_pod(&namespaces[i], &mounts[i].path, &file)?;
        host_ids.push(seen.host_ids);
    }
    let mut views = Vec::new();
    for (i, _) in pods.iter().enumerate() {
        views.push(in_pod(&namespaces[i], &mounts[i].path, "")?.owners);
    }
    let mut out = String::from(
        "\nPods (hostUsers: false): two ranges from an allocator (idmapped::ranges,\n\
         state in a temporary directory); each pod gets a user namespace of its\n\
         own and the same volume idmapped for it; each pod's root writes a file.\n\n",
    );
    for (pod, ids) in pods.iter().zip(&host_ids) {
        out.push_str(&format!(
            "{:<8} --map-mount={:<22} its root runs on the host as {ids}\n",
            pod.key(),
            pod.map_mount()
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<12} {:<10} {:<14} {}\n",
        "FILE", "ON DISK", "POD-A SEES", "POD-B SEES"
    ));
    for pod in &pods {
        let file = format!("{}.txt", pod.key());
        let path = volume.join(&file);
        let m = std::fs::symlink_metadata(&path).map_err(Failure::io(path.display()))?;
        let sees = |v: &Vec<(String, String)>| {
            v.iter()
                .find(|(n, _)| *n == file)
                .map_or("-".to_string(), |(_, o)| o.clone())
        };
        out.push_str(&format!(
            "{:<12} {:<10} {:<14} {}\n",
            file,
            format!("{}:{}", m.uid(), m.gid()),
            sees(&views[0]),
            sees(&views[1])
        ));
    }
    out.push_str(
        "(both files are 0:0 on disk; each pod sees both as its root's; on the\n\
         host the pods' processes run as the unprivileged ids of their ranges)\n",
    );
    for m in mounts.into_iter().rev() {
        m.unmount()?;
    }
    drop(namespaces);
    drop(ranges);
    Ok(out)
}

/// What a pod process reported.
struct PodRun {
    /// "uid U, gid G", read from `/proc/PID/status` on the host.
    host_ids: String,
    /// The volume's files and their owners as the pod sees them.
    owners: Vec<(String, String)>,
}

/// Runs this program as the pod's root in `ns`: it writes `file` to
/// `volume` (unless empty) and lists the owners it sees; while it
/// waits, the host reads its ids from `/proc/PID/status`.
fn in_pod(ns: &UserNamespace, volume: &Path, file: &str) -> Result<PodRun, Failure> {
    let exe = std::env::current_exe().map_err(Failure::io("current_exe"))?;
    let ns_path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_fd().as_raw_fd());
    let mut child = Process::new(exe)
        .arg(HELPER)
        .arg(&ns_path)
        .arg(volume)
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(Failure::io("cannot start a pod process"))?;
    let pid = child.id();
    let mut owners = Vec::new();
    let mut ready = false;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(Failure::io("pod process output"))?;
            if line == "ready" {
                ready = true;
                break;
            }
            if let Some((name, owner)) = line.split_once(' ') {
                owners.push((name.to_string(), owner.to_string()));
            }
        }
    }
    let host_ids = if ready {
        status_ids(pid)
    } else {
        String::new()
    };
    drop(child.stdin.take());
    let status = child.wait().map_err(Failure::io("pod process"))?;
    if !ready || !status.success() {
        return Err(Failure::Failed(format!(
            "the pod process failed ({status})"
        )));
    }
    Ok(PodRun { host_ids, owners })
}

/// "uid U, gid G" from the Uid and Gid lines of `/proc/PID/status`.
fn status_ids(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string()
    };
    format!("uid {}, gid {}", field("Uid:"), field("Gid:"))
}

/// The pod process: `HELPER NS_PATH VOLUME FILE`. Joins the user
/// namespace, becomes its root, writes FILE (when not empty) and
/// prints "NAME UID:GID" for each file of VOLUME as it sees them,
/// then "ready", and waits for its stdin to close.
pub fn helper(args: &[OsString]) -> ExitCode {
    match helper_steps(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount-idmapped: demo pod process: {e}");
            ExitCode::from(1)
        }
    }
}

fn helper_steps(args: &[OsString]) -> Result<(), String> {
    let [ns_path, volume, file] = args else {
        return Err("usage: NS_PATH VOLUME FILE".into());
    };
    let volume = Path::new(volume);
    let ns = std::fs::File::open(ns_path).map_err(|e| format!("open {ns_path:?}: {e}"))?;
    // A fresh single-threaded process, as setns(CLONE_NEWUSER) needs.
    rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::User))
        .map_err(|e| format!("setns(CLONE_NEWUSER): {e}"))?;
    let root_gid = rustix::process::Gid::from_raw(0);
    let root_uid = rustix::process::Uid::from_raw(0);
    rustix::thread::set_thread_groups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid)
        .map_err(|e| format!("setresgid(0): {e}"))?;
    rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid)
        .map_err(|e| format!("setresuid(0): {e}"))?;
    if !file.is_empty() {
        let path = volume.join(file);
        std::fs::write(&path, b"written by the pod's root\n")
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let mut names: Vec<_> = std::fs::read_dir(volume)
        .map_err(|e| format!("read {}: {e}", volume.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let m = std::fs::symlink_metadata(volume.join(&name)).map_err(|e| e.to_string())?;
        out.push_str(&format!(
            "{} {}:{}\n",
            name.to_string_lossy(),
            m.uid(),
            m.gid()
        ));
    }
    out.push_str("ready\n");
    print!("{out}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Stay alive until the host has read our ids.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
    Ok(())
}
