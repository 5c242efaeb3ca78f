#!/usr/bin/env bash
# The GPU check (issue #18): one script, under 8 minutes on an H100/H200, run first whenever a GPU
# machine is lent (device tool: `run` with this script). It installs, runs the GPU tests, runs the GPU
# benchmark (fxpress cuda with dlight schedules and briefly tuned, vs torch.compile and ORT's CUDA
# provider), and writes benchmarks/results/gpu-<date>.{md,json} plus the pytest log. When $OUT is set
# (the device tool's output folder), the results are copied there too, so they come back.
# CI never runs this: it has no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y%m%d-%H%M)
res=benchmarks/results
mkdir -p "$res"
log="$res/gpu-$stamp-pytest.log"
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true; } | tee "$res/gpu-$stamp-device.txt"
git rev-parse --short HEAD >> "$res/gpu-$stamp-device.txt" 2>/dev/null || true
# The device machine reaches no package index: carry the wheels (device README: `pip download ... -d .whl`
# for Python 3.12 manylinux, torch's CUDA build included) and name `.whl` in the run's carry list.
if [ -d .whl ]; then
    python3 -m venv .venv && .venv/bin/python -m pip install -q --no-index --find-links .whl -e ".[test]" \
        || { echo "gpu_check: install from .whl failed"; exit 1; }
else
    timeout 240 bash scripts/setup.sh || { echo "gpu_check: set-up failed"; exit 1; }
fi
# 1. the GPU tests (they skip cleanly elsewhere)
timeout 150 .venv/bin/python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$log"
# 2. the GPU benchmark, small trials so the whole script stays under 8 minutes
timeout 180 .venv/bin/python benchmarks/bench_tuning.py --gpu --trials 8 --repeat 20 \
    --out "$res/gpu-$stamp" 2>&1 | tail -40
echo "gpu_check: done in $(( $(date +%s) - t0 )) s"
if [ -n "${OUT:-}" ]; then cp "$res"/gpu-"$stamp"* "$OUT"/ 2>/dev/null || true; fi
