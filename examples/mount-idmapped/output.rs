//! What goes to stdout: the `--json` objects (written by hand: the crate has
//! no JSON dependency) and the `--check` verdict line.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use idmapped::chown::ShiftReport;
use idmapped::probe::Support;
use idmapped::rootfs::{LayerCheck, LayerRole, OverlayMethod};
use idmapped::strategy::{MountWay, Outcome};
use idmapped::{Attached, IdMap, Mapping, MountAttrFlags, Propagation};

use crate::args::{CheckRequest, IdSource, MountRequest, NewFsRequest};
use crate::commands::{Blocker, Made};
use crate::Failure;

/// Whether fd 1 was closed when the program started. Rust's runtime opens
/// `/dev/null` on a closed fd 0, 1 or 2 before `main`, so by then a closed
/// stdout looks like `>/dev/null` and everything written to it is lost
/// without an error: `mount-idmapped --json ... >&-` would exit 0.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Runs before Rust's runtime (from `.init_array`, as the C library calls
/// constructors before `main`), while a closed fd 1 is still closed.
extern "C" fn note_closed_stdout() {
    if rustix::io::fcntl_getfd(std::io::stdout()) == Err(rustix::io::Errno::BADF) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
}

#[used]
#[link_section = ".init_array"]
static NOTE_CLOSED_STDOUT: extern "C" fn() = note_closed_stdout;

/// Fails when stdout was closed at start: the caller checks before doing
/// anything it would have to undo.
pub fn require_stdout() -> Result<(), Failure> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Err(Failure::Failed(
            "cannot write to stdout: it is closed (--json needs it)".to_owned(),
        ));
    }
    Ok(())
}

/// Write `text` to stdout; any failure is an error (exit 1), a stdout that
/// was closed at start included.
pub fn emit(text: &str) -> Result<(), Failure> {
    let cannot = |e: rustix::io::Errno| {
        let why = match e {
            rustix::io::Errno::BADF => "it is closed".to_owned(),
            e => std::io::Error::from(e).to_string(),
        };
        Failure::Failed(format!("cannot write to stdout: {why}"))
    };
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Err(cannot(rustix::io::Errno::BADF));
    }
    let stdout = std::io::stdout().lock();
    let mut rest = text.as_bytes();
    while !rest.is_empty() {
        match rustix::io::write(&stdout, rest) {
            Ok(0) => return Err(cannot(rustix::io::Errno::IO)),
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(cannot(e)),
        }
    }
    Ok(())
}

pub fn mount_json(
    request: &MountRequest,
    outcome: &Outcome,
    mapping: Option<&Mapping>,
    attached: Option<&Attached>,
) -> String {
    let mut per_mount = json::NULL.to_owned();
    let userns = match &request.ids {
        IdSource::Userns(path) => json::path(path),
        IdSource::Mapping(_) => json::NULL.to_owned(),
    };
    let mapping = mapping.map_or_else(|| json::NULL.to_owned(), mapping_json);
    let (strategy, kernel_path, fallback, report) = match outcome {
        Outcome::Idmapped { method } => ("idmap", json::string(method.syscalls()), None, None),
        Outcome::Chowned { report, because } => (
            "chown",
            json::NULL.to_owned(),
            because.as_ref(),
            Some(report),
        ),
        Outcome::PerMount { mounts, report } => {
            let items: Vec<String> = mounts
                .iter()
                .map(|m| {
                    let (way, key, value) = match &m.way {
                        MountWay::Idmapped(method) => {
                            ("idmap", "kernel_path", json::string(method.syscalls()))
                        }
                        MountWay::Shifted(why) => {
                            ("chown", "reason", json::string(&why.to_string()))
                        }
                    };
                    json::Object::new()
                        .raw("mount", json::path(&absolute(&m.mount)))
                        .raw("strategy", json::string(way))
                        .raw(key, value)
                        .finish_inline()
                })
                .collect();
            per_mount = format!("[{}]", items.join(", "));
            ("per-mount", json::NULL.to_owned(), None, Some(report))
        }
    };
    let fallback = fallback.map_or_else(
        || json::NULL.to_owned(),
        |f| {
            json::Object::new()
                .raw("mount", json::path(&absolute(&f.mount)))
                .raw("reason", json::string(&f.reason.to_string()))
                .finish_inline()
        },
    );
    let o = json::Object::new().raw("source", json::path(&absolute(&request.source)));
    where_attached(o, &request.target, request.beneath.as_deref(), attached)
        .raw("strategy", json::string(strategy))
        .raw("requested_strategy", json::string(request.strategy.name()))
        .raw("recursive", request.recursive.to_string())
        .raw("mapping", mapping)
        .raw("userns", userns)
        .raw("attributes", attributes_json(request))
        .raw("kernel_path", kernel_path)
        .raw("fallback", fallback)
        .raw("mounts", per_mount)
        .raw(
            "report",
            report.map_or_else(|| json::NULL.to_owned(), report_json),
        )
        .finish()
}

