//! Container root filesystems: an overlay whose layers are seen through a
//! mapping, built so that no helper mount ever appears where anything else
//! can see it.
//!
//! A `hostUsers: false` pod's root filesystem is an overlay of image layers
//! that every pod on the node shares. Shifting them on disk would copy the
//! image per pod (and through overlayfs, copy every file up); the overlay
//! mount itself cannot be idmapped (EINVAL; upstream declined). What works
//! is to idmap each *layer* and build the overlay from the idmapped layers.
//! [`Overlay::create`] does that by the best rung this kernel has, chosen
//! by probing ([`crate::features::overlay_features`]):
//!
//! | rung | kernel | how |
//! |---|---|---|
//! | [`OverlayMethod::LayerFds`] | 6.13 | one idmapped detached clone per distinct mount the layers live on, never attached; each layer an `O_PATH` fd beneath it, passed with `FSCONFIG_SET_FD` (upper and work beneath **one** clone of their common parent). No mount but the overlay ever exists in any table. |
//! | [`OverlayMethod::StagedStrings`] | 6.8 | one idmapped clone per distinct mount the layers live on, attached in a private staging tmpfs inside a helper thread's **own** mount namespace, the layers given as `lowerdir+` strings (one option per layer: no size limit) |
//! | [`OverlayMethod::StagedMountData`] | 5.19 | the same staging, the layers given in one `lowerdir=` string to `mount(2)` (short relative names, so 500 layers fit in its page) |
//! | — | older | [`ErrorKind::KernelTooOld`] |
//!
//! The staging namespace belongs to one short-lived thread: it dies with the
//! thread, so even a runtime killed mid-way leaves nothing staged. The
//! overlay is a detached mount ([`OverlayMount`]) that the caller attaches
//! in its own namespace.
//!
//! The overlay is created with credentials mapped in the layers' idmapping
//! (fsuid/fsgid of the id on-disk 0 is seen as, with the caller's
//! capabilities): overlayfs does all later work on its layers with its
//! creator's credentials, and a creator not mapped there gets EOVERFLOW on
//! the work directory — the kernel then *silently* mounts the overlay
//! read-only. With an upper layer the result is checked to be writable.
#![forbid(unsafe_code)]

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result};
use crate::features::{features, overlay_features, Availability};
use crate::map::Mapping;
use crate::mount::{CloneFlags, DetachedMount, FsContext, MountAttr, NewFilesystem};
use crate::probe::{self, Support};
use crate::sys;
use crate::userns::UserNamespace;

/// The most lower layers overlayfs takes (`OVL_MAX_STACK`).
pub const MAX_LOWER_LAYERS: usize = 500;

/// Which layer of an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerRole {
    /// A read-only lower layer, numbered from 0 (the top-most, as in `lowerdir=`).
    Lower(usize),
    /// The writable upper layer.
    Upper,
    /// The work directory (on the upper's mount).
    Work,
}

impl LayerRole {
    /// `lower`, `upper` or `work`, for machine-readable output.
    pub fn kind(self) -> &'static str {
        match self {
            LayerRole::Lower(_) => "lower",
            LayerRole::Upper => "upper",
            LayerRole::Work => "work",
        }
    }
}

impl fmt::Display for LayerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerRole::Lower(i) => write!(f, "lower layer {i}"),
            LayerRole::Upper => f.write_str("upper layer"),
            LayerRole::Work => f.write_str("work directory"),
        }
    }
}

/// How [`Overlay::create`] built the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverlayMethod {
    /// Layers as fds beneath idmapped detached clones (Linux 6.13).
    LayerFds,
    /// Idmapped clones attached in a private staging namespace, layers as
    /// `lowerdir+` strings (Linux 6.8).
    StagedStrings,
    /// Idmapped clones attached in a private staging namespace, layers in
    /// one `lowerdir=` string given to `mount(2)` (Linux 5.19).
    StagedMountData,
}

impl OverlayMethod {
    /// `layer-fds` or `staged-mounts`.
    pub fn name(self) -> &'static str {
        match self {
            OverlayMethod::LayerFds => "layer-fds",
            OverlayMethod::StagedStrings | OverlayMethod::StagedMountData => "staged-mounts",
        }
    }

    /// How the layers were handed to overlayfs: `fds`, `lowerdir+` or `lowerdir`.
    pub fn layer_options(self) -> &'static str {
        match self {
            OverlayMethod::LayerFds => "fds",
            OverlayMethod::StagedStrings => "lowerdir+",
            OverlayMethod::StagedMountData => "lowerdir",
        }
    }

    /// The rung this kernel offers, from the probed features; `KernelTooOld`
    /// when it cannot idmap at all. (Whether overlayfs accepts idmapped
    /// layers, Linux 5.19, shows only when the overlay is made: a refusal
    /// then is diagnosed as [`ErrorKind::KernelTooOld`].)
    pub fn for_this_kernel() -> Result<OverlayMethod> {
        if features().mount_setattr != Availability::Available {
            return Err(Error::new(ErrorKind::KernelTooOld {
                feature: "mount_setattr",
                since: "5.12",
            }));
        }
        let ov = overlay_features();
        if ov.fsopen != Availability::Available {
            return Err(Error::new(ErrorKind::KernelTooOld {
                feature: "fsopen",
                since: "5.2",
            }));
        }
        Ok(if ov.layer_fds == Availability::Available {
            OverlayMethod::LayerFds
        } else if ov.lowerdir_plus == Availability::Available {
            OverlayMethod::StagedStrings
        } else {
            OverlayMethod::StagedMountData
        })
    }
}

