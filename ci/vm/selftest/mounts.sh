#!/bin/sh
# VM runner selftest (not a test of the crate): in a private mount
# namespace, make loop devices and mount ext4, xfs, btrfs and vfat with
# util-linux's mount, then tmpfs and an overlay. Prints one line per
# filesystem in the format of the crate's matrix:
#   matrix: <release> <fs> unsupported <pass|fail>
# where "unsupported" is only a placeholder (this selftest tries no idmapping)
# and pass/fail says whether the filesystem mounted and took a write.
# util-linux programs are called by path: busybox's applets shadow them.
set -u
if [ "${SELFTEST_NS:-}" != 1 ]; then
	SELFTEST_NS=1 exec /usr/bin/unshare --mount --propagation unchanged "$0" "$@"
fi
/usr/bin/mount --make-rprivate / || exit 1

rel=$(uname -r)
w=$(mktemp -d /tmp/selftest.XXXXXX)
failures=0

report() { # fs result
	echo "matrix: $rel $1 unsupported $2"
	[ "$2" = pass ] || failures=$((failures + 1))
}

write_check() { # dir: write, read back, chown where the fs can
	echo "selftest $2" >"$1/file" && [ "$(cat "$1/file")" = "selftest $2" ]
}

for fs in ext4 xfs btrfs vfat; do
	img=$w/$fs.img
	mnt=$w/$fs
	mkdir "$mnt"
	truncate -s 320M "$img"
	case "$fs" in
	ext4) /usr/sbin/mkfs.ext4 -q -F "$img" ;;
	xfs) /usr/sbin/mkfs.xfs -q -f "$img" ;;
	btrfs) /usr/sbin/mkfs.btrfs -q -f "$img" >/dev/null ;;
	vfat) /usr/sbin/mkfs.vfat "$img" >/dev/null ;;
	esac || {
		echo "selftest: mkfs.$fs failed"
		report "$fs" fail
		continue
	}
	dev=$(/usr/sbin/losetup --find --show "$img") || {
		echo "selftest: losetup failed for $fs"
		report "$fs" fail
		continue
	}
	result=fail
	if /usr/bin/mount -t "$fs" "$dev" "$mnt"; then
		write_check "$mnt" "$fs" && result=pass
		/usr/bin/findmnt -n -o SOURCE,FSTYPE,OPTIONS "$mnt"
		/usr/bin/umount "$mnt" || result=fail
	fi
	/usr/sbin/losetup --detach "$dev" || result=fail
	rm -f "$img"
	report "$fs" "$result"
done

result=fail
mkdir "$w/tmpfs"
if /usr/bin/mount -t tmpfs -o size=16m tmpfs "$w/tmpfs"; then
	write_check "$w/tmpfs" tmpfs && result=pass
	/usr/bin/umount "$w/tmpfs" || result=fail
fi
report tmpfs "$result"

result=fail
mkdir "$w/ovl"
if /usr/bin/mount -t tmpfs tmpfs "$w/ovl"; then
	mkdir "$w/ovl/lower" "$w/ovl/upper" "$w/ovl/work" "$w/ovl/merged"
	echo lower >"$w/ovl/lower/from-lower"
	if /usr/bin/mount -t overlay overlay \
		-o "lowerdir=$w/ovl/lower,upperdir=$w/ovl/upper,workdir=$w/ovl/work" "$w/ovl/merged"; then
		[ "$(cat "$w/ovl/merged/from-lower")" = lower ] &&
			write_check "$w/ovl/merged" overlay &&
			[ -e "$w/ovl/upper/file" ] && result=pass
		/usr/bin/umount "$w/ovl/merged" || result=fail
	fi
	/usr/bin/umount "$w/ovl" || result=fail
fi
report overlay "$result"

if grep -q "$w" /proc/1/mountinfo; then
	echo "selftest: FAIL: mounts leaked out of the private namespace"
	failures=$((failures + 1))
fi
rm -rf "$w"
echo "selftest: $failures failure(s)"
[ "$failures" -eq 0 ]
