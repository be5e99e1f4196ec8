#!/usr/bin/env bash
# Builds the upstream kvm-unit-tests suite in a scratch directory and runs its x86 tests with the
# suite's own runner (run_tests.sh) against hopvm, through a link named qemu-system-x86_64; then
# compares every result with guest-tests/kvm-unit-tests.expect. Fails when a test does worse
# than expected (a test expected to PASS does not, one expected to SKIP fails, the runner skips
# a test because the VMM refused its command line); reports a test that does better.
#
# Usage: resources/kvm-unit-tests.sh [--qemu PATH] [--results FILE] [--keep]
#   --qemu PATH     run another VMM (e.g. /usr/bin/qemu-system-x86_64, QEMU 7.2) and compare it
#                   with the expectations' QEMU column instead of hopvm's
#   --results FILE  also write the results there (one line per test: NAME RESULT [detail])
#   --keep          keep the scratch directory (the suite, its logs/) and print where it is
# Environment: HOPVM (default target/debug/hopvm), KUT_TARBALL (the suite's archive; default
# ../shared/kvm-unit-tests/kvm-unit-tests-*.tar.gz beside the repository), KUT_TIMEOUT (per
# test, default 30s), KUT_HANG_TIMEOUT (for tests expected to time out, default 5s).
#
# The suite is GPL-2.0 and is never copied into this repository: it is unpacked and built in a
# temporary directory each run (a few seconds with gcc and binutils).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
expect="$root/guest-tests/kvm-unit-tests.expect"

vmm="" results="" keep=no
while [ $# -gt 0 ]; do
    case "$1" in
        --qemu) vmm=${2:?--qemu needs a path}; shift ;;
        --results) results=${2:?--results needs a file}; shift ;;
        --keep) keep=yes ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "kvm-unit-tests.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done

# The archive: beside the repository in CI (a fresh clone with shared/ next to it); from a git
# worktree, beside the main checkout.
find_tarball() {
    local dir
    for dir in "$root/.." "$(git -C "$root" rev-parse --path-format=absolute --git-common-dir 2>/dev/null)/../.."; do
        compgen -G "$dir/shared/kvm-unit-tests/kvm-unit-tests-*.tar.gz" | sort | tail -1 && return 0
    done
    return 1
}
tarball=${KUT_TARBALL:-$(find_tarball || true)}
if [ -z "$tarball" ] || [ ! -f "$tarball" ]; then
    echo "kvm-unit-tests.sh: the suite's archive is missing (../shared/kvm-unit-tests/ beside" \
        "the repository, or KUT_TARBALL)" >&2
    exit 1
fi

if [ -n "$vmm" ]; then
    column=3 label=$(basename "$vmm")
    [ -x "$vmm" ] || { echo "kvm-unit-tests.sh: $vmm is not executable" >&2; exit 1; }
    vmm=$(readlink -f "$vmm")
else
    column=2 label=hopvm
    vmm=$(readlink -f "${HOPVM:-$root/target/debug/hopvm}")
    [ -x "$vmm" ] || { echo "kvm-unit-tests.sh: build hopvm first ($vmm)" >&2; exit 1; }
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hopvm-kut.XXXXXX")
cleanup() {
    if [ "$keep" = yes ]; then echo "kvm-unit-tests: suite and logs kept in $work/suite"; else rm -rf "$work"; fi
}
trap cleanup EXIT
mkdir -p "$work/suite" "$work/bin"
tar -xzf "$tarball" -C "$work/suite"
ln -s "$vmm" "$work/bin/qemu-system-x86_64"
start=$SECONDS
(cd "$work/suite" && ./configure >"$work/build.log" 2>&1 && make -j2 >>"$work/build.log" 2>&1) || {
    tail -20 "$work/build.log" >&2
    echo "kvm-unit-tests.sh: the suite did not build" >&2
    exit 1
}
echo "kvm-unit-tests: built $(basename "$tarball") in $((SECONDS - start)) s"

# Expected results: NAME HOPVM QEMU REASON...
declare -A want
hang=()
while read -r name h q _; do
    case "$name" in ''|'#'*) continue ;; esac
    [ "$column" = 2 ] && r=$h || r=$q
    want[$name]=$r
    [ "$r" = TIMEOUT ] && hang+=("$name")
done <"$expect"

cd "$work/suite"
all=$(./run_tests.sh -l | awk '{print $1}')
normal=()
for t in $all; do
    [ "${want[$t]:-}" = TIMEOUT ] || normal+=("$t")
done

run() { # TIMEOUT LOGDIR TESTS...
    local timeout=$1 logs=$2
    shift 2
    [ $# -gt 0 ] || return 0
    QEMU="$work/bin/qemu-system-x86_64" ACCEL=kvm TIMEOUT=$timeout unittest_log_dir=$logs \
        ./run_tests.sh -j 2 "$@" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | tee -a "$work/output.txt"
}
start=$SECONDS
run "${KUT_TIMEOUT:-30s}" logs "${normal[@]}"
run "${KUT_HANG_TIMEOUT:-5s}" logs-hang "${hang[@]}"
echo "kvm-unit-tests: ran $(wc -w <<<"$all") tests on $label in $((SECONDS - start)) s"

# NAME RESULT [detail]. A timeout is its own result, and so is REFUSED: the runner skipped the
# test because the VMM refused its command line (its probe with a missing kernel failed).
awk '/^(PASS|FAIL|SKIP) / {
        r = $1; name = $2; $1 = ""; $2 = ""; sub(/^ +/, "")
        if (r == "FAIL" && $0 ~ /^\(timeout;/) r = "TIMEOUT"
        if (r == "SKIP" && $0 ~ /^\((hopvm|qemu-system-x86_64):/) r = "REFUSED"
        print name, r, $0
    }' "$work/output.txt" | sort >"$work/results.txt"
[ -n "$results" ] && cp "$work/results.txt" "$results"

# Worse = lower rank than expected: PASS > SKIP > FAIL, TIMEOUT > REFUSED.
rank() { case "$1" in PASS) echo 3 ;; SKIP) echo 2 ;; FAIL|TIMEOUT) echo 1 ;; *) echo 0 ;; esac; }
worse=0 better=0
declare -A seen
while read -r name got detail; do
    seen[$name]=1
    exp=${want[$name]:-}
    if [ -z "$exp" ]; then
        echo "NEW      $name: $got $detail (not in $(basename "$expect"))"
        worse=$((worse + 1))
    elif [ "$got" = "$exp" ]; then
        :
    elif [ "$(rank "$got")" -lt "$(rank "$exp")" ]; then
        echo "WORSE    $name: expected $exp, got $got $detail (log: logs*/$name.log)"
        worse=$((worse + 1))
    elif [ "$(rank "$got")" -gt "$(rank "$exp")" ]; then
        echo "BETTER   $name: expected $exp, got $got $detail: update $(basename "$expect")"
        better=$((better + 1))
    else
        echo "CHANGED  $name: expected $exp, got $got $detail"
    fi
done <"$work/results.txt"
for name in "${!want[@]}"; do
    [ -n "${seen[$name]:-}" ] || { echo "MISSING  $name: in the expectations, not run"; worse=$((worse + 1)); }
done
pass=$(awk '$2 == "PASS"' "$work/results.txt" | wc -l)
echo "kvm-unit-tests on $label: $pass passed; $worse worse than expected, $better better"
if [ "$worse" -gt 0 ]; then
    keep=yes
    exit 1
fi