/// The ids seen through an idmap: a [`Mapping`], or a namespace.
#[derive(Debug, Clone, Copy)]
enum Idmap<'a> {
    Mapping(&'a Mapping),
    Userns(&'a UserNamespace),
}

/// An overlay of layers, each seen through one mapping; see the
/// [module docs](self).
///
/// ```no_run
/// use idmapped::rootfs::Overlay;
/// use idmapped::Mapping;
/// let mapping = Mapping::parse_map_mount(["b:0:100000:65536"])?;
/// let rootfs = Overlay::new(["/layers/3", "/layers/2", "/layers/1"])
///     .upper("/pods/p1/upper", "/pods/p1/work")
///     .mapping(&mapping)
///     .create()?;
/// println!("made by {}", rootfs.method().name());
/// rootfs.attach("/run/pods/p1/rootfs")?;
/// # Ok::<(), idmapped::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Overlay<'a> {
    lower: Vec<PathBuf>,
    upper: Option<(PathBuf, PathBuf)>,
    idmap: Option<Idmap<'a>>,
    attr: MountAttr<'a>,
    options: Vec<(String, Option<String>)>,
}

impl<'a> Overlay<'a> {
    /// An overlay of `lower` (top-most first, as in `lowerdir=`), read-only
    /// until [`upper`](Self::upper) is given.
    pub fn new<P: Into<PathBuf>>(lower: impl IntoIterator<Item = P>) -> Overlay<'a> {
        Overlay {
            lower: lower.into_iter().map(Into::into).collect(),
            upper: None,
            idmap: None,
            attr: MountAttr::new(),
            options: Vec::new(),
        }
    }

    /// Parse `lowerdir=L1:L2[:...][,upperdir=U,workdir=W][,OTHER...]`, the
    /// overlay options of a mount command line. `\:`, `\,` and `\\` escape
    /// those characters in a path; other options (`volatile`,
    /// `redirect_dir=on`, ...) are passed to overlayfs as they are.
    pub fn parse_options(text: &str) -> Result<Overlay<'a>> {
        let bad = |m: String| Error::new(ErrorKind::InvalidInput(m));
        let mut lower = None;
        let (mut upper, mut work) = (None, None);
        let mut options = Vec::new();
        for item in split_escaped(text, ',') {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (item.clone(), None),
            };
            match (key.as_str(), value) {
                ("lowerdir", Some(v)) => {
                    let layers: Vec<PathBuf> = split_escaped(&v, ':')
                        .into_iter()
                        .map(|l| PathBuf::from(unescape(&l)))
                        .collect();
                    if layers.iter().any(|l| l.as_os_str().is_empty()) {
                        return Err(bad(format!(
                            "lowerdir={v}: an empty layer (data-only layers, \"::\", are not supported here)"
                        )));
                    }
                    lower = Some(layers);
                }
                ("upperdir", Some(v)) => upper = Some(PathBuf::from(unescape(&v))),
                ("workdir", Some(v)) => work = Some(PathBuf::from(unescape(&v))),
                ("lowerdir" | "upperdir" | "workdir", None) => {
                    return Err(bad(format!("overlay option {key} needs a value")))
                }
                ("lowerdir+" | "datadir+", _) => {
                    return Err(bad(format!(
                        "overlay option {key}: give the layers in one lowerdir=L1:L2:..."
                    )))
                }
                ("", _) => return Err(bad(format!("an empty overlay option in {text:?}"))),
                (_, value) => options.push((key, value.map(|v| unescape(&v)))),
            }
        }
        let lower = lower.ok_or_else(|| bad(format!("overlay options {text:?} lack lowerdir=")))?;
        let mut overlay = Overlay::new(lower);
        match (upper, work) {
            (Some(u), Some(w)) => overlay = overlay.upper(u, w),
            (None, None) => {}
            _ => {
                return Err(bad(
                    "overlay options: upperdir and workdir go together (both or neither)".into(),
                ))
            }
        }
        overlay.options = options;
        Ok(overlay)
    }

    /// A writable overlay: new and changed files go to `upper`; `work` is
    /// overlayfs' scratch directory, on the same mount as `upper`.
    pub fn upper(mut self, upper: impl Into<PathBuf>, work: impl Into<PathBuf>) -> Self {
        self.upper = Some((upper.into(), work.into()));
        self
    }

    /// See every layer through `mapping` (a namespace is made for it).
    pub fn mapping(mut self, mapping: &'a Mapping) -> Self {
        self.idmap = Some(Idmap::Mapping(mapping));
        self
    }

    /// See every layer through `userns`'s mapping.
    pub fn userns(mut self, userns: &'a UserNamespace) -> Self {
        self.idmap = Some(Idmap::Userns(userns));
        self
    }

    /// Attributes of the overlay mount (read-only, nosuid, ...). It cannot
    /// carry an idmap: the overlay mount itself can never be idmapped.
    pub fn attr(mut self, attr: MountAttr<'a>) -> Self {
        self.attr = attr;
        self
    }

    /// Another overlayfs option (`volatile`, `redirect_dir=on`, `userxattr`, ...).
    pub fn option(mut self, key: impl Into<String>, value: Option<String>) -> Self {
        self.options.push((key.into(), value));
        self
    }

    /// The lower layers, top-most first.
    pub fn lower_layers(&self) -> &[PathBuf] {
        &self.lower
    }

    /// The upper layer and work directory, if given.
    pub fn upper_layer(&self) -> Option<(&Path, &Path)> {
        self.upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path()))
    }

    /// Every layer with its role: lowers, then upper and work.
    pub fn layers(&self) -> Vec<(LayerRole, &Path)> {
        let mut v: Vec<(LayerRole, &Path)> = self
            .lower
            .iter()
            .enumerate()
            .map(|(i, p)| (LayerRole::Lower(i), p.as_path()))
            .collect();
        if let Some((u, w)) = &self.upper {
            v.push((LayerRole::Upper, u));
            v.push((LayerRole::Work, w));
        }
        v
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorKind::InvalidInput(m)));
        if self.lower.is_empty() {
            return bad("an overlay needs at least one lower layer".into());
        }
        if self.lower.len() > MAX_LOWER_LAYERS {
            return bad(format!(
                "{} lower layers: overlayfs takes at most {MAX_LOWER_LAYERS}",
                self.lower.len()
            ));
        }
        if self.upper.is_none() && self.lower.len() < 2 {
            return bad(
                "a read-only overlay (no upperdir) needs at least two lower layers; give an upper and work directory, or mount the one layer itself".into(),
            );
        }
        if self.attr.changes_idmap() {
            return bad(
                "the overlay mount itself can never be idmapped (its layers are): give the mapping with Overlay::mapping".into(),
            );
        }
        for (key, value) in &self.options {
            if matches!(
                key.as_str(),
                "lowerdir" | "lowerdir+" | "datadir+" | "upperdir" | "workdir"
            ) {
                return bad(format!("overlay option {key} is given through the layers"));
            }
            if key.contains(['=', ',', '\0'])
                || value.as_deref().is_some_and(|v| v.contains([',', '\0']))
            {
                return bad(format!("overlay option {key:?}={value:?}"));
            }
        }
        Ok(())
    }

    /// Per layer, whether it can be seen through an idmap here, and why not:
    /// a real probe of each layer's mount ([`probe::idmap_support`]: a
    /// clone idmapped and dropped, nothing attached, nothing changed). No
    /// mapping is needed. Upper and work must also share one mount.
    pub fn check(&self) -> Result<Vec<LayerCheck>> {
        self.validate()?;
        let mut out = Vec::new();
        let mut upper_mount = None;
        for (role, path) in self.layers() {
            let opened = open_layer(role, path)?;
            let support = probe::idmap_support(path).map_err(|e| layer_error(role, path, e))?;
            if role == LayerRole::Upper {
                upper_mount = Some(opened.mnt_id);
            }
            let support = match (role, upper_mount, &support) {
                (LayerRole::Work, Some(m), Support::Supported) if m != opened.mnt_id => {
                    Support::Unsupported(probe::Reason::Filesystem {
                        fs: "a different mount than the upper layer".into(),
                    })
                }
                _ => support,
            };
            out.push(LayerCheck {
                role,
                path: path.to_path_buf(),
                fs: probe::fs_type(path),
                support,
            });
        }
        Ok(out)
    }

    /// Build the overlay as a detached mount, by the best rung this kernel
    /// has ([`OverlayMethod::for_this_kernel`]). Nothing is attached in the
    /// caller's namespace; nothing on any layer changes (overlayfs creates
    /// its `work/` directory inside the work directory). On error nothing is
    /// left mounted or staged.
    pub fn create(&self) -> Result<OverlayMount> {
        self.validate()?;
        let method = OverlayMethod::for_this_kernel()?;
        self.create_by(method)
    }

    /// [`create`](Self::create) by a given rung (for tests and benchmarks of
    /// the older rungs on a new kernel); a rung this kernel lacks fails.
    pub fn create_by(&self, method: OverlayMethod) -> Result<OverlayMount> {
        self.validate()?;
        let owned;
        let userns = match self.idmap {
            Some(Idmap::Userns(ns)) => ns,
            Some(Idmap::Mapping(m)) => {
                owned = UserNamespace::from_mapping(m)?;
                &owned
            }
            None => {
                return Err(Error::new(ErrorKind::InvalidInput(
                    "an overlay of idmapped layers needs a mapping or a user namespace".into(),
                )))
            }
        };
        let mapping = match self.idmap {
            Some(Idmap::Mapping(m)) => Some(m),
            _ => userns.mapping(),
        };
        let creator = mapping.map(creator_ids);
        let layers: Vec<OpenLayer> = self
            .layers()
            .into_iter()
            .map(|(role, path)| open_layer(role, path))
            .collect::<Result<_>>()?;
        if let (Some(u), Some(w)) = (
            layers.iter().find(|l| l.role == LayerRole::Upper),
            layers.iter().find(|l| l.role == LayerRole::Work),
        ) {
            if u.mnt_id != w.mnt_id {
                return Err(layer_error(
                    LayerRole::Work,
                    &w.path,
                    Error::new(ErrorKind::InvalidInput(format!(
                        "it is on another mount than the upper layer {}; overlayfs needs both on one mount",
                        u.path.display()
                    ))),
                ));
            }
        }
        let job = Job {
            overlay: self,
            userns,
            creator,
            layers: &layers,
        };
        let (mount, staged) = match method {
            OverlayMethod::LayerFds => job.by_layer_fds()?,
            OverlayMethod::StagedStrings | OverlayMethod::StagedMountData => job.staged(method)?,
        };
        let mut mount = mount;
        mount.set_attr(&self.attr)?;
        Ok(OverlayMount {
            mount,
            method,
            layers: layers.iter().map(|l| (l.role, l.path.clone())).collect(),
            staged_mounts: staged,
        })
    }
}

