//! One error type for the whole crate: what failed (the system call and its
//! arguments), on which path, with which errno, and *why* in words.
//!
//! The kernel answers most idmap refusals with a bare `EINVAL` or `EPERM`;
//! [`ErrorKind`] is our diagnosis of which rule of the kernel was hit, so a
//! runtime can react (fall back to chown, report a misconfiguration) without
//! parsing strings.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

pub use rustix::io::Errno;

use crate::map::MapError;

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an operation failed, in terms of the kernel's rules.
///
/// `#[non_exhaustive]`: new kernels bring new reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The filesystem cannot be idmapped (it lacks `FS_ALLOW_IDMAP` on this
    /// kernel). With a recursive clone, `path` names the submount that blocked it.
    NotSupported {
        /// Filesystem type, as in `/proc/self/mountinfo` (e.g. `tmpfs`, `nfs4`).
        fs: String,
    },
    /// The mount was attached to the filesystem tree at some point; only a
    /// never-attached detached mount (from `open_tree(OPEN_TREE_CLONE)`) can be idmapped.
    NotDetached,
    /// The mount is idmapped already; `mount_setattr` cannot change an idmap
    /// (`open_tree_attr` on Linux >= 6.15 can replace or clear it).
    AlreadyIdmapped,
    /// The user namespace given is the initial one: an identity mapping is not an idmap.
    InitialUserns,
    /// The file descriptor is not a user namespace.
    NotUserns,
    /// The user namespace has no uid map or no gid map written (Linux >= 6.9 needs both).
    UsernsMissingMap,
    /// The user namespace is the one that owns the filesystem itself.
    UsernsOwnsFilesystem,
    /// A file is open for writing on the mount.
    Busy,
    /// The caller lacks a capability (usually `CAP_SYS_ADMIN`), or a security
    /// policy such as seccomp refused the call.
    PermissionDenied,
    /// The kernel lacks a system call or feature.
    KernelTooOld {
        /// The missing feature, e.g. `mount_setattr`.
        feature: &'static str,
        /// The first Linux release that has it.
        since: &'static str,
    },
    /// A mapping was rejected before any system call was made.
    InvalidMap(MapError),
    /// An argument was rejected before any system call was made.
    InvalidInput(String),
    /// The filesystem tree changed under a walk in a way that would have made
    /// it unsafe to go on (a directory became a symlink, a mount appeared).
    TreeChanged(String),
    /// An id on disk lies outside the mapping and the caller asked to fail.
    IdOutOfRange {
        /// `"uid"` or `"gid"`.
        kind: &'static str,
        /// The on-disk id (the first one found).
        id: u32,
        /// How many ids (owners, groups, ACL qualifiers, capability root
        /// ids) of the tree the mapping does not cover.
        count: u64,
    },
    /// A path does not exist (ENOENT).
    NotFound,
    /// A child process or namespace helper failed.
    Process(String),
    /// The kernel refused an idmap with `EINVAL` although the namespace has
    /// both maps and the mount is detached: a mount of the tree is on a
    /// filesystem that cannot be idmapped on this kernel, or the namespace
    /// owns the filesystem. [`crate::probe::diagnose`] finds out which (it
    /// probes with clones of each mount); the mount calls themselves make no
    /// such probe.
    IdmapRefused,
    /// A path inside a root could not be resolved ([`crate::resolve`]):
    /// `component` is the path, relative to the root and with the symlinks
    /// met so far expanded, of the component that failed.
    Unresolvable {
        /// The failing component, relative to the root (e.g. `etc/evil`).
        component: PathBuf,
        /// Why it could not be resolved.
        reason: ResolveReason,
        /// The last symlink followed on the way (relative to the root), if
        /// any: how the path got to `component`.
        via: Option<PathBuf>,
    },
    /// A file descriptor that should be the root of a mount is not
    /// ([`crate::DetachedMount::from_fd`]).
    NotAMount,
    /// The shift walker refuses this filesystem: a virtual one (proc, sysfs,
    /// devtmpfs, cgroup, ...) whose ownership belongs to the host, or one it
    /// does not know to hold ownership and its record. `path` names the mount.
    NotShiftable {
        /// Filesystem type, as in mountinfo.
        fs: String,
        /// Why, in words.
        why: String,
    },
    /// The tree carries a shift record that refuses this call: another
    /// mapping or policy, an unfinished shift or unshift, or a record
    /// copied with the tree from another directory.
    ShiftRecorded {
        /// The recorded shift, e.g. `mapping b:0:100000:65536, --out-of-range=keep, ... (finished)`.
        recorded: String,
        /// What to do.
        hint: String,
    },
    /// An entry that must change is immutable or append-only (`chattr +i`/`+a`).
    Immutable {
        /// `"immutable (chattr +i)"` or `"append-only (chattr +a)"` (of the
        /// first such entry; `path` names it).
        attribute: &'static str,
        /// How many entries that must change are immutable or append-only.
        count: u64,
    },
    /// An inode of the tree has hard links outside it, and the caller asked to fail.
    LinkedOutside {
        /// Its link count.
        links: u32,
        /// The names of it found inside the tree.
        found: u32,
    },
    /// Keeping an uncovered ACL qualifier would give an ACL two entries for
    /// one id (an on-disk id shifted onto a kept one).
    AclCollision {
        /// `"uid"` or `"gid"`.
        kind: &'static str,
        /// The id that would appear twice.
        id: u32,
    },
    /// The source was shifted on disk, but attaching it at the target failed.
    SourceShifted {
        /// Why attaching failed.
        cause: String,
        /// The command that undoes the shift.
        undo: String,
    },
    /// The source and the mount point cannot be mounted one onto the other:
    /// the kernel mounts a directory only onto a directory, and anything
    /// else only onto a non-directory (`move_mount` says only `EINVAL`).
    /// Found with `stat` before any mount call; [`Error::path`] is the mount
    /// point.
    MountPointMismatch {
        /// The path the mount is cloned from.
        source: PathBuf,
        /// What the source is.
        source_kind: FileKind,
        /// What the mount point is.
        target_kind: FileKind,
    },
    /// The mount point's last component is a symlink: `move_mount` does not
    /// follow it (`EINVAL`), and following it is the caller's decision
    /// (inside a container's root, resolve it there). [`Error::path`] is the
    /// mount point.
    TargetIsSymlink {
        /// What the symlink holds.
        points_to: PathBuf,
    },
    /// The source is a kind of file this operation does not take: ownership
    /// is given to a directory, or a regular file mounted onto a file; a
    /// shift on disk (`Strategy::Chown`) needs a directory. [`Error::path`]
    /// is the source.
    UnsupportedSource {
        /// What the source is.
        kind: FileKind,
        /// Whether the operation needed a directory (a shift on disk).
        needs_directory: bool,
    },
    /// The maps of a user namespace cannot be read (it was opened from an
    /// fd, or from a path that is not `/proc/PID/ns/user`), so ownership
    /// cannot be shifted on disk by them; idmapping with it still works.
    UsernsMapsUnknown,
    /// Per-pod id ranges: the settings break a rule of the pool or block
    /// size (see [`ranges`](crate::ranges)).
    RangeRule(crate::ranges::RuleViolation),
    /// Per-pod id ranges: a key is not 1 to 253 characters of `[A-Za-z0-9._-]`
    /// (or is `.` or `..`).
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Per-pod id ranges: every usable block is allocated.
    PoolExhausted {
        /// How many blocks the pool can hand out.
        usable: u64,
        /// The pool.
        pool: crate::ranges::Pool,
    },
    /// Per-pod id ranges: a file of the state directory is not a valid
    /// record for the current settings; [`Error::path`] is the file.
    InvalidState {
        /// The file's name in the state directory (the key).
        file: String,
        /// What is wrong with it.
        problem: crate::ranges::StateProblem,
    },
    /// Per-pod id ranges: a user's subordinate ids cannot be a pool.
    Subids(crate::ranges::SubidProblem),
    /// A filesystem refused an option of a new instance (`fsconfig`), or to
    /// create the instance from the options given (`FSCONFIG_CMD_CREATE`).
    FsRefused {
        /// The filesystem type, e.g. `tmpfs`, `overlay`.
        fs: String,
        /// The option as given (`size=16m`, `lowerdir+=/layers/1`), or what
        /// was being created.
        option: String,
        /// The filesystem's own words from the context's log (`read()` of
        /// the `fsopen` fd), when it logged any; most overlay errors go only
        /// to the kernel log.
        message: Option<String>,
    },
    /// The kernel has no filesystem of this type (not built in, module not loaded).
    NoFilesystem {
        /// The type asked for.
        fs: String,
    },
    /// A layer of an overlay cannot be used as asked; [`Error::path`] is the layer.
    Layer {
        /// Which layer: `lower layer 3`, `upper layer`, `work directory`.
        layer: String,
        /// Why not, e.g. [`ErrorKind::NotSupported`] naming its filesystem.
        cause: Box<ErrorKind>,
    },
    /// The operation would shift ownership through overlayfs, which copies
    /// every file up into the upper directory; use the overlay helper
    /// ([`crate::rootfs::Overlay`]) with the layers instead.
    ShiftThroughOverlay,
    /// Any other failure of a system call; see [`Error::errno`].
    Os,
}

