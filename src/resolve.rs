//! Resolve a path inside a root directory *as if that directory were `/`*:
//! the way a runtime must find a mount point inside a container's root
//! filesystem, which the container can write to.
//!
//! - `..` stops at the root; an absolute symlink restarts at the root;
//!   symlinks in every component, the last one included, are expanded inside
//!   the root;
//! - procfs magic links (`/proc/*/fd/*`, `/proc/*/root`, `/proc/*/exe`, ...)
//!   are refused: they jump to wherever the kernel says, not where the text
//!   says;
//! - more than 40 symlinks (the kernel's bound) give
//!   [`ResolveReason::SymlinkLoop`].
//!
//! The result is an `O_PATH` file descriptor ([`Resolved`]) for
//! [`DetachedMount::attach_to`](crate::DetachedMount::attach_to): attaching to
//! the fd, not to a path, is what keeps a symlink exchanged *after* the
//! resolution from redirecting the mount.
//!
//! Two resolvers, chosen by probing ([`crate::features`]):
//!
//! - [`Resolver::Openat2`]: one `openat2(root, path, O_PATH,
//!   RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` (Linux 5.6), retried on
//!   `EAGAIN` (the kernel's answer to a concurrent rename);
//! - [`Resolver::Userspace`]: where the kernel lacks `openat2` or seccomp
//!   refuses it (`ENOSYS`/`EPERM`), or when `IDMAPPED_FORCE_FALLBACK=openat2`
//!   is set: one component at a time, each opened with
//!   `openat(parent_fd, name, O_PATH | O_NOFOLLOW)` relative to the fd of the
//!   directory before it; a symlink is read from its own fd
//!   (`readlinkat(fd, "")`) and its target pushed in front of the rest of the
//!   path; `..` drops the last fd held (never opens `..`, so it cannot leave
//!   the root even while directories are moved). A symlink on procfs whose
//!   target is not a plain relative path (`/...`, `pipe:[..]`,
//!   `anon_inode:..`) is taken for a magic link; ordinary procfs symlinks
//!   (`/proc/self`, `/proc/mounts`) are followed.
//!
//! With [`ResolveOptions::create`], missing components are created — every
//! one as a directory (mode 0755, less the umask, like `mkdir -p`) but the last, which
//! is a directory or an empty regular file (mode 0644) — by `mkdirat` /
//! `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` relative to the verified parent
//! fd, then opened again with `O_NOFOLLOW`; a name that appears meanwhile
//! (`EEXIST`, perhaps a symlink) is simply resolved like any other. Creation
//! always walks component by component (both resolvers).
//!
//! The path reported for an `openat2` result ([`Resolved::path`]) comes
//! from a second, userspace walk when it reaches the same file, else from
//! the fd's name read through the crate's verified procfs handle.
//!
//! Failures name the component ([`ErrorKind::Unresolvable`]); with
//! `openat2`, which does not say which component failed, the userspace
//! resolver is run once more, without creating anything, to find it.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, ResolveReason, Result};
use crate::features::{self, Availability};

/// The kernel's bound on symlinks followed in one resolution (`MAXSYMLINKS`).
pub const MAX_SYMLINKS: usize = 40;

/// `PROC_SUPER_MAGIC`.
const PROC_SUPER_MAGIC: u64 = 0x9fa0;

/// How many times an `openat2` that answers `EAGAIN` (a rename or mount
/// raced with `..`) is retried before the userspace resolver takes over.
const OPENAT2_RETRIES: usize = 128;

/// A bound on the userspace resolver's steps (components plus link
/// expansions plus creation retries), so a racing attacker cannot keep it
/// busy forever.
const MAX_STEPS: usize = 16 * 1024;

/// Which resolver did (or should do) the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolver {
    /// `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, Linux 5.6.
    Openat2,
    /// Component by component with `O_PATH | O_NOFOLLOW`.
    Userspace,
}

impl Resolver {
    /// `openat2` or `userspace`, as logged and printed by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Resolver::Openat2 => "openat2",
            Resolver::Userspace => "userspace",
        }
    }
}

/// What to create when the last component is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Create {
    /// A directory (mode 0755 less the umask): the mount point of a directory mount.
    Directory,
    /// An empty regular file (mode 0644 less the umask): the mount point of a file mount.
    File,
}

/// Options for [`resolve_in_root`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolveOptions {
    create: Option<Create>,
    resolver: Option<Resolver>,
}

