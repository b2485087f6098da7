//! ID-mapped mounts for Linux, for container runtimes.
//!
//! A Kubernetes pod with `hostUsers: false` runs as unprivileged ids on the
//! host, yet its volumes must look owned by the pod's ids. The old answer was
//! a recursive `chown` of every file: O(n), slow, and dangerous on shared
//! data. An **ID-mapped mount** asks the kernel to translate ownership at the
//! mount instead: O(1), nothing on disk changes.
//!
//! The kernel API is three calls, and this crate gives each a typed, owned
//! handle:
//!
//! 1. clone the tree as a detached mount — [`DetachedMount::clone_tree`]
//!    (`open_tree(OPEN_TREE_CLONE)`);
//! 2. attach a user namespace's mapping to it — [`DetachedMount::set_attr`]
//!    with [`MountAttr::idmap`] (`mount_setattr(MOUNT_ATTR_IDMAP)`), or steps 1
//!    and 2 at once with [`DetachedMount::clone_with`] (`open_tree_attr`,
//!    Linux 6.15, falling back to the two calls on older kernels);
//! 3. attach it where it belongs — [`DetachedMount::attach`] (`move_mount`).
//!
//! The user namespace comes from a validated [`Mapping`]
//! ([`UserNamespace::from_mapping`], no `fork()` of the caller), from a path
//! such as `/proc/PID/ns/user`, from a pidfd, or from an fd. When the kernel refuses, the
//! [`Error`] says which rule was hit ([`ErrorKind`]): the filesystem (naming
//! its type, and with a recursive clone the submount), a mount that is not
//! detached or already idmapped, the initial namespace, a missing map, a busy
//! file, a missing privilege, or a kernel that is too old. [`probe`] tells in
//! advance what the kernel and a given path support.
//!
//! Which host ids each pod gets is [`ranges`]' job: per-pod blocks the way
//! the kubelet hands them out, in a state directory every runtime on a node
//! can share; each allocation's [`Mapping`] goes straight into
//! [`UserNamespace::from_mapping`].
//!
//! ```no_run
//! use idmapped::{CloneFlags, DetachedMount, Mapping, MountAttr, UserNamespace};
//!
//! // Files stored as 0..65535 on disk are seen as 100000..165535.
//! let mapping = Mapping::parse_map_mount(["b:0:100000:65536"])?;
//! let userns = UserNamespace::from_mapping(&mapping)?;
//! let mount = DetachedMount::clone_with(
//!     "/srv/volume",
//!     CloneFlags::RECURSIVE,
//!     &MountAttr::new().idmap_recursive(&userns),
//! )?;
//! mount.attach("/run/pod/volume")?;
//! # Ok::<(), idmapped::Error>(())
//! ```
//!
//! # Runtimes: attach into a container's root only beneath it
//! A container can write to its root filesystem and volumes, so a path into
//! them is attacker-chosen. [`DetachedMount::attach`] follows symlinks in
//! the caller's namespace; attach there only with
//! [`DetachedMount::attach_beneath`] (or [`resolve::resolve_in_root`] and
//! [`DetachedMount::attach_to`]), which resolves the target as if the root
//! were `/` and attaches to the resolved fd. A mount made in one process can
//! be sent to another ([`DetachedMount::send`], [`DetachedMount::recv`]),
//! attached inside another mount namespace
//! ([`DetachedMount::attach_in_namespace`]) or replace a mount atomically
//! ([`DetachedMount::replace`]). OCI's mount options map onto
//! [`CloneFlags`] and [`MountAttr`] (`idmap` vs `idmap_recursive` for
//! `idmap`/`ridmap`, `set` vs `set_recursive` for `ro`/`rro`, ...), and its
//! `uidMappings` onto [`Mapping::from_oci`]; the README's "For runtime
//! authors" has the full table.
//!
//! The public API uses `std` fd and path types and its own flags; the one
//! rustix type in it is [`Errno`], re-exported (see the README for why).
//!
//! # Root filesystems and fresh filesystems
//! A container's root filesystem is an overlay of shared image layers;
//! [`rootfs::Overlay`] builds one whose layers are each seen through the
//! mapping (the overlay mount itself cannot be idmapped), by the best rung
//! the kernel has, with no helper mount ever visible to anything else.
//! [`NewFilesystem`] makes a fresh instance (`fsopen`/`fsconfig`/`fsmount`:
//! a pod's tmpfs with its `size=`, `mode=`, `nr_inodes=`, `uid=`, `gid=`)
//! as a [`DetachedMount`] to idmap and attach; a refused option is reported
//! with the filesystem's own message.
//!
//! # Semantics in one line
//! For each mapping line `A B N`: a file whose **on-disk** id is `A+n` is
//! **seen** through the mount as `B+n`; unmapped ids are seen as 65534. See
//! [`map`] for the syntaxes accepted and the names of the two columns.
//!
//! # Minimum kernels
//! `open_tree`/`move_mount` 5.2 (attaching to an fd too); `openat2` (the
//! in-kernel resolver; a userspace one before) 5.6; `mount_setattr`
//! (idmapping at all) 5.12; `MOVE_MOUNT_BENEATH` (atomic replace) 6.5;
//! `open_tree_attr` (one-call clone+idmap, replacing or clearing an idmap)
//! 6.15; `statmount` idmap read-back 6.15; an overlay of idmapped layers
//! 5.19 (layers as `lowerdir+` strings 6.8, as fds 6.13); an idmapped fresh
//! tmpfs 6.3. Which filesystems can be idmapped depends on the kernel: ask
//! [`probe::idmap_support`].
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod chown;
pub mod error;
pub mod features;
pub mod map;
pub mod mount;
mod mounttable;
pub mod probe;
mod procfs;
pub mod ranges;
pub mod resolve;
pub mod rootfs;
pub mod strategy;
mod sys;
pub mod userns;

pub use error::{Errno, Error, ErrorKind, FileKind, ResolveReason, Result};
pub use map::{Extent, IdKind, IdMap, MapError, Mapping, OciIdMapping};
pub use mount::{
    check_mount_point, read_idmap, set_attr_at_path, Atime, AttachOptions, Attached, CloneFlags,
    CloneMethod, DetachedMount, IdmapReadback, MountAttr, MountAttrFlags, MountNamespace,
    Propagation,
};
pub use mount::{FsContext, NewFilesystem};
pub use userns::{UserNamespace, UsernsCache};

// The README's examples are compiled as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
