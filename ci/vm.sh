#!/bin/bash
# Run the crate's privileged tests inside VMs on several Debian kernels.
#
#   ci/vm.sh [--tests DIR] [--selftest] [--jobs N] [--timeout SECS] [KERNEL...]
#
# KERNEL: 5.10 (bullseye), 6.1 (bookworm), 6.12 (bookworm-security),
# 7.3 (trixie-backports); default: all four. Each VM is QEMU with TCG
# (no KVM needed), booting the Debian cloud kernel with an initramfs that
# runs every executable file of DIR (default target/vm-tests/, meant to be
# filled with static test binaries:
#   RUSTFLAGS='-C target-feature=+crt-static' \
#     cargo test --no-run --target x86_64-unknown-linux-gnu
# ) as root, each with the words of DIR/ARGS as arguments.
# --selftest runs the runner's own checks (ci/vm/selftest/) instead.
#
# Exits 0 when every test program passed on every kernel. Kernels and
# modules are cached in target/vm/<kernel>/ (delete it to fetch again);
# console logs are written to target/vm/<kernel>/console.log.
#
# Lines "matrix: <release> <fs> <idmap|chown|unsupported> <pass|fail>" in
# the guest's output are collected and printed together at the end (libtest
# captures the output of passing tests: put --nocapture in ARGS).
# The tests see VM_KERNEL=<KERNEL> in their environment.
#
# Environment: VM_JOBS (VMs at once, 1), VM_TIMEOUT (seconds per VM, 600),
# VM_MEMORY (2G), VM_CPUS (2), VM_APPEND (extra kernel parameters; NAME=value
# words become environment variables of the tests), VM_EXTRA_BINS (more host
# programs for the guest), DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vmdir=$root/ci/vm
cache=$root/target/vm
ALL_KERNELS=(5.10 6.1 6.12 7.3)

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
	exit "${1:-0}"
}

tests=$root/target/vm-tests
selftest=0
jobs=${VM_JOBS:-1}
timeout=${VM_TIMEOUT:-600}
kernels=()
while (($#)); do
	case "$1" in
	--tests) tests=${2:?--tests needs a directory}; shift 2 ;;
	--tests=*) tests=${1#*=}; shift ;;
	--selftest) selftest=1; shift ;;
	--jobs) jobs=${2:?--jobs needs a number}; shift 2 ;;
	--jobs=*) jobs=${1#*=}; shift ;;
	--timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
	--timeout=*) timeout=${1#*=}; shift ;;
	-h | --help) usage 0 ;;
	-*) echo "vm.sh: unknown option $1" >&2; usage 2 >&2 ;;
	*)
		case " ${ALL_KERNELS[*]} " in
		*" $1 "*) kernels+=("$1") ;;
		*) echo "vm.sh: unknown kernel $1 (known: ${ALL_KERNELS[*]})" >&2; exit 2 ;;
		esac
		shift
		;;
	esac