/// What [`Overlay::check`] found for one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCheck {
    /// Which layer.
    pub role: LayerRole,
    /// Its path, as given.
    pub path: PathBuf,
    /// The filesystem it is on.
    pub fs: String,
    /// Whether it can be seen through an idmap, and if not why.
    pub support: Support,
}

/// An overlay of idmapped layers, detached: attach it with
/// [`attach`](Self::attach), or take the [`DetachedMount`].
#[derive(Debug)]
pub struct OverlayMount {
    mount: DetachedMount,
    method: OverlayMethod,
    layers: Vec<(LayerRole, PathBuf)>,
    staged_mounts: usize,
}

impl OverlayMount {
    /// How it was built.
    pub fn method(&self) -> OverlayMethod {
        self.method
    }

    /// Its layers, in the order given.
    pub fn layers(&self) -> &[(LayerRole, PathBuf)] {
        &self.layers
    }

    /// How many idmapped clones were attached in the private staging
    /// namespace while the overlay was made (0 with layer fds); none of
    /// them was ever visible outside it, and all are gone.
    pub fn staged_mounts(&self) -> usize {
        self.staged_mounts
    }

    /// Attach the overlay at `target` (see [`DetachedMount::attach`]).
    pub fn attach(self, target: impl AsRef<Path>) -> Result<()> {
        self.mount.attach(target)
    }

