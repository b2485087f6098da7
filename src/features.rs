//! What the running kernel can do, probed once per process.
//!
//! Every fallback ladder in the crate asks here which rung to take. A probe
//! tells apart a call the kernel lacks (`ENOSYS`: [`Availability::Missing`])
//! from one a security policy refused (`EPERM`/`EACCES` from seccomp:
//! [`Availability::Blocked`]); only what cannot change for the life of the
//! process is cached.
#![forbid(unsafe_code)]

use std::sync::OnceLock;

use rustix::fs::{AtFlags, StatxFlags, CWD};
use rustix::io::Errno;

use crate::sys;

/// Whether a kernel feature can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// The call exists and is allowed.
    Available,
    /// The kernel lacks it (ENOSYS), or it was disabled for testing with
    /// `IDMAPPED_FORCE_FALLBACK`.
    Missing,
    /// The call exists but a security policy refused it (EPERM/EACCES from seccomp).
    Blocked(Errno),
}

/// Kernel features this crate uses, probed once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// `mount_setattr(2)`, Linux 5.12: idmapping at all.
    pub mount_setattr: Availability,
    /// `open_tree_attr(2)`, Linux 6.15: clone and idmap in one call; replace or clear an idmap.
    pub open_tree_attr: Availability,
    /// `statmount(2)` with `STATMOUNT_MNT_UIDMAP`, Linux 6.15: read a mount's idmap back.
    pub statmount_idmap: Availability,
    /// `openat2(2)` with `RESOLVE_*`, Linux 5.6: procfs lookups that refuse
    /// symlinks, magic links and mount crossings in one call, and resolving a
    /// path inside a root in one call ([`crate::resolve`]; without it a
    /// userspace resolver with the same semantics is used).
    pub openat2: Availability,
    /// `pidfd_send_signal(2)`, Linux 5.1: the namespace helper is signalled
    /// through its pidfd (`CLONE_PIDFD`, 5.2) rather than by pid.
    pub pidfd_send_signal: Availability,
    /// `waitid(P_PIDFD)`, Linux 5.4: the helper is reaped through its pidfd.
    pub waitid_pidfd: Availability,
    /// `ioctl(PIDFD_GET_USER_NAMESPACE)`, Linux 6.11: a process's user
    /// namespace straight from its pidfd ([`UserNamespace::from_pidfd`](crate::UserNamespace::from_pidfd)).
    pub pidfd_get_user_namespace: Availability,
    /// `listmount(2)` + `statmount(2)`, Linux 6.8: the mounts of a subtree and
    /// their type, flags and idmap, without reading the whole mount table.
    pub listmount: Availability,
    /// `move_mount(MOVE_MOUNT_BENEATH)`, Linux 6.5: atomic replace of a mount.
    pub move_mount_beneath: Availability,
}

/// Whether `IDMAPPED_FORCE_FALLBACK` (a comma-separated list, read once per
/// process) names `feature`: the way tests run the older-kernel rung of a
/// fallback ladder on a new kernel.
pub(crate) fn forced_fallback(feature: &str) -> bool {
    static FORCED: OnceLock<String> = OnceLock::new();
    FORCED
        .get_or_init(|| std::env::var("IDMAPPED_FORCE_FALLBACK").unwrap_or_default())
        .split(',')
        .any(|f| f.trim() == feature)
}

/// The features of the running kernel (probed on first use, then cached).
///
/// Setting `IDMAPPED_FORCE_FALLBACK` to a comma-separated list of
/// `open_tree_attr`, `statmount`, `openat2`, `pidfd`, `pidfd_get_user_namespace`,
/// `listmount` makes those report [`Availability::Missing`], so the fallback
/// paths can be tested on a new kernel (`openat2` does the same for the
/// [`chown`](crate::chown) walker's directory opens, `nodev_view` makes the
/// walker pin every entry `O_PATH` (its pre-5.12 rung) and `xattrat` makes
/// its scan read xattrs by `/proc` path (pre-6.13), `fine_ctime` makes its
/// settling passes take timestamps as coarse (pre-6.13); `pidfd` covers both
/// pidfd calls; `fsopen_proc` makes the procfs handle use the checked
/// `/proc` mount instead of a private instance).
pub fn features() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(|| {
        let forced = forced_fallback;
        // rustix's ABS is fd -EBADF: every *at() call rejects it with EBADF
        // before looking at anything else, so "EBADF" means "the call exists".
        let bad_fd = || rustix::fs::ABS;
        let mount_setattr = availability(sys::mount_setattr(
            bad_fd(),
            c"",
            libc::AT_EMPTY_PATH as u32,
            &sys::RawMountAttr {
                attr_set: 0,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            },
        ));
        let open_tree_attr = if forced("open_tree_attr") {
            Availability::Missing
        } else {
            availability(sys::open_tree_attr(bad_fd(), c"x", 0, None).map(drop))
        };
        let statmount_idmap = if forced("statmount") {
            Availability::Missing
        } else {
            probe_statmount_idmap()
        };
        let gate = |name: &str, probe: fn() -> Availability| {
            if forced(name) {
                Availability::Missing
            } else {
                probe()
            }
        };
        Features {
            mount_setattr,
            open_tree_attr,
            statmount_idmap,
            openat2: gate("openat2", probe_openat2),
            pidfd_send_signal: gate("pidfd", || {
                // fd -1: EBADF when the call exists.
                availability(sys::pidfd_send_signal(bad_fd_raw(), 0))
            }),
            waitid_pidfd: gate("pidfd", probe_waitid_pidfd),
            pidfd_get_user_namespace: gate("pidfd_get_user_namespace", probe_pidfd_userns),
            listmount: gate("listmount", || {
                availability(sys::listmount(sys::LSMT_ROOT, 0, &mut [0u64; 1]).map(drop))
            }),
            move_mount_beneath: gate("move_mount_beneath", probe_move_mount_beneath),
        }
    })
}