fn report_json(r: &ShiftReport) -> String {
    json::Object::new()
        .raw("visited", r.visited.to_string())
        .raw("changed", r.changed.to_string())
        .raw("already_shifted", r.already_shifted.to_string())
        .raw(
            "hardlinks_deduplicated",
            r.hardlinks_deduplicated.to_string(),
        )
        .raw("acls_rewritten", r.acls_rewritten.to_string())
        .raw(
            "capabilities_rewritten",
            r.capabilities_rewritten.to_string(),
        )
        .raw("out_of_range", r.out_of_range.to_string())
        .raw("skipped_mounts", r.skipped_mounts.to_string())
        .raw("recovered", r.recovered.to_string())
        .raw("completed_before", r.completed_before.to_string())
        .raw("resumed", r.resumed.to_string())
        .raw("tree_changed", r.tree_changed.to_string())
        .raw("tree_unsettled", r.tree_unsettled.to_string())
        .raw("entry_access", json::string(r.entry_access.name()))
        .raw(
            "kept_in_seen_range",
            list(r.kept_in_seen_range.iter().map(|k| {
                json::Object::new()
                    .raw("path", json::path(&k.path))
                    .raw("kind", json::string(k.kind))
                    .raw("id", k.id.to_string())
                    .finish_inline()
            })),
        )
        .raw(
            "outside_links",
            list(r.outside_links.iter().map(|p| json::path(p))),
        )
        .raw(
            "mounts_shifted",
            list(r.mounts_shifted.iter().map(|p| json::path(p))),
        )
        .raw("elapsed_s", format!("{:.6}", r.elapsed.as_secs_f64()))
        .finish_inline()
}

/// A JSON array of already-encoded values.
fn list(items: impl Iterator<Item = String>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(", "))
}

/// `--unshift --json`.
pub fn unshift_json(source: &Path, r: &ShiftReport) -> String {
    json::Object::new()
        .raw("source", json::path(&absolute(source)))
        .raw("unshifted", "true")
        .raw("report", report_json(r))
        .finish()
}

fn mapping_json(mapping: &Mapping) -> String {
    json::Object::new()
        .raw("uid", extents_json(mapping.uids()))
        .raw("gid", extents_json(mapping.gids()))
        .finish_inline()
}

fn extents_json(map: &IdMap) -> String {
    let items: Vec<String> = map
        .extents()
        .iter()
        .map(|e| {
            json::Object::new()
                .raw("on_disk", e.on_disk().to_string())
                .raw("seen", e.seen().to_string())
                .raw("count", e.count().to_string())
                .finish_inline()
        })
        .collect();
    format!("[{}]", items.join(","))
}

fn attributes_json(request: &MountRequest) -> String {
    flags_json(request.flags, request.propagation)
}

fn flags_json(flags: MountAttrFlags, propagation: Option<Propagation>) -> String {
    let flag = |f: MountAttrFlags| flags.contains(f).to_string();
    json::Object::new()
        .raw("read_only", flag(MountAttrFlags::RDONLY))
        .raw("nosuid", flag(MountAttrFlags::NOSUID))
        .raw("nodev", flag(MountAttrFlags::NODEV))
        .raw("noexec", flag(MountAttrFlags::NOEXEC))
        .raw("nosymfollow", flag(MountAttrFlags::NOSYMFOLLOW))
        .raw(
            "propagation",
            propagation.map_or_else(|| json::NULL.to_owned(), |p| json::string(p.name())),
        )
        .finish_inline()
}

