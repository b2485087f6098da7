//! The privilege split of runc and crun, with this crate: one process makes
//! the idmapped mount, sends it over a Unix socket (`SCM_RIGHTS`), and
//! another process attaches it beneath a root it does not trust.
//!
//! ```sh
//! privilege-split SOURCE ROOT TARGET [b:FROM:TO:RANGE]
//! ```
//!
//! idmaps SOURCE (default mapping `b:0:100000:65536`: on-disk 0..65535 seen
//! as 100000..165535; a plain clone where the kernel cannot idmap), starts
//! a copy of itself as the attaching process with the socket as its stdin,
//! and sends the mount; the child resolves TARGET inside ROOT as if ROOT
//! were "/", creates it if missing, attaches, and prints where. Root
//! needed. The two processes share the caller's mount namespace: run it in
//! a scratch namespace (`unshare -m --propagation private`) to keep the
//! host's clean.
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode, Stdio};

use idmapped::features::{self, Availability};
use idmapped::{AttachOptions, CloneFlags, DetachedMount, Mapping, MountAttr, UserNamespace};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--attach") if args.len() == 3 => attach(&args[1], &args[2]),
        Some(_) if (3..=4).contains(&args.len()) => make_and_send(&args),
        _ => {
            eprintln!("usage: privilege-split SOURCE ROOT TARGET [b:FROM:TO:RANGE]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("privilege-split: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The privileged side: make the mount, hand it over, wait for the other side.
fn make_and_send(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (source, root, target) = (&args[0], &args[1], &args[2]);
    let spec = args.get(3).map_or("b:0:100000:65536", String::as_str);
    let (ours, theirs) = UnixStream::pair()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--attach", root, target])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .spawn()?;
    let mount = if features::features().mount_setattr == Availability::Available {
        let userns = UserNamespace::from_mapping(&Mapping::parse_map_mount([spec])?)?;
        DetachedMount::clone_with(
            source,
            CloneFlags::RECURSIVE,
            &MountAttr::new().idmap_recursive(&userns),
        )?
    } else {
        eprintln!("privilege-split: this kernel cannot idmap; sending a plain clone");
        DetachedMount::clone_tree(source, CloneFlags::RECURSIVE)?
    };
    mount.send(&ours)?;
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("the attaching process failed ({status})").into());
    }
    Ok(())
}

/// The other side: receive, then attach beneath ROOT only.
fn attach(root: &str, target: &str) -> Result<(), Box<dyn std::error::Error>> {
    let stdin = std::io::stdin();
    let mount = DetachedMount::recv(stdin.as_fd())?;
    let root_fd = std::fs::File::open(root)?;
    let done = mount.attach_beneath(&root_fd, target, &AttachOptions::new().create(true))?;
    println!(
        "attached at {root}/{} (resolver: {}, created: {})",
        done.target.display(),
        done.resolver.name(),
        done.created
    );
    Ok(())
}