/// A descriptor number no call accepts (rustix's `ABS` is `-EBADF`).
fn bad_fd_raw() -> rustix::fd::BorrowedFd<'static> {
    rustix::fs::ABS
}

fn probe_openat2() -> Availability {
    let how = rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_MAGICLINKS;
    availability(
        rustix::fs::openat2(
            CWD,
            ".",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            how,
        )
        .map(drop),
    )
}

/// `waitid(P_PIDFD)` on a pidfd of our own process: ECHILD (we are not our
/// own child) where P_PIDFD is known, EINVAL before 5.4. (A negative fd
/// would not do: the kernel rejects it with EINVAL before looking at it.)
fn probe_waitid_pidfd() -> Availability {
    let Some(me) = rustix::process::Pid::from_raw(std::process::id() as i32) else {
        return Availability::Missing;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(me, rustix::process::PidfdFlags::empty()) else {
        return Availability::Missing;
    };
    match sys::waitid_pidfd(rustix::fd::AsFd::as_fd(&pidfd)) {
        Err(Errno::INVAL) | Err(Errno::NOSYS) => Availability::Missing,
        Err(e @ (Errno::PERM | Errno::ACCESS)) => Availability::Blocked(e),
        _ => Availability::Available,
    }
}

/// The ioctl on a pidfd of our own: ENOTTY (or EINVAL) before 6.11.
fn probe_pidfd_userns() -> Availability {
    let Some(me) = rustix::process::Pid::from_raw(std::process::id() as i32) else {
        return Availability::Missing;
    };
    let Ok(pidfd) = rustix::process::pidfd_open(me, rustix::process::PidfdFlags::empty()) else {
        return Availability::Missing;
    };
    match sys::pidfd_get_user_namespace(rustix::fd::AsFd::as_fd(&pidfd)) {
        Ok(_) => Availability::Available,
        Err(e @ (Errno::PERM | Errno::ACCESS)) => Availability::Blocked(e),
        Err(_) => Availability::Missing,
    }
}

fn availability(r: std::result::Result<(), Errno>) -> Availability {
    match r {
        Err(Errno::NOSYS) => Availability::Missing,
        Err(e @ (Errno::PERM | Errno::ACCESS)) => Availability::Blocked(e),
        _ => Availability::Available,
    }
}

/// `move_mount` checks privilege (EPERM), then rejects flags it does not know
/// (EINVAL: `MOVE_MOUNT_BENEATH` is unknown before 6.5), then looks at the fds
/// (EBADF: the flag is known).
fn probe_move_mount_beneath() -> Availability {
    use rustix::mount::MoveMountFlags as M;
    let r = rustix::mount::move_mount(
        rustix::fs::ABS,
        "",
        rustix::fs::ABS,
        "",
        M::MOVE_MOUNT_F_EMPTY_PATH | M::MOVE_MOUNT_T_EMPTY_PATH | M::MOVE_MOUNT_BENEATH,
    );
    match r {
        Err(Errno::INVAL) | Err(Errno::NOSYS) => Availability::Missing,
        Err(e @ (Errno::PERM | Errno::ACCESS)) => Availability::Blocked(e),
        _ => Availability::Available,
    }
}

/// statmount exists (6.8) and knows `STATMOUNT_MNT_UIDMAP` (6.15).
fn probe_statmount_idmap() -> Availability {
    let Ok(st) = rustix::fs::statx(
        CWD,
        "/",
        AtFlags::empty(),
        StatxFlags::from_bits_retain(0x4000),
    ) else {
        return Availability::Missing;
    };
    if st.stx_mask & 0x4000 == 0 {
        return Availability::Missing;
    }
    // A kernel that knows STATMOUNT_SUPPORTED_MASK says which fields it can fill.
    match sys::statmount(st.stx_mnt_id, sys::STATMOUNT_SUPPORTED_MASK) {
        Ok(sm)
            if sm.mask & sys::STATMOUNT_SUPPORTED_MASK != 0
                && sm.supported_mask & sys::STATMOUNT_MNT_UIDMAP != 0 =>
        {
            Availability::Available
        }
        Ok(_) => Availability::Missing,
        // Any error but a policy refusal means "not usable" here.
        Err(e @ (Errno::PERM | Errno::ACCESS)) => Availability::Blocked(e),
        Err(_) => Availability::Missing,
    }
}

// ---- overlay and new filesystems ----

/// What overlayfs and `fsopen` can do here, probed once per process on
/// first use (not by [`features`]: the probes load the overlay module).
///
/// Every probe is an `fsopen` context that is configured and then dropped
/// without `FSCONFIG_CMD_CREATE`: nothing is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFeatures {
    /// `fsopen(2)` and friends, Linux 5.2: a new filesystem as a detached mount.
    pub fsopen: Availability,
    /// overlay's `lowerdir+` (and `datadir+`) as strings through `fsconfig`,
    /// Linux 6.8: one layer per option, so no option string hits a size limit.
    pub lowerdir_plus: Availability,
    /// overlay layers as file descriptors (`FSCONFIG_SET_FD` with an
    /// `O_PATH` fd for `lowerdir+`, `datadir+`, `upperdir`, `workdir`),
    /// Linux 6.13: a detached idmapped clone is a layer without being attached anywhere.
    pub layer_fds: Availability,
}

