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

import math
from dataclasses import asdict, dataclass

from streamcqsa.cqs.divide import DEFAULT_QUORUM, Node, Plan, divide
from streamcqsa.cqs.interest import chunk_count, interest_set

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
PASSES = ("fwd", "bwd")


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

    def to_dict(self) -> dict:
        return asdict(self)


def leaf_device_bytes(
    tokens: int, q_heads: int, kv_heads: int, head_dim: int, itemsize: int, kind: str = "fwd"
) -> int:
    """Device bytes of one leaf task of ``kind``, inputs in the compute dtype.

    Forward: q, k, v and the kernel's out, plus fp32 out and lse. Backward:
    q, k, v, dout, out, fp32 lse, fp32 dq/dk/dv accumulators and one block's
    kernel gradients.
    """
    hq, hk, d, c = q_heads, kv_heads, head_dim, itemsize
    if kind == "fwd":
        return tokens * d * (c * (2 * hq + 2 * hk) + 4 * hq) + 4 * hq * tokens
    if kind == "bwd":
        return tokens * (d * (c * (3 * hq + 2 * hk) + (4 + c) * (hq + 2 * hk)) + 4 * hq)
    raise ValueError(f"kind must be one of {PASSES}, got {kind!r}")


def leaf_host_bytes(
    tokens: int, q_heads: int, kv_heads: int, head_dim: int, itemsize: int, kind: str = "fwd"
) -> int:
    """Host bytes of one in-flight leaf task of ``kind``: its gathered inputs as
    stored (``itemsize``) plus its fp32 partial twice (read and write buffer)."""
    hq, hk, d, s = q_heads, kv_heads, head_dim, itemsize
    if kind == "fwd":
        return tokens * (d * s * (hq + 2 * hk) + 2 * 4 * hq * (d + 1))
    if kind == "bwd":
        return tokens * (d * s * (3 * hq + 2 * hk) + 4 * hq + 2 * 4 * d * (hq + 2 * hk))
    raise ValueError(f"kind must be one of {PASSES}, got {kind!r}")


def unit_host_bytes(
    plan: Plan,
    node: Node,
    *,
    group_ratio: int,
    head_group: int,
    head_dim: int,
    kind: str = "fwd",
) -> int:
    """Host bytes of a task unit that runs ``node``'s subtree in memory.

    Counted in fp32 (CPU kernels compute half types in fp32): the node's
    gathered inputs, the partial rows its fold holds at its peak (gradients
    are added up child by child, ``Plan.summed_fold_rows``), the padded copy
    written out, and one leaf's gathered inputs plus kernel outputs.
    """
    hq, hk, d = head_group * group_ratio, head_group, head_dim
    if kind == "fwd":
        per_in = d * (hq + 2 * hk)  # q, k, v
        per_part = hq * (d + 1)  # out, lse
        held = plan.fold_rows(node)
    else:
        per_in = d * (3 * hq + 2 * hk) + hq  # q, k, v, dout, out, lse
        per_part = d * (hq + 2 * hk)  # dq, dk, dv
        held = plan.summed_fold_rows(node)
    leaf = plan.longest_leaf(node)
    rows = held + node.length
    return 4 * (node.length * per_in + rows * per_part + leaf * (per_in + per_part))


def unit_device_bytes(
    plan: Plan,
    node: Node,
    *,
    group_ratio: int,
    head_group: int,
    head_dim: int,
    itemsize: int,
) -> int:
    """Device bytes of a forward unit that lives on a GPU.

    The node's inputs in the compute dtype, the fp32 partial rows its
    streamed fold holds at its peak, and one leaf's gathered inputs (at
    most) and kernel output in the compute dtype.
    """
    hq, hk, d = head_group * group_ratio, head_group, head_dim
    leaf = plan.longest_leaf(node)
    inputs = itemsize * (node.length + leaf) * d * (hq + 2 * hk)
    partials = 4 * plan.streamed_fold_rows(node) * hq * (d + 1)
    return inputs + partials + itemsize * leaf * hq * d


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
) -> Estimate:
    """Predict memory, disk, I/O and time of running ``plan`` (time: forward).

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
    rows = sum(math.ceil(n.length / chunk_tokens) * chunk_tokens for n in plan.nodes if n.depth)
    partial_disk = batch * heads * rows * (head_dim + 1) * 4
    io_tokens = sum(t.length for t in plan.tasks)
    reads = batch * io_tokens * head_dim * ssize * (heads + 2 * kv_heads)
    merge_reads = sum(
        n.length * len(plan.interest_sets[n.depth]) for n in plan.nodes if not n.is_leaf
    )
    reads += batch * heads * merge_reads * (head_dim + 1) * 4
    writes = partial_disk + batch * heads * plan.seq_len * (head_dim * ssize + 4)
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
        disk_bytes=inputs + partial_disk + batch * heads * plan.seq_len * (head_dim * ssize + 4),
        read_bytes=reads,
        write_bytes=writes,
        entries=entries,
        seconds=entries / throughput / max(1, devices),
        fwd_device_bytes_per_task=dev["fwd"],
        bwd_device_bytes_per_task=dev["bwd"],
        requested_itr=plan.requested_itr if plan.capped else None,
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
                return est
    return None


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
