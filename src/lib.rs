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
//! such as `/proc/PID/ns/user`, or from an fd. When the kernel refuses, the
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
//! # Semantics in one line
//! For each mapping line `A B N`: a file whose **on-disk** id is `A+n` is
//! **seen** through the mount as `B+n`; unmapped ids are seen as 65534. See
//! [`map`] for the syntaxes accepted and the names of the two columns.
//!
//! # Minimum kernels
//! `open_tree`/`move_mount` 5.2; `mount_setattr` (idmapping at all) 5.12;
//! `open_tree_attr` (one-call clone+idmap, replacing or clearing an idmap)
//! 6.15; `statmount` idmap read-back 6.15. Which filesystems can be idmapped
//! depends on the kernel: ask [`probe::idmap_support`].
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod chown;
pub mod error;
pub mod features;
pub mod map;
pub mod mount;
mod mountinfo;
pub mod probe;
pub mod ranges;
pub mod strategy;
mod sys;
pub mod userns;

pub use error::{Errno, Error, ErrorKind, FileKind, Result};
pub use map::{Extent, IdKind, IdMap, MapError, Mapping};
pub use mount::{
    check_mount_point, read_idmap, set_attr_at_path, Atime, CloneFlags, CloneMethod, DetachedMount,
    IdmapReadback, MountAttr, MountAttrFlags, Propagation,
};
pub use userns::{UserNamespace, UsernsCache};

// The README's examples are compiled as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
