"""Measuring this machine: real leaf tasks, fold and store bandwidth, and small
end-to-end pipeline runs, each timed in isolation.

Only raw seconds (and bytes) come out of here; fitting them into a model is
``calibrate``'s job.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcqsa.cqs.divide import Node, Plan, divide
from streamcqsa.cqs.interest import chunk_count
from streamcqsa.estimate.model import Shape
from streamcqsa.kernels.device import Device


def default_device() -> str:
    return str(Device.of("auto"))


def reduced_plans(itr: int, quorum: int, is_causal: bool, leaf_tokens: Sequence[int]) -> list[Plan]:
    """Plans of the same depth and quorum whose longest leaf is about each size."""
    shrink = (quorum / chunk_count(quorum)) ** itr if itr else 1.0
    return [
        divide(max(8, math.ceil(t / shrink)), itr, quorum, is_causal=is_causal) for t in leaf_tokens
    ]


def pick_tasks(plan: Plan, count: int) -> list[Node]:
    """``count`` leaves at evenly spaced quantiles of work, ending at the largest:
    the heavy leaves carry nearly all of a plan's entries, and the near-empty
    ones would only measure call overhead."""
    tasks = sorted(plan.tasks, key=lambda t: (t.blocks.entries, t.path))  # type: ignore[union-attr]
    if len(tasks) <= count:
        return tasks
    idx = sorted({round((i + 1) * (len(tasks) - 1) / count) for i in range(count)})
    return [tasks[i] for i in idx]


def time_tasks(
    tasks: Sequence[Node],
    *,
    hq: int,
    hk: int,
    head_dim: int,
    dtype: str,
    device: str,
    backend: str = "auto",
    repeats: int = 5,
    settle: float = 0.03,
    warmup: bool = True,
) -> list[dict[str, float]]:
    """Seconds of each task's forward and backward alone on the device: the
    best of up to ``repeats`` rounds over all tasks, stopping early once a
    round improves the summed best times by less than ``settle``. With
    ``warmup`` an untimed round goes first (first calls, allocator).

    On a shared machine load only ever adds time, so the best of a few
    rounds is the task's own cost; rounds go over all tasks so that a burst
    of load spoils one round of many tasks, not every round of one. The
    backward is fed the task's own out and lse (its cost does not depend on
    whether they are the global ones). On CUDA each pass's peak allocated
    bytes are recorded too. ``fwd_s_max``/``bwd_s_max`` are the slowest
    timed round: how far apart repeats of one task landed (the load).
    """
    from streamcqsa.kernels import runner
    from streamcqsa.kernels.backend import get_backend
    from streamcqsa.storage.layout import torch_dtype

    dev = torch.device(device)
    cdt = get_backend(backend, dev).compute_dtype(torch_dtype(dtype), dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    where = Device.of(device)
    rows: list[dict[str, float]] = [
        {"tokens": t.length, "entries": t.blocks.entries * hq, "fwd_s": math.inf, "bwd_s": math.inf}  # type: ignore[union-attr]
        for t in tasks
    ]
    total = math.inf
    first = 1 if warmup else 0
    for r in range(first + max(1, repeats)):
        for task, row in zip(tasks, rows, strict=True):
            n = task.length
            q, k, v, dout = (
                torch.randn(1, h, n, head_dim, generator=g).to(dev, cdt) for h in (hq, hk, hk, hq)
            )
            out = lse = None
            for name in ("fwd", "bwd"):
                where.reset_peak()
                where.synchronize()
                t = time.perf_counter()
                if name == "fwd":
                    out, lse = runner.forward(q, k, v, task.blocks, backend=backend)  # type: ignore[arg-type]
                else:
                    runner.backward(q, k, v, dout, out, lse, task.blocks, backend=backend)  # type: ignore[arg-type]
                where.synchronize()
                dt = time.perf_counter() - t
                if r >= first:
                    row[f"{name}_s"] = min(row[f"{name}_s"], dt)
                    row[f"{name}_s_max"] = max(row.get(f"{name}_s_max", 0.0), dt)
                peak = where.peak_bytes()
                if peak is not None:
                    row[f"{name}_peak_bytes"] = peak
            del q, k, v, dout, out, lse
        if r >= first:
            now = sum(row["fwd_s"] + row["bwd_s"] for row in rows)
            if r > first and now > (1 - settle) * total:
                break
            total = now
    return rows


def time_fold(
    hq: int, hk: int, head_dim: int, device: str, rows: int = 8192, repeats: int = 5
) -> dict[str, float]:
    """Seconds per partial element a fold reads: a 3-way lse merge (forward) and a
    3-way gradient sum (backward), fp32, in isolation."""
    from streamcqsa.kernels.fold import sum_partials
    from streamcqsa.kernels.merge import merge_partials

    dev = torch.device(device)
    where = Device.of(device)
    g = torch.Generator().manual_seed(1)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(dev)

    fparts = [(rnd(1, hq, rows, head_dim), rnd(1, hq, rows)) for _ in range(3)]
    bparts = [
        (rnd(1, hq, rows, head_dim), rnd(1, hk, rows, head_dim), rnd(1, hk, rows, head_dim))
        for _ in range(3)
    ]
    out: dict[str, float] = {}
    for name, fn, elems in (
        ("fwd", lambda: merge_partials(fparts), 3 * rows * hq * (head_dim + 1)),
        ("bwd", lambda: sum_partials(bparts), 3 * rows * (hq + 2 * hk) * head_dim),
    ):
        fn()
        best = math.inf
        for _ in range(repeats):
            where.synchronize()
            t = time.perf_counter()
            fn()
            where.synchronize()
            best = min(best, time.perf_counter() - t)
        out[name] = best / elems
    return out


def time_store(
    directory: Path, heads: int, head_dim: int, chunk_tokens: int, mib: int = 32
) -> dict:
    """Bytes per second writing and reading fp32 partial-shaped chunks through
    zarr with the store's codecs (crc32c), on the disk the runs use.

    Small files read back from the page cache; at a billion tokens the data
    outgrows it, so treat the read figure as an upper bound there.
    """
    import zarr

    from streamcqsa.storage.store import array_kwargs

    rows = max(chunk_tokens, (mib << 20) // (4 * heads * head_dim) // chunk_tokens * chunk_tokens)
    data = np.random.default_rng(0).standard_normal((1, heads, rows, head_dim), dtype=np.float32)
    path = Path(tempfile.mkdtemp(prefix="scqsa-bw-", dir=directory))
    try:
        arr = zarr.create_array(
            store=str(path),
            shape=data.shape,
            **array_kwargs("float32", (1, heads, chunk_tokens, head_dim)),
        )
        t = time.perf_counter()
        arr[...] = data
        w = time.perf_counter() - t
        t = time.perf_counter()
        np.asarray(arr[...])
        r = time.perf_counter() - t
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return {"read_Bps": data.nbytes / r, "write_Bps": data.nbytes / w, "bytes": data.nbytes}


def pipeline_run(
    directory: Path, shape: Shape, itr: int, *, head_group: int, quorum: int = 3, workers: int = 2
) -> dict:
    """One measured forward and backward over a fresh random store, end to end
    (the pipeline's own checks included)."""
    from streamcqsa.pipeline import run, run_backward
    from streamcqsa.storage import create_random
    from streamcqsa.storage.inspect import open as open_run

    path = Path(tempfile.mkdtemp(prefix="scqsa-est-", dir=directory)) / "run.zarr"
    try:
        create_random(
            path,
            seq_len=shape.seq_len,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            batch=shape.batch,
            dtype=shape.dtype,
            is_causal=shape.is_causal,
        )
        chunk = open_run(path).problem.chunk_tokens
        g = torch.Generator().manual_seed(3)
        dout: Any = torch.randn(
            shape.batch, shape.heads, shape.seq_len, shape.head_dim, generator=g
        )
        dout = dout.bfloat16() if shape.dtype == "bfloat16" else dout.numpy().astype(shape.dtype)
        t = time.perf_counter()
        fwd = run(
            path, itr=itr, quorum=quorum, head_group=head_group, progress=False, workers=workers
        )
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        bwd = run_backward(path, dout, progress=False, workers=workers)
        t_bwd = time.perf_counter() - t
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    return {
        "seq_len": shape.seq_len,
        "itr": itr,
        "head_group": head_group,
        "chunk_tokens": chunk,
        "fwd_s": t_fwd,
        "bwd_s": t_bwd,
        "plan": fwd.get("plan", {}),
        "fwd_stages": fwd.get("stages", {}),
        "bwd_stages": bwd.get("stages", {}),
        "fwd_partial_disk_bytes": fwd.get("partial_disk_bytes"),
        "bwd_partial_disk_bytes": bwd.get("partial_disk_bytes"),
    }
