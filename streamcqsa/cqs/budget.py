"""Choose a plan from memory budgets, and predict what it will cost.

Splitting heads or batch adds no work, so the head group is the first lever;
the CQS depth comes second (each level shrinks a task by about k/n but adds
merges and partial disk), and the quorum last. Pure arithmetic over a real
``divide`` of the chosen depth: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from streamcqsa.cqs.divide import Node, Plan, divide
from streamcqsa.cqs.interest import chunk_count

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Budget:
    device_memory: int  # bytes per device
    host_memory: int  # bytes
    devices: int = 1


@dataclass(frozen=True)
class Estimate:
    """What a plan needs; every figure in bytes or seconds."""

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

    def to_dict(self) -> dict:
        return asdict(self)


def leaf_device_bytes(
    tokens: int, q_heads: int, kv_heads: int, head_dim: int, itemsize: int
) -> int:
    """q, k, v and the kernel's out in the compute dtype, plus fp32 out and lse."""
    return (
        tokens * head_dim * (itemsize * (2 * q_heads + 2 * kv_heads) + 4 * q_heads)
        + 4 * q_heads * tokens
    )


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
) -> Estimate:
    """Predict memory, disk, I/O and time of running ``plan`` (forward)."""
    size = ITEMSIZE[dtype]
    r = heads // kv_heads
    groups = kv_heads // head_group
    leaf = max(t.length for t in plan.tasks)
    per_task = leaf_device_bytes(leaf, head_group * r, head_group, head_dim, size)
    # host: each in-flight task holds its inputs and fp32 partial twice (read + write)
    host_task = (
        leaf * head_dim * (size * (head_group * r + 2 * head_group) + 2 * 4 * head_group * r)
    )
    host = n_cap * devices * host_task + 64 * 2**20
    rows = sum(math.ceil(n.length / chunk_tokens) * chunk_tokens for n in plan.nodes if n.depth)
    partial_disk = batch * heads * rows * (head_dim + 1) * 4
    io_tokens = sum(t.length for t in plan.tasks)
    reads = batch * io_tokens * head_dim * size * (heads + 2 * kv_heads)
    merge_reads = sum(
        n.length * len(plan.interest_sets[n.depth]) for n in plan.nodes if not n.is_leaf
    )
    reads += batch * heads * merge_reads * (head_dim + 1) * 4
    writes = partial_disk + batch * heads * plan.seq_len * (head_dim * size + 4)
    inputs = batch * plan.seq_len * head_dim * size * (heads + 2 * kv_heads)
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
        disk_bytes=inputs + partial_disk + batch * heads * plan.seq_len * (head_dim * size + 4),
        read_bytes=reads,
        write_bytes=writes,
        entries=entries,
        seconds=entries / throughput / max(1, devices),
    )


def choose(
    *,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    budget: Budget,
    dtype: str = "float16",
    is_causal: bool = False,
    batch: int = 1,
    quorum: int = 3,
    max_itr: int = 6,
    n_cap: int = 2,
    throughput: float = 1e9,
    chunk_tokens: int = 512,
) -> Estimate:
    """The shallowest plan whose tasks fit the device (n_cap of them) and host.

    For each depth the largest head group that fits is taken; deeper plans
    are tried only if even one head per task does not fit.
    """
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype must be one of {tuple(ITEMSIZE)}, got {dtype!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    n = chunk_count(quorum)
    for itr in range(max_itr + 1):
        # cheap bound before building the plan: an even split's leaf length
        approx = seq_len * (quorum / n) ** itr
        if (
            leaf_device_bytes(int(approx * 0.9), heads // kv_heads, 1, head_dim, ITEMSIZE[dtype])
            > budget.device_memory
            and itr < max_itr
        ):
            continue
        plan = divide(seq_len, itr, quorum, is_causal=is_causal)
        for hg in sorted((d for d in range(1, kv_heads + 1) if kv_heads % d == 0), reverse=True):
            for cap in range(n_cap, 0, -1):
                est = estimate(
                    plan,
                    batch=batch,
                    heads=heads,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    dtype=dtype,
                    head_group=hg,
                    n_cap=cap,
                    throughput=throughput,
                    chunk_tokens=chunk_tokens,
                    devices=budget.devices,
                )
                if (
                    est.device_bytes <= budget.device_memory
                    and est.host_bytes <= budget.host_memory
                ):
                    return est
    raise ValueError(
        f"no plan up to itr={max_itr} fits {budget.device_memory} device bytes and "
        f"{budget.host_memory} host bytes; raise max_itr or the budgets"
    )
