//! ID-mapped mounts for Linux.
#![deny(missing_docs)]

pub mod chown;
pub mod map;
