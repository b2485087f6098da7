#!/bin/bash
# Run the crate's privileged tests inside VMs on several Debian kernels.
#
#   ci/vm.sh [--no-build] [--test NAME]... [--tests DIR] [--selftest]
#            [--quiet] [--jobs N] [--timeout SECS] [KERNEL...]
#
# KERNEL: 5.10 (bullseye), 6.1 (bookworm), 6.12 (bookworm-security),
# 7.3 (trixie-backports); default: all four. Each VM is QEMU with TCG
# (no KVM needed), booting the Debian cloud kernel with an initramfs that
# runs every executable file directly in DIR (default target/vm-tests/) as
# root, each with the words of DIR/ARGS as arguments and the NAME=value
# lines of DIR/ENV in its environment. Subdirectories of DIR (such as bin/)
# go into the guest too, for programs the tests run, but are not run.
#
# First (unless --no-build, --tests or --selftest) the crate's test
# binaries are built statically for the guest, in target/vm-build/ (so the
# normal build cache stays valid):
#   RUSTFLAGS='-C target-feature=+crt-static' cargo test --release --no-run \
#     --target x86_64-unknown-linux-gnu --test NAME...
# and the mount-idmapped example likewise with cargo build --example. They
# replace the contents of target/vm-tests/: one executable per test target
# (named after it), bin/mount-idmapped, ARGS "--nocapture --test-threads=1"
# and ENV "MOUNT_IDMAPPED_BIN=/tests/bin/mount-idmapped" (where the guest
# has it). --test NAME (repeatable) picks the test targets; the default is
# VM_TEST_TARGETS (space separated), or "matrix mount userns cli helper ranges
# id_ranges resolve runtime cli_beneath rootfs chown".
# --tests DIR runs the binaries already in DIR instead (no build).
# --selftest runs the runner's own checks (ci/vm/selftest/) instead.
# --quiet prints only the tests' progress and results while the VMs run,
# and a failing kernel's whole console afterwards.
#
# Exits 0 when every test program passed on every kernel. Kernels and
# modules are cached in target/vm/<kernel>/ (delete it to fetch again);
# console logs are written to target/vm-console/<kernel>.log (not under
# target/vm/, which may be a kernel cache shared by several checkouts).
#
# Lines "matrix: <release> <fs> <idmap|chown|unsupported> <pass|fail>" in
# the guest's output are collected and printed together at the end (libtest
# captures the output of passing tests: hence --nocapture in ARGS), and so
# are the root-filesystem columns, "matrix-rootfs: <release>
# overlay=<fds|strings|staging|no> tmpfs=<idmap|no> <pass|fail>".
# The tests see VM_KERNEL=<KERNEL> in their environment.
#
# Environment: VM_TEST_TARGETS, VM_JOBS (VMs at once, 1), VM_TIMEOUT
# (seconds per VM, 600), VM_MEMORY (2G), VM_CPUS (2), VM_APPEND (extra
# kernel parameters; NAME=value words become environment variables of the
# tests), VM_EXTRA_BINS (more host programs for the guest), DEBIAN_MIRROR,
# DEBIAN_SECURITY_MIRROR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vmdir=$root/ci/vm
cache=$root/target/vm
consoles=$root/target/vm-console
mkdir -p "$consoles"
ALL_KERNELS=(5.10 6.1 6.12 7.3)

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
	exit "${1:-0}"
}

