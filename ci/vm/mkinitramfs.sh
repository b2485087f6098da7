#!/bin/bash
# Build the initramfs for one kernel.
#
#   ci/vm/mkinitramfs.sh KERNEL_DIR TESTS_DIR OUTPUT
#
# KERNEL_DIR is what fetch-kernel.sh made. The image holds busybox (static),
# the guest init (ci/vm/init), the kernel's modules with their load order,
# util-linux's mount/umount/losetup/unshare/nsenter/findmnt, the mkfs tools
# of ext4/xfs/btrfs/vfat, the acl, attr and libcap tools, the coreutils
# programs tests commonly run (all with their shared libraries), and
# TESTS_DIR as /tests: its top-level executable files are the tests, ARGS
# holds the arguments given to each, ENV holds NAME=value lines exported to
# them, and subdirectories (e.g. bin/) are copied as they are, for helper
# programs the tests run (never run as tests themselves).
# Extra host programs can be added with VM_EXTRA_BINS="prog1 prog2".
# OUTPUT is an uncompressed newc cpio archive (nothing to inflate under TCG).
set -euo pipefail

kdir=${1:?usage: mkinitramfs.sh KERNEL_DIR TESTS_DIR OUTPUT}
tests=${2:?usage: mkinitramfs.sh KERNEL_DIR TESTS_DIR OUTPUT}
output=${3:?usage: mkinitramfs.sh KERNEL_DIR TESTS_DIR OUTPUT}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

HOST_BINS=(
	mount umount losetup unshare nsenter findmnt blkid
	mkfs.ext4 mke2fs mkfs.xfs mkfs.btrfs mkfs.vfat mkfs.fat
	setfacl getfacl setfattr getfattr setcap getcap chattr lsattr
	cat chown chmod chgrp sleep stat id ls touch mkdir rm cp mv ln
	truncate dd env true false sync
)
# getsubids (Debian: uidmap) when the host has it, for the ranges tests;
# without it they read /etc/subuid and /etc/subgid themselves.
if PATH=/usr/sbin:/usr/bin:/sbin:/bin type -P getsubids >/dev/null; then HOST_BINS+=(getsubids); fi
# Word splitting is wanted: a space separated list of program names.
# shellcheck disable=SC2206
HOST_BINS+=(${VM_EXTRA_BINS:-})

release=$(cat "$kdir/release")
stage=$(mktemp -d "${TMPDIR:-/tmp}/vm-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,tmp,run,root,tests,newroot}
chmod 1777 "$stage/tmp"

# busybox: every applet as a link in /bin; /usr/bin and /usr/sbin come
# first in PATH, so the real programs copied there win for exec(). (The
# busybox shell itself still prefers its applets: scripts use full paths.)
cp /bin/busybox "$stage/bin/busybox"
for applet in $("$stage/bin/busybox" --list); do
	[[ "$applet" == busybox ]] || ln -s busybox "$stage/bin/$applet"
done
install -m 0755 "$here/init" "$stage/init"

copy_libs() { # copy the shared libraries of a dynamic executable
	local line lib
	ldd "$1" 2>/dev/null | while read -r line; do
		case "$line" in
		*"=> /"*) lib=${line#*=> } lib=${lib%% (*} ;;
		/*) lib=${line%% (*} ;;
		*) continue ;;
		esac
		if [[ ! -e "$stage$lib" ]]; then
			mkdir -p "$stage${lib%/*}"
			cp -L "$lib" "$stage$lib"
		fi
	done
}
# ldd also succeeds on static-pie executables ("statically linked"): only
# resolved libraries ("=>") make a program dynamic.
is_dynamic() { ldd "$1" 2>/dev/null | grep -q '=>'; }

for b in "${HOST_BINS[@]}"; do
	src=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin type -P "$b") || {
		echo "mkinitramfs: $b not found on the host" >&2
		exit 1
	}
	case "$src" in /usr/sbin/*) dst=/usr/sbin/$b ;; *) dst=/usr/bin/$b ;; esac
	cp -L "$src" "$stage$dst"
	copy_libs "$src"
done
if [[ -e /etc/mke2fs.conf ]]; then cp /etc/mke2fs.conf "$stage/etc/"; fi
# mkfs.vfat converts labels through iconv (codepage 850): give it glibc's
# converters for that, or it warns on every run.
gconv=/usr/lib/x86_64-linux-gnu/gconv
if [[ -d "$gconv" ]]; then
	mkdir -p "$stage$gconv"
	cp -a "$gconv"/gconv-modules* "$gconv"/IBM850.so "$gconv"/IBM437.so "$stage$gconv/" 2>/dev/null || true
fi
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$stage/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/etc/group"
: >"$stage/etc/fstab"
# Empty, as on a fresh Debian: the ranges tests bind-mount over them.
: >"$stage/etc/subuid"
: >"$stage/etc/subgid"
ln -s ../proc/self/mounts "$stage/etc/mtab"

# Modules, and a modules.dep for modprobe (the init loads by load.list).
mkdir -p "$stage/lib/modules"
cp -a "$kdir/lib/modules/$release" "$stage/lib/modules/"
"$stage/bin/busybox" depmod -b "$stage" "$release" 2>/dev/null || true

# Tests: the top-level executable files; ARGS and ENV; subdirectories as
# they are (helper programs, data), not run by the init.
n=0
shopt -s nullglob
for t in "$tests"/*; do
	if [[ -f "$t" && -x "$t" ]]; then
		cp -L "$t" "$stage/tests/"
		n=$((n + 1))
	elif [[ -d "$t" ]]; then
		cp -rL "$t" "$stage/tests/"
	fi
done
for f in ARGS ENV; do
	if [[ -f "$tests/$f" ]]; then cp "$tests/$f" "$stage/tests/$f"; fi
done
if ((n == 0)); then
	echo "mkinitramfs: no executable files in $tests" >&2
	exit 1
fi
while IFS= read -r -d '' t; do
	if is_dynamic "$t"; then
		echo "mkinitramfs: note: ${t#"$stage"} is dynamically linked; copying its libraries" >&2
		copy_libs "$t"
	fi
done < <(find "$stage/tests" -type f -perm -u+x -print0)

mkdir -p "$(dirname "$output")"
(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --quiet --owner=0:0) >"$output.tmp"
mv "$output.tmp" "$output"
