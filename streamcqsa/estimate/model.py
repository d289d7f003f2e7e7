"""The cost model's arithmetic: problem shapes, the fits, plan costs and plan choice.

Pure arithmetic over plans (no torch, no timing), so that the full plan's
cost can be summed at a billion tokens in seconds and tested anywhere; the
measured coefficients come from ``timing`` and ``calibrate``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import streamcqsa.cqs.budget as planner
from streamcqsa.cqs.budget import (
    ITEMSIZE,
    PASSES,
    Budget,
    fit_plan,
    leaf_device_bytes,
    leaf_host_bytes,
)
from streamcqsa.cqs.divide import DEFAULT_QUORUM, Plan, divide
from streamcqsa.cqs.footprint import pass_traffic
from streamcqsa.kernels.device import compute_dtype_name


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
    cols: Sequence[Sequence[float]],
    y: Sequence[float],
    *,
    relative: bool = True,
    offset: Sequence[float] | None = None,
) -> tuple[list[float], float]:
    """Least squares with non-negative coefficients; returns them and the relative
    RMS residual.

    The model is ``offset + cols @ coef`` (``offset`` defaults to 0): a known
    part of y that the fitted terms only add to. Exhaustive over column
    subsets (a handful of columns here), so it needs no solver and always
    returns the best non-negative fit. ``relative`` weighs every point by 1/y
    (points span orders of magnitude); otherwise large points dominate,
    which is what an extrapolation to huge tasks wants.
    """
    x = np.asarray(cols, dtype=float).T
    yy = np.asarray(y, dtype=float)
    base = np.zeros_like(yy) if offset is None else np.asarray(offset, dtype=float)
    w = 1.0 / np.maximum(yy, 1e-12) if relative else np.full_like(yy, 1.0 / max(yy.max(), 1e-12))
    best: tuple[float, list[float]] = (math.inf, [0.0] * x.shape[1])
    for r in range(0 if offset is not None else 1, x.shape[1] + 1):
        for sub in itertools.combinations(range(x.shape[1]), r):
            full = [0.0] * x.shape[1]
            if sub:
                coef, *_ = np.linalg.lstsq(x[:, sub] * w[:, None], (yy - base) * w, rcond=None)
                if (coef < 0).any():
                    continue
                for i, c in zip(sub, coef, strict=True):
                    full[i] = float(c)
            err = float(np.sqrt(np.mean(((x @ np.asarray(full) + base - yy) * w) ** 2)))
            if err < best[0]:
                best = (err, full)
    pred = x @ np.asarray(best[1]) + base
    rel = float(np.sqrt(np.mean((pred / np.maximum(yy, 1e-12) - 1.0) ** 2)))
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
    disk: dict[str, int]  # inputs, and outputs and accumulator per pass
    device_bytes_per_task: dict[str, int]
    host_bytes_per_task: dict[str, int]


def compute_dtype(dtype: str, device: str) -> str:
    """The dtype kernels on ``device`` (a name; it need not be present here)
    compute ``dtype`` in: ``kernels.device``'s rule (for "cpu", this CPU's)."""
    return compute_dtype_name(device.split(":")[0], dtype)


def task_bytes(
    tokens: int, hq: int, hk: int, d: int, csize: int, ssize: int
) -> dict[str, dict[str, int]]:
    """Device and host bytes of one task per pass: the planner's own figures
    (``cqs.budget.leaf_device_bytes`` in the compute dtype, ``leaf_host_bytes``
    in the stored one), so the estimate and the chooser agree."""
    return {
        "device": {k: leaf_device_bytes(tokens, hq, hk, d, csize, k) for k in PASSES},
        "host": {k: leaf_host_bytes(tokens, hq, hk, d, ssize, k) for k in PASSES},
    }


def plan_cost(
    plan: Plan,
    shape: Shape,
    head_group: int,
    chunk_tokens: int,
    device: str = "cpu",
    unit_depth: int | None = None,
) -> PlanCost:
    """Work, bytes and memory of running ``plan`` over ``shape``, both passes.

    Store traffic is a store pass's with units cut at ``unit_depth``
    (default: every leaf a unit, the most I/O; ``cqs.footprint.pass_traffic``).
    A pipeline with larger units moves less; the end-to-end fit absorbs that
    as a smaller ``beta``.
    """
    if head_group < 1 or shape.kv_heads % head_group:
        raise ValueError(f"head_group {head_group} must divide kv_heads {shape.kv_heads}")
    hk = head_group
    hq = hk * shape.ratio
    units = shape.batch * (shape.kv_heads // hk)
    d, ss = shape.head_dim, ITEMSIZE[shape.dtype]
    cs = ITEMSIZE[compute_dtype(shape.dtype, device)]
    leaves = plan.tasks
    depth = plan.itr if unit_depth is None else min(unit_depth, plan.itr)
    child_rows = 0  # rows folds read: every inner node reads each child's rows
    for n in plan.nodes:
        if not n.is_leaf:
            child_rows += sum(plan.by_path[c].length for c in n.children)
    traffic = {
        k: pass_traffic(
            plan,
            depth,
            batch=shape.batch,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=d,
            itemsize=ss,
            chunk_tokens=chunk_tokens,
            kind=k,
            head_group=head_group,
        )
        for k in PASSES
    }
    B, H, Hk, L = shape.batch, shape.heads, shape.kv_heads, plan.seq_len
    disk = {
        "inputs": B * L * d * ss * (H + 2 * Hk),
        "fwd_outputs": traffic["fwd"].output_bytes,
        "fwd_partials": traffic["fwd"].accumulator_bytes,
        "bwd_outputs": traffic["bwd"].output_bytes,
        "bwd_partials": traffic["bwd"].accumulator_bytes,
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
        read_bytes={k: t.read_bytes for k, t in traffic.items()},
        write_bytes={k: t.write_bytes for k, t in traffic.items()},
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
    quorum: int = DEFAULT_QUORUM,
    n_cap: int = 1,
    chunk_tokens: int = 65536,
    device: str = "cpu",
    max_itr: int = 7,
) -> tuple[Plan, int]:
    """The plan and head group both passes run with (``plan_choice`` without
    the number of tasks in flight)."""
    plan, hg, _ = plan_choice(
        shape,
        device_memory=device_memory,
        host_memory=host_memory,
        itr=itr,
        quorum=quorum,
        n_cap=n_cap,
        chunk_tokens=chunk_tokens,
        device=device,
        max_itr=max_itr,
    )
    return plan, hg


def plan_choice(
    shape: Shape,
    *,
    device_memory: int,
    host_memory: int,
    itr: int | str = "auto",
    quorum: int = DEFAULT_QUORUM,
    n_cap: int = 1,
    chunk_tokens: int = 65536,
    device: str = "cpu",
    max_itr: int = 7,
) -> tuple[Plan, int, int]:
    """The plan, head group and tasks in flight (at most ``n_cap``) both passes
    run with: the planner's one chooser (``cqs.budget.choose_plan``, as
    ``streamcqsa.plan`` and ``itr='auto'`` runs use it), sized for the compute
    dtype of ``device``. A given ``itr`` only picks the head group and tasks
    in flight; if nothing fits there, the plan is still returned (with one
    head per task, ``n_cap`` in flight) so that it can be reported.
    """
    cdt = compute_dtype(shape.dtype, device)
    common = {
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "budget": Budget(device_memory, host_memory),
        "dtype": cdt,
        "store_dtype": shape.dtype,
        "batch": shape.batch,
        "n_cap": n_cap,
        "chunk_tokens": chunk_tokens,
    }
    if itr == "auto":
        est, plan = planner.choose_plan(
            seq_len=shape.seq_len,
            is_causal=shape.is_causal,
            quorum=quorum,
            max_itr=max_itr,
            **common,  # type: ignore[arg-type]
        )
        return plan, est.head_group, est.n_cap
    if isinstance(itr, bool) or not isinstance(itr, int) or itr < 0:
        raise ValueError(f"itr must be a non-negative int or 'auto', got {itr!r}")
    plan = divide(shape.seq_len, itr, quorum, is_causal=shape.is_causal)
    fit = fit_plan(plan, **common)  # type: ignore[arg-type]
    return (plan, fit.head_group, fit.n_cap) if fit is not None else (plan, 1, n_cap)
