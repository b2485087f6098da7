#!/bin/bash
# Install the host packages the VM runner needs, idempotently.
# Works on a Debian bookworm machine that only has the base bookworm sources:
# the bookworm-backports source is added when missing (QEMU comes from there).
set -euo pipefail

# Packages from the base suites.
BASE_PKGS=(
	busybox-static cpio e2fsprogs xfsprogs btrfs-progs dosfstools util-linux
	mount zstd xz-utils debian-archive-keyring ca-certificates
)
if [[ "${VM_NEED_CC:-0}" == 1 ]]; then
	BASE_PKGS+=(gcc libc6-dev)
fi
# Packages taken from bookworm-backports.
BPO_PKGS=(qemu-system-x86)

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BPO_SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources

missing() {
	local p status
	for p in "$@"; do
		status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
		[[ "$status" == installed ]] || printf '%s\n' "$p"
	done
}

has_bpo_source() {
	grep -rqsE '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
		/etc/apt/sources.list /etc/apt/sources.list.d/
}

mapfile -t need_base < <(missing "${BASE_PKGS[@]}")
mapfile -t need_bpo < <(missing "${BPO_PKGS[@]}")
if ((${#need_base[@]} == 0 && ${#need_bpo[@]} == 0)); then
	exit 0
fi

if [[ $(id -u) != 0 ]]; then
	echo "host-deps: missing packages (${need_base[*]} ${need_bpo[*]}); run as root" >&2
	exit 1
fi

if ((${#need_bpo[@]})) && ! has_bpo_source; then
	echo "host-deps: adding $BPO_SOURCES"
	cat >"$BPO_SOURCES" <<SRC
Types: deb
URIs: $MIRROR
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
echo "host-deps: installing ${need_base[*]} ${need_bpo[*]}"
apt-get update -qq
if ((${#need_base[@]})); then
	apt-get install -y -qq --no-install-recommends "${need_base[@]}"
fi
if ((${#need_bpo[@]})); then
	apt-get install -y -qq --no-install-recommends -t bookworm-backports "${need_bpo[@]}"
fi