/// Why a component of a path inside a root could not be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResolveReason {
    /// It does not exist (and creating it was not asked for).
    Missing,
    /// A component before the last is not a directory.
    NotADirectory,
    /// More than 40 symlinks were met (`ELOOP`, as the kernel counts).
    SymlinkLoop,
    /// It is a procfs magic link (`/proc/*/fd/*`, `/proc/*/root`, ...),
    /// which could jump anywhere: always refused.
    MagicLink,
    /// The system call failed otherwise; see [`Error::errno`].
    Failed,
}

impl fmt::Display for ResolveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolveReason::Missing => "does not exist",
            ResolveReason::NotADirectory => "is not a directory",
            ResolveReason::SymlinkLoop => "leads through more than 40 symlinks (a loop?)",
            ResolveReason::MagicLink => "is a procfs magic link, which is never followed",
            ResolveReason::Failed => "cannot be opened",
        })
    }
}

/// What a path is, as mounting cares: `move_mount` pairs directories with
/// directories and everything else with non-directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A regular file.
    RegularFile,
    /// A symbolic link (only seen when not following it).
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
    /// Anything else the kernel reports.
    Other,
}

impl FileKind {
    /// The kind of a file from its `st_mode`.
    pub fn from_mode(mode: u32) -> FileKind {
        use rustix::fs::FileType;
        match FileType::from_raw_mode(mode as _) {
            FileType::Directory => FileKind::Directory,
            FileType::RegularFile => FileKind::RegularFile,
            FileType::Symlink => FileKind::Symlink,
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::CharacterDevice => FileKind::CharDevice,
            FileType::BlockDevice => FileKind::BlockDevice,
            _ => FileKind::Other,
        }
    }

