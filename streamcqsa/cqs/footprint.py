"""Every byte a plan costs: memory per task and unit, disk and I/O per pass.

One module so the chooser (``cqs.budget``), the pipeline's unit choice, its
guardrail and ``streamcqsa estimate`` size things alike. Pure arithmetic over
a plan: no torch, no I/O.

The store model these count (``storage.units``): a pass cut at unit depth u
reads each unit node's tokens once (so every input token k^u-ish times), and
folds each unit's fp32 partial into one accumulator over the sequence (read
and written once per unit); the accumulator is the only intermediate on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamcqsa.cqs.folds import unit_nodes
from streamcqsa.cqs.plan import Node, Plan

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
PASSES = ("fwd", "bwd")


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


def tree_rows(plan: Plan, node: Node, kind: str = "fwd", width: int = 1) -> int:
    """Peak partial rows ``kernels.tree`` holds running ``node``'s subtree.

    One by one (``width`` 1): ``Plan.fold_rows`` forward, and
    ``Plan.summed_fold_rows`` backward, where each child is added in as soon
    as it is done. With leaves at once on ``width`` >= 2 threads, a fold
    (forward) or an add (backward) waits for the next batch of leaves to run
    beside it, so each level below ``node`` may hold one more inner node's
    rows, and forward its children's too; and the backward holds the
    gradients of up to 2 * width leaves instead of one."""
    if kind not in PASSES:
        raise ValueError(f"kind must be one of {PASSES}, got {kind!r}")
    one = plan.fold_rows(node) if kind == "fwd" else plan.summed_fold_rows(node)
    if width < 2 or node.is_leaf:
        return one
    levels: dict[int, int] = {}  # the most a queued inner node holds, per depth
    below = [plan.by_path[c] for c in node.children]  # its subtree only: units tile the plan
    while below:
        n = below.pop()
        if n.is_leaf:
            continue
        kids = [plan.by_path[c] for c in n.children]
        rows = n.length + (sum(c.length for c in kids) if kind == "fwd" else 0)
        levels[n.depth] = max(levels.get(n.depth, 0), rows)
        below += kids
    leaves = (2 * width - 1) * plan.longest_leaf(node) if kind == "bwd" else 0
    return one + sum(levels.values()) + leaves


def unit_host_bytes(
    plan: Plan,
    node: Node,
    *,
    group_ratio: int,
    head_group: int,
    head_dim: int,
    kind: str = "fwd",
    width: int = 1,
) -> int:
    """Host bytes of a task unit that runs ``node``'s subtree in memory, its
    leaves ``width`` at a time.

    Counted in fp32 (an upper bound: CPU kernels compute half types in fp32
    where the CPU does not multiply them in hardware): the node's
    gathered inputs, the partial rows its tree holds at its peak
    (``tree_rows``), the padded copy written out, and each running leaf's
    gathered inputs plus kernel outputs.
    """
    hq, hk, d = head_group * group_ratio, head_group, head_dim
    if kind == "fwd":
        per_in = d * (hq + 2 * hk)  # q, k, v
        per_part = hq * (d + 1)  # out, lse
    else:
        per_in = d * (3 * hq + 2 * hk) + hq  # q, k, v, dout, out, lse
        per_part = d * (hq + 2 * hk)  # dq, dk, dv
    leaf = plan.longest_leaf(node) * max(1, width)
    rows = tree_rows(plan, node, kind, width) + node.length
    return 4 * (node.length * per_in + rows * per_part + leaf * (per_in + per_part))


def unit_device_bytes(
    plan: Plan,
    node: Node,
    *,
    group_ratio: int,
    head_group: int,
    head_dim: int,
    itemsize: int,
    kind: str = "fwd",
) -> int:
    """Device bytes of a unit that lives on a GPU.

    Forward: the node's inputs in the compute dtype, the fp32 partial rows
    its streamed fold holds at its peak, and one leaf's gathered inputs (at
    most) and kernel output in the compute dtype. Backward: the node's six
    inputs (lse in fp32) and one leaf's gathered copies, the fp32 gradient
    rows its sums hold at their peak (``Plan.summed_fold_rows``), one leaf's
    kernel gradients in the compute dtype, and the kernel's own scratch for
    that leaf: an fp32 dq accumulator and row delta per query head (flash and
    memory-efficient backwards both keep them), and under GQA dk and dv per
    query head before they are summed to the kv heads.
    """
    hq, hk, d = head_group * group_ratio, head_group, head_dim
    leaf = plan.longest_leaf(node)
    if kind == "fwd":
        inputs = itemsize * (node.length + leaf) * d * (hq + 2 * hk)
        partials = 4 * plan.streamed_fold_rows(node) * hq * (d + 1)
        return inputs + partials + itemsize * leaf * hq * d
    if kind == "bwd":
        per_in = itemsize * d * (3 * hq + 2 * hk) + 4 * hq  # q, k, v, dout, out; lse
        grad_row = d * (hq + 2 * hk)  # dq, dk, dv
        scratch = 4 * hq * (d + 1) + (2 * itemsize * hq * d if group_ratio > 1 else 0)
        return (
            (node.length + leaf) * per_in
            + 4 * plan.summed_fold_rows(node) * grad_row
            + leaf * (itemsize * grad_row + scratch)
        )
    raise ValueError(f"kind must be one of {PASSES}, got {kind!r}")


def part_row_bytes(heads: int, kv_heads: int, head_dim: int, kind: str) -> int:
    """fp32 bytes of one token row of a pass's partial (all heads)."""
    if kind == "fwd":
        return heads * (head_dim + 1) * 4
    return (heads + 2 * kv_heads) * head_dim * 4