tests=$root/target/vm-tests
build=1
read -r -a test_targets <<<"${VM_TEST_TARGETS:-matrix mount userns cli helper ranges id_ranges resolve runtime cli_beneath rootfs chown}"
cli_test_targets=()
selftest=0
quiet=0
jobs=${VM_JOBS:-1}
timeout=${VM_TIMEOUT:-600}
kernels=()
while (($#)); do
	case "$1" in
	--tests) tests=${2:?--tests needs a directory} build=0; shift 2 ;;
	--tests=*) tests=${1#*=} build=0; shift ;;
	--no-build) build=0; shift ;;
	--test) cli_test_targets+=("${2:?--test needs a test target name}"); shift 2 ;;
	--test=*) cli_test_targets+=("${1#*=}"); shift ;;
	--selftest) selftest=1 build=0; shift ;;
	--quiet) quiet=1; shift ;;
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
((${#cli_test_targets[@]})) && test_targets=("${cli_test_targets[@]}")
if ((build && ${#test_targets[@]} == 0)); then
	echo "vm.sh: no test targets to build (VM_TEST_TARGETS is empty)" >&2
	exit 2
fi

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

if ((!selftest && !build)) && [[ ! -d "$tests" ]]; then
	echo "vm.sh: no test directory $tests; build the static test binaries first" >&2
	echo "  (ci/vm.sh without --no-build does)" >&2
	exit 1
fi

# --- 1. host packages ----------------------------------------------------
t=$(now)
VM_NEED_CC=$selftest "$vmdir/host-deps.sh"
echo "vm.sh: host packages ready ($(elapsed "$t")s)"

# --- 2. kernels, fetched in parallel (in the background during 3.) --------
t_fetch=$(now)
declare -A fetch_pid=()
for k in "${kernels[@]}"; do
	"$vmdir/fetch-kernel.sh" "$k" "$cache/$k" >"$work/$k.fetch.log" 2>&1 &
	fetch_pid[$k]=$!
done

# --- 3. static test binaries -------------------------------------------------
TARGET=x86_64-unknown-linux-gnu
artifacts() { # JSON messages on stdin; KIND NAME...: "NAME PATH" lines
	python3 -c '
import json, sys
kind, names = sys.argv[1], set(sys.argv[2:])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and kind in t.get("kind", []) and t.get("name") in names):
        print(t["name"], m["executable"])
' "$@"
}
build_tests() {
	local bdir=$root/target/vm-build name path args=() missing=()
	local -A exe=()
	for name in "${test_targets[@]}"; do args+=(--test "$name"); done
	# --target keeps RUSTFLAGS away from build scripts and proc macros,
	# which cannot be static.
	local cargo=(env -u CARGO_ENCODED_RUSTFLAGS
		RUSTFLAGS="-C target-feature=+crt-static${RUSTFLAGS:+ $RUSTFLAGS}" cargo)
	local cargo_opts=(--quiet --release --target "$TARGET" --target-dir "$bdir"
		--manifest-path "$root/Cargo.toml" --message-format=json-render-diagnostics)
	"${cargo[@]}" test --no-run "${cargo_opts[@]}" "${args[@]}" >"$work/build-tests.json" || {
		echo "vm.sh: building the test binaries failed" >&2
		return 1
	}
	"${cargo[@]}" build "${cargo_opts[@]}" --example mount-idmapped --example id-ranges >"$work/build-example.json" || {
		echo "vm.sh: building the mount-idmapped and id-ranges examples failed" >&2
		return 1
	}
	while read -r name path; do exe[$name]=$path; done < <(
		artifacts test "${test_targets[@]}" <"$work/build-tests.json"
		artifacts example mount-idmapped id-ranges <"$work/build-example.json" | sed 's/^/example:/'
	)
	for name in "${test_targets[@]}" example:mount-idmapped example:id-ranges; do
		[[ -n "${exe[$name]:-}" ]] || missing+=("$name")
	done
	if ((${#missing[@]})); then
		echo "vm.sh: cargo reported no executable for: ${missing[*]}" >&2
		return 1
	fi
	rm -rf "$tests"
	mkdir -p "$tests/bin"
	for name in "${test_targets[@]}"; do cp "${exe[$name]}" "$tests/$name"; done
	cp "${exe[example:mount-idmapped]}" "$tests/bin/mount-idmapped"
	cp "${exe[example:id-ranges]}" "$tests/bin/id-ranges"
	echo "--nocapture --test-threads=1" >"$tests/ARGS"
	printf '%s\n' "MOUNT_IDMAPPED_BIN=/tests/bin/mount-idmapped" \
		"ID_RANGES_BIN=/tests/bin/id-ranges" "IDMAPPED_TEST_SCALE=10" >"$tests/ENV"
}
build_failed=0
if ((build)); then
	t=$(now)
	if build_tests; then
		echo "vm.sh: built ${test_targets[*]} and mount-idmapped into ${tests#"$root"/} ($(elapsed "$t")s)"
	else
		build_failed=1 # reported once the fetches are done (not left running)
	fi
fi

# --- 4. wait for the kernels -------------------------------------------------
fetch_failed=0
for k in "${kernels[@]}"; do
	if ! wait "${fetch_pid[$k]}"; then fetch_failed=1; fi
	sed "s/^/[$k] /" "$work/$k.fetch.log"
done
if ((fetch_failed)); then
	echo "vm.sh: fetching kernels failed" >&2
	exit 1
fi
if ((build_failed)); then
	echo "vm.sh: nothing booted: the build failed" >&2
	exit 1
fi
echo "vm.sh: kernels ready ($(elapsed "$t_fetch")s since the fetch started)"

# --- 5. initramfs --------------------------------------------------------------
if ((selftest)); then
	tests=$work/selftest
	mkdir -p "$tests/bin"
	gcc -static -O2 -Wall -o "$tests/nsprivate" "$vmdir/selftest/nsprivate.c"
	cp "$vmdir/selftest/mounts.sh" "$tests/selftest-mounts"
	cp "$vmdir/selftest/tools.sh" "$tests/selftest-tools"
	# A helper that must not be run as a test (it fails without "ok").
	# shellcheck disable=SC2016 # $1 is the helper's
	printf '#!/bin/sh\n[ "$1" = ok ] && echo "helper ok"\n' >"$tests/bin/helper"
	chmod +x "$tests/bin/helper"
	printf 'SELFTEST_ENV=ok\nSELFTEST_HELPER=/tests/bin/helper\n' >"$tests/ENV"
fi
t=$(now)
for k in "${kernels[@]}"; do
	"$vmdir/mkinitramfs.sh" "$cache/$k" "$tests" "$work/$k.initramfs"
done
echo "vm.sh: initramfs images built ($(elapsed "$t")s): $(du -ch "$work"/*.initramfs | tail -1 | cut -f1) in all"

# --- 6. boot ---------------------------------------------------------------
progress() { # the console lines to show while a VM runs
	if ((quiet)); then
		grep -a --line-buffered -E 'VM-TEST-|VM-EXIT-STATUS|^test result:|SKIPPED|panicked|Kernel panic|init: (kernel|WARNING|modules that failed)' || true
	else
		cat
	fi
}
run_vm() { # kernel: boot it, stream its console, write $work/<kernel>.result
	local k=$1 log=$consoles/$1.log t rc marker status note
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
		tee "$log" | progress | sed -u "s/^/[$k] /"
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

# --- 7. summary ------------------------------------------------------------
echo
echo "=== matrix ==="
for k in "${kernels[@]}"; do
	# Anywhere in a line: libtest prints "test name ... " before a test's
	# own output, and kernel messages may interleave.
	grep -a -o -E 'matrix: [^ ]+ [^ ]+ (idmap|chown|unsupported) (pass|fail)' \
		"$consoles/$k.log" || echo "[$k] (no matrix lines)"
done
echo
echo "=== root filesystems (overlay of idmapped layers, fresh idmapped tmpfs) ==="
for k in "${kernels[@]}"; do
	grep -a -o -E 'matrix-rootfs: [^ ]+ overlay=[a-z]+ tmpfs=[a-z]+ (pass|fail)' \
		"$consoles/$k.log" || echo "[$k] (no matrix-rootfs line)"
done
echo
echo "=== results ==="
failed=0
for k in "${kernels[@]}"; do
	read -r status secs note <"$work/$k.result" || { status=1 secs="?" note="no result"; }
	boot=$(grep -a -o 'init: started at [0-9.]*s' "$consoles/$k.log" | head -n 1 || true)
	printf '%-5s %-28s %6ss (kernel boot %6s)  %s\n' "$k" "$(cat "$cache/$k/release")" "$secs" \
		"${boot#init: started at }" "$([[ "$status" == 0 ]] && echo PASS || echo "FAIL ($note)")"
	[[ "$status" == 0 ]] || failed=1
done
if ((quiet)); then
	for k in "${kernels[@]}"; do
		read -r status _ <"$work/$k.result" 2>/dev/null || status=1
		[[ "$status" == 0 ]] && continue
		echo
		echo "=== console of $k (failed) ==="
		sed "s/^/[$k] /" "$consoles/$k.log"
	done
fi
# Last, so that the tail of a long log still names what failed: each
# failing program, each failed test, and each panic with its message.
for k in "${kernels[@]}"; do
	read -r status _ <"$work/$k.result" 2>/dev/null || status=1
	[[ "$status" == 0 ]] && continue
	echo
	echo "=== what failed on $k ==="
	grep -a -E -A2 'VM-TEST-END: .* status=[1-9]|--- FAILED|panicked at|Kernel panic' "$consoles/$k.log" |
		sed "s/^/[$k] /" || echo "[$k] (no failing test named in the console)"
done
echo "total: $(elapsed "$t_start")s"
exit "$failed"
