"""Scaled evaluation (the paper's §3.3): time real tasks small, extrapolate to the full plan.

A billion-token pass is far too long to run just to learn its cost, but its
plan is cheap to build (``divide`` is segment-level: at L=1e9 itr=4 is 2.5k
nodes in ~0.2 s, itr=5 15k nodes in ~1 s; each level costs ~7x more, so
itr=7 takes ~40 s) and its leaf tasks are all of one shape family. So, on
this machine's device:

1. time a sample of real leaf tasks (``kernels.runner.forward/backward`` on
   random data) drawn from plans of the same depth, quorum, head group and
   dtype at reduced sequence lengths, and fit ``t = a + b * score entries``;
2. time the fold arithmetic per partial element and the store's read/write
   bandwidth in isolation;
3. run the real pipeline (``pipeline.run`` / ``run_backward``) end to end on a
   few small stores, time every leaf of those plans alone, and fit
   ``T = c0 + alpha * kernel_s + beta * (fold_s + io_s)`` per pass, so that
   whatever the pipeline does around the kernels (threads, checksums, how it
   groups tasks into units) is measured, not assumed;
4. sum the fitted models over the full plan.

The kernel model is linear, so the full plan's kernel time only needs the
number of leaves and their summed score entries: nothing per token.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamcqsa.cqs.budget import ITEMSIZE, Budget, choose, leaf_device_bytes
from streamcqsa.cqs.divide import Node, Plan, divide
from streamcqsa.cqs.interest import chunk_count

PASSES = ("fwd", "bwd")
# (seq_len, itr) of the small end-to-end pipeline runs the overhead is fitted on:
# both depths, and sizes where the kernels are a good share of the time, so
# that the kernel coefficient is pinned down
CALIBRATION_POINTS = ((2048, 1), (4096, 1), (4096, 2), (8192, 1), (8192, 2))
QUICK_POINTS = ((1024, 1), (1024, 2), (2048, 1), (2048, 2))


@dataclass(frozen=True)
class Shape:
    """One attention problem, as a run store would hold it."""

    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    dtype: str = "float16"
    is_causal: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"dtype must be one of {tuple(ITEMSIZE)}, got {self.dtype!r}")
        for name in ("seq_len", "heads", "kv_heads", "head_dim", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads")

    @property
    def ratio(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Line:
    """``t = a + b * x`` with the fit's relative RMS residual over its points."""

    a: float
    b: float
    rel_rms: float = 0.0
    points: int = 0

    def __call__(self, x: float) -> float:
        return self.a + self.b * x


def fit_nonneg(
    cols: Sequence[Sequence[float]], y: Sequence[float], *, relative: bool = True
) -> tuple[list[float], float]:
    """Least squares with non-negative coefficients; returns them and the relative
    RMS residual.

    Exhaustive over column subsets (a handful of columns here), so it needs no
    solver and always returns the best non-negative fit. ``relative`` weighs
    every point by 1/y (points span orders of magnitude); otherwise large
    points dominate, which is what an extrapolation to huge tasks wants.
    """
    x = np.asarray(cols, dtype=float).T
    yy = np.asarray(y, dtype=float)
    w = 1.0 / np.maximum(yy, 1e-12) if relative else np.full_like(yy, 1.0 / max(yy.max(), 1e-12))
    best: tuple[float, list[float]] = (math.inf, [0.0] * x.shape[1])
    for r in range(1, x.shape[1] + 1):
        for sub in itertools.combinations(range(x.shape[1]), r):
            coef, *_ = np.linalg.lstsq(x[:, sub] * w[:, None], yy * w, rcond=None)
            if (coef < 0).any():
                continue
            full = [0.0] * x.shape[1]
            for i, c in zip(sub, coef, strict=True):
                full[i] = float(c)
            err = float(np.sqrt(np.mean(((x @ np.asarray(full) - yy) * w) ** 2)))
            if err < best[0]:
                best = (err, full)
    rel = float(np.sqrt(np.mean((x @ np.asarray(best[1]) / np.maximum(yy, 1e-12) - 1.0) ** 2)))
    return best[1], rel


