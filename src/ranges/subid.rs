//! A user's subordinate id range as a [`Pool`]: from `getsubids` when it is
//! installed (it also sees ranges served by NSS subid plugins), else from
//! `/etc/subuid` and `/etc/subgid` directly — a node without `getsubids`
//! must still work (the kubelet refuses to start there).

use std::fmt;
use std::io::ErrorKind as IoErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::io::Errno;

use super::Pool;
use crate::error::{Error, ErrorKind, Result};

/// Where the ranges are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubidLookup {
    /// The `getsubids` program to ask, or `None` to read the files.
    pub getsubids: Option<PathBuf>,
    /// The subordinate uid file (`/etc/subuid`).
    pub subuid: PathBuf,
    /// The subordinate gid file (`/etc/subgid`).
    pub subgid: PathBuf,
    /// The password file, to match entries written by uid (`/etc/passwd`).
    pub passwd: PathBuf,
}

impl SubidLookup {
    /// The system's: `getsubids` if an executable of that name is on `PATH`
    /// (or in `/usr/bin`, `/bin` when `PATH` is unset), the files in `/etc`.
    pub fn system() -> SubidLookup {
        SubidLookup {
            getsubids: find_program("getsubids"),
            ..SubidLookup::files_only()
        }
    }

    /// The files in `/etc` only, never `getsubids`.
    pub fn files_only() -> SubidLookup {
        SubidLookup {
            getsubids: None,
            subuid: PathBuf::from("/etc/subuid"),
            subgid: PathBuf::from("/etc/subgid"),
            passwd: PathBuf::from("/etc/passwd"),
        }
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| {
            rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok()
                && std::fs::metadata(p).is_ok_and(|m| m.is_file())
        })
}

/// Where a range was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubidSource {
    /// Reported by this `getsubids` program.
    Getsubids(PathBuf),
    /// Read from the subuid and subgid files.
    Files,
}

/// A user's range, identical for uids and gids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subids {
    /// The range.
    pub pool: Pool,
    /// Where it came from.
    pub source: SubidSource,
}

/// Why a user's ranges cannot be a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubidProblem {
    /// The user has no subordinate uid (or gid) range.
    Missing {
        /// The user.
        user: String,
        /// `"uid"` or `"gid"`.
        kind: &'static str,
        /// Where we looked: a file, or `getsubids` and what it said.
        looked_in: String,
    },
    /// The user has more than one range of a kind; a pool is one range.
    Several {
        /// The user.
        user: String,
        /// `"uid"` or `"gid"`.
        kind: &'static str,
        /// How many.
        count: usize,
        /// Where.
        looked_in: String,
    },
    /// The uid range and the gid range differ.
    Mismatch {
        /// The user.
        user: String,
        /// The uid range.
        uids: Pool,
        /// The gid range.
        gids: Pool,
    },
    /// A line for the user is not `NAME:FIRST:COUNT` (or `getsubids`'
    /// `N: NAME FIRST COUNT`).
    Malformed {
        /// Where.
        looked_in: String,
        /// The 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

impl fmt::Display for SubidProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubidProblem::Missing {
                user,
                kind,
                looked_in,
            } => write!(f, "user {user:?} has no subordinate {kind} range ({looked_in})"),
            SubidProblem::Several {
                user,
                kind,
                count,
                looked_in,
            } => write!(
                f,
                "user {user:?} has {count} subordinate {kind} ranges in {looked_in}; a pool is exactly one"
            ),
            SubidProblem::Mismatch { user, uids, gids } => write!(
                f,
                "user {user:?}'s subordinate uid range {uids} and gid range {gids} differ; they must be one identical range"
            ),
            SubidProblem::Malformed {
                looked_in,
                line,
                text,
            } => write!(f, "{looked_in} line {line} is malformed: {text:?}"),
        }
    }
}

fn problem(p: SubidProblem) -> Error {
    Error::new(ErrorKind::Subids(p))
}

