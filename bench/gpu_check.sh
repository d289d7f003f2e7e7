#!/usr/bin/env bash
# Every GPU check in one command (about 8 minutes on an H200): the gpu-marked
# tests, then the GPU benchmark. Logs and tables go to $OUT (or bench/results).
# On the lent machine (see ../shared/device/README.md), after installing .whl/:
#   PYTHONUNBUFFERED=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout 300 python3 bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log"