impl ResolveOptions {
    /// Resolve only; a missing component is an error.
    pub fn new() -> ResolveOptions {
        ResolveOptions::default()
    }

    /// Create what is missing: parents as directories, the last component as `what`.
    pub fn create(mut self, what: Create) -> ResolveOptions {
        self.create = Some(what);
        self
    }

    /// Use this resolver instead of probing for the best one. A forced
    /// [`Resolver::Openat2`] on a kernel without it fails with the errno.
    pub fn resolver(mut self, resolver: Resolver) -> ResolveOptions {
        self.resolver = Some(resolver);
        self
    }

    /// What [`create`](Self::create) asked for.
    pub fn creates(&self) -> Option<Create> {
        self.create
    }
}

/// A path resolved inside a root: an `O_PATH` fd to what it names.
#[derive(Debug)]
pub struct Resolved {
    fd: OwnedFd,
    path: PathBuf,
    resolver: Resolver,
    created: bool,
}

impl Resolved {
    /// Where the path led, relative to the root, symlinks expanded (`""` for
    /// the root itself).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The resolver that produced the fd.
    pub fn resolver(&self) -> Resolver {
        self.resolver
    }

    /// Whether anything was created.
    pub fn created(&self) -> bool {
        self.created
    }

    /// The `O_PATH` fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Resolved {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Resolve `path` inside the directory `root` as if `root` were `/` (see the
/// [module docs](self)). `path` may be written with or without a leading `/`;
/// `""` and `/` name the root itself.
///
/// # References
/// - [`openat2(2)`](https://man7.org/linux/man-pages/man2/openat2.2.html) (`RESOLVE_IN_ROOT`)
#[doc(alias = "RESOLVE_IN_ROOT")]
pub fn resolve_in_root(
    root: impl AsFd,
    path: impl AsRef<Path>,
    options: &ResolveOptions,
) -> Result<Resolved> {
    let root = root.as_fd();
    let path = path.as_ref();
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(Error::new(ErrorKind::InvalidInput(format!(
            "path {path:?} contains a NUL byte"
        ))));
    }
    check_root(root)?;
    let resolver = options.resolver.unwrap_or_else(best_resolver);
    match resolver {
        Resolver::Userspace => userspace(root, path, options.create),
        Resolver::Openat2 => {
            let forced = options.resolver == Some(Resolver::Openat2);
            match kernel(root, path) {
                Ok(fd) => {
                    let rel = report_path(root, path, fd.as_fd());
                    Ok(Resolved {
                        fd,
                        path: rel,
                        resolver: Resolver::Openat2,
                        created: false,
                    })
                }
                // Seccomp or an old kernel: the userspace resolver.
                Err(Errno::NOSYS | Errno::PERM | Errno::ACCESS) if !forced => {
                    userspace(root, path, options.create)
                }
                // A rename kept racing `..`: walk it ourselves.
                Err(Errno::AGAIN) if !forced => userspace(root, path, options.create),
                Err(Errno::NOENT) if options.create.is_some() => {
                    userspace(root, path, options.create)
                }
                Err(e) => {
                    // Name the component: walk again, creating nothing.
                    let diagnosis = userspace(root, path, None);
                    Err(match diagnosis {
                        Err(err) => err,
                        Ok(_) => {
                            let reason = reason_of(e);
                            Error::sys("openat2", openat2_args(root, path), e)
                                .with_path(path)
                                .with_kind(ErrorKind::Unresolvable {
                                    component: lexical(path),
                                    reason,
                                    via: None,
                                })
                        }
                    })
                }
            }
        }
    }
}

/// The resolver this kernel allows (probed once).
pub fn best_resolver() -> Resolver {
    if features::features().openat2 == Availability::Available {
        Resolver::Openat2
    } else {
        Resolver::Userspace
    }
}

fn check_root(root: BorrowedFd<'_>) -> Result<()> {
    let st = rustix::fs::statx(root, "", AtFlags::EMPTY_PATH, StatxFlags::TYPE).map_err(|e| {
        Error::sys(
            "statx",
            format!("fd {}, \"\", AT_EMPTY_PATH, STATX_TYPE", root.as_raw_fd()),
            e,
        )
    })?;
    if FileType::from_raw_mode(st.stx_mode.into()) != FileType::Directory {
        return Err(Error::new(ErrorKind::InvalidInput(format!(
            "the root (fd {}) is not a directory",
            root.as_raw_fd()
        ))));
    }
    Ok(())
}

