"""Fold unit partials into whole-sequence accumulators, in unit order.

A store pass cut at unit depth u computes each unit node's subtree in memory
(``kernels.tree``) and folds the unit's partial into one accumulator over the
sequence (``cqs.folds``). The rule for one unit, used by the pass for each
chunk of rows and by ``forward_flat``/``backward_flat`` for whole runs, is:

* forward: acc = merge_partials([acc, unit]) (two partials, acc first);
* backward: acc += unit.

Both are elementwise per row, so folding the same rows in the same unit
order gives the same bits however the rows are grouped. Accumulators start
at the merge identity (out 0, lse -inf; gradients 0), and every unit is
folded, the first one too: a pass that resumes mid-fold cannot tell "first"
from "absorbed", and the in-memory reference must do exactly what it does.
With a single unit (u = 0) there is nothing to fold: its partial is the
result, as in the engine's hierarchical tree.

Units that are leaves run at once where ``kernels.tree`` runs a node's
leaves at once (``schedule.leaf_groups``), at most two per thread held, and are
folded in unit order as they come (``threads.run_in_order``): the same bits.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from streamcqsa.cqs.folds import row_runs, unit_nodes
from streamcqsa.cqs.plan import Node, Plan
from streamcqsa.kernels import threads
from streamcqsa.kernels.merge import merge_partials
from streamcqsa.kernels.runner import accumulator_dtype
from streamcqsa.kernels.schedule import leaf_groups
from streamcqsa.kernels.tree import LeafRun, backward_tree, forward_tree


def fold_forward(acc: tuple[Tensor, Tensor], part: tuple[Tensor, Tensor]) -> None:
    """acc <- merge(acc, part), in place (tensors [B, H, rows, ...], fp32)."""
    merge_partials([acc, part], out=acc)


def fold_backward(acc: tuple[Tensor, ...], part: tuple[Tensor, ...]) -> None:
    """acc <- acc + part, in place."""
    for a, p in zip(acc, part, strict=True):
        a += p


def _gather(xs: tuple[Tensor, ...], node: Node) -> tuple[Tensor, ...]:
    """The node's tokens of each tensor, contiguous: what a pass's unit reads
    (its partial then covers every row, empty ones included)."""
    return tuple(torch.cat([t[:, :, a : a + n] for a, n in node.runs], dim=2) for t in xs)


def forward_flat(
    plan: Plan, depth: int, qkv: tuple[Tensor, Tensor, Tensor], leaf: LeafRun, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(out, lse) of the whole sequence with units cut at ``depth``: the bits
    a store pass with that unit depth writes."""
    units = unit_nodes(plan, depth)
    if len(units) == 1:
        return forward_tree(plan, units[0], qkv, leaf, dtype)
    q = qkv[0]
    acc = accumulator_dtype(dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], -math.inf, dtype=acc, device=q.device)

    def unit(node: Node) -> tuple[Tensor, Tensor]:
        return forward_tree(plan, node, _gather(qkv, node), leaf, dtype)  # type: ignore[arg-type]

    def add(node: Node, part: tuple[Tensor, Tensor]) -> None:
        for a, n, off in row_runs(node):
            fold_forward(
                (out[:, :, a : a + n], lse[:, :, a : a + n]),
                (part[0][:, :, off : off + n], part[1][:, :, off : off + n]),
            )

    for group in leaf_groups(units, q.device, q.shape[0] * q.shape[1]):
        threads.run_in_order(
            [functools.partial(unit, node) for node in group],
            lambda i, part, group=group: add(group[i], part),
        )
    return out, lse


def backward_flat(
    plan: Plan, depth: int, xs: tuple[Tensor, ...], leaf: LeafRun, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) with units cut at ``depth``; ``xs`` = (q, k, v, dout, out, lse)."""
    units = unit_nodes(plan, depth)
    if len(units) == 1:
        return backward_tree(plan, units[0], xs, leaf, dtype)
    acc = accumulator_dtype(dtype)
    grads = tuple(torch.zeros(t.shape, dtype=acc, device=t.device) for t in xs[:3])

    def unit(node: Node) -> tuple[Tensor, Tensor, Tensor]:
        return backward_tree(plan, node, _gather(xs, node), leaf, dtype)

    def add(node: Node, part: tuple[Tensor, ...]) -> None:
        for a, n, off in row_runs(node):
            fold_backward(
                tuple(g[:, :, a : a + n] for g in grads),
                tuple(p[:, :, off : off + n] for p in part),
            )

    for group in leaf_groups(units, xs[0].device, xs[0].shape[0] * xs[0].shape[1]):
        threads.run_in_order(
            [functools.partial(unit, node) for node in group],
            lambda i, part, group=group: add(group[i], part),
        )
    return grads  # type: ignore[return-value]


__all__ = ["backward_flat", "fold_backward", "fold_forward", "forward_flat"]