/// `path` made absolute against the current directory, without resolving
/// symlinks (falls back to `path` itself if the directory is gone).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `--json` for `--tmpfs` and `--overlay`: what was made and how.
/// The `target`, `beneath`, `replaced`, `created` and `resolver` fields: with
/// --beneath, the target as resolved, relative to ROOT ("." for ROOT itself);
/// otherwise TARGET made absolute.
fn where_attached(
    o: json::Object,
    target: &Path,
    beneath: Option<&Path>,
    attached: Option<&Attached>,
) -> json::Object {
    let shown = match (beneath, attached) {
        (Some(_), Some(a)) if a.target.as_os_str().is_empty() => json::string("."),
        (Some(_), Some(a)) => json::path(&a.target),
        _ => json::path(&absolute(target)),
    };
    let beneath = beneath.map_or_else(|| json::NULL.to_owned(), |root| json::path(&absolute(root)));
    let resolver = attached.map_or_else(
        || json::NULL.to_owned(),
        |a| json::string(a.resolver.name()),
    );
    o.raw("target", shown)
        .raw("beneath", beneath)
        .raw("replaced", attached.is_some_and(|a| a.replaced).to_string())
        .raw("created", attached.is_some_and(|a| a.created).to_string())
        .raw("resolver", resolver)
}

pub fn new_fs_json(
    request: &NewFsRequest,
    made: &Made,
    mapping: Option<&Mapping>,
    attached: Option<&Attached>,
) -> String {
    let userns = match &request.ids {
        IdSource::Userns(path) => json::path(path),
        IdSource::Mapping(_) => json::NULL.to_owned(),
    };
    let mut o = where_attached(
        json::Object::new(),
        &request.target,
        request.beneath.as_deref(),
        attached,
    );
    o = match made {
        Made::Tmpfs { options } => o
            .raw("filesystem", json::string("tmpfs"))
            .raw("method", json::string("fsmount"))
            .raw(
                "kernel_path",
                json::string("fsopen+fsconfig+fsmount+mount_setattr"),
            )
            .raw("options", json::string(options)),
        Made::Overlay {
            method,
            layers,
            staged_mounts,
        } => {
            let items: Vec<String> = layers
                .iter()
                .map(|(role, path)| {
                    let index = match role {
                        LayerRole::Lower(i) => i.to_string(),
                        _ => json::NULL.to_owned(),
                    };
                    json::Object::new()
                        .raw("role", json::string(role.kind()))
                        .raw("index", index)
                        .raw("path", json::path(&absolute(path)))
                        .raw("fs", json::string(&idmapped::probe::fs_type(path)))
                        .finish_inline()
                })
                .collect();
            let read_only = !layers.iter().any(|(r, _)| *r == LayerRole::Upper);
            o.raw("filesystem", json::string("overlay"))
                .raw("method", json::string(method.name()))
                .raw("layer_options", json::string(method.layer_options()))
                .raw("staged_mounts", staged_mounts.to_string())
                .raw("read_only", read_only.to_string())
                .raw("layers", format!("[{}]", items.join(",")))
        }
    };
    o.raw(
        "mapping",
        mapping.map_or_else(|| json::NULL.to_owned(), mapping_json),
    )
    .raw("userns", userns)
    .raw("attributes", flags_json(request.flags, request.propagation))
    .finish()
}

/// How this kernel would build the overlay, in words.
fn method_text(method: &Result<OverlayMethod, idmapped::Error>) -> String {
    match method {
        Ok(OverlayMethod::LayerFds) => {
            "would be built from layer fds (idmapped detached clones; Linux 6.13)".into()
        }
        Ok(OverlayMethod::StagedStrings) => "would be built from idmapped clones staged in a private mount namespace, layers as lowerdir+ strings (Linux 6.8)".into(),
        Ok(OverlayMethod::StagedMountData) => "would be built from idmapped clones staged in a private mount namespace, layers in one lowerdir= string (Linux 5.19)".into(),
        Err(e) => format!("cannot be built here: {e}"),
    }
}

fn support_text(support: &Support) -> String {
    match support {
        Support::Supported => "can be idmapped".into(),
        Support::Unsupported(reason) => format!("cannot be idmapped: {reason}"),
    }
}

