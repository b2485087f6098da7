#!/usr/bin/env bash
# The project's test command (README: "Test"). Run as root to include the
# privileged tests; on CI (CI set) a privileged test that cannot run fails.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
step "cargo doc (warnings are errors)"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps
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
# The overlay ladder's choice with the newer rungs switched off: create() and
# the CLI must pick staged mounts with lowerdir+, then with one lowerdir= page
# (tests/rootfs.rs runs every rung directly anyway).
for forced in overlay_layer_fds overlay_lowerdir_plus; do
	step "cargo test --test rootfs (rung choice) with IDMAPPED_FORCE_FALLBACK=$forced"
	IDMAPPED_FORCE_FALLBACK=$forced cargo test --test rootfs -- create_picks cli_overlay
done
