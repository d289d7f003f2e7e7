"""The layout of a pass: depth (``itr="auto"``), head group and unit depth.

Memory decides: the depth and head group from the device and host budgets
(``cqs.budget.choose``), the unit depth as the shallowest whose units fit
the unit budget (each level deeper folds every token k times more). An
automatic choice is made once per pass: a resumed pass keeps its units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from streamcqsa.cqs import footprint
from streamcqsa.cqs.divide import divide
from streamcqsa.cqs.plan import Plan
from streamcqsa.kernels.device import Device, compute_dtype_name
from streamcqsa.storage.layout import Problem, torch_dtype
from streamcqsa.storage.units import Layout


def auto_plan(
    p: Problem, device: str, head_group: int | None, guard: dict
) -> tuple[int, int | None, dict]:
    """itr, head group and n_cap from the device and host memory budgets."""
    import psutil

    from streamcqsa.cqs.budget import Budget, choose

    dev = Device.of(device)
    dev_mem = guard.get("budget_bytes")
    if dev_mem is None:
        dev_mem = dev.plan_bytes()
    host = int(psutil.virtual_memory().available * 0.5)
    est = choose(
        seq_len=p.seq_len,
        heads=p.heads,
        kv_heads=p.kv_heads,
        head_dim=p.head_dim,
        budget=Budget(dev_mem, host),
        dtype=compute_dtype_name(dev.type, p.dtype),
        store_dtype=p.dtype,
        is_causal=p.is_causal,
        batch=p.batch,
        n_cap=guard.get("n_cap", 2),
        chunk_tokens=p.chunk_tokens,
    )
    return est.itr, head_group or est.head_group, {**guard, "n_cap": est.n_cap}


def choose_head_group(problem: Problem, task_tokens: int, budget_bytes: int) -> int:
    """Largest divisor of kv_heads whose leaf working set fits the budget.

    Splitting heads adds no work, so it is the first lever for memory.
    """
    r = problem.group_ratio
    per_kv_head = task_tokens * problem.head_dim * 4 * (2 + 3 * r) * 2  # inputs, out, temps
    best = 1
    for hg in range(1, problem.kv_heads + 1):
        if problem.kv_heads % hg == 0 and hg * per_kv_head <= budget_bytes:
            best = hg
    return best


def default_task_bytes(device: str, n_cap: int) -> int:
    """Memory one unit may take: units live on the pass's device, forward and
    backward alike (``Device.unit_bytes``; on a GPU
    ``cqs.footprint.unit_device_bytes`` sizes them)."""
    return Device.of(device).unit_bytes(n_cap)


def choose_units(
    plan: Plan,
    problem: Problem,
    head_group: int | None,
    budget_bytes: int,
    kind: str,
    device_itemsize: int | None = None,
    width: int = 1,
) -> tuple[int, int]:
    """(unit_depth, head_group) for ``problem`` (``cqs.footprint.choose_units``,
    host units running their leaves ``width`` at a time); a head group from
    ``choose_head_group`` if no depth fits."""
    depth, hg = footprint.choose_units(
        plan,
        group_ratio=problem.group_ratio,
        kv_heads=problem.kv_heads,
        head_dim=problem.head_dim,
        budget_bytes=budget_bytes,
        kind=kind,
        head_group=head_group,
        device_itemsize=device_itemsize,
        width=width,
    )
    if hg is None:
        hg = choose_head_group(problem, max(t.length for t in plan.tasks), budget_bytes)
    return depth, hg


def resume_units(
    entry: dict | None, problem: Problem, itr: int, quorum: Any, head_group: int | None
) -> tuple[int | str | None, int | None]:
    """An automatic choice is made once per pass: a pass already in the store
    with the same depth and quorums keeps its units and head group, even if
    the budget (or its default) has changed since."""
    plan = (entry or {}).get("plan")
    if not plan:
        return "auto", head_group
    built = divide(problem.seq_len, itr, quorum, is_causal=problem.is_causal)  # may be capped
    if plan.get("itr") != built.itr or list(plan.get("quorums", ())) != list(built.quorums):
        return "auto", head_group
    if head_group is not None and head_group != plan.get("head_group"):
        return "auto", head_group
    return plan.get("unit_depth", itr), plan.get("head_group")


def layout(
    problem: Problem,
    itr: int,
    quorum: int | Sequence[int],
    head_group: int | None,
    task_bytes: int,
    unit_depth: int | str | None,
    kind: str,
    device: str = "cpu",
    width: int = 1,
) -> Layout:
    plan = divide(problem.seq_len, itr, quorum, is_causal=problem.is_causal)
    if head_group is not None and (
        isinstance(head_group, bool)
        or not isinstance(head_group, int)
        or head_group < 1
        or problem.kv_heads % head_group
    ):
        raise ValueError(f"head_group {head_group} must divide kv_heads {problem.kv_heads}")
    if unit_depth == "auto":
        on_gpu = Device.of(device).is_cuda
        itemsize = torch.empty((), dtype=torch_dtype(problem.dtype)).element_size()
        unit_depth, head_group = choose_units(
            plan, problem, head_group, task_bytes, kind, itemsize if on_gpu else None, width
        )
    elif unit_depth is not None and (
        isinstance(unit_depth, bool) or not isinstance(unit_depth, int) or unit_depth < 0
    ):
        raise ValueError(f"unit_depth must be 'auto', None or an int >= 0, got {unit_depth!r}")
    if head_group is None:
        longest = max(t.length for t in plan.tasks)
        head_group = choose_head_group(problem, longest, task_bytes)
    return Layout(plan=plan, problem=problem, head_group=head_group, unit_depth=unit_depth)


__all__ = [
    "auto_plan",
    "choose_head_group",
    "choose_units",
    "default_task_bytes",
    "layout",
    "resume_units",
]
