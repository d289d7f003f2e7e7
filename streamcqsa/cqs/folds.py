"""How a pass folds its task units' partials into one accumulator, as data.

A pass computes the subtree below each *unit node* (the plan's nodes at the
unit depth, and shallower leaves) in memory. Instead of storing every unit's
partial and merging the tree level by level (disk growing as k^depth), each
unit's partial is folded into one accumulator over the whole sequence, in
unit order. The accumulator is the only stored intermediate, so a pass needs
disk for its outputs and one fp32 copy of them, whatever itr is.

Folds must happen in unit order for every row (a resumed pass must give the
same bits), but only rows that two units share constrain each other. So the
sequence is cut into *shards* of whole store chunks, and a unit's fold is
cut into *pieces*, one per shard it reaches: a piece waits for the previous
piece into the same shard, and pieces into different shards run in
parallel. Shards are made as small as the piece budget allows.

Pure: no torch, no I/O.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property

from streamcqsa.cqs.plan import Node, Plan

RowRun = tuple[int, int, int]  # (global start, length, local offset in the unit)
MAX_PIECES = 20_000  # fold pieces per (batch, head group): graph size, not correctness


def unit_nodes(plan: Plan, depth: int) -> tuple[Node, ...]:
    """The nodes whose subtrees are computed in memory by one unit each, in
    plan order: those at ``depth`` and the leaves above it."""
    return tuple(n for n in plan.nodes if n.depth == depth or (n.is_leaf and n.depth < depth))


def row_runs(node: Node) -> tuple[RowRun, ...]:
    """A node's global runs with the local offset where each begins (sorted:
    a node keeps its tokens in sequence order)."""
    out, pos = [], 0
    for a, n in node.runs:
        out.append((a, n, pos))
        pos += n
    return tuple(out)


@dataclass(frozen=True)
class Piece:
    """Rows of unit ``unit`` that fold into shard ``shard``, after unit
    ``prev`` (None: the first unit to reach that shard)."""

    unit: int
    shard: int
    runs: tuple[RowRun, ...]
    prev: int | None


@dataclass(frozen=True)
class FoldPlan:
    """Units, shards and pieces of one (batch, head group) of a pass."""

    seq_len: int
    chunk: int  # rows per store chunk of the accumulator
    shard_chunks: int  # store chunks per shard
    units: tuple[tuple[int, ...], ...]  # unit node paths, in fold order
    unit_runs: tuple[tuple[RowRun, ...], ...]  # each unit's rows

    @property
    def shard_rows(self) -> int:
        return self.chunk * self.shard_chunks

    @property
    def shards(self) -> int:
        return -(-self.seq_len // self.shard_rows) if self.seq_len else 0

    @property
    def chunks(self) -> int:
        return -(-self.seq_len // self.chunk) if self.seq_len else 0

    @property
    def direct(self) -> bool:
        """One unit: it writes the outputs itself, with no accumulator."""
        return len(self.units) == 1

    @cached_property
    def pieces(self) -> tuple[Piece, ...]:
        """Every piece, in unit order and, within a unit, shard order."""
        last: dict[int, int] = {}
        out = []
        for i, runs in enumerate(self.unit_runs):
            for s, part in _split(runs, self.shard_rows):
                out.append(Piece(i, s, part, last.get(s)))
                last[s] = i
        return tuple(out)

    @cached_property
    def last_piece(self) -> dict[int, int]:
        """Shard -> index (in ``pieces``) of the last piece into it."""
        return {p.shard: j for j, p in enumerate(self.pieces)}

    @cached_property
    def pieces_of(self) -> tuple[tuple[int, ...], ...]:
        """Unit -> indices (in ``pieces``) of its pieces."""
        out: list[list[int]] = [[] for _ in self.units]
        for j, p in enumerate(self.pieces):
            out[p.unit].append(j)
        return tuple(tuple(x) for x in out)

    def chunk_runs(self, unit: int, chunk: int) -> tuple[RowRun, ...]:
        """Unit ``unit``'s rows inside store chunk ``chunk`` (global rows)."""
        lo, hi = chunk * self.chunk, min((chunk + 1) * self.chunk, self.seq_len)
        return tuple(_clip(self.unit_runs[unit], lo, hi))

    def chunks_of_piece(self, piece: Piece) -> tuple[int, ...]:
        """Store chunks a piece writes, in order."""
        seen: list[int] = []
        for a, n, _ in piece.runs:
            for c in range(a // self.chunk, (a + n - 1) // self.chunk + 1):
                if not seen or seen[-1] != c:
                    seen.append(c)
        return tuple(sorted(set(seen)))

    def touchers(self, chunk: int) -> tuple[int, ...]:
        """Units with rows in store chunk ``chunk``, in fold order (an
        integrity check: a missing chunk is damage if any unit wrote it)."""
        lo, hi = chunk * self.chunk, min((chunk + 1) * self.chunk, self.seq_len)
        return tuple(i for i, runs in enumerate(self.unit_runs) if any(_clip(runs, lo, hi)))


def fold_plan(plan: Plan, depth: int, chunk: int, max_pieces: int = MAX_PIECES) -> FoldPlan:
    """The fold plan of ``plan`` cut at unit depth ``depth``, with store
    chunks of ``chunk`` rows: shards as small as ``max_pieces`` allows."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nodes = unit_nodes(plan, depth)
    runs = tuple(row_runs(n) for n in nodes)
    shard_chunks = 1
    if len(nodes) > 1:
        while True:
            rows = chunk * shard_chunks
            count = sum(len({a // rows for a, _, _ in _cut(r, rows)}) for r in runs)
            if count <= max_pieces or rows >= plan.seq_len:
                break
            shard_chunks *= 2
    return FoldPlan(plan.seq_len, chunk, shard_chunks, tuple(n.path for n in nodes), runs)


def _cut(runs: tuple[RowRun, ...], rows: int) -> list[RowRun]:
    """Runs cut at multiples of ``rows`` (global coordinates)."""
    out = []
    for a, n, off in runs:
        g = a
        while g < a + n:
            z = min(a + n, (g // rows + 1) * rows)
            out.append((g, z - g, off + g - a))
            g = z
    return out


def _split(runs: tuple[RowRun, ...], rows: int) -> list[tuple[int, tuple[RowRun, ...]]]:
    """Runs grouped by the shard of ``rows`` rows they fall in, by shard."""
    by: dict[int, list[RowRun]] = {}
    for r in _cut(runs, rows):
        by.setdefault(r[0] // rows, []).append(r)
    return [(s, tuple(sorted(by[s]))) for s in sorted(by)]


def _clip(runs: tuple[RowRun, ...], lo: int, hi: int) -> list[RowRun]:
    """The parts of ``runs`` (sorted by global start) inside rows [lo, hi)."""
    out = []
    i = max(0, bisect.bisect_right([a for a, _, _ in runs], lo) - 1)
    for a, n, off in runs[i:]:
        if a >= hi:
            break
        s, e = max(a, lo), min(a + n, hi)
        if s < e:
            out.append((s, e - s, off + s - a))
    return out


__all__ = ["FoldPlan", "MAX_PIECES", "Piece", "RowRun", "fold_plan", "row_runs", "unit_nodes"]