    /// The kind of a file from [`std::fs::FileType`].
    pub fn from_file_type(t: std::fs::FileType) -> FileKind {
        use std::os::unix::fs::FileTypeExt;
        if t.is_dir() {
            FileKind::Directory
        } else if t.is_file() {
            FileKind::RegularFile
        } else if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_fifo() {
            FileKind::Fifo
        } else if t.is_socket() {
            FileKind::Socket
        } else if t.is_char_device() {
            FileKind::CharDevice
        } else if t.is_block_device() {
            FileKind::BlockDevice
        } else {
            FileKind::Other
        }
    }

    /// Whether it is a directory.
    pub fn is_dir(self) -> bool {
        self == FileKind::Directory
    }

    /// `directory`, `regular file`, `FIFO`, ...
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Directory => "directory",
            FileKind::RegularFile => "regular file",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "FIFO",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
            FileKind::Other => "file of unknown type",
        }
    }

    /// The name with its article: `a directory`, `a FIFO`.
    fn a(self) -> String {
        format!("a {}", self.name())
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::NotSupported { fs } => {
                write!(f, "filesystem type {fs} does not support idmapped mounts on this kernel")
            }
            ErrorKind::NotDetached => f.write_str(
                "the mount is attached (or was attached); only a detached clone can be idmapped",
            ),
            ErrorKind::AlreadyIdmapped => f.write_str(
                "the mount is already idmapped (replacing an idmap needs open_tree_attr, Linux 6.15)",
            ),
            ErrorKind::InitialUserns => {
                f.write_str("the initial user namespace cannot be used to idmap a mount")
            }
            ErrorKind::NotUserns => f.write_str("not a user namespace"),
            ErrorKind::UsernsMissingMap => {
                f.write_str("the user namespace lacks a uid map or a gid map")
            }
            ErrorKind::UsernsOwnsFilesystem => {
                f.write_str("the user namespace is the one that owns the filesystem")
            }
            ErrorKind::Busy => f.write_str("a file is open for writing on the mount"),
            ErrorKind::PermissionDenied => f.write_str(
                "permission denied (CAP_SYS_ADMIN needed, or a security policy refused the call)",
            ),
            ErrorKind::KernelTooOld { feature, since } => {
                write!(f, "the kernel lacks {feature} (needs Linux {since} or later)")
            }
            ErrorKind::InvalidMap(e) => write!(f, "invalid mapping: {e}"),
            ErrorKind::InvalidInput(s) => write!(f, "invalid input: {s}"),
            ErrorKind::TreeChanged(s) => write!(f, "the tree changed during the walk: {s}"),
            ErrorKind::IdOutOfRange { kind, id, count } => write!(
                f,
                "{kind} {id} on disk is outside the mapping ({count} uncovered id{} in the tree; nothing was changed)",
                if *count == 1 { "" } else { "s" }
            ),
            ErrorKind::NotFound => f.write_str("no such file or directory"),
            ErrorKind::Process(s) => write!(f, "helper process failed: {s}"),
            ErrorKind::IdmapRefused => f.write_str(
                "the kernel refused to idmap the mount: a filesystem of the tree cannot be idmapped on this kernel, or the namespace owns it (probe::diagnose tells which)",
            ),
            ErrorKind::Unresolvable {
                component,
                reason,
                via,
            } => {
                write!(f, "cannot resolve {component:?} inside the root: it {reason}")?;
                match via {
                    Some(link) => write!(f, " (reached through the symlink {link:?})"),
                    None => Ok(()),
                }
            }
            ErrorKind::NotAMount => {
                f.write_str("the file descriptor is not the root of a mount")
            }
            ErrorKind::NotShiftable { fs, why } => {
                write!(f, "refusing to shift ownership on a {fs} mount: {why}; nothing was changed")
            }
            ErrorKind::ShiftRecorded { recorded, hint } => {
                write!(f, "the shift record on the tree refuses this: it records {recorded}; {hint}")
            }
            ErrorKind::Immutable { attribute, count } => write!(
                f,
                "the entry is {attribute} and its ownership must change ({count} such entr{} in the tree, left untouched): clear the attribute (chattr -i / chattr -a) and run the same command again, which finishes the shift",
                if *count == 1 { "y" } else { "ies" }
            ),
            ErrorKind::LinkedOutside { links, found } => write!(
                f,
                "the inode has {links} hard links but only {found} inside the tree: it is linked from outside (--outside-links=skip leaves it, =shift shifts it); nothing was changed"
            ),
            ErrorKind::AclCollision { kind, id } => write!(
                f,
                "keeping an uncovered ACL {kind} would leave two entries for {kind} {id} (a shifted id lands on a kept one): use --out-of-range=overflow or a mapping that covers it; nothing was changed"
            ),
            ErrorKind::SourceShifted { cause, undo } => write!(
                f,
                "the source WAS shifted on disk, but attaching it failed: {cause}; undo the shift with: {undo}"
            ),
            ErrorKind::MountPointMismatch {
                source,
                source_kind,
                target_kind,
            } => {
                write!(
                    f,
                    "the mount point is {}, but the source {} is {}: ",
                    target_kind.a(),
                    source.display(),
                    source_kind.a()
                )?;
                if target_kind.is_dir() {
                    f.write_str("only a directory can be mounted onto a directory; mount a file onto a file (create an empty one to mount onto)")
                } else {
                    f.write_str("a directory can be mounted only onto a directory (create one to mount onto), a file only onto a file")
                }
            }
            ErrorKind::TargetIsSymlink { points_to } => write!(
                f,
                "the mount point is a symlink (to {}), which move_mount does not follow: give the path it points to (inside a container's root, resolve it there)",
                points_to.display()
            ),
            ErrorKind::UnsupportedSource {
                kind,
                needs_directory: true,
            } => write!(
                f,
                "the source is {}: shifting ownership on disk (strategy chown) takes a directory; give the directory, or idmap the file (strategy idmap)",
                kind.a()
            ),
            ErrorKind::UnsupportedSource { kind, .. } => write!(
                f,
                "the source is {}: only a directory, or a regular file mounted onto a file, can be given new owners",
                kind.a()
            ),
            ErrorKind::UsernsMapsUnknown => f.write_str(
                "the maps of the user namespace cannot be read, so ownership cannot be shifted on disk by them: idmap with it (strategy idmap), or give the mapping itself",
            ),
            ErrorKind::RangeRule(v) => write!(f, "id range settings break a rule: {v}"),
            ErrorKind::InvalidKey { key, reason } => {
                write!(f, "invalid key {key:?}: {reason}")
            }
            ErrorKind::PoolExhausted { usable, pool } => {
                write!(f, "pool {pool} exhausted: all {usable} usable blocks are allocated")
            }
            ErrorKind::InvalidState { file, problem } => {
                write!(f, "invalid id range state in {file:?}: {problem}")
            }
            ErrorKind::Subids(p) => write!(f, "{p}"),
            ErrorKind::FsRefused { fs, option, message } => match message {
                Some(m) => write!(f, "{fs} refused {option}: {m}"),
                None => write!(f, "{fs} refused {option} (it logged no reason here; see the kernel log)"),
            },
            ErrorKind::NoFilesystem { fs } => write!(
                f,
                "the kernel has no filesystem type {fs} (not built in, or its module is not loaded)"
            ),
            ErrorKind::Layer { layer, cause } => write!(f, "overlay {layer}: {cause}"),
            ErrorKind::ShiftThroughOverlay => f.write_str(
                "refusing to shift ownership through overlayfs: it would copy every file up into the upper directory (a copy of the image per container); idmap the layers instead (idmapped::rootfs::Overlay, mount-idmapped --overlay=lowerdir=...)",
            ),
            ErrorKind::Os => f.write_str("system call failed"),
        }
    }
}