/// `--check --overlay`: one line per layer, then the overlay's.
pub fn overlay_check_text(
    layers: &[LayerCheck],
    method: &Result<OverlayMethod, idmapped::Error>,
) -> String {
    let mut out = String::new();
    for l in layers {
        out.push_str(&format!(
            "{} {}: {} (filesystem type {})\n",
            l.role,
            l.path.display(),
            support_text(&l.support),
            l.fs
        ));
    }
    out.push_str(&format!("overlay: {}\n", method_text(method)));
    out
}

pub fn overlay_check_json(
    layers: &[LayerCheck],
    method: &Result<OverlayMethod, idmapped::Error>,
    ok: bool,
) -> String {
    let items: Vec<String> = layers
        .iter()
        .map(|l| {
            let index = match l.role {
                LayerRole::Lower(i) => i.to_string(),
                _ => json::NULL.to_owned(),
            };
            let reason = match &l.support {
                Support::Supported => json::NULL.to_owned(),
                Support::Unsupported(r) => json::string(&r.to_string()),
            };
            json::Object::new()
                .raw("role", json::string(l.role.kind()))
                .raw("index", index)
                .raw("path", json::path(&absolute(&l.path)))
                .raw("fs", json::string(&l.fs))
                .raw("supported", (l.support == Support::Supported).to_string())
                .raw("reason", reason)
                .finish_inline()
        })
        .collect();
    let (m, opts, why) = match method {
        Ok(m) => (
            json::string(m.name()),
            json::string(m.layer_options()),
            json::NULL.to_owned(),
        ),
        Err(e) => (
            json::NULL.to_owned(),
            json::NULL.to_owned(),
            json::string(&e.to_string()),
        ),
    };
    json::Object::new()
        .raw("supported", ok.to_string())
        .raw("method", m)
        .raw("layer_options", opts)
        .raw("reason", why)
        .raw("layers", format!("[{}]", items.join(",")))
        .finish()
}

pub fn check_text(request: &CheckRequest, fs: Option<&str>, blocker: Option<&Blocker>) -> String {
    let source = request.source.display();
    let fs = fs.unwrap_or("unknown");
    match blocker {
        None => format!("{source}: can be idmapped (filesystem type {fs})\n"),
        Some(b) if b.mount_point == request.source => {
            format!("{source}: cannot be idmapped: {}\n", b.reason)
        }
        Some(b) => format!(
            "{source}: cannot be idmapped: submount {}: {}\n",
            b.mount_point.display(),
            b.reason
        ),
    }
}

pub fn check_json(request: &CheckRequest, fs: Option<&str>, blocker: Option<&Blocker>) -> String {
    let reason = blocker.map_or_else(
        || json::NULL.to_owned(),
        |b| json::string(&b.reason.to_string()),
    );
    let blocked_by = blocker.map_or_else(
        || json::NULL.to_owned(),
        |b| {
            json::Object::new()
                .raw("path", json::path(&absolute(&b.mount_point)))
                .raw("fs", json::string(&b.fs))
                .finish_inline()
        },
    );
    json::Object::new()
        .raw("source", json::path(&absolute(&request.source)))
        .raw("supported", blocker.is_none().to_string())
        .raw("reason", reason)
        .raw("fs", fs.map_or_else(|| json::NULL.to_owned(), json::string))
        .raw("recursive", request.recursive.to_string())
        .raw("blocked_by", blocked_by)
        .finish()
}

/// JSON, by hand.
mod json {
    use std::fmt::Write as _;
    use std::path::Path;

    pub const NULL: &str = "null";

    /// `s` as a JSON string literal.
    pub fn string(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if u32::from(c) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A path as a JSON string (bytes that are not UTF-8 become U+FFFD).
    pub fn path(p: &Path) -> String {
        string(&p.to_string_lossy())
    }

    /// An object built from already-rendered values.
    #[derive(Default)]
    pub struct Object {
        body: String,
    }

    impl Object {
        pub fn new() -> Object {
            Object::default()
        }

        pub fn raw(mut self, key: &str, value: impl AsRef<str>) -> Object {
            if !self.body.is_empty() {
                self.body.push(',');
            }
            self.body.push_str(&string(key));
            self.body.push(':');
            self.body.push_str(value.as_ref());
            self
        }

        /// The object as a value inside another.
        pub fn finish_inline(self) -> String {
            format!("{{{}}}", self.body)
        }

        /// The object as a whole output line.
        pub fn finish(self) -> String {
            format!("{{{}}}\n", self.body)
        }
    }
}