    /// The overlay's detached mount.
    pub fn into_mount(self) -> DetachedMount {
        self.mount
    }
}

impl AsFd for OverlayMount {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.mount.as_fd()
    }
}

// ---- opening the layers ----

/// A layer opened once (`O_PATH`), identified by its mount and inode, with
/// its path made absolute and free of `.`/`..`/symlinks.
#[derive(Debug)]
struct OpenLayer {
    role: LayerRole,
    /// As given.
    path: PathBuf,
    /// Resolved (`/proc/self/fd` of the `O_PATH` fd).
    real: PathBuf,
    /// Holds the layer while the overlay is made.
    _pin: OwnedFd,
    mnt_id: u64,
    dev: (u32, u32),
    ino: u64,
}

fn layer_error(role: LayerRole, path: &Path, err: Error) -> Error {
    // A refusal from the mount calls carries the clone's path; the layer is
    // the one to name, with the diagnosis the error already has.
    let cause = match err.kind() {
        ErrorKind::Layer { cause, .. } => (**cause).clone(),
        k => k.clone(),
    };
    err.with_kind(ErrorKind::Layer {
        layer: role.to_string(),
        cause: Box::new(cause),
    })
    .with_path(path)
}

fn open_layer(role: LayerRole, path: &Path) -> Result<OpenLayer> {
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        layer_error(
            role,
            path,
            Error::sys("open", format!("{path:?}, O_PATH|O_DIRECTORY|O_CLOEXEC"), e),
        )
    })?;
    let st = rustix::fs::statx(
        &fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
    )
    .map_err(|e| layer_error(role, path, Error::sys("statx", format!("{path:?}"), e)))?;
    let real = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        rustix::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .map_err(|e| {
        let errno = Errno::from_io_error(&e).unwrap_or(Errno::IO);
        layer_error(
            role,
            path,
            Error::sys("readlink", "/proc/self/fd/N of the layer", errno),
        )
    })?;
    if !real.is_absolute() {
        return Err(layer_error(
            role,
            path,
            Error::new(ErrorKind::InvalidInput(format!(
                "it resolves to {real:?}, outside this mount namespace's tree"
            ))),
        ));
    }
    Ok(OpenLayer {
        role,
        path: path.to_path_buf(),
        real,
        _pin: fd,
        mnt_id: st.stx_mnt_id,
        dev: (st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
    })
}