fn openat2_args(root: BorrowedFd<'_>, path: &Path) -> String {
    format!(
        "fd {}, {:?}, O_PATH|O_CLOEXEC, RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS",
        root.as_raw_fd(),
        path
    )
}

fn kernel(root: BorrowedFd<'_>, path: &Path) -> std::result::Result<OwnedFd, Errno> {
    let p: &Path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let mut last = Errno::AGAIN;
    for _ in 0..OPENAT2_RETRIES {
        match rustix::fs::openat2(
            root,
            p,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Err(Errno::AGAIN) => last = Errno::AGAIN,
            r => return r,
        }
    }
    Err(last)
}

fn reason_of(e: Errno) -> ResolveReason {
    match e {
        Errno::NOENT => ResolveReason::Missing,
        Errno::NOTDIR => ResolveReason::NotADirectory,
        Errno::LOOP => ResolveReason::SymlinkLoop,
        _ => ResolveReason::Failed,
    }
}

/// Where the fd `openat2` gave leads, relative to the root, for the report
/// ([`Resolved::path`]; the fd, not this path, is what gets used).
///
/// The userspace resolver's answer when it reaches the same file (same
/// device, inode and mount); else the kernel's name of the fd relative to
/// the root's, read through procfs; else the path with `.` and `..` folded.
fn report_path(root: BorrowedFd<'_>, path: &Path, fd: BorrowedFd<'_>) -> PathBuf {
    if let Ok(walked) = userspace(root, path, None) {
        if same_file(walked.fd.as_fd(), fd) {
            return walked.path;
        }
    }
    relative_path(root, fd).unwrap_or_else(|| lexical(path))
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let id = |fd| {
        rustix::fs::statx(
            fd,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::INO | StatxFlags::MNT_ID,
        )
        .ok()
        .map(|st| {
            (
                st.stx_dev_major,
                st.stx_dev_minor,
                st.stx_ino,
                st.stx_mnt_id,
            )
        })
    };
    matches!((id(a), id(b)), (Some(x), Some(y)) if x == y)
}

/// The path of `fd` relative to `root`, from the kernel's names of both.
fn relative_path(root: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Option<PathBuf> {
    let root_path = fd_path(root)?;
    let path = fd_path(fd)?;
    let rel = path.strip_prefix(&root_path).ok()?;
    Some(rel.to_path_buf())
}

/// The kernel's name of an fd: `readlinkat` of its `fd/N` link in our
/// thread's `fd/` directory, through the crate's verified procfs handle
/// ([`crate::procfs`]), so neither the mount namespace the call runs in nor
/// what is mounted at `/proc` there matters. Used only for a report.
fn fd_path(fd: BorrowedFd<'_>) -> Option<PathBuf> {
    let dir = crate::procfs::handle().ok()?.fd_dir().ok()?;
    let target = rustix::fs::readlinkat(&dir, fd.as_raw_fd().to_string(), Vec::new()).ok()?;
    let bytes = target.as_bytes();
    if !bytes.starts_with(b"/") || bytes.ends_with(b" (deleted)") {
        return None;
    }
    Some(PathBuf::from(OsStr::from_bytes(bytes)))
}

/// `path` without `.`, `..` resolved lexically and clamped, no root:
/// a fallback for reports only.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// Split into names, dropping empty and `.` components (`..` is kept).
fn names(bytes: &[u8]) -> impl Iterator<Item = OsString> + '_ {
    bytes
        .split(|&b| b == b'/')
        .filter(|n| !n.is_empty() && *n != b".")
        .map(|n| OsStr::from_bytes(n).to_os_string())
}

/// One directory of the walk: its fd and its name in its parent.
struct Level {
    fd: OwnedFd,
    name: OsString,
}

fn rel_of(stack: &[Level], name: Option<&OsStr>) -> PathBuf {
    let mut p: PathBuf = stack.iter().map(|l| l.name.as_os_str()).collect();
    if let Some(n) = name {
        p.push(n);
    }
    p
}

fn unresolvable(
    call: &'static str,
    args: String,
    errno: Errno,
    path: &Path,
    component: PathBuf,
    reason: ResolveReason,
) -> Error {
    Error::sys(call, args, errno)
        .with_path(path)
        .with_kind(ErrorKind::Unresolvable {
            component,
            reason,
            via: None,
        })
}

