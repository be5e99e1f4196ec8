#!/usr/bin/env bash
# Renders guest-tests/kvm-unit-tests.expect as the README's kvm-unit-tests result table (test,
# QEMU 7.2 here, hopvm, why), with a summary line, and writes it into README.md between the
# markers "<!-- kvm-unit-tests table -->" and "<!-- end kvm-unit-tests table -->".
#
# Usage: resources/kvm-unit-tests-table.sh [--hopvm RESULTS] [--qemu RESULTS] [--print]
#   --hopvm / --qemu RESULTS  results of a run (resources/kvm-unit-tests.sh --results FILE, with
#                             or without --qemu): the table shows them instead of the expected
#                             column, and every difference is listed on stderr
#   --print                   print the table instead of rewriting README.md
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hopvm="" qemu="" print=no
while [ $# -gt 0 ]; do
    case "$1" in
        --hopvm) hopvm=${2:?}; shift ;;
        --qemu) qemu=${2:?}; shift ;;
        --print) print=yes ;;
        *) echo "kvm-unit-tests-table.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done

python3 - "$root/guest-tests/kvm-unit-tests.expect" "$root/README.md" "$hopvm" "$qemu" "$print" <<'PY'
import sys

expect_path, readme_path, hopvm_path, qemu_path, print_only = sys.argv[1:6]
rows = []
for line in open(expect_path):
    if not line.strip() or line.startswith("#"):
        continue
    parts = line.split(None, 3)
    name, hopvm, qemu = parts[:3]
    why = parts[3].strip() if len(parts) > 3 else ""
    rows.append([name, qemu, hopvm, why])


def results(path):
    out = {}
    if path:
        for line in open(path):
            parts = line.split(None, 2)
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
    return out


ran = {1: results(qemu_path), 2: results(hopvm_path)}
for row in rows:
    for col, label in ((1, "qemu-7.2"), (2, "hopvm")):
        got = ran[col].get(row[0])
        if ran[col] and got is None:
            print(f"{row[0]}: not in the {label} results", file=sys.stderr)
        elif got and got != row[col]:
            print(f"{row[0]}: {label} expected {row[col]}, ran {got}", file=sys.stderr)
            row[col] = got

both = sum(1 for r in rows if r[1] == "PASS" and r[2] == "PASS")
qpass = sum(1 for r in rows if r[1] == "PASS")
hpass = sum(1 for r in rows if r[2] == "PASS")
only_q = [r[0] for r in rows if r[1] == "PASS" and r[2] != "PASS"]
only_h = [r[0] for r in rows if r[2] == "PASS" and r[1] != "PASS"]
lines = [
    f"{len(rows)} tests; PASS: QEMU 7.2 {qpass}, hopvm {hpass}, both {both}."
    + (f" Only QEMU: {', '.join(only_q)}." if only_q else "")
    + (f" Only hopvm: {', '.join(only_h)}." if only_h else ""),
    "",
    "| test | QEMU 7.2 here | hopvm | why not PASS |",
    "|---|---|---|---|",
]
for name, q, h, why in rows:
    lines.append(f"| `{name}` | {q} | {h} | {why.replace('|', '/')} |")
table = "\n".join(lines) + "\n"

if print_only == "yes":
    sys.stdout.write(table)
    sys.exit(0)
begin, end = "<!-- kvm-unit-tests table -->\n", "<!-- end kvm-unit-tests table -->\n"
text = open(readme_path).read()
if begin not in text or end not in text:
    sys.exit(f"{readme_path}: the table markers are missing")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open(readme_path, "w").write(head + begin + table + end + tail)
print(f"README.md: kvm-unit-tests table of {len(rows)} tests written")
PY