/// Open `rel` (no `..`, no symlinks) beneath the clone `root` and check it
/// is the layer that was opened, so a path swapped in between is caught.
fn open_beneath(root: &DetachedMount, rel: &Path, layer: &OpenLayer) -> Result<OwnedFd> {
    let rel_s = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let fd = rustix::fs::openat2(
        root,
        rel_s,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
    )
    .map_err(|e| {
        layer_error(
            layer.role,
            &layer.path,
            Error::sys(
                "openat2",
                format!("clone fd, {rel_s:?}, O_PATH, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV"),
                e,
            ),
        )
    })?;
    let st = rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)
        .map_err(|e| layer_error(layer.role, &layer.path, Error::sys("statx", "layer fd", e)))?;
    if (st.stx_dev_major, st.stx_dev_minor) != layer.dev || st.stx_ino != layer.ino {
        return Err(layer_error(
            layer.role,
            &layer.path,
            Error::new(ErrorKind::TreeChanged(
                "the layer was replaced while the overlay was being made".into(),
            )),
        ));
    }
    Ok(fd)
}

/// The deepest directory that contains every path (all absolute, normal).
fn common_ancestor<'p>(paths: impl IntoIterator<Item = &'p Path>) -> PathBuf {
    let mut it = paths.into_iter();
    let Some(first) = it.next() else {
        return PathBuf::from("/");
    };
    let mut common: Vec<Component<'_>> = first.components().collect();
    for p in it {
        let n = common
            .iter()
            .zip(p.components())
            .take_while(|(a, b)| *a == b)
            .count();
        common.truncate(n);
    }
    common.iter().collect()
}

/// The ids the overlay is created as: those on-disk 0 is seen as (else the
/// first seen id of the mapping), so the creator is mapped in the layers' idmapping.
fn creator_ids(m: &Mapping) -> (u32, u32) {
    let pick = |map: &crate::map::IdMap| {
        map.seen(0)
            .or_else(|| map.extents().first().map(|e| e.seen()))
            .unwrap_or(0)
    };
    (pick(m.uids()), pick(m.gids()))
}

// ---- building the overlay ----

struct Job<'j, 'a> {
    overlay: &'j Overlay<'a>,
    userns: &'j UserNamespace,
    creator: Option<(u32, u32)>,
    layers: &'j [OpenLayer],
}

/// One idmapped clone per distinct mount the layers live on, rooted at
/// the deepest directory that holds all of that mount's layers.
struct Group {
    clone: DetachedMount,
    /// Per layer of the group: (index into `layers`, path below the clone's root).
    members: Vec<(usize, PathBuf)>,
}

impl Job<'_, '_> {
    fn idmapped_clone(&self, layer: &OpenLayer, path: &Path) -> Result<DetachedMount> {
        DetachedMount::clone_with(
            path,
            CloneFlags::empty(),
            &MountAttr::new().idmap(self.userns),
        )
        .map_err(|e| probe::diagnose(e, path, false))
        .map_err(|e| layer_error(layer.role, &layer.path, e))
    }

    /// Group the layers (indices into `self.layers`) by mount and clone each group's ancestor.
    fn groups(&self, which: impl Iterator<Item = usize>) -> Result<Vec<Group>> {
        let mut by_mount: Vec<(u64, Vec<usize>)> = Vec::new();
        for i in which {
            let m = self.layers[i].mnt_id;
            match by_mount.iter_mut().find(|(id, _)| *id == m) {
                Some((_, v)) => v.push(i),
                None => by_mount.push((m, vec![i])),
            }
        }
        let mut groups = Vec::new();
        for (_, idx) in by_mount {
            let root = common_ancestor(idx.iter().map(|&i| self.layers[i].real.as_path()));
            let first = &self.layers[idx[0]];
            let clone = self.idmapped_clone(first, &root)?;
            let mut members = Vec::new();
            for &i in &idx {
                let l = &self.layers[i];
                let rel = l
                    .real
                    .strip_prefix(&root)
                    .unwrap_or(Path::new(""))
                    .to_path_buf();
                // Check now that the clone holds this very layer.
                drop(open_beneath(&clone, &rel, l)?);
                members.push((i, rel));
            }
            groups.push(Group { clone, members });
        }
        Ok(groups)
    }

