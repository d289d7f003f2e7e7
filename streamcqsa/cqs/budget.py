"""Choose a plan from memory budgets, and predict what it will cost.

Splitting heads or batch adds no work, so the head group is the first lever;
the CQS depth comes second (each level shrinks a task by about k/n but adds
merges and partial disk), and the quorum last. Pure arithmetic over a real
``divide`` of the chosen depth: no torch, no I/O.

One chooser serves every caller (``streamcqsa.plan``, ``itr='auto'`` runs,
``streamcqsa estimate``): the backward reuses the forward's plan and its
tasks hold more, so a plan is chosen only if both passes' tasks fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from streamcqsa.cqs.divide import DEFAULT_QUORUM, Plan, divide
from streamcqsa.cqs.footprint import (  # the byte formulas, re-exported for callers
    ITEMSIZE,
    PASSES,
    choose_units,
    leaf_device_bytes,
    leaf_host_bytes,
    pass_traffic,
    peak_disk,
    unit_device_bytes,
    unit_host_bytes,
)
from streamcqsa.cqs.interest import chunk_count, interest_set


@dataclass(frozen=True)
class Budget:
    device_memory: int  # bytes per device
    host_memory: int  # bytes
    devices: int = 1


@dataclass(frozen=True)
class Estimate:
    """What a plan needs; every figure in bytes or seconds.

    ``device_bytes_per_task`` is the larger of the two passes' (what the
    choice was sized for); each pass's own is stated beside it.
    """

    itr: int
    quorum: int
    head_group: int
    n_cap: int
    tasks: int
    leaf_tokens: int
    device_bytes_per_task: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    read_bytes: int
    write_bytes: int
    entries: int
    seconds: float
    fwd_device_bytes_per_task: int = 0
    bwd_device_bytes_per_task: int = 0
    requested_itr: int | None = None  # the depth asked for, if divide stopped above it
    unit_depth: int = 0  # where a store pass cuts its units (``cqs.footprint``)
    chunk_tokens: int = 512
    partial_disk_bytes: int = 0  # the forward's accumulator, its one intermediate
    kept_partial_bytes: int = 0  # every unit's partial, if kept on request

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(
    plan: Plan,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    head_group: int,
    n_cap: int,
    throughput: float,
    chunk_tokens: int,
    devices: int = 1,
    store_dtype: str | None = None,
    unit_depth: int | None = None,
) -> Estimate:
    """Predict memory, disk, I/O and time of running ``plan`` (time: forward).

    Disk and I/O are a store forward's with units cut at ``unit_depth``
    (default: every leaf a unit, the most I/O): inputs, outputs and the
    accumulator on disk; reads of each unit's tokens and folds.

    Memory per task is that of the pass that needs most: the backward runs
    the forward's plan. ``dtype`` is the compute dtype (device memory);
    ``store_dtype`` (default ``dtype``) is what gathered inputs are held in.
    """
    size = ITEMSIZE[dtype]
    ssize = ITEMSIZE[store_dtype or dtype]
    r = heads // kv_heads
    groups = kv_heads // head_group
    leaf = max(t.length for t in plan.tasks)
    hq, hk = head_group * r, head_group
    dev = {k: leaf_device_bytes(leaf, hq, hk, head_dim, size, k) for k in PASSES}
    per_task = max(dev.values())
    host_task = max(leaf_host_bytes(leaf, hq, hk, head_dim, ssize, k) for k in PASSES)
    host = n_cap * devices * host_task + 64 * 2**20
    depth = plan.itr if unit_depth is None else min(unit_depth, plan.itr)
    traffic = pass_traffic(
        plan,
        depth,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        itemsize=ssize,
        chunk_tokens=chunk_tokens,
        head_group=head_group,
    )
    inputs = batch * plan.seq_len * head_dim * ssize * (heads + 2 * kv_heads)
    entries = plan.entries * batch * heads
    return Estimate(
        itr=plan.itr,
        quorum=plan.quorums[0] if plan.quorums else 0,
        head_group=head_group,
        n_cap=n_cap,
        tasks=len(plan.tasks) * batch * groups,
        leaf_tokens=leaf,
        device_bytes_per_task=per_task,
        device_bytes=per_task * n_cap,
        host_bytes=host,
        disk_bytes=inputs + peak_disk(traffic.output_bytes, traffic.accumulator_bytes),
        read_bytes=traffic.read_bytes,
        write_bytes=traffic.write_bytes,
        entries=entries,
        seconds=entries / throughput / max(1, devices),
        fwd_device_bytes_per_task=dev["fwd"],
        bwd_device_bytes_per_task=dev["bwd"],
        requested_itr=plan.requested_itr if plan.capped else None,
        unit_depth=depth,
        chunk_tokens=chunk_tokens,
        partial_disk_bytes=traffic.accumulator_bytes,
        kept_partial_bytes=traffic.kept_bytes,
    )


def fit_plan(
    plan: Plan,
    *,
    heads: int,
    kv_heads: int,
    head_dim: int,
    budget: Budget,
    dtype: str = "float16",
    store_dtype: str | None = None,
    batch: int = 1,
    n_cap: int = 2,
    throughput: float = 1e9,
    chunk_tokens: int = 512,
) -> Estimate | None:
    """The largest head group, then the most tasks in flight (up to ``n_cap``),
    with which ``plan``'s tasks of both passes fit the budget; None if even
    one head per task, one at a time, does not."""
    for hg in sorted((d for d in range(1, kv_heads + 1) if kv_heads % d == 0), reverse=True):
        for cap in range(n_cap, 0, -1):
            est = estimate(
                plan,
                batch=batch,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                dtype=dtype,
                store_dtype=store_dtype,
                head_group=hg,
                n_cap=cap,
                throughput=throughput,
                chunk_tokens=chunk_tokens,
                devices=budget.devices,
            )
            if est.device_bytes <= budget.device_memory and est.host_bytes <= budget.host_memory:
                # units as large as half the host memory per resident task
                # allows (a unit's partial waits for its fold beside the next)
                depth, _ = choose_units(
                    plan,
                    group_ratio=heads // kv_heads,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    budget_bytes=budget.host_memory // (2 * cap),
                    kind="fwd",
                    head_group=hg,
                )
                return replace(
                    est,
                    **_traffic_fields(
                        plan, depth, batch, heads, kv_heads, head_dim, est, store_dtype or dtype
                    ),
                )
    return None


def _traffic_fields(
    plan: Plan,
    depth: int,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    est: Estimate,
    store_dtype: str,
) -> dict:
    ssize = ITEMSIZE[store_dtype]
    t = pass_traffic(
        plan,
        depth,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        itemsize=ssize,
        chunk_tokens=est.chunk_tokens,
        head_group=est.head_group,
    )
    inputs = batch * plan.seq_len * head_dim * ssize * (heads + 2 * kv_heads)
    return {
        "unit_depth": depth,
        "disk_bytes": inputs + peak_disk(t.output_bytes, t.accumulator_bytes),
        "read_bytes": t.read_bytes,
        "write_bytes": t.write_bytes,
        "partial_disk_bytes": t.accumulator_bytes,
        "kept_partial_bytes": t.kept_bytes,
    }


def choose_plan(
    *,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    budget: Budget,
    dtype: str = "float16",
    store_dtype: str | None = None,
    is_causal: bool = False,
    batch: int = 1,
    quorum: int = DEFAULT_QUORUM,
    max_itr: int = 6,
    n_cap: int = 2,
    throughput: float = 1e9,
    chunk_tokens: int = 512,
) -> tuple[Estimate, Plan]:
    """``choose``, with the plan it chose (so callers need not divide again)."""
    _check_shape(heads, kv_heads, dtype, store_dtype)
    interest_set(quorum)  # a bad quorum is refused even if no level ends up using it
    n = chunk_count(quorum)
    shape = {
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "budget": budget,
        "dtype": dtype,
        "store_dtype": store_dtype,
        "batch": batch,
        "n_cap": n_cap,
        "throughput": throughput,
        "chunk_tokens": chunk_tokens,
    }
    for itr in range(max_itr + 1):
        # cheap bound before building the plan: an even split's leaf, one head
        approx = int(seq_len * (quorum / n) ** itr * 0.9)
        least = max(
            leaf_device_bytes(approx, heads // kv_heads, 1, head_dim, ITEMSIZE[dtype], k)
            for k in PASSES
        )
        if least > budget.device_memory and itr < max_itr:
            continue
        plan = divide(seq_len, itr, quorum if itr else DEFAULT_QUORUM, is_causal=is_causal)
        est = fit_plan(plan, **shape)  # type: ignore[arg-type]
        if est is not None:
            return est, plan
        if plan.capped:  # deeper levels would split nothing more
            break
    raise ValueError(
        f"no plan up to itr={max_itr} fits {budget.device_memory} device bytes and "
        f"{budget.host_memory} host bytes (forward and backward tasks); raise max_itr "
        "or the budgets"
    )


def choose(
    *,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    budget: Budget,
    dtype: str = "float16",
    store_dtype: str | None = None,
    is_causal: bool = False,
    batch: int = 1,
    quorum: int = DEFAULT_QUORUM,
    max_itr: int = 6,
    n_cap: int = 2,
    throughput: float = 1e9,
    chunk_tokens: int = 512,
) -> Estimate:
    """The shallowest plan whose tasks fit the device (n_cap of them) and host.

    Both passes' tasks must fit, since the backward runs the forward's plan.
    For each depth the largest head group that fits is taken; deeper plans
    are tried only if even one head per task does not fit. ``dtype`` is the
    compute dtype, ``store_dtype`` (default ``dtype``) the stored one.
    """
    est, _ = choose_plan(
        seq_len=seq_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        budget=budget,
        dtype=dtype,
        store_dtype=store_dtype,
        is_causal=is_causal,
        batch=batch,
        quorum=quorum,
        max_itr=max_itr,
        n_cap=n_cap,
        throughput=throughput,
        chunk_tokens=chunk_tokens,
    )
    return est


def _check_shape(heads: int, kv_heads: int, dtype: str, store_dtype: str | None) -> None:
    for name, dt in (("dtype", dtype), ("store_dtype", store_dtype or dtype)):
        if dt not in ITEMSIZE:
            raise ValueError(f"{name} must be one of {tuple(ITEMSIZE)}, got {dt!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")


__all__ = [
    "ITEMSIZE",
    "PASSES",
    "Budget",
    "Estimate",
    "choose",
    "choose_plan",
    "estimate",
    "fit_plan",
    "leaf_device_bytes",
    "leaf_host_bytes",
    "unit_device_bytes",
    "unit_host_bytes",
]
