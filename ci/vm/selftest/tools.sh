#!/bin/sh
# VM runner selftest (not a test of the crate): the guest has what the
# crate's tests use, and programs exec'd through PATH (as Rust's Command
# does) are the real ones, not busybox applets. Also checks /proc/thread-self,
# /tmp, the open files limit and /tests/ENV with a helper under /tests/bin.
set -u
failures=0
fail() {
	echo "selftest-tools: FAIL: $*"
	failures=$((failures + 1))
}

# What execvp() would run for a name: the first executable file in PATH.
resolve() (
	IFS=:
	for d in $PATH; do
		if [ -f "$d/$1" ] && [ -x "$d/$1" ]; then
			echo "$d/$1"
			exit 0
		fi
	done
	exit 1
)

for p in mkfs.ext4 mkfs.xfs mkfs.btrfs mkfs.vfat mount umount losetup \
	unshare nsenter findmnt setfacl getfacl setfattr getfattr setcap getcap \
	chown cat sleep stat truncate; do
	path=$(resolve "$p") || {
		fail "$p is not in PATH ($PATH)"
		continue
	}
	case "$(readlink -f "$path")" in
	*/busybox) fail "$p resolves to a busybox applet ($path)" ;;
	*)
		"$path" --version >/dev/null 2>&1
		rc=$?
		# 126/127: it cannot be executed (e.g. a missing shared library).
		if [ "$rc" -eq 126 ] || [ "$rc" -eq 127 ]; then
			fail "$path does not run (status $rc)"
			"$path" --version 2>&1 | head -n 3
		fi
		;;
	esac
done

[ -e /proc/thread-self/mountinfo ] || fail "no /proc/thread-self/mountinfo"

tmpfs_type=$(awk '$2 == "/tmp" { t = $3 } END { print t }' /proc/mounts)
[ "$tmpfs_type" = tmpfs ] || fail "/tmp is ${tmpfs_type:-not a mount}, not tmpfs"
[ "${TMPDIR:-}" = /tmp ] || fail "TMPDIR is '${TMPDIR:-}', not /tmp"
free=$(df -m /tmp | awk 'NR == 2 { print $4 }')
[ "${free:-0}" -ge 768 ] || fail "/tmp has only ${free:-?} MiB free"
# shellcheck disable=SC3045 # busybox sh has ulimit -n
nofile=$(ulimit -n)
[ "$nofile" -ge 65536 ] || fail "open files limit is $nofile"

# The tools work on a tmpfs file (ACLs, trusted.* xattrs and file
# capabilities all work on tmpfs on every kernel tested).
f=$(mktemp /tmp/selftest-tools.XXXXXX)
if ! { /usr/bin/setfacl -m u:1234:rw "$f" &&
	/usr/bin/getfacl -n "$f" 2>/dev/null | grep -q '^user:1234:rw-'; }; then
	fail "setfacl/getfacl on tmpfs"
fi
if ! { /usr/bin/setfattr -n trusted.selftest -v yes "$f" &&
	[ "$(/usr/bin/getfattr --only-values -n trusted.selftest "$f" 2>/dev/null)" = yes ]; }; then
	fail "setfattr/getfattr on tmpfs"
fi
if ! { /usr/sbin/setcap cap_net_raw+ep "$f" && /usr/sbin/getcap "$f" | grep -q cap_net_raw; }; then
	fail "setcap/getcap on tmpfs"
fi
if ! { /usr/bin/chown 1234:5678 "$f" && [ "$(/usr/bin/stat -c %u:%g "$f")" = 1234:5678 ]; }; then
	fail "chown"
fi
rm -f "$f"

# /tests/ENV is exported; the helper it names is in /tests/bin and is not
# run as a test (it fails when run without "ok").
[ "${SELFTEST_ENV:-}" = ok ] || fail "SELFTEST_ENV from /tests/ENV is '${SELFTEST_ENV:-}'"
if [ -n "${SELFTEST_HELPER:-}" ]; then
	[ "$("$SELFTEST_HELPER" ok)" = "helper ok" ] || fail "$SELFTEST_HELPER did not run"
else
	fail "SELFTEST_HELPER is not set"
fi

echo "selftest-tools: $failures failure(s)"
[ "$failures" -eq 0 ]