/// The userspace resolver (see the module docs).
fn userspace(root: BorrowedFd<'_>, path: &Path, create: Option<Create>) -> Result<Resolved> {
    let mut via = None;
    walk(root, path, create, &mut via).map_err(|e| match (e.kind(), via) {
        (
            ErrorKind::Unresolvable {
                component, reason, ..
            },
            Some(link),
        ) if component != &link => {
            let kind = ErrorKind::Unresolvable {
                component: component.clone(),
                reason: *reason,
                via: Some(link),
            };
            e.with_kind(kind)
        }
        _ => e,
    })
}

/// The walk itself; `via` is kept at the last symlink expanded.
fn walk(
    root: BorrowedFd<'_>,
    path: &Path,
    create: Option<Create>,
    via: &mut Option<PathBuf>,
) -> Result<Resolved> {
    let mut stack: Vec<Level> = Vec::new();
    let mut rest: VecDeque<OsString> = names(path.as_os_str().as_bytes()).collect();
    // A trailing "/" asks for a directory, as in the kernel (ENOTDIR otherwise).
    let mut must_dir = path.as_os_str().as_bytes().ends_with(b"/");
    let mut links = 0usize;
    let mut steps = 0usize;
    let mut created = false;
    while let Some(name) = rest.pop_front() {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(unresolvable(
                "openat",
                "too many steps".into(),
                Errno::LOOP,
                path,
                rel_of(&stack, Some(&name)),
                ResolveReason::SymlinkLoop,
            ));
        }
        if name == ".." {
            // Never opens "..": the parent is the fd we came from, and the
            // root's parent is the root.
            stack.pop();
            continue;
        }
        let parent = stack.last().map_or(root, |l| l.fd.as_fd());
        let last = rest.is_empty();
        let oflags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let args = || {
            format!(
                "fd {}, {:?}, O_PATH|O_NOFOLLOW|O_CLOEXEC",
                parent.as_raw_fd(),
                name
            )
        };
        let fd = match rustix::fs::openat(parent, name.as_os_str(), oflags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create.is_some() => {
                let what = if last && !must_dir {
                    create
                } else {
                    Some(Create::Directory)
                };
                match make(parent, &name, what) {
                    Ok(()) => created = true,
                    // Someone else made it: resolve whatever is there now.
                    Err(Errno::EXIST) => {}
                    Err(e) => {
                        let call = if what == Some(Create::File) {
                            "openat"
                        } else {
                            "mkdirat"
                        };
                        return Err(unresolvable(
                            call,
                            make_args(parent, &name, what),
                            e,
                            path,
                            rel_of(&stack, Some(&name)),
                            ResolveReason::Failed,
                        ));
                    }
                }
                rest.push_front(name);
                continue;
            }
            Err(e) => {
                return Err(unresolvable(
                    "openat",
                    args(),
                    e,
                    path,
                    rel_of(&stack, Some(&name)),
                    reason_of(e),
                ))
            }
        };
        let st =
            rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::TYPE).map_err(|e| {
                unresolvable(
                    "statx",
                    format!("fd {}, \"\", AT_EMPTY_PATH, STATX_TYPE", fd.as_raw_fd()),
                    e,
                    path,
                    rel_of(&stack, Some(&name)),
                    ResolveReason::Failed,
                )
            })?;
        match FileType::from_raw_mode(st.stx_mode.into()) {
            FileType::Symlink => {
                let component = rel_of(&stack, Some(&name));
                *via = Some(component.clone());
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(unresolvable(
                        "readlinkat",
                        format!("fd {}, \"\"", fd.as_raw_fd()),
                        Errno::LOOP,
                        path,
                        component,
                        ResolveReason::SymlinkLoop,
                    ));
                }
                let target = rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(|e| {
                    unresolvable(
                        "readlinkat",
                        format!("fd {}, \"\"", fd.as_raw_fd()),
                        e,
                        path,
                        component.clone(),
                        ResolveReason::Failed,
                    )
                })?;
                let target = target.as_bytes();
                if is_magic_link(fd.as_fd(), target) {
                    return Err(unresolvable(
                        "readlinkat",
                        format!(
                            "fd {}, \"\" = {:?} on procfs",
                            fd.as_raw_fd(),
                            OsStr::from_bytes(target)
                        ),
                        Errno::LOOP,
                        path,
                        component,
                        ResolveReason::MagicLink,
                    ));
                }
                if target.starts_with(b"/") {
                    stack.clear();
                }
                if rest.is_empty() && target.ends_with(b"/") {
                    must_dir = true;
                }
                let expanded: Vec<OsString> = names(target).collect();
                for n in expanded.into_iter().rev() {
                    rest.push_front(n);
                }
            }
            FileType::Directory => stack.push(Level { fd, name }),
            _ if last && !must_dir => stack.push(Level { fd, name }),
            _ => {
                return Err(unresolvable(
                    "openat",
                    args(),
                    Errno::NOTDIR,
                    path,
                    rel_of(&stack, Some(&name)),
                    ResolveReason::NotADirectory,
                ))
            }
        }
    }
    let rel = rel_of(&stack, None);
    let fd = match stack.pop() {
        Some(l) => l.fd,
        None => rustix::fs::openat(root, ".", OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| {
                Error::sys(
                    "openat",
                    format!("fd {}, \".\", O_PATH|O_CLOEXEC", root.as_raw_fd()),
                    e,
                )
            })?,
    };
    Ok(Resolved {
        fd,
        path: rel,
        resolver: Resolver::Userspace,
        created,
    })
}