    /// Linux 6.13: every layer an fd; nothing attached anywhere.
    ///
    /// One idmapped detached clone per distinct mount the layers live on,
    /// each layer an `O_PATH` fd beneath its mount's clone. Upper and work
    /// share a mount, so they are beneath ONE clone of their common parent
    /// (two clones, even of one mount, are "not on the same mount" to
    /// overlayfs); every clone stays open until `FSCONFIG_CMD_CREATE`. One
    /// clone per mount rather than per layer: closing a detached clone tears
    /// down its anonymous mount namespace, which waits for an RCU grace
    /// period (measured: 50 per-layer clones took 0.16 s of wall time per
    /// overlay, nearly all of it waiting).
    fn by_layer_fds(&self) -> Result<(DetachedMount, usize)> {
        let groups = self.groups(0..self.layers.len())?;
        let mut fds: Vec<Option<OwnedFd>> = (0..self.layers.len()).map(|_| None).collect();
        for g in &groups {
            for (i, rel) in &g.members {
                fds[*i] = Some(open_beneath(&g.clone, rel, &self.layers[*i])?);
            }
        }
        let mount = self.with_creator_creds(|| {
            let ctx = FsContext::open("overlay")?;
            // Lowers first, in order (top-most first), then upper and work.
            for (l, fd) in self.layers.iter().zip(&fds) {
                let key = match l.role {
                    LayerRole::Lower(_) => "lowerdir+",
                    LayerRole::Upper => "upperdir",
                    LayerRole::Work => "workdir",
                };
                let fd = fd.as_ref().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidInput(format!(
                        "{} was not opened",
                        l.role
                    )))
                })?;
                ctx.set_fd(key, fd.as_fd(), &l.path.display().to_string())
                    .map_err(|e| layer_error(l.role, &l.path, e))?;
            }
            self.set_options(&ctx)?;
            ctx.create(&self.describe())?;
            ctx.mount()
        })?;
        // The overlay holds its own references to the layers.
        drop(fds);
        drop(groups);
        self.check_writable(&mount)?;
        Ok((mount, 0))
    }

    /// Linux 5.19 - 6.12: stage the idmapped clones where nothing else can
    /// see them, in a helper thread's own mount namespace.
    fn staged(&self, method: OverlayMethod) -> Result<(DetachedMount, usize)> {
        let groups = self.groups(0..self.layers.len())?;
        let staged = groups.len();
        let mount = std::thread::scope(|s| {
            s.spawn(|| self.staged_in_helper(groups, method))
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::new(ErrorKind::Process(
                        "the overlay staging thread panicked".into(),
                    )))
                })
        })?;
        self.check_writable(&mount)?;
        Ok((mount, staged))
    }

    /// Runs on its own thread: private mount namespace, staging tmpfs,
    /// clones attached, overlay made from them, staging detached. The
    /// namespace dies with the thread.
    fn staged_in_helper(&self, groups: Vec<Group>, method: OverlayMethod) -> Result<DetachedMount> {
        sys::unshare_fs_and_mount_ns()
            .map_err(|e| Error::sys("unshare", "CLONE_FS|CLONE_NEWNS", e))?;
        // Nothing mounted here may propagate to the namespace we came from.
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::REC
                | rustix::mount::MountPropagationFlags::PRIVATE,
        )
        .map_err(|e| Error::sys("mount", "\"/\", MS_REC|MS_PRIVATE (staging namespace)", e))?;
        let stage = ["/tmp", "/run", "/mnt", "/dev"]
            .iter()
            .map(Path::new)
            .find(|p| p.is_dir())
            .ok_or_else(|| {
                Error::new(ErrorKind::InvalidInput(
                    "no directory to stage on (/tmp, /run, /mnt, /dev)".into(),
                ))
            })?;
        NewFilesystem::tmpfs()
            .mode(0o700)
            .create(&MountAttr::new())?
            .attach(stage)?;
        let result = self.build_staged(stage, groups, method);
        // Detach the staging tmpfs and every clone beneath it: the overlay
        // keeps its own references to its layers.
        let _ = rustix::mount::unmount(stage, rustix::mount::UnmountFlags::DETACH);
        result
    }

    fn build_staged(
        &self,
        stage: &Path,
        groups: Vec<Group>,
        method: OverlayMethod,
    ) -> Result<DetachedMount> {
        let io = |what: String| {
            move |e: std::io::Error| {
                Error::sys(
                    "mkdir/symlink",
                    what,
                    Errno::from_io_error(&e).unwrap_or(Errno::IO),
                )
            }
        };
        rustix::process::chdir(stage)
            .map_err(|e| Error::sys("chdir", format!("{stage:?} (staging)"), e))?;
        // Short names for every layer (`l0`, `u`, `w`): symlinks into the
        // staged clones, so no option string grows with the layers' paths.
        let mut names = vec![String::new(); self.layers.len()];
        for (g, group) in groups.into_iter().enumerate() {
            let dir = format!("m{g}");
            std::fs::create_dir(&dir).map_err(io(format!("{stage:?}/{dir}")))?;
            for (i, rel) in &group.members {
                let name = match self.layers[*i].role {
                    LayerRole::Lower(n) => format!("l{n}"),
                    LayerRole::Upper => "u".into(),
                    LayerRole::Work => "w".into(),
                };
                std::os::unix::fs::symlink(Path::new(&dir).join(rel), &name)
                    .map_err(io(format!("{stage:?}/{name}")))?;
                names[*i] = name;
            }
            group.clone.attach(&dir)?;
        }
        let lowers: Vec<&str> = self
            .layers
            .iter()
            .zip(&names)
            .filter(|(l, _)| matches!(l.role, LayerRole::Lower(_)))
            .map(|(_, n)| n.as_str())
            .collect();
        let has_upper = self.overlay.upper.is_some();
        // This thread is the helper's own: it becomes the creator for good.
        self.become_creator()?;
        match method {
            OverlayMethod::StagedStrings => {
                let ctx = FsContext::open("overlay")?;
                for (l, n) in self.layers.iter().zip(&names) {
                    let key = match l.role {
                        LayerRole::Lower(_) => "lowerdir+",
                        LayerRole::Upper => "upperdir",
                        LayerRole::Work => "workdir",
                    };
                    ctx.set_string(key, n)
                        .map_err(|e| layer_error(l.role, &l.path, e))?;
                }
                self.set_options(&ctx)?;
                ctx.create(&self.describe())?;
                ctx.mount()
            }
            _ => {
                let mut data = format!("lowerdir={}", lowers.join(":"));
                if has_upper {
                    data.push_str(",upperdir=u,workdir=w");
                }
                for (k, v) in &self.overlay.options {
                    data.push(',');
                    data.push_str(k);
                    if let Some(v) = v {
                        data.push('=');
                        data.push_str(v);
                    }
                }
                // mount(2) copies one page of data; 4096 is the smallest page Linux has.
                let page = 4096;
                if data.len() >= page {
                    return Err(Error::new(ErrorKind::InvalidInput(format!(
                        "{} lower layers: the option string ({} bytes) exceeds the page mount(2) takes ({page} bytes) on a kernel without lowerdir+ (Linux 6.8)",
                        lowers.len(),
                        data.len()
                    ))));
                }
                std::fs::create_dir("ovl").map_err(io(format!("{stage:?}/ovl")))?;
                let cdata = std::ffi::CString::new(data.clone()).map_err(|_| {
                    Error::new(ErrorKind::InvalidInput(
                        "an overlay option contains a NUL byte".into(),
                    ))
                })?;
                rustix::mount::mount(
                    "overlay",
                    "ovl",
                    "overlay",
                    rustix::mount::MountFlags::empty(),
                    cdata.as_c_str(),
                )
                .map_err(|e| {
                    self.refused(
                        e,
                        &format!("\"overlay\", \"ovl\", \"overlay\", 0, {data:?}"),
                    )
                })?;
                let m = DetachedMount::clone_tree("ovl", CloneFlags::empty());
                let _ = rustix::mount::unmount("ovl", rustix::mount::UnmountFlags::DETACH);
                m
            }
        }
    }

    /// An overlay refusal from `mount(2)`: overlayfs logs the reason only to
    /// the kernel log. A kernel older than 5.19 refuses idmapped layers with
    /// a bare EINVAL: tell that apart by trying a read-only probe overlay of
    /// the first staged clone and an empty directory.
    fn refused(&self, errno: Errno, call: &str) -> Error {
        let err = Error::sys("mount", call.to_string(), errno);
        if errno == Errno::INVAL
            && std::fs::create_dir("probe-empty").is_ok()
            && std::fs::create_dir("probe").is_ok()
        {
            let probe = rustix::mount::mount(
                "overlay",
                "probe",
                "overlay",
                rustix::mount::MountFlags::RDONLY,
                c"lowerdir=m0:probe-empty",
            );
            match probe {
                Ok(()) => {
                    let _ = rustix::mount::unmount("probe", rustix::mount::UnmountFlags::DETACH);
                }
                Err(Errno::INVAL) => {
                    return err.with_kind(ErrorKind::KernelTooOld {
                        feature: "overlayfs with idmapped layers",
                        since: "5.19",
                    })
                }
                Err(_) => {}
            }
        }
        err.with_kind(ErrorKind::FsRefused {
            fs: "overlay".into(),
            option: format!("to create an overlay from {}", self.describe()),
            message: None,
        })
    }

    fn set_options(&self, ctx: &FsContext) -> Result<()> {
        for (k, v) in &self.overlay.options {
            match v {
                Some(v) => ctx.set_string(k, v)?,
                None => ctx.set_flag(k)?,
            }
        }
        Ok(())
    }

    /// The layers and options for messages.
    fn describe(&self) -> String {
        let mut s = format!(
            "lowerdir={}",
            self.overlay
                .lower
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        );
        if let Some((u, w)) = &self.overlay.upper {
            s.push_str(&format!(
                ",upperdir={},workdir={}",
                u.display(),
                w.display()
            ));
        }
        s
    }

    /// Run `f` on a new thread that [`become_creator`](Self::become_creator)s first.
    fn with_creator_creds<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.become_creator()?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::new(ErrorKind::Process(
                    "the overlay creation thread panicked".into(),
                )))
            })
        })
    }

    /// Give the calling (dedicated) thread fsuid/fsgid mapped in the
    /// layers' idmapping, keeping the caller's capabilities effective.
    /// Without a known mapping the caller's ids stay, and
    /// [`check_writable`](Self::check_writable) catches a creator the kernel could not map.
    fn become_creator(&self) -> Result<()> {
        let Some((uid, gid)) = self.creator else {
            return Ok(());
        };
        let caps = rustix::thread::capabilities(None).map_err(|e| Error::sys("capget", "0", e))?;
        let got = sys::set_thread_fsids(uid, gid);
        if got != (uid, gid) {
            return Err(Error::new(ErrorKind::Process(format!(
                "could not take fsuid {uid} / fsgid {gid} to create the overlay (have {got:?})"
            ))));
        }
        // A fsuid other than 0 drops the filesystem capabilities from the
        // effective set; overlayfs needs them in its creator's credentials.
        rustix::thread::set_capabilities(None, caps)
            .map_err(|e| Error::sys("capset", "0, the caller's sets", e))
    }

    /// With an upper layer the overlay must be writable: a creator the kernel
    /// could not map gets a silently read-only overlay.
    fn check_writable(&self, mount: &DetachedMount) -> Result<()> {
        let Some((upper, _)) = &self.overlay.upper else {
            return Ok(());
        };
        let st = rustix::fs::fstatvfs(mount)
            .map_err(|e| Error::sys("fstatvfs", "overlay mount fd", e))?;
        if st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
            return Err(layer_error(
                LayerRole::Upper,
                upper,
                Error::new(ErrorKind::FsRefused {
                    fs: "overlay".into(),
                    option: "a writable upper layer".into(),
                    message: Some(
                        "the kernel mounted the overlay read-only (the upper or work directory could not be used as the creator's ids, e.g. EOVERFLOW: an id outside the mapping; see the kernel log)".into(),
                    ),
                }),
            ));
        }
        Ok(())
    }
}

