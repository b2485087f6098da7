//! The commands: mount SOURCE at TARGET (`idmapped::strategy` does the
//! work), and `--check`.

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
use idmapped::strategy::{mount_with_ownership, MountWay, Outcome, Plan, Strategy};
use idmapped::{Mapping, UserNamespace};

use crate::args::{CheckRequest, IdSource, MountRequest};
use crate::output::{self, emit};
use crate::Failure;

pub fn mount(request: &MountRequest) -> Result<ExitCode, Failure> {
    if request.json {
        // Nothing to mount (or shift on disk) if the report cannot be written.
        output::require_stdout()?;
    }
    let target = follow_target(&request.target)?;
    let (outcome, mapping) = give_ownership(request, &target)?;
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
        if let Err(failure) = emit(&output::mount_json(request, &outcome, mapping.as_ref())) {
            let _ = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH);
            return Err(failure);
        }
    }
    Ok(ExitCode::SUCCESS)
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
    if r.tree_changed {
        eprintln!(
            "mount-idmapped: the tree changed during the walk (entries moved); the directories concerned were walked again"
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
/// mount is attached at `target`. Returns the mapping used, when known.
fn give_ownership(
    request: &MountRequest,
    target: &Path,
) -> Result<(Outcome, Option<Mapping>), Failure> {
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
    let outcome = mount_with_ownership(&request.source, target, &plan);
    if printed.load(Ordering::Relaxed) {
        eprintln!();
    }
    let outcome = outcome?;
    Ok((outcome, plan_mapping))
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
