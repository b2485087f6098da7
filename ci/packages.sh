#!/usr/bin/env bash
# The Debian packages the tests run programs from, installed with apt when
# missing: only what is missing, nothing else. ci/test.sh runs this first
# when it runs as root; .ci/run (CI) too. tests/common/mod.rs (TOOLS) names
# the program each package is needed for, and a test in tests/cli.rs checks
# that the two lists agree.
#
#   ci/packages.sh            as root: install the missing ones (apt-get)
#   ci/packages.sh --check    list the missing ones; exit 1 if there are any
#
# Also adds the rustfmt and clippy components through rustup when cargo
# lacks them (ci/test.sh runs both).
set -euo pipefail

PACKAGES=(e2fsprogs xfsprogs btrfs-progs dosfstools mount util-linux acl libcap2-bin coreutils)

check_only=false
case "${1:-}" in
--check) check_only=true ;;
"") ;;
*)
	echo "usage: ci/packages.sh [--check]" >&2
	exit 2
	;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
	echo "ci/packages.sh: not a Debian system (no dpkg-query): make sure the programs of these packages are installed: ${PACKAGES[*]}" >&2
	exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

tools_missing=()
cargo fmt --version >/dev/null 2>&1 || tools_missing+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || tools_missing+=(clippy)

if $check_only; then
	status=0
	if ((${#missing[@]})); then
		echo "missing Debian packages: ${missing[*]} (as root: ci/packages.sh, or apt-get install ${missing[*]})"
		status=1
	fi
	if ((${#tools_missing[@]})); then
		echo "missing Rust components: ${tools_missing[*]} (rustup component add ${tools_missing[*]})"
		status=1
	fi
	exit "$status"
fi

if ((${#missing[@]})); then
	if ((EUID != 0)); then
		echo "ci/packages.sh: missing ${missing[*]}; run as root to install them (apt-get)" >&2
		exit 1
	fi
	echo "ci/packages.sh: installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
	echo "ci/packages.sh: every package the tests need is installed"
fi

if ((${#tools_missing[@]})); then
	if command -v rustup >/dev/null 2>&1; then
		echo "ci/packages.sh: adding the Rust components ${tools_missing[*]}"
		rustup component add "${tools_missing[@]}"
	else
		echo "ci/packages.sh: cargo lacks ${tools_missing[*]} and there is no rustup to add them" >&2
		exit 1
	fi
fi