@dataclass(frozen=True)
class Traffic:
    """One pass's store traffic and disk, in bytes (whole problem)."""

    read_bytes: int
    write_bytes: int
    output_bytes: int  # the pass's outputs (dout too, for the backward)
    accumulator_bytes: int  # the one intermediate (0 when a unit is the whole group)
    kept_bytes: int  # every unit's partial, if kept


def pass_traffic(
    plan: Plan,
    unit_depth: int,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    itemsize: int,
    chunk_tokens: int,
    kind: str = "fwd",
    head_group: int | None = None,
) -> Traffic:
    """Store traffic of one pass cut at ``unit_depth`` (``itemsize``: stored).

    The accumulator holds every row's partial plus one fp32 counter per
    (row, head group) (``storage.accumulator``); ``head_group`` None: one
    group of all kv heads."""
    groups = kv_heads // (head_group or kv_heads) if kv_heads else 1
    units = unit_nodes(plan, unit_depth)
    L, d, s = plan.seq_len, head_dim, itemsize
    rows = math.ceil(L / chunk_tokens) * chunk_tokens if L else 0
    unit_rows = sum(n.length for n in units)
    part = part_row_bytes(heads, kv_heads, d, kind)
    direct = len(units) == 1
    acc = 0 if direct else batch * rows * (part + 4 * groups)
    if kind == "fwd":
        per_in = d * s * (heads + 2 * kv_heads)
        out = batch * rows * heads * (d * s + 4)
    else:
        per_in = d * s * (3 * heads + 2 * kv_heads) + 4 * heads
        out = batch * rows * d * s * (2 * heads + 2 * kv_heads)  # dout, dq, dk, dv
    folds = 0 if direct else batch * unit_rows * part  # read and written once per unit
    kept_rows = sum(math.ceil(n.length / chunk_tokens) * chunk_tokens for n in units if n.depth)
    return Traffic(
        read_bytes=batch * unit_rows * per_in + folds + acc,
        write_bytes=folds + out,
        output_bytes=out,
        accumulator_bytes=acc,
        kept_bytes=batch * kept_rows * part,
    )


def choose_units(
    plan: Plan,
    *,
    group_ratio: int,
    kv_heads: int,
    head_dim: int,
    budget_bytes: int,
    kind: str,
    head_group: int | None = None,
    device_itemsize: int | None = None,
    width: int = 1,
) -> tuple[int, int | None]:
    """(unit_depth, head_group): the shallowest unit depth whose units fit
    ``budget_bytes``, with the largest head group that fits there (None if
    none does at any depth and none was given). Host units run their leaves
    ``width`` at a time.

    Each level deeper reads every input token k times more and folds its
    partial k times more, while a unit folds its own subtree in memory for
    free, so shallow units are fastest; head groups add no work or I/O, so
    they are split first to get there. With ``device_itemsize`` the budget is
    device memory and non-leaf units are sized as they live on a GPU.
    """
    groups = (
        [head_group]
        if head_group is not None
        else sorted(g for g in range(1, kv_heads + 1) if kv_heads % g == 0)[::-1]
    )

    def need(n: Node, hg: int) -> int:
        shape = {"group_ratio": group_ratio, "head_group": hg, "head_dim": head_dim}
        if device_itemsize is not None and not n.is_leaf:
            return unit_device_bytes(plan, n, itemsize=device_itemsize, kind=kind, **shape)
        return unit_host_bytes(plan, n, kind=kind, width=width, **shape)

    for depth in range(plan.itr + 1):
        units = unit_nodes(plan, depth)
        fits = [hg for hg in groups if max(need(n, hg) for n in units) <= budget_bytes]
        if fits:
            return depth, fits[0]
    return plan.itr, head_group


def peak_disk(
    output_bytes: int, accumulator_bytes: int, final_bytes: int = 0, replace_bytes: int = 0
) -> int:
    """New disk a pass holds at its peak (dout and kept partials aside).

    Units fold into the accumulator; each final then writes one chunk's
    outputs and drops that accumulator chunk. An accumulator chunk is at
    least as large as the outputs cast from it (fp32, with the lse and a
    counter), so stored accumulator chunks plus finished outputs never
    exceed the whole accumulator, save the outputs of the finals in flight
    (``final_bytes``: one chunk's outputs times the finals that may run at
    once), and the chunks being rewritten (``replace_bytes``: a fold writes
    an accumulator chunk's new version beside the old one and then renames
    it over, so each writer at once holds one chunk twice). A pass whose
    unit is the whole group writes its outputs only.
    """
    if not accumulator_bytes:
        return output_bytes
    return max(accumulator_bytes + final_bytes + replace_bytes, output_bytes)


__all__ = [
    "ITEMSIZE",
    "PASSES",
    "Traffic",
    "choose_units",
    "leaf_device_bytes",
    "leaf_host_bytes",
    "part_row_bytes",
    "pass_traffic",
    "peak_disk",
    "tree_rows",
    "unit_device_bytes",
    "unit_host_bytes",
]
