#!/bin/bash
# Fetch one Debian cloud kernel and the modules the VM tests need.
#
#   ci/vm/fetch-kernel.sh KERNEL OUTDIR
#
# KERNEL is one of 5.10, 6.1, 6.12, 7.3. The packages are fetched with a
# private apt configuration (own sources.list, state and cache), so the
# host's apt setup is neither used nor changed. The version is resolved
# through the suite's meta package. OUTDIR receives:
#   vmlinuz        the kernel image
#   release        its `uname -r`
#   packages       the packages (name=version) it came from
#   lib/modules/<release>/...   the needed modules, decompressed
#   lib/modules/<release>/load.list   those modules in load order
# A file OUTDIR/.complete marks a finished fetch; nothing is fetched again
# while it exists.
set -euo pipefail

kernel=${1:?usage: fetch-kernel.sh KERNEL OUTDIR}
out=${2:?usage: fetch-kernel.sh KERNEL OUTDIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

case "$kernel" in
5.10) url=$mirror suite=bullseye meta=linux-image-cloud-amd64 ;;
6.1) url=$mirror suite=bookworm meta=linux-image-cloud-amd64 ;;
6.12) url=$security_mirror suite=bookworm-security meta=linux-image-6.12-cloud-amd64 ;;
7.3) url=$mirror suite=trixie-backports meta=linux-image-cloud-amd64 ;;
*)
	echo "fetch-kernel: unknown kernel '$kernel' (known: 5.10 6.1 6.12 7.3)" >&2
	exit 2
	;;
esac

# Modules the tests need (loop devices, the filesystems and what they use).
# Names missing from a kernel are built in (or do not exist there): skipped.
WANTED=(
	loop ext4 xfs btrfs vfat msdos fat overlay
	nls_cp437 nls_ascii nls_utf8 nls_iso8859_1
	libcrc32c crc32c_generic crc32c_intel crc32_generic
	xxhash_generic blake2b_generic sha256_generic
)

if [[ -e "$out/.complete" ]]; then
	echo "fetch-kernel $kernel: cached in $out ($(cat "$out/release"))"
	exit 0
fi