impl Subids {
    /// Looks `user` up as `lookup` says and checks that the uid and gid
    /// ranges are one identical range. Fails with [`ErrorKind::Subids`]; the
    /// range is not checked against the pool rules here (an
    /// [`Allocator`](super::Allocator) does that when it opens).
    pub fn lookup(user: &str, lookup: &SubidLookup) -> Result<Subids> {
        let (uids, gids, source) = match &lookup.getsubids {
            Some(program) => (
                from_getsubids(program, user, "uid")?,
                from_getsubids(program, user, "gid")?,
                SubidSource::Getsubids(program.clone()),
            ),
            None => {
                let names = names_for(user, &lookup.passwd)?;
                (
                    from_file(&lookup.subuid, user, &names, "uid")?,
                    from_file(&lookup.subgid, user, &names, "gid")?,
                    SubidSource::Files,
                )
            }
        };
        if uids != gids {
            return Err(problem(SubidProblem::Mismatch {
                user: user.to_owned(),
                uids,
                gids,
            }));
        }
        Ok(Subids { pool: uids, source })
    }
}

/// The names an entry for `user` may carry: the name and its uid (an entry
/// may be written either way).
fn names_for(user: &str, passwd: &Path) -> Result<Vec<String>> {
    let mut names = vec![user.to_owned()];
    let text = match std::fs::read(passwd) {
        Ok(t) => t,
        Err(e) if e.kind() == IoErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(io_error("read", passwd, &e)),
    };
    for line in String::from_utf8_lossy(&text).lines() {
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(uid)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if name == user && !names.iter().any(|n| n == uid) {
            names.push(uid.to_owned());
        } else if uid == user && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn io_error(op: &'static str, path: &Path, e: &std::io::Error) -> Error {
    let errno = e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error);
    Error::sys(op, format!("{path:?}"), errno).with_path(path)
}

fn one_range(ranges: Vec<Pool>, user: &str, kind: &'static str, looked_in: String) -> Result<Pool> {
    match ranges.as_slice() {
        [one] => Ok(*one),
        [] => Err(problem(SubidProblem::Missing {
            user: user.to_owned(),
            kind,
            looked_in,
        })),
        many => Err(problem(SubidProblem::Several {
            user: user.to_owned(),
            kind,
            count: many.len(),
            looked_in,
        })),
    }
}

fn from_file(path: &Path, user: &str, names: &[String], kind: &'static str) -> Result<Pool> {
    let looked_in = path.display().to_string();
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == IoErrorKind::NotFound => {
            return Err(problem(SubidProblem::Missing {
                user: user.to_owned(),
                kind,
                looked_in: format!("{looked_in} does not exist"),
            }))
        }
        Err(e) => return Err(io_error("read", path, &e)),
    };
    let mut ranges = Vec::new();
    for (i, line) in String::from_utf8_lossy(&text).lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let name = fields.next().unwrap_or_default();
        if !names.iter().any(|n| n == name) {
            continue;
        }
        let parsed = match (fields.next(), fields.next(), fields.next()) {
            (Some(first), Some(count), None) => first.parse().ok().zip(count.parse().ok()),
            _ => None,
        };
        let Some((first, count)) = parsed else {
            return Err(problem(SubidProblem::Malformed {
                looked_in,
                line: i + 1,
                text: line.to_owned(),
            }));
        };
        ranges.push(Pool::new(first, count));
    }
    one_range(ranges, user, kind, looked_in)
}