def fit_line(
    xs: Sequence[float], ys: Sequence[float], *, relative: bool = False, drop_above: float = 0.0
) -> Line:
    """``y = a + b x`` with a, b >= 0.

    ``drop_above`` > 1 makes the fit robust to load on a shared machine, which
    only ever adds time: points more than that factor above the line are
    dropped and the line refitted (at most a third of the points).
    """
    keep = list(range(len(xs)))
    for _ in range(3):
        (a, b), err = fit_nonneg(
            [[1.0] * len(keep), [xs[i] for i in keep]], [ys[i] for i in keep], relative=relative
        )
        if drop_above <= 1.0:
            break
        ok = [i for i in keep if ys[i] <= drop_above * (a + b * xs[i])]
        if len(ok) == len(keep) or len(ok) < max(3, 2 * len(xs) // 3):
            break
        keep = ok
    return Line(a=a, b=b, rel_rms=err, points=len(keep))


# -------------------------------------------------------------------- plan costs


@dataclass(frozen=True)
class PlanCost:
    """Everything the models need from a plan, per whole problem (all batches and
    head groups). Nothing here is per token."""

    itr: int
    quorum: int
    head_group: int
    tasks: int  # leaf tasks x batch x head groups
    leaves: int  # leaf tasks of one (batch, head group)
    leaf_tokens: int  # the longest leaf
    entries: int  # score entries x query heads, all tasks
    fold_elems: dict[str, int]  # partial elements the folds read, per pass
    read_bytes: dict[str, int]
    write_bytes: dict[str, int]
    disk: dict[str, int]  # inputs, outputs, partials per pass (every level kept)
    device_bytes_per_task: dict[str, int]
    host_bytes_per_task: dict[str, int]


def compute_dtype(dtype: str, device: str) -> str:
    """CPU kernels compute half types in fp32 (the torch backend casts once per task)."""
    return "float32" if device.startswith("cpu") else dtype


def task_bytes(
    tokens: int, hq: int, hk: int, d: int, csize: int, ssize: int
) -> dict[str, dict[str, int]]:
    """Device and host bytes of one task per pass.

    Device: the forward is the planner's ``leaf_device_bytes``; the backward
    holds q, k, v, dout, out in the compute dtype, fp32 lse and dq/dk/dv
    accumulators, and one block's kernel gradients. Host: the gathered inputs
    as stored plus the fp32 partial, twice (read buffer and write buffer).
    """
    dev_f = leaf_device_bytes(tokens, hq, hk, d, csize)
    dev_b = tokens * (d * (csize * (3 * hq + 2 * hk) + (4 + csize) * (hq + 2 * hk)) + 4 * hq)
    host_f = tokens * (d * ssize * (hq + 2 * hk) + 2 * 4 * hq * (d + 1))
    host_b = tokens * (d * ssize * (3 * hq + 2 * hk) + 4 * hq + 2 * 4 * d * (hq + 2 * hk))
    return {"device": {"fwd": dev_f, "bwd": dev_b}, "host": {"fwd": host_f, "bwd": host_b}}


def plan_cost(
    plan: Plan, shape: Shape, head_group: int, chunk_tokens: int, device: str = "cpu"
) -> PlanCost:
    """Work, bytes and memory of running ``plan`` over ``shape``, both passes.

    Store traffic is counted for the layout that stores every level (each
    node's partial padded to whole chunks): the most the pipeline writes. A
    pipeline that folds subtrees in memory moves less; the end-to-end fit
    absorbs that as a smaller ``beta``.
    """
    if head_group < 1 or shape.kv_heads % head_group:
        raise ValueError(f"head_group {head_group} must divide kv_heads {shape.kv_heads}")
    hk = head_group
    hq = hk * shape.ratio
    units = shape.batch * (shape.kv_heads // hk)
    d, ss = shape.head_dim, ITEMSIZE[shape.dtype]
    cs = ITEMSIZE[compute_dtype(shape.dtype, device)]
    leaves = plan.tasks
    leaf_tok = sum(t.length for t in leaves)
    pad = 0  # padded partial rows of every non-root node
    child_rows = 0  # rows folds read: every inner node reads each child's rows
    for n in plan.nodes:
        if n.depth:
            pad += math.ceil(n.length / chunk_tokens) * chunk_tokens
        if not n.is_leaf:
            child_rows += sum(plan.by_path[c].length for c in n.children)
    fwd_part = hq * (d + 1) * 4  # out + lse per row
    bwd_part = (hq + 2 * hk) * d * 4  # dq, dk, dv per row
    L = plan.seq_len
    read = {
        "fwd": leaf_tok * d * ss * (hq + 2 * hk) + child_rows * fwd_part,
        "bwd": leaf_tok * (d * ss * (3 * hq + 2 * hk) + 4 * hq) + child_rows * bwd_part,
    }
    write = {
        "fwd": pad * fwd_part + L * hq * (d * ss + 4),
        "bwd": pad * bwd_part + L * (hq + 2 * hk) * d * ss,
    }
    B, H, Hk = shape.batch, shape.heads, shape.kv_heads
    disk = {
        "inputs": B * L * d * ss * (H + 2 * Hk),
        "fwd_outputs": B * L * H * (d * ss + 4),
        "fwd_partials": pad * units * fwd_part,
        "bwd_outputs": B * L * d * ss * (H + H + 2 * Hk),  # dout, dq, dk, dv
        "bwd_partials": pad * units * bwd_part,
    }
    longest = max(t.length for t in leaves)
    mem = task_bytes(longest, hq, hk, d, cs, ss)
    return PlanCost(
        itr=plan.itr,
        quorum=plan.quorums[0] if plan.quorums else 0,
        head_group=head_group,
        tasks=len(leaves) * units,
        leaves=len(leaves),
        leaf_tokens=longest,
        entries=plan.entries * hq * units,
        fold_elems={
            "fwd": child_rows * hq * (d + 1) * units,
            "bwd": child_rows * (hq + 2 * hk) * d * units,
        },
        read_bytes={k: v * units for k, v in read.items()},
        write_bytes={k: v * units for k, v in write.items()},
        disk=disk,
        device_bytes_per_task=mem["device"],
        host_bytes_per_task=mem["host"],
    )


def choose_plan(
    shape: Shape,
    *,
    device_memory: int,
    host_memory: int,
    itr: int | str = "auto",
    quorum: int = 3,
    n_cap: int = 1,
    chunk_tokens: int = 65536,
    device: str = "cpu",
    max_itr: int = 7,
) -> tuple[Plan, int]:
    """The plan (and head group) both passes run with: ``run_backward`` reuses the
    forward's plan, so the backward's larger tasks must fit too.

    ``itr='auto'`` starts from the planner's choice (``streamcqsa.plan``, sized
    for the compute dtype of ``device``) and goes deeper only if the backward
    does not fit; a given ``itr`` only picks the head group.
    """
    cdt = compute_dtype(shape.dtype, device)
    if itr == "auto":
        est = choose(
            seq_len=shape.seq_len,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            budget=Budget(device_memory, host_memory),
            dtype=cdt,
            is_causal=shape.is_causal,
            batch=shape.batch,
            quorum=quorum,
            max_itr=max_itr,
            n_cap=n_cap,
            chunk_tokens=chunk_tokens,
        )
        depths: Sequence[int] = range(est.itr, max_itr + 1)
    elif isinstance(itr, bool) or not isinstance(itr, int) or itr < 0:
        raise ValueError(f"itr must be a non-negative int or 'auto', got {itr!r}")
    else:
        depths = [itr]
    groups = sorted(g for g in range(1, shape.kv_heads + 1) if shape.kv_heads % g == 0)
    n = chunk_count(quorum)
    for depth in depths:
        # skip depths whose even-split leaf is obviously too big before dividing
        approx = int(shape.seq_len * (quorum / n) ** depth * 0.9)
        b = task_bytes(approx, shape.ratio, 1, shape.head_dim, ITEMSIZE[cdt], 4)
        if b["device"]["bwd"] * n_cap > device_memory and depth != depths[-1]:
            continue
        plan = divide(shape.seq_len, depth, quorum, is_causal=shape.is_causal)
        longest = max(t.length for t in plan.tasks)
        for hg in reversed(groups):
            tb = task_bytes(
                longest,
                hg * shape.ratio,
                hg,
                shape.head_dim,
                ITEMSIZE[cdt],
                ITEMSIZE[shape.dtype],
            )
            if (
                max(tb["device"].values()) * n_cap <= device_memory
                and max(tb["host"].values()) * n_cap <= host_memory
            ):
                return plan, hg
        if len(depths) == 1:  # a fixed itr that does not fit: report it anyway
            return plan, 1
    raise ValueError(
        f"no plan up to itr={max_itr} fits the backward in {device_memory} device bytes; "
        "raise the budgets or pass --itr"
    )


# -------------------------------------------------------------------- measuring


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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
    bytes are recorded too.
    """
    from streamcqsa.kernels import runner
    from streamcqsa.kernels.backend import get_backend
    from streamcqsa.storage.layout import torch_dtype

    dev = torch.device(device)
    cdt = get_backend(backend, dev).compute_dtype(torch_dtype(dtype), dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    cuda = device.startswith("cuda")
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
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                _sync(device)
                t = time.perf_counter()
                if name == "fwd":
                    out, lse = runner.forward(q, k, v, task.blocks, backend=backend)  # type: ignore[arg-type]
                else:
                    runner.backward(q, k, v, dout, out, lse, task.blocks, backend=backend)  # type: ignore[arg-type]
                _sync(device)
                dt = time.perf_counter() - t
                if r >= first:
                    row[f"{name}_s"] = min(row[f"{name}_s"], dt)
                if cuda:
                    row[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
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
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
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


# -------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """This machine's fitted cost models for one task shape (hq, hk, D, dtype)."""

    device: str
    kernel: dict[str, Line]  # seconds vs score entries x query heads, per task
    fold_s_per_elem: dict[str, float]
    read_Bps: float
    write_Bps: float
    memory: dict[str, Line] | None = None  # CUDA: peak bytes vs task tokens, per pass
    pipeline: dict[str, dict[str, float]] | None = None  # c0, alpha, beta per pass
    samples: list[dict] = field(default_factory=list)
    pipeline_runs: list[dict] = field(default_factory=list)

    def components(
        self, cost: PlanCost, kernel_s: dict[str, float] | None = None
    ) -> dict[str, dict[str, float]]:
        """Isolated seconds per pass: kernels (from the fitted line unless measured
        sums are given), folds, store I/O."""
        out = {}
        for p in PASSES:
            k = self.kernel[p]
            out[p] = {
                "kernel_s": kernel_s[p] if kernel_s else k.a * cost.tasks + k.b * cost.entries,
                "fold_s": self.fold_s_per_elem[p] * cost.fold_elems[p],
                "io_s": cost.read_bytes[p] / self.read_Bps + cost.write_bytes[p] / self.write_Bps,
            }
        return out

    def predict(self, cost: PlanCost) -> dict[str, dict[str, float]]:
        """Per pass: the isolated components and the pipeline's wall seconds."""
        comp = self.components(cost)
        for p, c in comp.items():
            if self.pipeline is None:
                c["pipeline_s"] = c["kernel_s"] + c["fold_s"] + c["io_s"]
            else:
                f = self.pipeline[p]
                c["pipeline_s"] = (
                    f["c0"] + f["alpha"] * c["kernel_s"] + f["beta"] * (c["fold_s"] + c["io_s"])
                )
        return comp

    def fit_pipeline(self, runs: Sequence[dict]) -> None:
        """Fit ``T = c0 + alpha * kernel_s [+ beta * (fold_s + io_s)]`` per pass over
        measured runs (each with ``components``); repeats of one (L, itr) enter as
        their best time (load on a shared machine only ever adds time).

        With or without the beta term is chosen by how well each, fitted on the
        smaller points, predicts the largest ones: the model is for
        extrapolating, and a term that only soaks up noise at small sizes
        extrapolates badly. The chosen form is then refitted on all points.
        """
        by_point: dict[tuple[int, int], list[dict]] = {}
        for r in runs:
            by_point.setdefault((r["seq_len"], r["itr"]), []).append(r)
        pts = sorted(by_point.items())
        top = max(L for (L, _), _ in pts)
        self.pipeline = {}
        for p in PASSES:
            comp = [rs[0]["components"][p] for _, rs in pts]
            cols = [
                [1.0] * len(pts),
                [c["kernel_s"] for c in comp],
                [c["fold_s"] + c["io_s"] for c in comp],
            ]
            y = [min(r[f"{p}_s"] for r in rs) for _, rs in pts]
            train = [i for i, ((L, _), _) in enumerate(pts) if L < top]
            test = [i for i in range(len(pts)) if i not in train]
            best: tuple[float, int] = (math.inf, 3)
            for ncols in (2, 3):
                if len(train) < ncols:
                    continue
                coef, _ = fit_nonneg(
                    [[c[i] for i in train] for c in cols[:ncols]], [y[i] for i in train]
                )
                err = max(
                    abs(sum(coef[j] * cols[j][i] for j in range(ncols)) / y[i] - 1) for i in test
                )
                if err < best[0]:
                    best = (err, ncols)
            ncols = best[1]
            coef, err = fit_nonneg(cols[:ncols], y)
            coef += [0.0] * (3 - ncols)
            self.pipeline[p] = {
                "c0": coef[0],
                "alpha": coef[1],
                "beta": coef[2],
                "rel_rms": err,
                "holdout_error": best[0],
                "terms": ncols,
            }
        self.pipeline_runs = list(runs)

    def to_dict(self) -> dict:
        return asdict(self)


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


def _best(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """Per task, the best time of every round so far."""
    if old is None:
        return new
    for o, n in zip(old, new, strict=True):
        for key in ("fwd_s", "bwd_s"):
            o[key] = min(o[key], n[key])
    return old


def _with_components(
    run: dict, cal: Calibration, shape: Shape, quorum: int, kernel: dict[str, float] | None
) -> dict:
    plan = divide(run["seq_len"], run["itr"], quorum, is_causal=shape.is_causal)
    s = replace(shape, seq_len=run["seq_len"])
    cost = plan_cost(plan, s, run["head_group"], run["chunk_tokens"], cal.device)
    run["components"] = cal.components(cost, kernel)
    return run


def calibrate(
    shape: Shape,
    *,
    itr: int,
    quorum: int = 3,
    head_group: int | None = None,
    leaf_tokens: Sequence[int] = (512, 1024, 2048, 4096),
    per_size: int = 3,
    pipeline_points: Sequence[tuple[int, int]] = CALIBRATION_POINTS,
    repeats: int = 1,
    device: str | None = None,
    backend: str = "auto",
    workers: int = 2,
    directory: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    each_round: Callable[[], None] | None = None,
) -> Calibration:
    """Measure this machine for tasks shaped like one (batch, head group) of ``shape``.

    The kernel line is fitted on sample leaves of reduced plans of depth
    ``itr`` (the target's family). ``pipeline_points`` are (seq_len, itr) of
    small end-to-end runs over one head group; their overhead is fitted
    against the measured kernel time of *all* their leaves, so the fit does
    not inherit the line's error. Pass ``()`` to skip them (the prediction is
    then the plain sum of the components).

    Everything is measured in ``repeats`` rounds (samples, calibration
    leaves, pipeline runs, then ``each_round``), keeping each item's best: on
    a shared machine load only ever adds time, and rounds spread over time
    let every item catch a quiet moment and keep the items comparable.
    """
    device = device or default_device()
    say = log or (lambda s: None)
    hk = head_group or shape.kv_heads
    small = replace(shape, heads=hk * shape.ratio, kv_heads=hk, batch=1)
    root = Path(directory) if directory else Path(tempfile.gettempdir())
    kw: dict[str, Any] = dict(
        hq=small.heads,
        hk=hk,
        head_dim=shape.head_dim,
        dtype=shape.dtype,
        device=device,
        backend=backend,
    )
    sample_tasks: list[Node] = []
    for p in reduced_plans(itr, quorum, shape.is_causal, leaf_tokens):
        sample_tasks += pick_tasks(p, per_size)
    plans = {pt: divide(pt[0], pt[1], quorum, is_causal=shape.is_causal) for pt in pipeline_points}
    leaf_tasks = [t for p in plans.values() for t in p.tasks]
    samples: list[dict] | None = None
    leaves: list[dict] | None = None
    runs: list[dict] = []
    rounds = max(1, repeats)
    for r in range(rounds):
        say(
            f"round {r + 1}/{rounds}: {len(sample_tasks)} sample tasks ({small.heads} q heads, "
            f"{hk} kv heads) on {device}"
            + (f", {len(leaf_tasks)} calibration leaves" if leaf_tasks else "")
        )
        # alone (no pipeline rounds to interleave with): several rounds at once
        n = 5 if not pipeline_points and rounds == 1 else 1
        samples = _best(samples, time_tasks(sample_tasks, repeats=n, warmup=r == 0, **kw))
        if leaf_tasks:
            leaves = _best(leaves, time_tasks(leaf_tasks, repeats=1, warmup=r == 0, **kw))
        for L, i in pipeline_points:
            say(f"round {r + 1}/{rounds}: pipeline run L={L} itr={i}")
            runs.append(
                pipeline_run(
                    root,
                    replace(small, seq_len=L),
                    i,
                    head_group=hk,
                    quorum=quorum,
                    workers=workers,
                )
            )
        if each_round is not None:
            each_round()
    assert samples is not None
    xs = [s["entries"] for s in samples]
    kernel = {
        p: fit_line(xs, [s[f"{p}_s"] for s in samples], relative=True, drop_above=1.4)
        for p in PASSES
    }
    memory = None
    if samples and "fwd_peak_bytes" in samples[0]:
        toks = [s["tokens"] for s in samples]
        memory = {p: fit_line(toks, [s[f"{p}_peak_bytes"] for s in samples]) for p in PASSES}
    from streamcqsa.storage.layout import default_chunk_tokens

    bw = time_store(root, small.heads, shape.head_dim, default_chunk_tokens(8192))
    cal = Calibration(
        device=device,
        kernel=kernel,
        fold_s_per_elem=time_fold(small.heads, hk, shape.head_dim, device),
        read_Bps=bw["read_Bps"],
        write_Bps=bw["write_Bps"],
        memory=memory,
        samples=samples,
    )
    if runs:
        sums, i = {}, 0
        for pt, p in plans.items():
            m = len(p.tasks)
            sums[pt] = {q: sum(x[f"{q}_s"] for x in leaves[i : i + m]) for q in PASSES}  # type: ignore[index]
            i += m
        for run in runs:
            _with_components(run, cal, small, quorum, sums[(run["seq_len"], run["itr"])])
        cal.fit_pipeline(runs)
    return cal


# -------------------------------------------------------------------- the estimate


def estimate(
    shape: Shape,
    *,
    device_memory: int,
    host_memory: int,
    itr: int | str = "auto",
    quorum: int = 3,
    device: str | None = None,
    quick: bool = False,
    pipeline: bool = True,
    calibration: Calibration | None = None,
    directory: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan ``shape`` under the budgets, calibrate this machine, extrapolate both passes.

    Returns a JSON-able report: the plan, per pass the task count, kernel
    device-hours, modelled pipeline hours, memory per task, I/O, and disk.
    ``calibration`` skips the measuring (tests, or reuse across shapes).
    """
    from streamcqsa.storage.layout import default_chunk_tokens

    device = device or default_device()
    n_cap = 2 if device.startswith("cuda") else 1  # the pipeline's defaults
    chunk = default_chunk_tokens(shape.seq_len)
    t0 = time.perf_counter()
    plan, hg = choose_plan(
        shape,
        device_memory=device_memory,
        host_memory=host_memory,
        itr=itr,
        quorum=quorum,
        n_cap=n_cap,
        chunk_tokens=chunk,
        device=device,
    )
    t_plan = time.perf_counter() - t0
    cost = plan_cost(plan, shape, hg, chunk, device)
    if calibration is None:
        if not pipeline:
            points: tuple[tuple[int, int], ...] = ()
        elif quick:
            points = QUICK_POINTS
        else:
            points = CALIBRATION_POINTS
        calibration = calibrate(
            shape,
            itr=plan.itr,
            quorum=quorum,
            head_group=hg,
            # leaves as large as is cheap: small leaves run small blocks, whose
            # per-entry cost is higher than the huge blocks of the full plan
            leaf_tokens=(512, 1024, 2048) if quick else (2048, 4096, 8192, 16384),
            per_size=2,
            pipeline_points=points,
            repeats=1 if quick or not points else 2,
            device=device,
            directory=directory,
            log=log,
        )
    pred = calibration.predict(cost)
    passes = {}
    for p in PASSES:
        c = pred[p]
        passes[p] = {
            "tasks": cost.tasks,
            "kernel_device_hours": c["kernel_s"] / 3600,
            "pipeline_hours": c["pipeline_s"] / 3600,
            "fold_hours": c["fold_s"] / 3600,
            "io_hours": c["io_s"] / 3600,
            "device_bytes_per_task": cost.device_bytes_per_task[p],
            "host_bytes_per_task": cost.host_bytes_per_task[p],
            "read_bytes": cost.read_bytes[p],
            "write_bytes": cost.write_bytes[p],
            "partial_disk_bytes": cost.disk[f"{p}_partials"],
            "output_disk_bytes": cost.disk[f"{p}_outputs"],
        }
        if calibration.memory is not None:  # CUDA: the fitted measured peak
            passes[p]["measured_fit_device_bytes_per_task"] = calibration.memory[p](
                cost.leaf_tokens
            )
    return {
        "shape": asdict(shape),
        "device": device,
        "budget": {"device_memory": device_memory, "host_memory": host_memory, "n_cap": n_cap},
        "plan": {
            "itr": plan.itr,
            "quorum": quorum,
            "head_group": hg,
            "leaves_per_group": cost.leaves,
            "leaf_tokens": cost.leaf_tokens,
            "chunk_tokens": chunk,
            "entries": cost.entries,
            "work_over_useful": plan.entries / plan.useful_entries,
            "dense_over_useful": plan.dense_entries / plan.useful_entries,
            "plan_seconds": t_plan,
            "fits": max(cost.device_bytes_per_task.values()) * n_cap <= device_memory
            and max(cost.host_bytes_per_task.values()) * n_cap <= host_memory,
        },
        "disk": {**cost.disk, "total": sum(cost.disk.values())},
        "passes": passes,
        "calibration": calibration.to_dict(),
    }


def check_model(
    shape: Shape | None = None,
    *,
    itr: int = 2,
    quorum: int = 3,
    calibration_points: Sequence[tuple[int, int]] = CALIBRATION_POINTS,
    leaf_tokens: Sequence[int] = (512, 1024, 2048, 4096),
    repeats: int = 1,
    device: str | None = None,
    workers: int = 2,
    directory: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict a full pipeline run (forward and backward) from smaller
    calibration runs, then run it and compare.

    The model never sees the checked size: its kernel time comes from the
    line fitted on sample leaves, and the pipeline fit uses
    ``calibration_points`` only, so the relative error measures an
    extrapolation, as at a billion tokens. The checked run is measured once
    per calibration round and its best compared, like every other item.
    """
    shape = shape or Shape(16384, 4, 4, 64, dtype="float32", is_causal=True)
    device = device or default_device()
    if not calibration_points or any(L >= shape.seq_len for L, _ in calibration_points):
        raise ValueError("calibration points must be given and smaller than the checked size")
    root = Path(directory) if directory else Path(tempfile.gettempdir())
    hg = shape.kv_heads
    measured: list[dict] = []

    def checked_run() -> None:
        if log:
            log(f"measured run: L={shape.seq_len} itr={itr}")
        measured.append(
            pipeline_run(root, shape, itr, head_group=hg, quorum=quorum, workers=workers)
        )

    cal = calibrate(
        shape,
        itr=itr,
        quorum=quorum,
        head_group=hg,
        leaf_tokens=leaf_tokens,
        pipeline_points=calibration_points,
        repeats=repeats,
        device=device,
        workers=workers,
        directory=directory,
        log=log,
        each_round=checked_run,
    )
    for m in measured:
        _with_components(m, cal, shape, quorum, None)
    pred = cal.predict(
        plan_cost(
            divide(shape.seq_len, itr, quorum, is_causal=shape.is_causal),
            shape,
            hg,
            measured[0]["chunk_tokens"],
            device,
        )
    )
    rows: dict[str, dict[str, float]] = {}
    for p in PASSES:
        meas = min(m[f"{p}_s"] for m in measured)
        rows[p] = {
            "predicted_s": pred[p]["pipeline_s"],
            "measured_s": meas,
            "rel_error": pred[p]["pipeline_s"] / meas - 1.0,
            "kernel_s": pred[p]["kernel_s"],
        }
    tp = sum(r["predicted_s"] for r in rows.values())
    tm = sum(r["measured_s"] for r in rows.values())
    rows["total"] = {"predicted_s": tp, "measured_s": tm, "rel_error": tp / tm - 1.0}
    return {
        "shape": asdict(shape),
        "itr": itr,
        "device": device,
        "repeats": repeats,
        "calibration_points": [list(x) for x in calibration_points],
        "passes": rows,
        "rel_error": rows["total"]["rel_error"],
        "measured_runs": measured,
        "calibration": cal.to_dict(),
    }


# -------------------------------------------------------------------- printing


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def format_report(rep: dict[str, Any]) -> str:
    """The estimate as a plain-text table."""
    s, pl, cal = rep["shape"], rep["plan"], rep["calibration"]
    fw, bw = rep["passes"]["fwd"], rep["passes"]["bwd"]
    lines = [
        f"problem: L={s['seq_len']:,} B={s['batch']} H={s['heads']} Hkv={s['kv_heads']} "
        f"D={s['head_dim']} {s['dtype']} causal={s['is_causal']}; device {rep['device']}",
        f"plan:    itr={pl['itr']} quorum={pl['quorum']} head_group={pl['head_group']} "
        f"n_cap={rep['budget']['n_cap']}; {fw['tasks']:,} tasks per pass "
        f"({pl['leaves_per_group']:,} leaves x groups x batch), leaves <= {pl['leaf_tokens']:,} "
        f"tokens; work {pl['work_over_useful']:.3f} x useful (dense leaves "
        f"{pl['dense_over_useful']:.3f}); planned in {pl['plan_seconds']:.2f} s"
        + ("" if pl["fits"] else "  ** tasks do NOT fit the device budget **"),
        "",
        f"| {'':28} | {'forward':>14} | {'backward':>14} | {'total':>14} |",
        f"|{'-' * 30}|{'-' * 16}|{'-' * 16}|{'-' * 16}|",
    ]

    def row(
        label: str, f: float, b: float, fmt: Callable[[float], str], total: bool = True
    ) -> None:
        t = fmt(f + b) if total else ""
        lines.append(f"| {label:28} | {fmt(f):>14} | {fmt(b):>14} | {t:>14} |")

    def hours(x: float) -> str:
        return f"{x:,.3g} h"

    row("kernel device-hours", fw["kernel_device_hours"], bw["kernel_device_hours"], hours)
    row("pipeline wall hours (model)", fw["pipeline_hours"], bw["pipeline_hours"], hours)
    row("  fold (isolated)", fw["fold_hours"], bw["fold_hours"], hours)
    row("  store I/O (isolated)", fw["io_hours"], bw["io_hours"], hours)
    row("tasks", fw["tasks"], bw["tasks"], lambda x: f"{x:,.0f}")
    row(
        "device memory / task",
        fw["device_bytes_per_task"],
        bw["device_bytes_per_task"],
        human_bytes,
        total=False,
    )
    row(
        "host memory / task",
        fw["host_bytes_per_task"],
        bw["host_bytes_per_task"],
        human_bytes,
        total=False,
    )
    row("read", fw["read_bytes"], bw["read_bytes"], human_bytes)
    row("written", fw["write_bytes"], bw["write_bytes"], human_bytes)
    row("disk: outputs", fw["output_disk_bytes"], bw["output_disk_bytes"], human_bytes)
    row(
        "disk: partials (all kept)", fw["partial_disk_bytes"], bw["partial_disk_bytes"], human_bytes
    )
    d = rep["disk"]
    lines += [
        "",
        f"disk: inputs {human_bytes(d['inputs'])}, everything kept {human_bytes(d['total'])} "
        "(partials are the most the store layout writes; keep_partials=False deletes them "
        "as parents finish)",
        "",
        "fitted on this machine:",
    ]
    for p in PASSES:
        k = cal["kernel"][p]
        lines.append(
            f"  {p} task seconds = {k['a']:.3g} + {k['b']:.3g} x entries "
            f"({k['points']} tasks, rel rms {k['rel_rms']:.1%}; "
            f"{1 / k['b'] if k['b'] else math.inf:.3g} entries/s)"
        )
    samples = cal.get("samples") or []
    if samples:
        big = max(samples, key=lambda r: r["entries"])
        lines.append(
            f"  sampled leaves of {min(r['tokens'] for r in samples):,}-"
            f"{max(r['tokens'] for r in samples):,} tokens (the plan's: up to "
            f"{pl['leaf_tokens']:,}); the largest ran {big['entries'] / big['fwd_s']:.3g} / "
            f"{big['entries'] / big['bwd_s']:.3g} entries/s (fwd/bwd). Bigger leaves run "
            "bigger blocks, so the hours above lean high."
        )
    lines.append(
        f"  fold {cal['fold_s_per_elem']['fwd']:.3g} / {cal['fold_s_per_elem']['bwd']:.3g} "
        f"s per element (fwd/bwd); store read {human_bytes(cal['read_Bps'])}/s, "
        f"write {human_bytes(cal['write_Bps'])}/s"
    )
    if cal.get("pipeline"):
        for p in PASSES:
            f = cal["pipeline"][p]
            lines.append(
                f"  {p} pipeline = {f['c0']:.3g} s + {f['alpha']:.3g} x kernel + "
                f"{f['beta']:.3g} x (fold + I/O)  (rel rms {f['rel_rms']:.1%} over "
                f"{len(cal['pipeline_runs'])} runs)"
            )
    else:
        lines.append("  pipeline overhead not calibrated: wall = kernel + fold + I/O")
    return "\n".join(lines)


def format_check(res: dict[str, Any]) -> str:
    s = res["shape"]
    out = [
        f"model check: L={s['seq_len']} H={s['heads']} D={s['head_dim']} {s['dtype']} "
        f"causal={s['is_causal']} itr={res['itr']} on {res['device']}; calibrated at "
        + ", ".join(f"L={L}/itr={i}" for L, i in res["calibration_points"]),
        "",
        "| pass | predicted s | measured s | rel. error |",
        "|---|---|---|---|",
    ]
    for p, r in res["passes"].items():
        out.append(
            f"| {p} | {r['predicted_s']:.2f} | {r['measured_s']:.2f} | {r['rel_error']:+.1%} |"
        )
    return "\n".join(out)


__all__ = [
    "Calibration",
    "Line",
    "PlanCost",
    "Shape",
    "calibrate",
    "check_model",
    "choose_plan",
    "estimate",
    "fit_line",
    "fit_nonneg",
    "pipeline_run",
    "format_check",
    "format_report",
    "plan_cost",
    "time_tasks",
]
