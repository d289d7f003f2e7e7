"""Host memory is bounded by the plan, not by the store size.

Each operation runs in a fresh subprocess (tests/scripts/mem_probe.py) that
reports its peak RSS (VmHWM, its own address space's high-water mark; not
ru_maxrss, which Linux carries over from the pytest parent across exec) after
imports and after opening the store (the baseline) and after the operation;
the growth between the two is what the operation needed. A forward must
show some growth, or the probe measured nothing. Two stores 4x apart in heads share L, D, the
chunking, itr and head_group, so every task of the pass is the same size in
both; the large one holds >= 1 GiB of inputs.

Measured per store:

- create: create_random, which writes chunk by chunk and ends by
  fingerprinting the inputs;
- input check: storage.fingerprint, the check of the inputs that run()
  does first unless check_inputs=False;
- forward: run(itr=2, head_group=8), input check included (partials dropped
  as parents finish, to bound the disk the test needs: kept, they would be
  ~4.5 GB; this does not change what a task holds in memory).

Two further stores of a single chunk row (L = chunk_tokens = 512, heads 128
vs 512) guard the input check and create against reading a whole chunk row
of all heads at once: on such a store that would be the whole store. (Before
commit 6d599e9 the fingerprint did exactly that, holding 2 x heads x
chunk_tokens x head_dim x itemsize: create grew 72 vs 270 MiB on these.)

The figures are printed (pytest -s) and written to bench/results/memory.json.
These tests take ~2 minutes on 2 cores, so they are marked slow.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).parents[1] / "scripts" / "mem_probe.py"
RESULTS = ROOT / "bench" / "results" / "memory.json"

MIB = 1 << 20
BOUND_MIB = 300  # growth allowed to any one operation on the >= 1 GiB store
SLACK_MIB = 64  # growth the large store may need beyond the small one

# float32 inputs, so no dtype conversion sits between the store and the kernels.
SHAPE = dict(seq_len=2048, head_dim=128, dtype="float32")
HEADS = {"small": 88, "large": 352}  # kv_heads = heads; 4x apart
# One chunk row (default chunk_tokens for L = 512 is 512): reading a chunk row of all
# heads at once would hold the whole store.
ROW_SHAPE = dict(seq_len=512, head_dim=128, dtype="float32")
ROW_HEADS = {"row_small": 128, "row_large": 512}
ITR, HEAD_GROUP, WORKERS = 2, 8, 2


def _probe(*args: str) -> dict:
    cmd = [sys.executable, str(PROBE), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _create_and_check(path: Path, shape: dict, heads: int) -> tuple[dict, dict, int]:
    create = _probe(
        "create",
        str(path),
        "--seq-len",
        str(shape["seq_len"]),
        "--heads",
        str(heads),
        "--head-dim",
        str(shape["head_dim"]),
        "--dtype",
        shape["dtype"],
        "--causal",
    )
    input_bytes = sum(_dir_bytes(path / name) for name in ("q", "k", "v"))
    check = _probe("fingerprint", str(path))
    return create, check, input_bytes


def _figures(heads: int, input_bytes: int, **results: dict) -> dict:
    return {
        "heads": heads,
        "input_bytes_on_disk": input_bytes,
        "input_gib": round(input_bytes / (1 << 30), 3),
        **{
            f"{name}_{key}": round(res[key], 1) if key != "seconds" else round(res[key], 2)
            for name, res in results.items()
            for key in ("growth_mib", "seconds")
        },
    }


def _measure_row(path: Path, heads: int) -> dict:
    create, check, input_bytes = _create_and_check(path, ROW_SHAPE, heads)
    out = _figures(heads, input_bytes, create=create, input_check=check)
    out["chunk_tokens"] = check["problem"]["chunk_tokens"]
    return out


def _measure(path: Path, heads: int) -> dict:
    create, check, input_bytes = _create_and_check(path, SHAPE, heads)
    forward = _probe(
        "run",
        str(path),
        "--itr",
        str(ITR),
        "--head-group",
        str(HEAD_GROUP),
        "--workers",
        str(WORKERS),
    )
    return {
        **_figures(heads, input_bytes, create=create, input_check=check, forward=forward),
        "problem": forward["problem"],
        "plan": forward["plan"],
        "units_run": forward["units_run"],
        "baseline_mib": round(forward["baseline_kib"] / 1024, 1),
        "forward_peak_mib": round(forward["peak_kib"] / 1024, 1),
    }


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    if sys.platform != "linux":
        pytest.skip("the probe reads /proc/self/status (Linux)")
    res: dict = {
        "what": "peak RSS growth (VmHWM after - baseline after imports and opening "
        "the store) of one operation in a fresh process",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {
            **SHAPE,
            "is_causal": True,
            "itr": ITR,
            "head_group": HEAD_GROUP,
            "workers": WORKERS,
            "keep_partials": False,
            "forward_check_inputs": True,
        },
        "bounds_mib": {"large_store_any_operation": BOUND_MIB, "large_minus_small": SLACK_MIB},
        "one_chunk_row_config": {**ROW_SHAPE, "is_causal": True},
    }
    stores = [(label, h, _measure) for label, h in HEADS.items()]
    stores += [(label, h, _measure_row) for label, h in ROW_HEADS.items()]
    for label, heads, measure in stores:
        path = tmp_path_factory.mktemp(f"mem-{label}") / "store.zarr"
        try:
            res[label] = measure(path, heads)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nmemory figures (also in {RESULTS.relative_to(ROOT)}):")
    for label in HEADS:
        r = res[label]
        print(
            f"  {label}: H={r['heads']} inputs {r['input_gib']} GiB, {r['units_run']} units | "
            f"growth MiB: create {r['create_growth_mib']}, input check "
            f"{r['input_check_growth_mib']}, forward {r['forward_growth_mib']} "
            f"(baseline {r['baseline_mib']}) | s: create {r['create_seconds']}, check "
            f"{r['input_check_seconds']}, forward {r['forward_seconds']}"
        )
    for label in ROW_HEADS:
        r = res[label]
        print(
            f"  {label}: H={r['heads']} L=chunk={r['chunk_tokens']} inputs {r['input_gib']} GiB | "
            f"growth MiB: create {r['create_growth_mib']}, input check "
            f"{r['input_check_growth_mib']}"
        )
    return res


def test_large_store_is_over_1_gib(figures):
    large = figures["large"]
    assert large["input_bytes_on_disk"] >= 1 << 30
    assert large["units_run"] == large["plan"]["units"]
    assert figures["small"]["plan"]["head_group"] == large["plan"]["head_group"] == HEAD_GROUP


def test_create_memory_bounded(figures):
    assert figures["large"]["create_growth_mib"] <= BOUND_MIB


def test_input_check_memory_bounded(figures):
    assert figures["large"]["input_check_growth_mib"] <= BOUND_MIB


def test_forward_memory_bounded(figures):
    assert figures["large"]["forward_growth_mib"] <= BOUND_MIB
    # a forward holds its units' buffers: no growth at all means the probe saw
    # a peak from before it started (as ru_maxrss inherited from a large parent)
    assert figures["large"]["forward_growth_mib"] > 1


def test_forward_memory_does_not_grow_with_store(figures):
    small, large = figures["small"], figures["large"]
    assert large["forward_growth_mib"] <= small["forward_growth_mib"] + SLACK_MIB


@pytest.mark.parametrize("pair", [("small", "large"), ("row_small", "row_large")])
@pytest.mark.parametrize("op", ["create", "input_check"])
def test_store_memory_does_not_grow_with_store(figures, op, pair):
    small, large = (figures[label] for label in pair)
    assert large[f"{op}_growth_mib"] <= small[f"{op}_growth_mib"] + SLACK_MIB
