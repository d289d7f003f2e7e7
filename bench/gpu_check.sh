#!/usr/bin/env bash
# Every GPU check in one command (at most 8 minutes, by its two timeouts; untimed
# on an H200 so far): the gpu-marked tests, then the GPU benchmark at 1M tokens
# (pass GPU_BENCH_ARGS="--seq-lens 1048576,2097152" for 2M too). Logs and tables
# go to $OUT (or bench/results).
# On the lent machine (see ../shared/device/README.md), after installing .whl/:
#   PYTHONUNBUFFERED=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # the bit-equality tests run in deterministic mode
timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
# shellcheck disable=SC2086
timeout 280 python3 bench/gpu_bench.py --out "$OUT" --seq-lens 1048576 --guard-len 524288 \
  ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu-bench.log"