/// The system call that failed, with its arguments rendered for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syscall {
    /// The call's name, e.g. `mount_setattr`.
    pub name: &'static str,
    /// Its arguments as text, e.g. `fd 5, "", AT_EMPTY_PATH|AT_RECURSIVE, {attr_set: IDMAP, userns_fd: 6}`.
    pub args: String,
}

impl fmt::Display for Syscall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name, self.args)
    }
}

/// The crate's error: the diagnosis ([`ErrorKind`]), the failing system call,
/// the path it concerned and the errno.
///
/// Displayed on one line, e.g.
/// `/srv/vol: filesystem type tmpfs does not support idmapped mounts on this kernel [mount_setattr(fd 5, "", AT_EMPTY_PATH, {attr_set: IDMAP, userns_fd: 6}) = EINVAL]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(Box<Inner>);

/// Boxed so that `Result<T, Error>` stays one pointer wide on the happy path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inner {
    kind: ErrorKind,
    syscall: Option<Syscall>,
    path: Option<PathBuf>,
    errno: Option<Errno>,
    /// Where the operation ran, when that is not evident (e.g. "in the mount
    /// namespace of pid 42").
    context: Option<String>,
}

impl Error {
    /// An error of `kind` with no system call attached.
    pub fn new(kind: ErrorKind) -> Error {
        Error(Box::new(Inner {
            kind,
            syscall: None,
            path: None,
            errno: None,
            context: None,
        }))
    }

