#!/usr/bin/env bash
# One-shot GPU check: PyTorch CUDA latency of the teacher and the students, a short full-size
# distillation run with its Dice, the SDK on CUDA, TensorRT-RTX engines; JSON + Markdown in OUT_DIR.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--dry-run] [more benchmarks/gpu_check.py options]
#
# Works from a plain checkout with no network and without installing regionkd: the wheels placed
# in benchmarks/gpu_wheels/ (see its README.md) that this Python lacks are installed offline into
# a folder on PYTHONPATH (kept in /tmp and reused by the next run), and regionkd.{sdk,train,export}
# import from this checkout through a folder of symlinks. Everything runs under a hard timeout:
# about 7 min 50 s in all (GPU_CHECK_TOTAL_S), 4 min for a --dry-run (the CPU, tiny sizes).
#
# Environment: PYTHON (default python3), GPU_CHECK_WHEELS (default benchmarks/gpu_wheels),
# GPU_CHECK_SITE (default /tmp/regionkd-gpu-check-site), GPU_CHECK_TOTAL_S.
set -euo pipefail

start=$SECONDS
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run] [gpu_check.py options]" >&2
    exit 2
fi
out=$1
shift
dry=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry=1; done
py=${PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-$here/gpu_wheels}
site=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/regionkd-gpu-check-site}
if [[ $dry == 1 ]]; then total=${GPU_CHECK_TOTAL_S:-240}; else total=${GPU_CHECK_TOTAL_S:-470}; fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/regionkd-gpu-check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# regionkd is a namespace package: sdk/ -> regionkd.sdk, train/ -> regionkd.train, export/ -> regionkd.export
mkdir -p "$scratch/root/regionkd"
for sub in sdk train export; do ln -s "$repo/$sub" "$scratch/root/regionkd/$sub"; done

# offline install of what is missing (a wheel that does not install is reported, not fatal)
"$py" "$here/_gpu_wheels.py" "$wheels" "$site" "$out/wheels.json" || echo "wheel step failed: going on" >&2

export PYTHONPATH="$scratch/root:$site${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_WHEELS_REPORT="$out/wheels.json"
export PYTHONUNBUFFERED=1
left=$((total - (SECONDS - start)))
if [[ $left -lt 30 ]]; then
    echo "gpu_check.sh: only ${left} s left of ${total} s after the install step" >&2
    exit 1
fi
# the Python side plans its sections within --budget-s; timeout is the backstop
rc=0
timeout --kill-after=10 "$left" "$py" "$here/gpu_check.py" "$out" --budget-s $((left - 8)) "$@" || rc=$?
if [[ $rc == 124 || $rc == 137 ]]; then
    echo "gpu_check.sh: stopped at the ${total} s limit; $out/gpu_check.json holds the sections that finished" >&2
fi
echo "gpu_check.sh: $((SECONDS - start)) s in all (limit ${total} s), results in $out" >&2
exit $rc
