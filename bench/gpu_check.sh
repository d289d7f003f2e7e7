#!/usr/bin/env bash
# Every GPU check in one command, at most 8 minutes by its own time limits: the
# gpu-marked tests, then the GPU benchmark one section at a time (each with its
# own limit, so one slow or failing section leaves the others' rows). Logs and
# tables go to $OUT (or bench/results), row by row.
# On the lent machine (see ../shared/device/README.md), after installing .whl/:
#   PYTHONUNBUFFERED=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"  # bench/ scripts import the package
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
rm -f "$OUT/gpu.json" "$OUT/gpu.md" "$OUT/pending.json"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$OUT/env.txt"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # the bit-equality tests run in deterministic mode
bench() {  # limit-in-seconds, then gpu_bench arguments
  local limit=$1; shift
  echo "== gpu_bench $* (limit ${limit}s)" | tee -a "$OUT/gpu-bench.log"
  timeout "$limit" python3 bench/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu-bench.log"
  if [ "${PIPESTATUS[0]}" = 124 ]; then  # leave a row saying what the limit stopped
    python3 bench/gpu_bench.py cut --out "$OUT" --limit "$limit" --seq-len "$3" --what "$1 section" \
      2>&1 | tee -a "$OUT/gpu-bench.log"
  fi
}
timeout 150 python3 -m pytest -q --durations=10 -m gpu tests/test_gpu.py \
  tests/kernels/test_cuda_gpu_paths.py 2>&1 | tee "$OUT/gpu-tests.log"
bench 100 fwd --seq-len 1048576
bench 50 guard --seq-len 524288
bench 110 bwd --seq-len 1048576 --pipeline-itr 1
bench 70 fwd --seq-len 2097152 --itrs 2