// ---- option text ----

/// Split at unescaped `sep` (a backslash escapes the next character).
fn split_escaped(text: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let cur = out.last_mut().expect("never empty");
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_overlay_options() {
        let o =
            Overlay::parse_options("lowerdir=/a:/b\\:c,upperdir=/u,workdir=/w,volatile").unwrap();
        assert_eq!(
            o.lower_layers(),
            &[PathBuf::from("/a"), PathBuf::from("/b:c")]
        );
        assert_eq!(o.upper_layer(), Some((Path::new("/u"), Path::new("/w"))));
        assert_eq!(o.options, vec![("volatile".to_string(), None)]);
        for bad in [
            "upperdir=/u,workdir=/w",
            "lowerdir=/a,upperdir=/u",
            "lowerdir=/a::/b",
            "lowerdir",
            "lowerdir=/a,,upperdir=/u",
            "lowerdir+=/a",
        ] {
            assert!(Overlay::parse_options(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_before_any_call() {
        let m = Mapping::parse_map_mount(["b:0:1000:10"]).unwrap();
        let e = |o: Overlay<'_>| o.validate().unwrap_err().to_string();
        assert!(e(Overlay::new(Vec::<PathBuf>::new())).contains("at least one"));
        assert!(e(Overlay::new(["/a"])).contains("two lower layers"));
        let many: Vec<String> = (0..501).map(|i| format!("/l{i}")).collect();
        assert!(e(Overlay::new(many).mapping(&m)).contains("at most 500"));
        let ns_err = Overlay::new(["/a", "/b"]).option("upperdir", Some("/x".into()));
        assert!(e(ns_err).contains("through the layers"));
    }

    #[test]
    fn common_ancestors() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            common_ancestor([p("/a/b/c").as_path(), p("/a/b/d").as_path()]),
            p("/a/b")
        );
        assert_eq!(common_ancestor([p("/a/b").as_path()]), p("/a/b"));
        assert_eq!(
            common_ancestor([p("/x").as_path(), p("/y").as_path()]),
            p("/")
        );
    }

    #[test]
    fn creator_is_what_on_disk_0_is_seen_as() {
        let m = Mapping::parse_map_mount(["b:0:100000:65536"]).unwrap();
        assert_eq!(creator_ids(&m), (100000, 100000));
        let m = Mapping::parse_map_mount(["b:1000:5000:10"]).unwrap();
        assert_eq!(creator_ids(&m), (5000, 5000));
    }
}
