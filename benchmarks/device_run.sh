#!/usr/bin/env bash
# The GPU run (docs/benchmarks/gpu.md says how to prepare and call it). On the lent machine, in the repository root:
#   bash benchmarks/device_run.sh [device_run options]        (device tool: carry .whl and .device-data)
# Installs the carried wheels, prints the machine, then runs python -m benchmarks.device_run; everything it
# measures, and this log, goes to $OUT. Extra arguments go to device_run (the CPU test passes --device cpu --size tiny).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/results/device}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}  # the carried wheels (CPython 3.12, the GPU machine's); the CPU test sets none

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" --version
if [ -d "$WHEELS" ] && [ -n "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
    echo "== installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "== carried wheels, as benchmarks/device_prepare.py resolved them"
    cat "$WHEELS/carried.txt" 2>/dev/null || echo "no $WHEELS/carried.txt: run python -m benchmarks.device_prepare again"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the plugin from the working tree (its start-up hook: see device_run)
"$PYTHON" -m benchmarks.device_run --data "${DEVICE_DATA:-.device-data}" --out "$OUT" "$@"