done
((${#kernels[@]})) || kernels=("${ALL_KERNELS[@]}")

work=$(mktemp -d "${TMPDIR:-/tmp}/vm-run.XXXXXX")
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
	local pidfile pid
	for pidfile in "$work"/*.qemu.pid; do
		[[ -e "$pidfile" ]] || continue
		pid=$(cat "$pidfile" 2>/dev/null) || continue
		if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == qemu-system-* ]]; then
			kill "$pid" 2>/dev/null || true
		fi
	done
	# Our own background jobs (fetches, VM runners), if any are left.
	local jobs_left
	jobs_left=$(jobs -p)
	if [[ -n "$jobs_left" ]]; then
		# shellcheck disable=SC2086 # a list of pids
		kill $jobs_left 2>/dev/null || true
		wait 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
t_start=$(now)

if ((!selftest)) && [[ ! -d "$tests" ]]; then
	echo "vm.sh: no test directory $tests; build the static test binaries first:" >&2
	echo "  RUSTFLAGS='-C target-feature=+crt-static' cargo test --no-run --target x86_64-unknown-linux-gnu" >&2
	exit 1
fi

# --- 1. host packages ----------------------------------------------------
t=$(now)
VM_NEED_CC=$selftest "$vmdir/host-deps.sh"
echo "vm.sh: host packages ready ($(elapsed "$t")s)"

# --- 2. kernels, fetched in parallel ---------------------------------------
t=$(now)
declare -A fetch_pid=()
for k in "${kernels[@]}"; do
	"$vmdir/fetch-kernel.sh" "$k" "$cache/$k" >"$work/$k.fetch.log" 2>&1 &
	fetch_pid[$k]=$!
done
fetch_failed=0
for k in "${kernels[@]}"; do
	if ! wait "${fetch_pid[$k]}"; then fetch_failed=1; fi
	sed "s/^/[$k] /" "$work/$k.fetch.log"
done
if ((fetch_failed)); then
	echo "vm.sh: fetching kernels failed" >&2
	exit 1
fi
echo "vm.sh: kernels ready ($(elapsed "$t")s)"

# --- 3. tests and initramfs ------------------------------------------------
if ((selftest)); then
	tests=$work/selftest
	mkdir -p "$tests"
	gcc -static -O2 -Wall -o "$tests/nsprivate" "$vmdir/selftest/nsprivate.c"
	cp "$vmdir/selftest/mounts.sh" "$tests/selftest-mounts"
fi
t=$(now)
for k in "${kernels[@]}"; do
	"$vmdir/mkinitramfs.sh" "$cache/$k" "$tests" "$work/$k.initramfs"
done
echo "vm.sh: initramfs images built ($(elapsed "$t")s): $(du -ch "$work"/*.initramfs | tail -1 | cut -f1) in all"

# --- 4. boot ---------------------------------------------------------------
run_vm() { # kernel: boot it, stream its console, write $work/<kernel>.result
	local k=$1 log=$cache/$1/console.log t rc marker status note
	t=$(now)
	set +e
	timeout -k 10 "$timeout" qemu-system-x86_64 \
		-accel tcg -cpu max -m "${VM_MEMORY:-2G}" -smp "${VM_CPUS:-2}" \
		-nographic -nodefaults -serial stdio -no-reboot \
		-pidfile "$work/$k.qemu.pid" \
		-kernel "$cache/$k/vmlinuz" -initrd "$work/$k.initramfs" \
		-append "console=ttyS0 panic=-1 loglevel=4 edd=off mitigations=off VM_KERNEL=$k ${VM_APPEND:-}" \
		</dev/null 2>&1 |
		sed -u 's/\r$//; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' |
		tee "$log" | sed -u "s/^/[$k] /"
	rc=${PIPESTATUS[0]}
	set -e
	marker=$(grep -a -o 'VM-EXIT-STATUS: [0-9]*' "$log" | tail -n 1 || true)
	status=${marker#VM-EXIT-STATUS: }
	note=ok
	if ((rc == 124 || rc == 137)); then
		note="timeout after ${timeout}s"
		status=124
	elif grep -a -q 'Kernel panic' "$log"; then
		note="kernel panic"
		status=${status:-1}
		((status)) || status=1
	elif [[ -z "$marker" ]]; then
		note="no exit status from the guest (qemu exited with $rc)"
		status=1
	elif ((status)); then
		note="$status test program(s) failed"
	fi
	echo "$status $(elapsed "$t") $note" >"$work/$k.result"
}

t=$(now)
for k in "${kernels[@]}"; do
	while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
	run_vm "$k" &
done
wait
echo "vm.sh: VMs done ($(elapsed "$t")s)"

# --- 5. summary ------------------------------------------------------------
echo
echo "=== matrix ==="
for k in "${kernels[@]}"; do
	# Anywhere in a line: libtest prints "test name ... " before a test's
	# own output, and kernel messages may interleave.
	grep -a -o -E 'matrix: [^ ]+ [^ ]+ (idmap|chown|unsupported) (pass|fail)' \
		"$cache/$k/console.log" || echo "[$k] (no matrix lines)"
done
echo
echo "=== results ==="
failed=0
for k in "${kernels[@]}"; do
	read -r status secs note <"$work/$k.result" || { status=1 secs="?" note="no result"; }
	boot=$(grep -a -o 'init: started at [0-9.]*s' "$cache/$k/console.log" | head -n 1 || true)
	printf '%-5s %-28s %6ss (kernel boot %6s)  %s\n' "$k" "$(cat "$cache/$k/release")" "$secs" \
		"${boot#init: started at }" "$([[ "$status" == 0 ]] && echo PASS || echo "FAIL ($note)")"
	[[ "$status" == 0 ]] || failed=1
done
echo "total: $(elapsed "$t_start")s"
exit "$failed"