/// The overlay features of the running kernel (probed on first use, then cached).
///
/// `IDMAPPED_FORCE_FALLBACK` may name `overlay_layer_fds` and
/// `overlay_lowerdir_plus` to test the older rungs on a new kernel.
pub fn overlay_features() -> &'static OverlayFeatures {
    static FEATURES: OnceLock<OverlayFeatures> = OnceLock::new();
    FEATURES.get_or_init(|| {
        let ctx = rustix::mount::fsopen("overlay", rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC);
        let fsopen = match &ctx {
            Ok(_) => Availability::Available,
            // ENODEV: no overlay here; the call itself exists.
            Err(Errno::NODEV) => Availability::Available,
            Err(e) => availability(Err(*e)),
        };
        let (lowerdir_plus, layer_fds) = match ctx {
            Ok(fd) => {
                // Before Linux 6.5 overlay has no parameter table: the legacy
                // context accepts *any* string option and fails only at
                // FSCONFIG_CMD_CREATE. Only a context that refuses an unknown
                // option (EINVAL) tells by accepting `lowerdir+` that it knows it.
                let validates =
                    rustix::mount::fsconfig_set_flag(&fd, "idmapped-probe-no-such-option").is_err();
                // "/" is a valid directory everywhere; the context is dropped
                // unused. A kernel without the parameter answers EINVAL.
                let plus = match rustix::mount::fsconfig_set_string(&fd, "lowerdir+", "/") {
                    Ok(()) if !validates => Availability::Missing,
                    r => availability_of_option(r),
                };
                let fds = match rustix::fs::open(
                    "/",
                    rustix::fs::OFlags::PATH
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                ) {
                    Ok(_) if !validates => Availability::Missing,
                    Ok(dir) => availability_of_option(rustix::mount::fsconfig_set_fd(
                        &fd,
                        "lowerdir+",
                        &dir,
                    )),
                    Err(_) => Availability::Missing,
                };
                (plus, fds)
            }
            Err(_) => (Availability::Missing, Availability::Missing),
        };
        let forced = forced_fallback;
        OverlayFeatures {
            fsopen,
            lowerdir_plus: if forced("overlay_lowerdir_plus") {
                Availability::Missing
            } else {
                lowerdir_plus
            },
            layer_fds: if forced("overlay_layer_fds") || forced("overlay_lowerdir_plus") {
                Availability::Missing
            } else {
                layer_fds
            },
        }
    })
}

/// An `fsconfig` option the kernel does not know is EINVAL (or, for an fd
/// where it wants a string, EBADF/EINVAL); a policy refusal is EPERM.
fn availability_of_option(r: std::result::Result<(), Errno>) -> Availability {
    match r {
        Ok(()) => Availability::Available,
        Err(e @ (Errno::PERM | Errno::ACCESS)) => Availability::Blocked(e),
        Err(_) => Availability::Missing,
    }
}
