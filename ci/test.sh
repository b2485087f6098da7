#!/usr/bin/env bash
# The project's test command (README: "Test"). Run as root to include the
# privileged tests; on CI (CI set) a privileged test that cannot run fails.
# As root it first installs the Debian packages the tests need, when missing
# (ci/packages.sh; IDMAPPED_NO_INSTALL=1 only lists them).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

if ((EUID == 0)) && [[ -z ${IDMAPPED_NO_INSTALL:-} ]]; then
	step "ci/packages.sh (install what the tests need, only what is missing)"
	bash ci/packages.sh
else
	step "ci/packages.sh --check"
	bash ci/packages.sh --check ||
		echo "(not installing: the privileged tests need root anyway, and name any missing program with its package)"
fi

step "cargo fmt --check"
cargo fmt --all -- --check
# clippy's incompatible_msrv lint (on by default) refuses standard-library
# API newer than Cargo.toml's rust-version. First check that it is active in
# this toolchain: a canary crate with the same rust-version that calls
# Option::is_none_or (stable in 1.82) must be refused.
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
step "clippy's incompatible_msrv is active against rust-version $msrv"
canary=target/msrv-canary
mkdir -p "$canary/src"
printf '[package]\nname = "msrv-canary"\nversion = "0.0.0"\nedition = "2021"\nrust-version = "%s"\n\n[workspace]\n' "$msrv" >"$canary/Cargo.toml"
printf 'pub fn newer_than_msrv(x: Option<u8>) -> bool {\n    x.is_none_or(|v| v > 1)\n}\n' >"$canary/src/lib.rs"
if canary_out=$(cd "$canary" && cargo clippy --quiet -- -D clippy::incompatible_msrv 2>&1); then
	echo "ci/test.sh: clippy accepted Option::is_none_or (Rust 1.82) under rust-version $msrv: the incompatible_msrv lint is not active, so the MSRV check below would prove nothing" >&2
	exit 1
fi
grep -q incompatible_msrv <<<"$canary_out" || {
	printf 'ci/test.sh: the canary failed for another reason:\n%s\n' "$canary_out" >&2
	exit 1
}
echo "ok: the lint refuses API newer than $msrv"
step "cargo clippy --all-targets -- -D warnings -D clippy::incompatible_msrv"
cargo clippy --all-targets -- -D warnings -D clippy::incompatible_msrv
step "cargo doc (warnings are errors)"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps
# What the tests must not leave behind (checked at the end): temporary
# files (the tests get a TMPDIR of their own, so whatever is left in it is
# theirs), mounts in this namespace, loop devices.
# (mode 1777 as /tmp: tests write there as other users.)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/idmapped-ci.XXXXXX")
chmod 1777 "$tmp"
export TMPDIR=$tmp
mounts_before=$(findmnt -rn -o TARGET | sort)
loops_before=$( (losetup -a 2>/dev/null || true) | sort)
step "cargo test"
cargo test
# The same mount tests through the pre-6.15 path (open_tree + mount_setattr,
# mountinfo read-back), so both rungs of the fallback ladder run here.
step "cargo test --test mount with IDMAPPED_FORCE_FALLBACK=open_tree_attr,statmount"
IDMAPPED_FORCE_FALLBACK=open_tree_attr,statmount cargo test --test mount
# The walker's safety tests once more without openat2 (kernels before 5.6,
# or seccomp): single-name openat(O_NOFOLLOW) plus the (dev, ino, mount) check.
step "cargo test --test chown (safety tests) with IDMAPPED_FORCE_FALLBACK=openat2"
IDMAPPED_FORCE_FALLBACK=openat2 cargo test --test chown -- symlinks attacker mounts_inside shifted_tree
# The whole walker suite through its older rungs: every entry pinned O_PATH
# with xattr calls through /proc/self/fd (kernels before 5.12, trees with
# mounts below them), the scan's xattr reads by /proc path and the settling
# passes' coarse-timestamp rule (both before 6.13).
step "cargo test --test chown with IDMAPPED_FORCE_FALLBACK=nodev_view,xattrat,fine_ctime"
IDMAPPED_FORCE_FALLBACK=nodev_view,xattrat,fine_ctime cargo test --test chown
# The helper, procfs and namespace-file tests through every older rung: no
# pidfds (helper by pid), no PIDFD_GET_USER_NAMESPACE, the checked /proc
# mount instead of a private procfs, no openat2, mountinfo instead of listmount.
step "cargo test --test helper --test userns with every procfs/pidfd fallback forced"
IDMAPPED_FORCE_FALLBACK=fsopen_proc,openat2,pidfd,pidfd_get_user_namespace,listmount,statmount \
	cargo test --test helper --test userns
# The resolver and runtime tests once more as on a kernel without openat2
# (before 5.6, or seccomp refusing it: the userspace resolver is the probed
# default) and without MOVE_MOUNT_BENEATH (before 6.5: replace refused).
step "cargo test --test resolve --test runtime --test cli_beneath with IDMAPPED_FORCE_FALLBACK=openat2,move_mount_beneath"
IDMAPPED_FORCE_FALLBACK=openat2,move_mount_beneath cargo test --test resolve --test runtime --test cli_beneath
# The overlay ladder's choice with the newer rungs switched off: create() and
# the CLI must pick staged mounts with lowerdir+, then with one lowerdir= page
# (tests/rootfs.rs runs every rung directly anyway).
for forced in overlay_layer_fds overlay_lowerdir_plus; do
	step "cargo test --test rootfs (rung choice) with IDMAPPED_FORCE_FALLBACK=$forced"
	IDMAPPED_FORCE_FALLBACK=$forced cargo test --test rootfs -- create_picks cli_overlay
done

step "nothing left behind: temporary directories, mounts, loop devices"
left=$(find "$tmp" -mindepth 1 -maxdepth 1 -print)
[[ -n $left ]] || rmdir "$tmp"
mounts_new=$(comm -13 <(echo "$mounts_before") <(findmnt -rn -o TARGET | sort))
loops_new=$(comm -13 <(echo "$loops_before") <( (losetup -a 2>/dev/null || true) | sort))
if [[ -n $left || -n $mounts_new || -n $loops_new ]]; then
	printf 'ci/test.sh: the tests left behind:\n' >&2
	[[ -z $left ]] || printf 'in TMPDIR (%s):\n%s\n' "$tmp" "$left" >&2
	[[ -z $mounts_new ]] || printf 'mounts:\n%s\n' "$mounts_new" >&2
	[[ -z $loops_new ]] || printf 'loop devices:\n%s\n' "$loops_new" >&2
	exit 1
fi
echo "ok: nothing left behind"