log() { echo "fetch-kernel $kernel: $*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vm-fetch-$kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- private apt configuration ------------------------------------------
mkdir -p "$work/apt/etc/sources.list.d" "$work/apt/etc/preferences.d" \
	"$work/apt/state/lists/partial" "$work/apt/cache/archives/partial"
echo "deb [signed-by=$keyring] $url $suite main" >"$work/apt/etc/sources.list"
touch "$work/apt/status"
APT_OPTS=(
	-o "Dir::Etc::SourceList=$work/apt/etc/sources.list"
	-o "Dir::Etc::SourceParts=$work/apt/etc/sources.list.d"
	-o "Dir::Etc::Preferences=$work/apt/etc/preferences"
	-o "Dir::Etc::PreferencesParts=$work/apt/etc/preferences.d"
	-o "Dir::State=$work/apt/state"
	-o "Dir::State::status=$work/apt/status"
	-o "Dir::Cache=$work/apt/cache"
	-o "APT::Architecture=amd64"
	-o "APT::Architectures=amd64"
	-o "Acquire::Languages=none"
	-o "APT::Sandbox::User=root"
	-o "Debug::NoLocking=1"
)

log "apt-get update ($suite)"
apt-get "${APT_OPTS[@]}" -qq update

# Follow Depends from the meta package to the real packages that carry the
# kernel image and its modules: linux-image-<abi>-* (up to trixie), or
# linux-binary-<abi>-* and linux-modules-<abi>-* (newer packaging).
declare -A seen=()
queue=("$meta")
pkgs=()
while ((${#queue[@]})); do
	p=${queue[0]}
	queue=("${queue[@]:1}")
	[[ -n "${seen[$p]:-}" ]] && continue
	seen[$p]=1
	if [[ "$p" =~ ^linux-(image|binary|modules)-[0-9] ]]; then
		pkgs+=("$p")
	fi
	while read -r dep; do
		case "$dep" in
		linux-image-* | linux-binary-* | linux-modules-*) queue+=("$dep") ;;
		esac
	done < <(apt-cache "${APT_OPTS[@]}" depends --no-recommends --no-suggests \
		--no-conflicts --no-breaks --no-replaces --no-enhances "$p" |
		sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \([^<][^ ]*\)$/\2/p')
done
if ((${#pkgs[@]} == 0)); then
	echo "fetch-kernel $kernel: $meta in $suite leads to no kernel package" >&2
	exit 1
fi
log "packages: ${pkgs[*]}"

(cd "$work" && apt-get "${APT_OPTS[@]}" -qq download "${pkgs[@]}")
mkdir -p "$work/root"
for deb in "$work"/*.deb; do
	dpkg-deb -x "$deb" "$work/root"
done

# --- kernel image ------------------------------------------------------
# boot/vmlinuz-<release> up to trixie; <modules>/<release>/vmlinuz in the
# newer linux-binary-* packages.
shopt -s nullglob
images=("$work"/root/boot/vmlinuz-* "$work"/root/{usr/,}lib/modules/*/vmlinuz)
if ((${#images[@]} != 1)); then
	echo "fetch-kernel $kernel: expected one kernel image, found ${#images[@]}" >&2
	exit 1
fi
image=${images[0]}
if [[ "$image" == */boot/vmlinuz-* ]]; then
	release=${image##*/vmlinuz-}
else
	release=${image%/vmlinuz}
	release=${release##*/}
fi
if [[ "$release" != "$kernel".* ]]; then
	echo "fetch-kernel $kernel: WARNING: $meta in $suite is now $release" >&2
fi
moddir=
for d in "$work/root/lib/modules/$release" "$work/root/usr/lib/modules/$release"; do
	if [[ -d "$d" ]]; then moddir=$d; fi
done
if [[ -z "$moddir" ]]; then
	echo "fetch-kernel $kernel: no modules directory for $release" >&2
	exit 1
fi

# --- module closure ----------------------------------------------------
# Debian ships no modules.dep: read each module's own .modinfo instead.
declare -A path_of=()
while IFS= read -r -d '' f; do
	n=${f##*/}
	n=${n%%.ko*}
	path_of[${n//-/_}]=$f
done < <(find "$moddir" -name '*.ko*' -print0)

decompressed() { # module file -> decompressed bytes on stdout
	case "$1" in
	*.ko.xz) xz -dc "$1" ;;
	*.ko.zst) zstd -qdc "$1" ;;
	*.ko.gz) gzip -dc "$1" ;;
	*) cat "$1" ;;
	esac
}

dest=$out.tmp
rm -rf "$dest"
mkdir -p "$dest/lib/modules/$release"
declare -A state=()
order=()
visit() { # depth-first, dependencies (and soft pre-dependencies) first
	local name=${1//-/_} src rel info dep
	[[ -n "${path_of[$name]:-}" ]] || return 0
	[[ -n "${state[$name]:-}" ]] && return 0
	state[$name]=visiting
	src=${path_of[$name]}
	rel=${src#"$moddir"/}
	rel=${rel%%.ko*}.ko
	mkdir -p "$dest/lib/modules/$release/${rel%/*}"
	decompressed "$src" >"$dest/lib/modules/$release/$rel"
	info=$(tr '\0' '\n' <"$dest/lib/modules/$release/$rel" | grep -a -E '^(depends|softdep)=' || true)
	for dep in $(sed -n 's/^depends=//p' <<<"$info" | tr ',' ' ') \
		$(sed -n 's/^softdep=//p' <<<"$info" | sed 's/post:.*//; s/pre://g'); do
		visit "$dep"
	done
	state[$name]=loaded
	order+=("$rel")
}
skipped=()
for m in "${WANTED[@]}"; do
	if [[ -n "${path_of[${m//-/_}]:-}" ]]; then
		visit "$m"
	else
		skipped+=("$m")
	fi
done
printf '%s\n' "${order[@]}" >"$dest/lib/modules/$release/load.list"
for f in modules.builtin modules.builtin.modinfo modules.order; do
	if [[ -e "$moddir/$f" ]]; then cp "$moddir/$f" "$dest/lib/modules/$release/"; fi
done
log "modules (${#order[@]}): $(printf '%s ' "${order[@]##*/}")"
log "not modules here (built in or absent): ${skipped[*]}"

cp "$image" "$dest/vmlinuz"
echo "$release" >"$dest/release"
for deb in "$work"/*.deb; do
	# shellcheck disable=SC2016 # dpkg-deb expands these, not the shell
	dpkg-deb --show --showformat='${Package}=${Version}\n' "$deb" >>"$dest/packages"
done
touch "$dest/.complete"
rm -rf "$out"
mv "$dest" "$out"
log "done: $release (${SECONDS}s)"