fn from_getsubids(program: &Path, user: &str, kind: &'static str) -> Result<Pool> {
    let mut cmd = Command::new(program);
    if kind == "gid" {
        cmd.arg("-g");
    }
    // getsubids takes no "--": a name starting with '-' would be an option.
    if user.starts_with('-') || user.is_empty() {
        return Err(Error::new(ErrorKind::InvalidInput(format!(
            "user name {user:?} is empty or starts with '-'"
        ))));
    }
    let out = cmd
        .arg(user)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io_error("execve", program, &e))?;
    let looked_in = format!(
        "{} {}{}",
        program.display(),
        if kind == "gid" { "-g " } else { "" },
        user
    );
    if !out.status.success() {
        // getsubids says "Error fetching ranges" and exits 1 both for a
        // user without ranges and for a lookup that failed: quote it.
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(problem(SubidProblem::Missing {
            user: user.to_owned(),
            kind,
            looked_in: format!("{looked_in} exited with {}: {said:?}", out.status),
        }));
    }
    let mut ranges = Vec::new();
    for (i, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // "0: kubelet 65536 131072"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let parsed = match fields.as_slice() {
            [index, _name, first, count] if index.ends_with(':') => {
                first.parse().ok().zip(count.parse().ok())
            }
            _ => None,
        };
        let Some((first, count)) = parsed else {
            return Err(problem(SubidProblem::Malformed {
                looked_in,
                line: i + 1,
                text: line.to_owned(),
            }));
        };
        ranges.push(Pool::new(first, count));
    }
    one_range(ranges, user, kind, looked_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup_in(dir: &Path, subuid: &str, subgid: Option<&str>) -> SubidLookup {
        std::fs::write(dir.join("subuid"), subuid).unwrap();
        if let Some(g) = subgid {
            std::fs::write(dir.join("subgid"), g).unwrap();
        }
        std::fs::write(dir.join("passwd"), "kube:x:990:990::/:/bin/false\n").unwrap();
        SubidLookup {
            getsubids: None,
            subuid: dir.join("subuid"),
            subgid: dir.join("subgid"),
            passwd: dir.join("passwd"),
        }
    }

    fn problem_of(r: Result<Subids>) -> SubidProblem {
        match r.unwrap_err().kind() {
            ErrorKind::Subids(p) => p.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn files() {
        let d = tempfile::tempdir().unwrap();
        let l = lookup_in(
            d.path(),
            "# c\nother:1:2\nkube:65536:7208960\n",
            Some("990:65536:7208960\n"),
        );
        let s = Subids::lookup("kube", &l).unwrap();
        assert_eq!(s.pool, Pool::new(65536, 7208960));
        assert_eq!(s.source, SubidSource::Files);
        // Past 2^32: kept as is for the rules to refuse.
        let l = lookup_in(
            d.path(),
            "kube:327680:4294836224\n",
            Some("kube:327680:4294836224\n"),
        );
        assert_eq!(
            Subids::lookup("kube", &l).unwrap().pool,
            Pool::new(327680, 4294836224)
        );
        let l = lookup_in(d.path(), "kube:65536:65536\n", Some("kube:131072:65536\n"));
        assert!(matches!(
            problem_of(Subids::lookup("kube", &l)),
            SubidProblem::Mismatch { .. }
        ));
        let l = lookup_in(
            d.path(),
            "kube:65536:65536\nkube:1:1\n",
            Some("kube:65536:65536\n"),
        );
        assert!(matches!(
            problem_of(Subids::lookup("kube", &l)),
            SubidProblem::Several {
                count: 2,
                kind: "uid",
                ..
            }
        ));
        let l = lookup_in(d.path(), "kube:x:65536\n", Some(""));
        assert!(matches!(
            problem_of(Subids::lookup("kube", &l)),
            SubidProblem::Malformed { line: 1, .. }
        ));
        let l = lookup_in(d.path(), "kube:65536:65536\n", Some(""));
        assert!(matches!(
            problem_of(Subids::lookup("kube", &l)),
            SubidProblem::Missing { kind: "gid", .. }
        ));
        std::fs::remove_file(d.path().join("subgid")).unwrap();
        let p = problem_of(Subids::lookup("kube", &l));
        assert!(p.to_string().contains("does not exist"), "{p}");
    }
}