    /// A system call failed with `errno`; the kind is [`ErrorKind::Os`] until a
    /// caller that knows the context diagnoses it ([`Error::with_kind`]).
    pub(crate) fn sys(name: &'static str, args: impl Into<String>, errno: Errno) -> Error {
        Error(Box::new(Inner {
            kind: generic_kind(errno),
            syscall: Some(Syscall {
                name,
                args: args.into(),
            }),
            path: None,
            errno: Some(errno),
            context: None,
        }))
    }

    /// Attach the path the failing operation concerned.
    pub(crate) fn with_path(mut self, path: impl AsRef<Path>) -> Error {
        self.0.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Say where the operation ran (shown before the path).
    pub(crate) fn with_context(mut self, context: impl Into<String>) -> Error {
        self.0.context = Some(context.into());
        self
    }

    /// Where the operation ran, when the error says (e.g. "in the mount
    /// namespace of pid 42").
    pub fn context(&self) -> Option<&str> {
        self.0.context.as_deref()
    }

    /// Record the check that failed when no system call did (the call that
    /// revealed the problem, with what it found), without an errno.
    pub(crate) fn with_call(mut self, name: &'static str, args: impl Into<String>) -> Error {
        self.0.syscall = Some(Syscall {
            name,
            args: args.into(),
        });
        self
    }

    /// Replace the diagnosis.
    pub(crate) fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.0.kind = kind;
        self
    }

    /// The diagnosis.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The system call that failed, if one did.
    pub fn syscall(&self) -> Option<&Syscall> {
        self.0.syscall.as_ref()
    }

