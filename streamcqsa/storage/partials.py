"""Where a run's partials, outputs and markers live, and whole-chunk I/O on them.

The task tree is stored down to ``unit_depth``: a node at that depth (or a
shallower leaf) is one task unit that computes its whole subtree in memory
and writes only its own partial; nodes above it are folded from the store
one chunk row at a time. ``unit_depth = itr`` stores every leaf's partial
(finest resume, most I/O); ``0`` computes each (batch, head group) in one go.

Partials of all stored nodes at one depth share one array per quantity; each
node owns a row region that starts on a chunk boundary and is padded to whole
chunks, so a task writes whole chunks and a merge piece writes exactly one
chunk row: no two units ever write the same chunk. Head groups are the other
chunk axis, so (batch, head group) units never share chunks either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr

from streamcqsa.cqs.divide import Node, Plan
from streamcqsa.kernels.nonfinite import poison_masked_rows
from streamcqsa.storage import chunkio
from streamcqsa.storage.integrity import checked_read
from streamcqsa.storage.layout import (
    ATTR,
    GRADS,
    Problem,
    stored_dtype,
    to_stored,
    to_torch,
    torch_dtype,
)
from streamcqsa.storage.store import array_kwargs

FWD, BWD = "fwd", "bwd"


@dataclass(frozen=True)
class Unit:
    """One resumable step: a task (a leaf, or a subtree run in memory) or one
    chunk row of a merge."""

    kind: str  # "task" or "merge"
    b: int
    g: int
    node: tuple[int, ...]
    piece: int = 0


@dataclass(frozen=True)
class Layout:
    """A plan laid over a store: head groups, row regions, unit numbering."""

    plan: Plan
    problem: Problem
    head_group: int  # kv heads per group
    unit_depth: int | None = None  # deepest stored level; None: every leaf (plan.itr)

    def __post_init__(self) -> None:
        d = self.unit_depth
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0):
            raise ValueError(f"unit_depth must be an int >= 0, got {d!r}")

    @property
    def top(self) -> int:
        """The deepest level whose nodes are stored."""
        itr = self.plan.itr
        return itr if self.unit_depth is None else min(self.unit_depth, itr)

    def is_stored(self, node: Node) -> bool:
        return node.depth <= self.top

    def is_task(self, node: Node) -> bool:
        """Computed in memory by one unit (its subtree included)."""
        return node.depth == self.top or (node.is_leaf and node.depth < self.top)

    def units_of(self, path: tuple[int, ...], b: int, g: int) -> list[Unit]:
        """The units that write a stored node (none for nodes inside a task)."""
        node = self.plan.by_path[path]
        if not self.is_stored(node):
            return []
        if self.is_task(node):
            return [Unit("task", b, g, path)]
        return [Unit("merge", b, g, path, j) for j in range(self.pieces(node))]

    def task_of(self, path: tuple[int, ...]) -> tuple[int, ...]:
        """The stored node whose unit computes ``path`` (itself if stored)."""
        return path[: self.top]

    @classmethod
    def from_meta(cls, plan: dict, problem: Problem) -> Layout:
        """The layout a pass recorded in the store's metadata (``describe()``)."""
        from streamcqsa.cqs.divide import divide

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
    def groups(self) -> int:
        return self.problem.kv_heads // self.head_group

    def q_heads(self, g: int) -> slice:
        r = self.problem.group_ratio
        return slice(g * self.head_group * r, (g + 1) * self.head_group * r)

    def kv_heads(self, g: int) -> slice:
        return slice(g * self.head_group, (g + 1) * self.head_group)

    def pieces(self, node: Node) -> int:
        return math.ceil(node.length / self.chunk)

    @cached_property
    def regions(self) -> dict[tuple[int, ...], int]:
        """Row offset of each non-root node inside its depth's array."""
        offsets: dict[tuple[int, ...], int] = {}
        used: dict[int, int] = {}
        for node in self.plan.nodes:
            if node.depth == 0 or not self.is_stored(node):
                continue
            offsets[node.path] = used.get(node.depth, 0)
            used[node.depth] = offsets[node.path] + self.pieces(node) * self.chunk
        return offsets

    @cached_property
    def depth_rows(self) -> dict[int, int]:
        rows: dict[int, int] = {}
        for node in self.plan.nodes:
            if node.depth and self.is_stored(node):
                rows[node.depth] = rows.get(node.depth, 0) + self.pieces(node) * self.chunk
        return rows

    @cached_property
    def group_units(self) -> tuple[Unit, ...]:
        """Units of group (0, 0) in execution order; other groups mirror them."""
        out: list[Unit] = []
        for node in self.plan.nodes:
            out.extend(self.units_of(node.path, 0, 0))
        return tuple(out)

    @cached_property
    def unit_index(self) -> dict[tuple[str, tuple[int, ...], int], int]:
        return {(u.kind, u.node, u.piece): i for i, u in enumerate(self.group_units)}

    def unit_at(self, i: int) -> Unit:
        """The unit numbered ``i`` (the inverse of ``index``)."""
        bg, local = divmod(int(i), len(self.group_units))
        b, g = divmod(bg, self.groups)
        u = self.group_units[local]
        return Unit(u.kind, b, g, u.node, u.piece)

    def index(self, unit: Unit) -> int:
        per = len(self.group_units)
        return (unit.b * self.groups + unit.g) * per + self.unit_index[
            (unit.kind, unit.node, unit.piece)
        ]

    @property
    def total_units(self) -> int:
        return self.problem.batch * self.groups * len(self.group_units)

    def partial_bytes(self, kind: str) -> int:
        """Disk the partials of one pass need if all are kept (uncompressed)."""
        p = self.problem
        rows = sum(self.depth_rows.values())
        if kind == FWD:
            return p.batch * p.heads * rows * (p.head_dim + 1) * 4
        return p.batch * (p.heads + 2 * p.kv_heads) * rows * p.head_dim * 4

    def describe(self) -> dict[str, Any]:
        return {
            "itr": self.plan.itr,
            "quorums": list(self.plan.quorums),
            "head_group": self.head_group,
            "unit_depth": self.top,
            "chunk_tokens": self.chunk,
            "tasks": len(self.plan.tasks),
            "units": self.total_units,
        }


