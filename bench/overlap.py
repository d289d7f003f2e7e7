"""Does store I/O overlap with compute? Reads are slowed on purpose.

Three runs of the same forward (itr=2 by default, causal, fp32): compute only (no delay),
I/O only (every input chunk read waits ``--delay`` seconds, and the kernel is
replaced by one that returns zeros), and both. If reads and compute overlap,
the last run takes about max(I/O, compute), not their sum. Writes
bench/results/overlap.md and overlap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from zarr.storage import LocalStore, WrapperStore

from streamcqsa.kernels.torch_ops import TorchBackend
from streamcqsa.pipeline import run
from streamcqsa.storage import create_random

OUT = Path(__file__).resolve().parent / "results"


class SlowReads(WrapperStore):
    """Every read of an input chunk (q, k, v) waits ``delay`` seconds first."""

    delay = 0.0

    async def get(self, key, prototype=None, byte_range=None):  # noqa: ANN001, ANN201
        if key.split("/", 1)[0] in ("q", "k", "v") and "/c/" in key:
            await asyncio.sleep(type(self).delay)
        return await self._store.get(key, prototype, byte_range)


class NoCompute(TorchBackend):
    """Zeros of the right shape: the run's time is then its I/O."""

    name = "nocompute"

    def block_forward(self, q, k, v, *, causal, scale):  # noqa: ANN001, ANN201
        return (torch.zeros(q.shape, dtype=q.dtype), torch.zeros(q.shape[:-1], dtype=torch.float32))


def timed_run(
    src: Path,
    tmp: Path,
    name: str,
    delay: float,
    backend: Any,
    workers: int,
    itr: int,
    **run_kwargs: Any,
) -> float:
    dst = tmp / name
    shutil.copytree(src, dst)
    os.sync()  # flush the copy now, not during the timed run
    SlowReads.delay = delay
    t = time.perf_counter()
    run(
        SlowReads(LocalStore(dst)),
        itr=itr,
        progress=False,
        backend=backend,
        workers=workers,
        check_inputs=False,
        **run_kwargs,
    )
    return time.perf_counter() - t


def measure(
    seq_len: int = 16384,
    heads: int = 4,
    delay: float = 0.04,
    workers: int = 3,
    itr: int = 2,
    **run_kwargs: Any,
) -> dict:
    """Compute-only, I/O-only and both runs of one forward (causal, fp32, D=64);
    ``run_kwargs`` go to ``pipeline.run`` (e.g. ``unit_depth``)."""
    tmp = Path(tempfile.mkdtemp(prefix="scqsa-overlap-"))
    try:
        src = tmp / "src"
        create_random(
            src, seq_len=seq_len, heads=heads, head_dim=64, dtype="float32", is_causal=True
        )
        compute = timed_run(src, tmp, "c", 0.0, "torch", workers, itr, **run_kwargs)
        io = timed_run(src, tmp, "i", delay, NoCompute(), workers, itr, **run_kwargs)
        both = timed_run(src, tmp, "b", delay, "torch", workers, itr, **run_kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "seq_len": seq_len,
        "heads": heads,
        "itr": itr,
        "delay_s": delay,
        "workers": workers,
        "compute_s": compute,
        "io_s": io,
        "both_s": both,
        "both_over_max": both / max(io, compute),
        "both_over_sum": both / (io + compute),
        **{k: v for k, v in run_kwargs.items() if isinstance(v, (int, str, type(None)))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--delay", type=float, default=0.04)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--itr", type=int, default=2)
    a = ap.parse_args()
    res = measure(a.seq_len, a.heads, a.delay, a.workers, a.itr)
    compute, io, both = res["compute_s"], res["io_s"], res["both_s"]
    OUT.mkdir(exist_ok=True)
    (OUT / "overlap.json").write_text(json.dumps(res, indent=2))
    md = (
        "# I/O and compute overlap (CPU)\n\n"
        f"Forward itr={a.itr}, causal, fp32, B=1, H={a.heads}, L={a.seq_len}, D=64, "
        f"{a.workers} Dask threads, every input chunk read delayed {a.delay} s. "
        "Regenerate: `python bench/overlap.py`.\n\n"
        "| compute only s | I/O only s | both s | both / max | both / sum |\n"
        "|---|---|---|---|---|\n"
        f"| {compute:.2f} | {io:.2f} | {both:.2f} | **{res['both_over_max']:.2f}** | "
        f"{res['both_over_sum']:.2f} |\n"
    )
    (OUT / "overlap.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
