//! ID-mapped mounts for Linux.
#![deny(missing_docs)]

pub mod error;
pub mod map;
pub mod mount;
mod mountinfo;
pub mod probe;
mod sys;
pub mod userns;

pub use error::{Errno, Error, ErrorKind, Result};
pub use map::{Extent, IdKind, IdMap, MapError, Mapping};
pub use mount::{
    read_idmap, set_attr_at_path, Atime, DetachedMount, IdmapReadback, MountAttr, MountFlags,
    Propagation,
};
pub use userns::{UserNamespace, UsernsCache};
