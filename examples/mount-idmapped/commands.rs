//! The commands: mount SOURCE at TARGET (`idmapped::strategy` does the
//! work), a new tmpfs or an overlay of idmapped layers at TARGET
//! (`idmapped::NewFilesystem`, `idmapped::rootfs`), and `--check`.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idmapped::chown::{
    unshift_tree, OutsideLinks, Progress, ProgressFn, ShiftOptions, ShiftReport,
};
use idmapped::probe;
use idmapped::rootfs::OverlayMethod;
use idmapped::strategy::{mount_with_ownership_at, Destination, MountWay, Outcome, Plan, Strategy};
use idmapped::{AttachOptions, Attached, DetachedMount, Mapping, MountAttr, UserNamespace};

use crate::args::{CheckRequest, IdSource, MountRequest, NewFs, NewFsRequest, OverlayCheckRequest};
use crate::output::{self, emit};
use crate::Failure;

pub fn mount(request: &MountRequest) -> Result<ExitCode, Failure> {
    if request.json {
        // Nothing to mount (or shift on disk) if the report cannot be written.
        output::require_stdout()?;
    }
    let target = Target::open(
        &request.target,
        request.beneath.as_deref(),
        request.mkdir,
        request.replace,
    )?;
    let (outcome, mapping, attached) = give_ownership(request, &target)?;
    if let Outcome::Chowned {
        because: Some(why), ..
    } = &outcome
    {
        eprintln!("mount-idmapped: cannot idmap ({why}); shifted ownership on disk instead");
    }
    match &outcome {
        Outcome::Chowned { report, .. } => {
            tell_report(&request.source, report, request.outside_links)
        }
        Outcome::PerMount { mounts, report } => {
            for m in mounts {
                match &m.way {
                    MountWay::Idmapped(_) => {
                        eprintln!("mount-idmapped: {}: idmapped", m.mount.display())
                    }
                    MountWay::Shifted(why) => eprintln!(
                        "mount-idmapped: {}: shifted ownership on disk ({why})",
                        m.mount.display()
                    ),
                }
            }
            tell_report(&request.source, report, request.outside_links);
        }
        Outcome::Idmapped { .. } => {}
    }
    if request.json {
        // The mount is in place: if the report cannot be written, take the
        // mount away again rather than exit 1 with something left mounted.
        let json = output::mount_json(request, &outcome, mapping.as_ref(), attached.as_ref());
        if let Err(failure) = emit(&json) {
            let at = target.mounted_at(attached.as_ref());
            let _ = rustix::mount::unmount(&at, rustix::mount::UnmountFlags::DETACH);
            return Err(failure);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the mount goes: TARGET as a path of our namespace (followed when
/// it is a symlink, see [`follow_target`]); or, with --beneath, resolved to
/// an fd inside ROOT; or, with --mkdir or --replace alone, resolved to an fd
/// inside "/".
enum Target {
    Path(PathBuf),
    Beneath {
        root: rustix::fd::OwnedFd,
        root_path: PathBuf,
        path: PathBuf,
        options: AttachOptions,
    },
}

impl Target {
    /// TARGET with `--beneath=ROOT`, `--mkdir` and `--replace`.
    fn open(
        target: &Path,
        beneath: Option<&Path>,
        mkdir: bool,
        replace: bool,
    ) -> Result<Target, Failure> {
        if beneath.is_none() && !mkdir && !replace {
            return follow_target(target).map(Target::Path);
        }
        let (root_path, path) = match beneath {
            Some(root) => (root.to_path_buf(), target.to_path_buf()),
            None => (
                PathBuf::from("/"),
                std::path::absolute(target)
                    .map_err(Failure::io(format_args!("{}", target.display())))?,
            ),
        };
        let root = rustix::fs::open(
            &root_path,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Failure::io(format_args!("--beneath {}", root_path.display()))(e.into()))?;
        Ok(Target::Beneath {
            root,
            root_path,
            path,
            options: AttachOptions::new().create(mkdir).replace(replace),
        })
    }

    /// Attach `mount` here: at the path, or to the fd resolved inside ROOT.
    fn attach(&self, mount: DetachedMount) -> Result<Option<Attached>, Failure> {
        Ok(match self {
            Target::Path(p) => {
                mount.attach(p)?;
                None
            }
            Target::Beneath {
                root,
                path,
                options,
                ..
            } => Some(mount.attach_beneath(root, path, options)?),
        })
    }

    /// Where a mount made by [`attach`](Self::attach) is, in our namespace.
    fn mounted_at(&self, attached: Option<&Attached>) -> PathBuf {
        match (self, attached) {
            (Target::Beneath { root_path, .. }, Some(a)) => root_path.join(&a.target),
            (Target::Path(p), _) | (Target::Beneath { root_path: p, .. }, None) => p.clone(),
        }
    }

    fn destination(&self) -> Destination<'_> {
        match self {
            Target::Path(p) => Destination::Path(p),
            Target::Beneath {
                root,
                path,
                options,
                ..
            } => Destination::Beneath {
                root: rustix::fd::AsFd::as_fd(root),
                path,
                options: *options,
            },
        }
    }
}

/// Where to mount: TARGET, or where it points when its last component is a
/// symlink. Like util-linux's mount(8), which canonicalizes TARGET; the
/// library's `attach` does not follow it (inside a container's root, a
/// symlink must be resolved there, not on the host).
fn follow_target(target: &Path) -> Result<PathBuf, Failure> {
    let is_symlink = std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink());
    if !is_symlink {
        return Ok(target.to_path_buf());
    }
    std::fs::canonicalize(target).map_err(|e| {
        let points_to = std::fs::read_link(target).unwrap_or_default();
        Failure::Failed(format!(
            "{}: TARGET is a symlink to {}, which cannot be followed: {e}; give an existing directory (or file) as TARGET",
            target.display(),
            points_to.display()
        ))
    })
}

/// What a walk did that a user must hear of, on stderr.
fn tell_report(source: &Path, r: &ShiftReport, outside: OutsideLinks) {
    if r.completed_before {
        eprintln!(
            "mount-idmapped: {}: already shifted with this mapping and policy (recorded on the tree); nothing walked",
            source.display()
        );
    }
    if r.resumed {
        eprintln!(
            "mount-idmapped: {}: finished an interrupted shift ({} entries done before, {} half-done entries completed)",
            source.display(),
            r.already_shifted,
            r.recovered
        );
    }
    if !r.kept_in_seen_range.is_empty() {
        eprintln!(
            "mount-idmapped: {} id(s) outside the mapping were kept although they lie inside a seen range (they now look like container ids); first:",
            r.kept_in_seen_range.len()
        );
        for k in r.kept_in_seen_range.iter().take(5) {
            eprintln!("  {}: {} {}", k.path.display(), k.kind, k.id);
        }
    }
    if !r.outside_links.is_empty() {
        let verb = match outside {
            OutsideLinks::Shift => "shifted anyway (--outside-links=shift)",
            _ => "left unchanged",
        };
        eprintln!(
            "mount-idmapped: {} file(s) are also hard-linked from outside the tree and were {verb}; first:",
            r.outside_links.len()
        );
        for p in r.outside_links.iter().take(5) {
            eprintln!("  {}", p.display());
        }
    }
    if r.tree_unsettled {
        eprintln!(
            "mount-idmapped: the tree kept changing during the walk (entries moving between directories): every entry found was shifted, but one that kept moving could have been missed"
        );
    } else if r.tree_changed {
        eprintln!(
            "mount-idmapped: the tree changed during the walk (entries moved); the directories concerned were walked again, and every entry was met"
        );
    }
}

/// `--unshift SOURCE`: undo the recorded shift.
pub fn unshift(request: &CheckRequest) -> Result<ExitCode, Failure> {
    let options = ShiftOptions {
        cross_mounts: request.recursive,
        ..ShiftOptions::default()
    };
    let report = unshift_tree(&request.source, &options)?;
    if request.json {
        emit(&output::unshift_json(&request.source, &report))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Run the library's strategy: everything that can fail happens before the
/// mount is attached at `target`. Returns the mapping used, when known, and
/// what the attach did with --beneath, --mkdir or --replace.
fn give_ownership(
    request: &MountRequest,
    target: &Target,
) -> Result<(Outcome, Option<Mapping>, Option<Attached>), Failure> {
    let ns;
    let plan = match &request.ids {
        IdSource::Mapping(mapping) => Plan::new(request.strategy, mapping),
        IdSource::Userns(path) => {
            ns = UserNamespace::open(path)?;
            if ns.mapping().is_none() && request.strategy == Strategy::Chown {
                return Err(Failure::usage(format_args!(
                    "--strategy=chown: the maps of {} cannot be read, so ownership cannot be shifted on disk by them",
                    path.display()
                )));
            }
            Plan::with_userns(request.strategy, &ns)
        }
    };
    let plan_mapping = plan.mapping().cloned();
    let printed = Arc::new(AtomicBool::new(false));
    let mut plan = plan
        .recursive(request.recursive)
        .flags(request.flags)
        .shift_options(ShiftOptions {
            out_of_range: request.out_of_range,
            outside_links: request.outside_links,
            progress: progress_line(Arc::clone(&printed)),
            ..ShiftOptions::default()
        });
    if let Some(p) = request.propagation {
        plan = plan.propagation(p);
    }
    let done = mount_with_ownership_at(&request.source, target.destination(), &plan);
    if printed.load(Ordering::Relaxed) {
        eprintln!();
    }
    let (outcome, attached) = done?;
    Ok((outcome, plan_mapping, attached))
}

/// A progress line on stderr while a walk runs, when stderr is a terminal:
/// updated at most every half second, only once the walk has taken 2 s.
/// `printed` tells the caller a line is on screen (to end it).
fn progress_line(printed: Arc<AtomicBool>) -> Option<ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let start = Instant::now();
    let last = Mutex::new(start);
    Some(Arc::new(move |p: &Progress| {
        let now = Instant::now();
        let Ok(mut last) = last.lock() else { return };
        if now.duration_since(start) < Duration::from_secs(2)
            || now.duration_since(*last) < Duration::from_millis(500)
        {
            return;
        }
        *last = now;
        printed.store(true, Ordering::Relaxed);
        eprint!(
            "\rshifting ownership: {} entries visited, {} changed",
            p.visited, p.changed
        );
    }))
}

/// The mount that decides a `--check` verdict against SOURCE.
pub struct Blocker {
    pub mount_point: PathBuf,
    pub fs: String,
    pub reason: probe::Reason,
}

pub fn check(request: &CheckRequest) -> Result<ExitCode, Failure> {
    // Look the path up first, so a missing SOURCE is an error, not a verdict.
    std::fs::symlink_metadata(&request.source)
        .map_err(Failure::io(format_args!("{}", request.source.display())))?;
    let fs = probe::fs_type(&request.source);
    let blocker = probe::first_unsupported(&request.source, request.recursive)?.map(
        |(mount_point, reason)| Blocker {
            fs: probe::fs_type(&mount_point),
            mount_point,
            reason,
        },
    );
    let text = if request.json {
        output::check_json(request, Some(&fs), blocker.as_ref())
    } else {
        output::check_text(request, Some(&fs), blocker.as_ref())
    };
    emit(&text)?;
    Ok(match blocker {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(1),
    })
}

// ---------------------------------------------------------------------------
// --tmpfs and --overlay

/// What [`new_fs`] made, for `--json`.
pub enum Made {
    Tmpfs {
        options: String,
    },
    Overlay {
        method: OverlayMethod,
        layers: Vec<(idmapped::rootfs::LayerRole, PathBuf)>,
        staged_mounts: usize,
    },
}

/// Make the new filesystem, idmap it (a tmpfs) or its layers (an overlay),
/// set the attributes, then attach it at TARGET: everything that can fail
/// happens on the detached mount first.
pub fn new_fs(request: &NewFsRequest) -> Result<ExitCode, Failure> {
    if request.json {
        // Nothing to mount if the report cannot be written.
        output::require_stdout()?;
    }
    let target = Target::open(
        &request.target,
        request.beneath.as_deref(),
        request.mkdir,
        request.replace,
    )?;
    let userns = match &request.ids {
        IdSource::Mapping(m) => UserNamespace::from_mapping(m)?,
        IdSource::Userns(path) => UserNamespace::open(path)?,
    };
    let mut attr = MountAttr::new().set(request.flags);
    if let Some(p) = request.propagation {
        attr = attr.propagation(p);
    }
    let (made, mount) = match &request.fs {
        NewFs::Tmpfs(fs) => {
            let mount = fs.create(&attr.idmap(&userns))?;
            let made = Made::Tmpfs {
                options: fs.options_text(),
            };
            (made, mount)
        }
        NewFs::Overlay(overlay) => {
            let ov = overlay.clone().userns(&userns).attr(attr).create()?;
            let made = Made::Overlay {
                method: ov.method(),
                layers: ov.layers().to_vec(),
                staged_mounts: ov.staged_mounts(),
            };
            (made, ov.into_mount())
        }
    };
    let attached = target.attach(mount)?;
    if request.json {
        let mapping = match &request.ids {
            IdSource::Mapping(m) => Some(m),
            IdSource::Userns(_) => userns.mapping(),
        };
        let json = output::new_fs_json(request, &made, mapping, attached.as_ref());
        if let Err(failure) = emit(&json) {
            let at = target.mounted_at(attached.as_ref());
            let _ = rustix::mount::unmount(&at, rustix::mount::UnmountFlags::DETACH);
            return Err(failure);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--check --overlay`: per layer, whether it can be idmapped and why not,
/// and how this kernel would build the overlay. Exit 1 when it cannot.
pub fn check_overlay(request: &OverlayCheckRequest) -> Result<ExitCode, Failure> {
    let layers = request.overlay.check()?;
    let method = OverlayMethod::for_this_kernel();
    let ok = method.is_ok()
        && layers
            .iter()
            .all(|l| l.support == probe::Support::Supported);
    let text = if request.json {
        output::overlay_check_json(&layers, &method, ok)
    } else {
        output::overlay_check_text(&layers, &method)
    };
    emit(&text)?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
