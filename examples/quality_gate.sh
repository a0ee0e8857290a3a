#!/usr/bin/env bash
# Use fewstep from a CI shell script: read the JSON result from the last stdout line, rely on exit
# codes (0 ok, 2 bad input). Fails if the teacher's 16-step samples drift from the data.
#
#   bash examples/quality_gate.sh [TEACHER] [MAX_SWD]
set -euo pipefail
teacher=${1:-toy:checkerboard}
max_swd=${2:-0.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fewstep sample --teacher "$teacher" --steps 16 --num 4096 --out "$work/samples.npz" --json 2>/dev/null \
  | tail -n 1 > "$work/sample.json"
fewstep eval swd --samples "$work/samples.npz" --json 2>/dev/null | tail -n 1 > "$work/eval.json"
swd=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["value"])' "$work/eval.json")
echo "teacher=$teacher steps=16 swd=$swd (gate: <= $max_swd)"

# bad input is exit code 2 with one line on stderr
set +e
fewstep sample --teacher "$teacher" --solver bogus --num 4 2> "$work/err.txt"
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "expected exit code 2 for a bad solver, got $rc"; exit 1; }
echo "bad input -> exit $rc: $(cat "$work/err.txt")"

python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)' "$swd" "$max_swd"