def partial_names(kind: str) -> tuple[str, ...]:
    return ("out", "lse") if kind == FWD else GRADS


class RunArrays:
    """Opens and creates the arrays of one pass (forward or backward)."""

    def __init__(self, group: zarr.Group, layout: Layout, kind: str) -> None:
        self.group = group
        self.layout = layout
        self.kind = kind
        self._open: dict[str, Any] = {}

    @cached_property
    def v_nonfinite_last(self) -> torch.Tensor | None:
        """[B, Hkv, D]: V's last non-finite token per column, recorded by a
        causal ``create(..., allow_nonfinite=True)``; None when V is finite."""
        last = dict(self.group.attrs[ATTR]).get("v_nonfinite_last")
        return None if last is None else torch.tensor(last, dtype=torch.int64)

    def array(self, path: str) -> Any:
        """Open an array once (opening reads its metadata from the store)."""
        if path not in self._open:
            self._open[path] = self.group[path]
        return self._open[path]

    # -- creation (driver only) ------------------------------------------------
    def create(self) -> None:
        """Create any missing partial, output and marker arrays (metadata only)."""
        p, lay = self.layout.problem, self.layout
        hq = lay.head_group * p.group_ratio
        for depth, rows in lay.depth_rows.items():
            for name in partial_names(self.kind):
                heads = p.kv_heads if name in ("dk", "dv") else p.heads
                hg = lay.head_group if name in ("dk", "dv") else hq
                shape: tuple[int, ...] = (p.batch, heads, rows, p.head_dim)
                chunks: tuple[int, ...] = (1, hg, lay.chunk, p.head_dim)
                if name == "lse":
                    shape, chunks = shape[:3], chunks[:3]
                self._ensure(self.partial_path(depth, name), shape, chunks, "float32")
        for name in partial_names(self.kind):
            heads = p.kv_heads if name in ("dk", "dv") else p.heads
            shape = (p.batch, heads, p.seq_len, p.head_dim)
            chunks = (1, 1, lay.chunk, p.head_dim)
            dtype = stored_dtype(p.dtype)
            if name == "lse":
                shape, chunks, dtype = shape[:3], chunks[:3], "float32"
            self._ensure(name, shape, chunks, dtype)
        self._ensure(self.marker_path, (lay.total_units,), (1,), "uint8")

    def _ensure(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str):
        try:
            arr = self.group[path]
            if tuple(arr.shape) == shape and tuple(arr.chunks) == chunks:
                return
        except KeyError:
            pass
        self.group.create_array(path, shape=shape, **array_kwargs(dtype, chunks))

    @property
    def marker_path(self) -> str:
        return f"progress/{self.kind}"

    def partial_path(self, depth: int, name: str) -> str:
        return f"partials/{self.kind}/d{depth}/{name}"

    # -- markers ---------------------------------------------------------------
    def done(self) -> np.ndarray:
        """Which units are marked done (a marker never written reads as not done)."""
        arr = self.array(self.marker_path)
        return np.asarray(checked_read(arr, (slice(None),), missing_ok=True)).astype(bool)

    def is_done(self, unit: Unit) -> bool:
        return bool(self.array(self.marker_path)[self.layout.index(unit)])

    def mark(self, unit: Unit) -> None:
        self.array(self.marker_path)[self.layout.index(unit)] = 1

    # -- node rows ---------------------------------------------------------------
    def _where(self, node: tuple[int, ...], name: str) -> tuple[Any, int]:
        if len(node) == 0:
            return self.array(name), 0
        depth = len(node)
        return self.array(self.partial_path(depth, name)), self.layout.regions[node]

    def heads(self, name: str, g: int) -> slice:
        return self.layout.kv_heads(g) if name in ("k", "v", "dk", "dv") else self.layout.q_heads(g)

    def read_rows(self, node: tuple[int, ...], name: str, b: int, g: int, a: int, z: int):
        """Rows [a, z) of a node's partial ``name`` (node-local), as fp32 torch."""
        arr, off = self._where(node, name)
        data = chunkio.read(arr, (slice(b, b + 1), self.heads(name, g), slice(off + a, off + z)))
        return torch.from_numpy(np.ascontiguousarray(data))

    def write_rows(
        self, node: tuple[int, ...], name: str, b: int, g: int, a: int, t: torch.Tensor
    ) -> None:
        """Write t [1, Hg, rows, ...] at node-local row a (whole chunks only)."""
        arr, off = self._where(node, name)
        rows = t.shape[2]
        if len(node) == 0:  # final outputs: the logical dtype
            if name == "out" and self.v_nonfinite_last is not None:
                last = self.v_nonfinite_last[b : b + 1, self.layout.kv_heads(g)]
                t = poison_masked_rows(t.clone(), last, start=a)  # as SDPA: 0 * inf = NaN
            data = t if name == "lse" else to_stored(t, self.layout.problem.dtype)
            if isinstance(data, torch.Tensor):
                data = data.numpy()
        else:
            data = t.numpy()
            pad = -rows % self.layout.chunk  # pad to whole chunks: never a partial write
            if pad:
                width = [(0, 0)] * data.ndim
                width[2] = (0, pad)
                data = np.pad(data, width)
                rows += pad
        chunkio.write(
            arr, (slice(b, b + 1), self.heads(name, g), slice(off + a, off + a + rows)), data
        )

    def unit_chunks(self, unit: Unit) -> list[tuple[str, tuple[int, ...]]]:
        """(array path, chunk) of every chunk a unit writes: what its done
        marker vouches for. Partial chunks span one head group; output chunks
        one head each."""
        lay = self.layout
        node = lay.plan.by_path[unit.node]
        pieces = range(lay.pieces(node)) if unit.kind == "task" else [unit.piece]
        first = lay.regions[unit.node] // lay.chunk if unit.node else 0
        out = []
        for name in partial_names(self.kind):
            tail = () if name == "lse" else (0,)
            if unit.node:
                path, heads = self.partial_path(len(unit.node), name), [unit.g]
            else:
                hs = self.heads(name, unit.g)
                path, heads = name, list(range(hs.start, hs.stop))
            out += [(path, (unit.b, h, first + j, *tail)) for h in heads for j in pieces]
        return out

    def delete_node(self, node: tuple[int, ...], b: int, g: int) -> None:
        """Drop a node's partial chunks for one (batch, head group)."""
        from zarr.core.sync import sync

        lay = self.layout
        first = lay.regions[node] // lay.chunk
        for name in partial_names(self.kind):
            arr = self.array(self.partial_path(len(node), name))
            hchunk = self.heads(name, g).start // arr.chunks[1]
            for j in range(first, first + lay.pieces(lay.plan.by_path[node])):
                idx = [str(b), str(hchunk), str(j)] + (["0"] if name != "lse" else [])
                key = f"{arr.path}/c/" + "/".join(idx)
                sync(arr.store.delete(key))


def read_runs(
    arrays: RunArrays,
    name: str,
    b: int,
    heads: slice,
    runs,
    problem: Problem,
    alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gather token runs of an input/output array into one torch tensor.

    With ``alloc(shape, dtype)`` the runs are read straight into the tensor it
    gives (a pooled buffer), with no concatenation.
    """
    arr = arrays.array(name)
    if alloc is None:
        parts = [chunkio.read(arr, (slice(b, b + 1), heads, slice(a, a + n))) for a, n in runs]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
        if name == "lse":
            return torch.from_numpy(np.ascontiguousarray(data))
        return to_torch(data, problem.dtype)
    h = len(range(*heads.indices(arr.shape[1])))
    shape = (1, h, sum(n for _, n in runs), *arr.shape[3:])
    dtype = torch.float32 if name == "lse" else torch_dtype(problem.dtype)
    t = alloc(shape, dtype)
    raw = t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()
    off = 0
    for a, n in runs:
        chunkio.read(arr, (slice(b, b + 1), heads, slice(a, a + n)), out=raw[:, :, off : off + n])
        off += n
    return t
