"""A plan laid over a store: head groups, the units of a pass, their numbering.

A pass is cut at ``unit_depth``: each *unit node* (a node at that depth, or a
shallower leaf) is one task unit that computes its subtree in memory and
folds its partial into the pass's accumulator (``storage.accumulator``), in
unit order. Then one *final* unit per store chunk of rows casts the
accumulator to the outputs. Where a (batch, head group) has a single unit
node (``unit_depth = 0``), that task writes the outputs itself: no
accumulator and no finals. Every unit is resumable: it is marked done once
all it wrote is in, and a unit that is not marked is simply run again.

``unit_depth = itr`` makes every leaf a unit (finest resume, most fold I/O:
a token is folded once per unit that holds it, k^depth times); ``0`` computes
each (batch, head group) in one go. Units' partials are kept on disk only on
request (``keep_partials``), at their own depth, for inspection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from streamcqsa.cqs.divide import divide
from streamcqsa.cqs.folds import MAX_PIECES, FoldPlan, fold_plan, unit_nodes
from streamcqsa.cqs.plan import Node, Plan
from streamcqsa.storage.layout import GRADS, Problem

FWD, BWD = "fwd", "bwd"
# The fold rule and accumulator layout, recorded with a pass's plan (see
# ``Layout.describe``): a pass started under another layout is not resumed.
FOLD = "accumulate-2"


def partial_names(kind: str) -> tuple[str, ...]:
    return ("out", "lse") if kind == FWD else GRADS


@dataclass(frozen=True)
class Unit:
    """One resumable step of a pass: a task (a unit node's subtree) or the
    final cast of one store chunk of rows."""

    kind: str  # "task" or "final"
    b: int
    g: int
    node: tuple[int, ...] = ()  # task: the unit node
    piece: int = 0  # final: the store chunk of rows


@dataclass(frozen=True)
class Layout:
    """A plan over a store: head groups, unit nodes, fold plan, unit numbering."""

    plan: Plan
    problem: Problem
    head_group: int  # kv heads per group
    unit_depth: int | None = None  # None: every leaf is a unit (depth plan.itr)

    def __post_init__(self) -> None:
        d = self.unit_depth
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise ValueError(f"unit_depth must be an int >= 0, got {d!r}")

    @property
    def depth(self) -> int:
        """The unit depth, within the plan."""
        itr = self.plan.itr
        return itr if self.unit_depth is None else min(self.unit_depth, itr)

    @cached_property
    def unit_nodes(self) -> tuple[Node, ...]:
        return unit_nodes(self.plan, self.depth)

    def is_task(self, node: Node) -> bool:
        return node.path in self.task_index

    @cached_property
    def task_index(self) -> dict[tuple[int, ...], int]:
        """Unit node path -> its place in fold order."""
        return {n.path: i for i, n in enumerate(self.unit_nodes)}

    @cached_property
    def fold(self) -> FoldPlan:
        per_group = max(64, MAX_PIECES // max(1, self.problem.batch * self.groups))
        return fold_plan(self.plan, self.depth, self.chunk, per_group)

    @property
    def direct(self) -> bool:
        """A single unit per (batch, head group): it writes the outputs."""
        return self.fold.direct

    @classmethod
    def from_meta(cls, plan: dict, problem: Problem) -> Layout:
        """The layout a pass recorded in the store's metadata (``describe()``)."""
        return cls(
            plan=divide(problem.seq_len, plan["itr"], plan["quorums"], is_causal=problem.is_causal),
            problem=problem,
            head_group=plan["head_group"],
            unit_depth=plan.get("unit_depth"),
        )

    @property
    def chunk(self) -> int:
        return self.problem.chunk_tokens

    @property
    def chunks(self) -> int:
        """Store chunks of rows over the sequence."""
        return math.ceil(self.problem.seq_len / self.chunk)

    @property
    def groups(self) -> int:
        return self.problem.kv_heads // self.head_group

    def q_heads(self, g: int) -> slice:
        r = self.problem.group_ratio
        return slice(g * self.head_group * r, (g + 1) * self.head_group * r)

    def kv_heads(self, g: int) -> slice:
        return slice(g * self.head_group, (g + 1) * self.head_group)

    def pieces(self, node: Node) -> int:
        """Store chunks of a node's rows (its kept partial's region)."""
        return math.ceil(node.length / self.chunk)

    @cached_property
    def regions(self) -> dict[tuple[int, ...], int]:
        """Row offset of each unit node's kept partial inside its depth's array
        (each starts on a chunk boundary: a unit writes whole chunks)."""
        offsets: dict[tuple[int, ...], int] = {}
        used: dict[int, int] = {}
        for node in self.unit_nodes:
            if node.depth == 0:
                continue
            offsets[node.path] = used.get(node.depth, 0)
            used[node.depth] = offsets[node.path] + self.pieces(node) * self.chunk
        return offsets

    @cached_property
    def depth_rows(self) -> dict[int, int]:
        """Rows of each depth's kept-partial array."""
        rows: dict[int, int] = {}
        for node in self.unit_nodes:
            if node.depth:
                rows[node.depth] = rows.get(node.depth, 0) + self.pieces(node) * self.chunk
        return rows

    @cached_property
    def group_units(self) -> tuple[Unit, ...]:
        """Units of group (0, 0) in execution order; other groups mirror them."""
        out = [Unit("task", 0, 0, n.path) for n in self.unit_nodes]
        if not self.direct:
            out += [Unit("final", 0, 0, (), c) for c in range(self.chunks)]
        return tuple(out)

    @cached_property
    def unit_index(self) -> dict[tuple[str, tuple[int, ...], int], int]:
        return {(u.kind, u.node, u.piece): i for i, u in enumerate(self.group_units)}

    def index(self, unit: Unit) -> int:
        per = len(self.group_units)
        return (unit.b * self.groups + unit.g) * per + self.unit_index[
            (unit.kind, unit.node, unit.piece)
        ]

    def unit_at(self, i: int) -> Unit:
        """The unit with index ``i`` (the inverse of ``index``)."""
        per = len(self.group_units)
        bg, j = divmod(int(i), per)
        b, g = divmod(bg, self.groups)
        u = self.group_units[j]
        return Unit(u.kind, b, g, u.node, u.piece)

    @property
    def total_units(self) -> int:
        return self.problem.batch * self.groups * len(self.group_units)

    def row_bytes(self, kind: str) -> int:
        """fp32 bytes of one token row of a pass's partials, all heads."""
        p = self.problem
        if kind == FWD:
            return p.heads * (p.head_dim + 1) * 4
        return (p.heads + 2 * p.kv_heads) * p.head_dim * 4

    def kept_partial_bytes(self, kind: str) -> int:
        """Disk of the units' partials when kept (``keep_partials``)."""
        return self.problem.batch * sum(self.depth_rows.values()) * self.row_bytes(kind)

    def accumulator_bytes(self, kind: str) -> int:
        """Disk of the pass's accumulator (none when units write the outputs)."""
        if self.direct:
            return 0
        p = self.problem  # each chunk of each group: its rows and one counter
        return p.batch * self.chunks * (self.chunk * self.row_bytes(kind) + self.groups * 4)

    def describe(self) -> dict[str, Any]:
        return {
            "itr": self.plan.itr,
            "quorums": list(self.plan.quorums),
            "head_group": self.head_group,
            "unit_depth": self.depth,
            "chunk_tokens": self.chunk,
            "tasks": len(self.plan.tasks),
            "units": self.total_units,
            "fold": FOLD,
        }


__all__ = ["BWD", "FOLD", "FWD", "Layout", "Unit", "partial_names"]