/// A symlink on procfs is magic unless its target is a plain relative path
/// (`/proc/self` -> `1234`, `/proc/mounts` -> `self/mounts`): the magic ones
/// read as absolute paths or as `type:[inode]`.
fn is_magic_link(link: BorrowedFd<'_>, target: &[u8]) -> bool {
    let on_proc = match rustix::fs::fstatfs(link) {
        // `f_type` is signed or unsigned, 32 or 64 bits, by architecture.
        Ok(st) => st.f_type as u64 == PROC_SUPER_MAGIC,
        // Cannot tell: refuse, as RESOLVE_NO_MAGICLINKS would rather fail.
        Err(_) => true,
    };
    on_proc && (target.starts_with(b"/") || target.contains(&b':') || target.is_empty())
}

fn make(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    what: Option<Create>,
) -> std::result::Result<(), Errno> {
    match what {
        Some(Create::File) => rustix::fs::openat(
            parent,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map(drop),
        _ => rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)),
    }
}

fn make_args(parent: BorrowedFd<'_>, name: &OsStr, what: Option<Create>) -> String {
    match what {
        Some(Create::File) => format!(
            "fd {}, {:?}, O_CREAT|O_EXCL|O_NOFOLLOW|O_WRONLY|O_CLOEXEC, 0644",
            parent.as_raw_fd(),
            name
        ),
        _ => format!("fd {}, {:?}, 0755", parent.as_raw_fd(), name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_dots_and_slashes_but_keep_dotdot() {
        let v: Vec<_> = names(b"//a/./b/../c/").collect();
        assert_eq!(v, ["a", "b", "..", "c"]);
        assert_eq!(names(b"/").count(), 0);
    }

    #[test]
    fn lexical_clamps_at_the_root() {
        assert_eq!(lexical(Path::new("/../../a/./b/..")), PathBuf::from("a"));
    }

    #[test]
    fn unprivileged_walk_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/a", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("a/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let rootfd =
            rustix::fs::open(&root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        for resolver in [Resolver::Userspace, best_resolver()] {
            let o = ResolveOptions::new().resolver(resolver);
            let r = resolve_in_root(&rootfd, "abs/b", &o).unwrap();
            assert_eq!(r.path(), Path::new("a/b"), "{resolver:?}");
            let r = resolve_in_root(&rootfd, "a/up/a/b/../..", &o).unwrap();
            assert_eq!(r.path(), Path::new(""), "{resolver:?}");
            let e = resolve_in_root(&rootfd, "loop/x", &o).unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Unresolvable { reason: ResolveReason::SymlinkLoop, component, .. } if component == Path::new("loop")),
                "{e}"
            );
            std::fs::write(root.join("a/file"), b"").unwrap();
            assert!(resolve_in_root(&rootfd, "a/file", &o).is_ok());
            let e = resolve_in_root(&rootfd, "a/file/", &o).unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Unresolvable { reason: ResolveReason::NotADirectory, component, .. } if component == Path::new("a/file")),
                "{resolver:?}: {e}"
            );
            std::fs::remove_file(root.join("a/file")).unwrap();
            let e = resolve_in_root(&rootfd, "a/missing/x", &o).unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Unresolvable { reason: ResolveReason::Missing, component, .. } if component == Path::new("a/missing")),
                "{e}"
            );
        }
    }
}