    /// The path the failure concerns (with a recursive idmap, the submount that blocked it).
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }

    /// The errno the kernel returned, if any.
    pub fn errno(&self) -> Option<Errno> {
        self.0.errno
    }

    /// True when the cause is the kernel or the filesystem lacking support
    /// (as opposed to a bad argument or missing privilege): the cases where a
    /// caller may reasonably fall back to shifting ownership on disk.
    pub fn is_unsupported(&self) -> bool {
        fn unsupported(kind: &ErrorKind) -> bool {
            match kind {
                ErrorKind::NotSupported { .. }
                | ErrorKind::KernelTooOld { .. }
                | ErrorKind::IdmapRefused => true,
                ErrorKind::Layer { cause, .. } => unsupported(cause),
                _ => false,
            }
        }
        unsupported(&self.0.kind)
    }
}

/// The kind an errno means when nothing more specific is known.
fn generic_kind(errno: Errno) -> ErrorKind {
    match errno {
        Errno::PERM | Errno::ACCESS => ErrorKind::PermissionDenied,
        Errno::BUSY => ErrorKind::Busy,
        Errno::NOENT => ErrorKind::NotFound,
        _ => ErrorKind::Os,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(context) = &self.0.context {
            write!(f, "{context}: ")?;
        }
        if let Some(path) = &self.0.path {
            write!(f, "{}: ", path.display())?;
        }
        write!(f, "{}", self.0.kind)?;
        match (&self.0.syscall, self.0.errno) {
            (Some(call), Some(errno)) => write!(f, " [{call} = {}]", errno_name(errno)),
            (Some(call), None) => write!(f, " [{call}]"),
            (None, Some(errno)) => write!(f, " [{}]", errno_name(errno)),
            (None, None) => Ok(()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.kind {
            ErrorKind::InvalidMap(e) => Some(e),
            _ => self
                .0
                .errno
                .as_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
        }
    }
}

impl From<MapError> for Error {
    fn from(e: MapError) -> Error {
        Error::new(ErrorKind::InvalidMap(e))
    }
}

/// `EINVAL (Invalid argument)`: the symbolic name a reader greps for, then the text.
pub(crate) fn errno_name(errno: Errno) -> String {
    let name = match errno {
        Errno::PERM => "EPERM",
        Errno::NOENT => "ENOENT",
        Errno::INTR => "EINTR",
        Errno::IO => "EIO",
        Errno::BADF => "EBADF",
        Errno::CHILD => "ECHILD",
        Errno::AGAIN => "EAGAIN",
        Errno::NOMEM => "ENOMEM",
        Errno::ACCESS => "EACCES",
        Errno::FAULT => "EFAULT",
        Errno::BUSY => "EBUSY",
        Errno::EXIST => "EEXIST",
        Errno::XDEV => "EXDEV",
        Errno::NOTDIR => "ENOTDIR",
        Errno::ISDIR => "EISDIR",
        Errno::INVAL => "EINVAL",
        Errno::MFILE => "EMFILE",
        Errno::NOSPC => "ENOSPC",
        Errno::ROFS => "EROFS",
        Errno::MLINK => "EMLINK",
        Errno::RANGE => "ERANGE",
        Errno::NAMETOOLONG => "ENAMETOOLONG",
        Errno::NOSYS => "ENOSYS",
        Errno::LOOP => "ELOOP",
        Errno::NODATA => "ENODATA",
        Errno::OVERFLOW => "EOVERFLOW",
        Errno::OPNOTSUPP => "EOPNOTSUPP",
        Errno::SRCH => "ESRCH",
        _ => return format!("errno {}", errno.raw_os_error()),
    };
    format!("{name} ({})", std::io::Error::from(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_path_kind_call_and_errno() {
        let e = Error::sys("mount_setattr", "fd 5, \"\", AT_EMPTY_PATH", Errno::INVAL)
            .with_path("/srv/vol")
            .with_kind(ErrorKind::NotSupported { fs: "tmpfs".into() });
        let s = e.to_string();
        assert!(s.starts_with("/srv/vol: filesystem type tmpfs"), "{s}");
        assert!(
            s.contains("[mount_setattr(fd 5, \"\", AT_EMPTY_PATH) = EINVAL (Invalid argument"),
            "{s}"
        );
        assert!(e.is_unsupported());
    }

    #[test]
    fn generic_kinds() {
        assert_eq!(
            Error::sys("x", "", Errno::PERM).kind(),
            &ErrorKind::PermissionDenied
        );
        assert_eq!(Error::sys("x", "", Errno::BUSY).kind(), &ErrorKind::Busy);
        assert_eq!(Error::sys("x", "", Errno::IO).kind(), &ErrorKind::Os);
        assert!(!Error::sys("x", "", Errno::IO).is_unsupported());
    }
}
