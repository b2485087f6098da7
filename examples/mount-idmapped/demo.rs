//! `--demo`: idmap a small tree on a scratch filesystem in a private mount
//! namespace, print the on-disk and the seen owners; then the pods story
//! ([`pods`]); clean up.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode};

use idmapped::{CloneFlags, CloneMethod, DetachedMount, Mapping, MountAttr, UserNamespace};
use rustix::mount::{MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;

use crate::output::emit;
use crate::Failure;

pub mod pods;

/// The mapping the demo applies (DESIGN §2's example).
const MAP: &str = "b:0:10000:10000";

/// The files the demo creates, with their on-disk owner (uid = gid).
const TREE: &[(&str, bool, u32)] = &[
    ("root-file", false, 0),
    ("user-dir", true, 1000),
    ("user-dir/file", false, 1000),
    ("outside-file", false, 15000),
];

pub fn run() -> Result<ExitCode, Failure> {
    enter_private_mount_namespace()?;
    let dir = tempfile::Builder::new()
        .prefix("mount-idmapped-demo-")
        .tempdir()
        .map_err(Failure::io("cannot create a temporary directory"))?;
    let scratch = Scratch::mount(dir.path())?;
    make_tree(&scratch.root)?;
    let target = dir.path().join("idmapped");
    std::fs::create_dir(&target).map_err(Failure::io(target.display()))?;
    let mapping = Mapping::parse_map_mount([MAP]).map_err(|e| Failure::Failed(e.to_string()))?;
    let ns = UserNamespace::from_mapping(&mapping)?;
    let clone = DetachedMount::clone_with(
        &scratch.root,
        CloneFlags::empty(),
        &MountAttr::new().idmap(&ns),
    )?;
    let method = clone.method();
    clone.attach(&target)?;
    let idmapped = Mounted::new(target);
    let mut table = table(&scratch, &idmapped.path, method)?;
    idmapped.unmount()?;
    table.push_str(&pods::run(dir.path(), &scratch.root)?);
    scratch.unmount()?;
    dir.close()
        .map_err(Failure::io("cannot remove the temporary directory"))?;
    emit(&table)?;
    Ok(ExitCode::SUCCESS)
}

/// A mount namespace of our own, with nothing propagating out of it.
fn enter_private_mount_namespace() -> Result<(), Failure> {
    // SAFETY: CLONE_NEWNS gives this thread its own mount namespace and
    // fs context (cwd, root, umask). The process has one thread at this
    // point and keeps no cached paths, so no state Rust relies on changes.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(|e| Failure::Failed(format!("unshare(CLONE_NEWNS): {e}")))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(|e| Failure::Failed(format!("cannot make / recursively private: {e}")))
}

/// A mount that is unmounted when dropped, unless unmounted explicitly.
struct Mounted {
    path: PathBuf,
    active: bool,
}

impl Mounted {
    fn new(path: PathBuf) -> Mounted {
        Mounted { path, active: true }
    }

    fn unmount(mut self) -> Result<(), Failure> {
        self.active = false;
        rustix::mount::unmount(&self.path, UnmountFlags::empty())
            .map_err(|e| Failure::Failed(format!("cannot unmount {}: {e}", self.path.display())))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
        }
    }
}

/// The scratch filesystem: ext4 on a loop image when `mkfs.ext4` is
/// there (tmpfs cannot be idmapped before Linux 6.3), tmpfs otherwise.
struct Scratch {
    root: PathBuf,
    kind: &'static str,
    mount: Mounted,
}

impl Scratch {
    fn mount(dir: &Path) -> Result<Scratch, Failure> {
        let root = dir.join("fs");
        std::fs::create_dir(&root).map_err(Failure::io(root.display()))?;
        let image = dir.join("fs.img");
        let kind = if make_ext4_image(&image)? {
            // util-linux sets up the loop device with autoclear: it goes
            // away with the last unmount.
            let mount = find_tool("mount").unwrap_or_else(|| PathBuf::from("mount"));
            run_tool(
                Process::new(mount)
                    .args(["-t", "ext4", "-o", "loop"])
                    .arg(&image)
                    .arg(&root),
            )?;
            "ext4 on a loop device"
        } else {
            rustix::mount::mount(
                "tmpfs",
                &root,
                "tmpfs",
                rustix::mount::MountFlags::empty(),
                None,
            )
            .map_err(|e| Failure::Failed(format!("cannot mount tmpfs: {e}")))?;
            "tmpfs"
        };
        Ok(Scratch {
            mount: Mounted::new(root.clone()),
            root,
            kind,
        })
    }

    fn unmount(self) -> Result<(), Failure> {
        self.mount.unmount()
    }
}

/// Make an ext4 image at `image`; `Ok(false)` when there is no mkfs.ext4.
fn make_ext4_image(image: &Path) -> Result<bool, Failure> {
    let Some(mkfs) = find_tool("mkfs.ext4") else {
        return Ok(false);
    };
    let file = std::fs::File::create(image).map_err(Failure::io(image.display()))?;
    file.set_len(32 << 20)
        .map_err(Failure::io(image.display()))?;
    run_tool(Process::new(mkfs).args(["-q", "-F"]).arg(image))?;
    Ok(true)
}

/// `name` on `PATH`, or in the sbin directories, which are not on every
/// user's `PATH`.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|tool| tool.is_file())
}

fn run_tool(cmd: &mut Process) -> Result<(), Failure> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(Failure::io(&name))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(Failure::Failed(format!(
        "{name} failed ({}): {}",
        out.status,
        stderr.trim()
    )))
}

fn make_tree(root: &Path) -> Result<(), Failure> {
    std::os::unix::fs::chown(root, Some(0), Some(0)).map_err(Failure::io(root.display()))?;
    for &(name, is_dir, id) in TREE {
        let path = root.join(name);
        let made = if is_dir {
            std::fs::create_dir(&path)
        } else {
            std::fs::write(&path, name)
        };
        made.and_then(|()| std::os::unix::fs::chown(&path, Some(id), Some(id)))
            .map_err(Failure::io(path.display()))?;
    }
    Ok(())
}

fn table(scratch: &Scratch, idmapped: &Path, method: CloneMethod) -> Result<String, Failure> {
    let owner = |p: &Path| {
        std::fs::symlink_metadata(p)
            .map(|m| format!("{}:{}", m.uid(), m.gid()))
            .map_err(Failure::io(p.display()))
    };
    let mut out = format!(
        "Scratch filesystem: {}; idmapped with --map-mount={MAP} via {}\n\
         (on-disk 0..9999 are seen as 10000..19999, every other id as 65534)\n\n",
        scratch.kind,
        method.syscalls()
    );
    out.push_str(&row("PATH", "ON DISK (uid:gid)", "SEEN (uid:gid)"));
    let names = std::iter::once(".").chain(TREE.iter().map(|&(name, _, _)| name));
    for name in names {
        let on_disk = owner(&scratch.root.join(name))?;
        let seen = owner(&idmapped.join(name))?;
        out.push_str(&row(name, &on_disk, &seen));
    }
    Ok(out)
}

fn row(path: &str, on_disk: &str, seen: &str) -> String {
    format!("{path:<16} {on_disk:<20} {seen}\n")
}
