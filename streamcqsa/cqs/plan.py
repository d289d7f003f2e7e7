"""A plan as data: the nodes of a CQS divide and what merges and memory sizing ask of them.

Nodes carry global token runs and, for leaves, their block structure; the
plan answers per-node questions (local runs, fold peaks, merge sources) once
and caches them. Built by ``divide``; nothing here is per token.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from streamcqsa.cqs.blocks import BlockList, Segment

Run = tuple[int, int]  # (start, length)


@dataclass(frozen=True)
class Node:
    """One subsequence of the recursion (the root is the whole sequence).

    ``parent_ranges`` are the node's chunks as (start, length) in the parent's
    local coordinates, in order; a merge scatters the node's rows there.
    ``segments`` refine the node by every level's chunk so far (for leaves,
    the segments the blocks are made of).
    """

    path: tuple[int, ...]
    segments: tuple[Segment, ...]
    parent_ranges: tuple[Run, ...]
    blocks: BlockList | None = None  # leaves only
    children: tuple[tuple[int, ...], ...] = ()  # inner nodes: paths, merge order
    chunks: tuple[Run, ...] = ()  # inner nodes: the n chunks (local start, length)

    @property
    def depth(self) -> int:
        return len(self.path)

    @property
    def is_leaf(self) -> bool:
        return self.blocks is not None

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    @cached_property
    def runs(self) -> tuple[Run, ...]:
        """Global token runs, coalesced: what a gather reads."""
        out: list[list[int]] = []
        for s in self.segments:
            if out and out[-1][0] + out[-1][1] == s.start:
                out[-1][1] += s.length
            else:
                out.append([s.start, s.length])
        return tuple((a, n) for a, n in out)

    @property
    def name(self) -> str:
        """Stable id used for storage keys and progress (root is ``r``)."""
        return "r" + "".join(f".{i}" for i in self.path)


@dataclass(frozen=True)
class MergeSource:
    """Rows [start, start+length) of a node come from these children, at these
    local offsets; an empty ``sources`` means the rows have no work at all."""

    start: int
    length: int
    sources: tuple[tuple[tuple[int, ...], int], ...]


@dataclass(frozen=True)
class Plan:
    """The whole divide for one sequence length: every node, leaves last per branch.

    ``nodes`` is in post-order (children before parents, children in index
    order), which is a valid execution order and the fixed merge order.

    ``itr`` is the depth the plan has (every leaf is that deep) and
    ``quorums`` its levels. ``requested_itr`` is the depth ``divide`` was
    asked for; it is larger only for a large plan whose levels past ``itr``
    would split no node's work (each node's one child with work would hold
    the node's tokens and work unchanged), so those levels are left out: the
    plan is the one of depth ``itr`` and computes the same pairs.
    """

    seq_len: int
    itr: int
    quorums: tuple[int, ...]
    interest_sets: tuple[tuple[int, ...], ...]
    is_causal: bool
    tile: int
    nodes: tuple[Node, ...] = field(repr=False)
    requested_itr: int | None = None  # None: same as itr

    @property
    def capped(self) -> bool:
        """True if ``divide`` stopped above the requested depth (see above)."""
        return self.requested_itr is not None and self.requested_itr > self.itr

    @cached_property
    def by_path(self) -> dict[tuple[int, ...], Node]:
        return {n.path: n for n in self.nodes}

    @property
    def root(self) -> Node:
        return self.nodes[-1]

    @cached_property
    def tasks(self) -> tuple[Node, ...]:
        """Leaf tasks with something to compute, in post-order."""
        return tuple(n for n in self.nodes if n.is_leaf)

    @property
    def entries(self) -> int:
        """Score entries the block-sparse kernels compute."""
        return sum(t.blocks.entries for t in self.tasks)  # type: ignore[union-attr]

    @property
    def dense_entries(self) -> int:
        """Score entries the paper's dense masked leaves would evaluate."""
        return sum(t.length**2 for t in self.tasks)

    @property
    def useful_entries(self) -> int:
        n = self.seq_len
        return n * (n + 1) // 2 if self.is_causal else n * n

    def iter_tasks(self) -> Iterator[Node]:
        return iter(self.tasks)

    @cached_property
    def _local_runs(self) -> dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[Run, ...]]:
        return {}

    def local_runs(self, node: Node, within: Node) -> tuple[Run, ...]:
        """``node``'s runs in the coordinates of ``within``'s gathered tokens.

        A unit that gathers one node's tokens runs its whole subtree on them;
        each descendant gathers from that buffer instead of the full sequence.
        ``within`` must be ``node`` or an ancestor. Every descendant run lies
        inside one of ``within``'s runs, since those are maximal.
        """
        key = (node.path, within.path)
        hit = self._local_runs.get(key)
        if hit is not None:
            return hit
        if node.path[: within.depth] != within.path:
            raise ValueError(f"{within.name} is not an ancestor of {node.name}")
        starts, offsets, pos = [], [], 0
        for a, n in within.runs:
            starts.append(a)
            offsets.append(pos)
            pos += n
        out = []
        for a, n in node.runs:
            i = bisect.bisect_right(starts, a) - 1
            wa, wn = within.runs[max(i, 0)]
            if i < 0 or a + n > wa + wn:
                raise ValueError(f"run ({a}, {n}) of {node.name} is not inside {within.name}")
            out.append((offsets[i] + a - wa, n))
        self._local_runs[key] = hit = tuple(out)
        return hit

    @cached_property
    def _subtree(self) -> dict[tuple[int, ...], tuple[int, int, int]]:
        """Per node, in one post-order pass: (fold_rows, longest leaf, leaves)."""
        out: dict[tuple[int, ...], tuple[int, int, int]] = {}
        for node in self.nodes:  # children come before their parent
            if node.is_leaf:
                out[node.path] = (node.length, node.length, 1)
                continue
            held = peak = longest = count = 0
            for c in node.children:
                rows, leaf, n = out[c]
                peak = max(peak, held + rows)
                held += self.by_path[c].length
                longest = max(longest, leaf)
                count += n
            out[node.path] = (max(peak, held + node.length), longest, count)
        return out

    def fold_rows(self, node: Node) -> int:
        """Peak partial rows held while folding ``node``'s subtree in memory.

        Children are folded one after another and kept until the parent's
        fold, so the peak is the largest (finished siblings + one child's own
        peak), or all children plus the parent's accumulator.
        """
        return self._subtree[node.path][0]

    def summed_fold_rows(self, node: Node) -> int:
        """Peak gradient partial rows of ``node``'s subtree: each inner node
        holds its own rows from the start and adds each child in as soon as
        it is done (``kernels.tree``'s backward), so one child at a time."""
        return self._summed[node.path]

    @cached_property
    def _summed(self) -> dict[tuple[int, ...], int]:
        out: dict[tuple[int, ...], int] = {}
        for node in self.nodes:  # children come before their parent
            kids = [out[c] for c in node.children]
            out[node.path] = node.length + (max(kids) if kids else 0)
        return out

    def streamed_fold_rows(self, node: Node) -> int:
        """Peak partial rows of ``node``'s subtree when ``node`` folds each merge
        range as soon as its holders are done and frees a child once nothing
        reads it (``kernels.tree``, as GPU units run); its children fold as
        usual. The node's own rows are held from the start."""
        if node.is_leaf:
            return node.length
        sources = self.merge_sources(node)
        waiting = [{p for p, _ in s.sources} for s in sources]
        uses = {c: sum(c in w for w in waiting) for c in node.children}
        held = peak = 0
        for c in node.children:
            child = self.by_path[c]
            peak = max(peak, node.length + held + self.fold_rows(child))
            held += child.length if uses[c] else 0
            for i, w in enumerate(waiting):
                if c in w:
                    w.discard(c)
                    if not w:
                        for p, _ in sources[i].sources:
                            uses[p] -= 1
                            if not uses[p]:
                                held -= self.by_path[p].length
        return max(peak, node.length + held)

    def longest_leaf(self, node: Node) -> int:
        """Tokens of the longest leaf task in ``node``'s subtree."""
        return self._subtree[node.path][1]

    def leaf_count(self, node: Node) -> int:
        """Leaf tasks in ``node``'s subtree (1 for a leaf)."""
        return self._subtree[node.path][2]

    @cached_property
    def _used(self) -> dict[tuple[int, ...], tuple[tuple[Run, ...], tuple[Run, ...]]]:
        return {}

    def used_ranges(self, leaf: Node) -> tuple[tuple[Run, ...], tuple[Run, ...]]:
        """Leaf-local (start, stop) ranges its blocks read as queries and as keys.

        A causal leaf often holds rows with no work and keys nobody attends
        (about half of both at itr=3): gathers copy only what blocks read.
        """
        hit = self._used.get(leaf.path)
        if hit is None:
            blocks = leaf.blocks.blocks  # type: ignore[union-attr]
            hit = (
                _union((b.q_start, b.q_stop) for b in blocks),
                _union((b.k_start, b.k_stop) for b in blocks),
            )
            self._used[leaf.path] = hit
        return hit

    def crossing_ranges(self, leaf: Node) -> tuple[tuple[Run, ...], tuple[Run, ...]]:
        """Leaf-local (start, stop) query and key ranges of blocks that cross
        one of the leaf's runs: the only rows a gather must copy, since a
        block inside one run can read a view of the source."""
        hit = self._crossing.get(leaf.path)
        if hit is None:
            ends = [0]
            for _, n in leaf.runs:
                ends.append(ends[-1] + n)

            def crosses(a: int, z: int) -> bool:
                return bisect.bisect_right(ends, a) != bisect.bisect_left(ends, z)

            blocks = leaf.blocks.blocks  # type: ignore[union-attr]
            hit = (
                _union((b.q_start, b.q_stop) for b in blocks if crosses(b.q_start, b.q_stop)),
                _union((b.k_start, b.k_stop) for b in blocks if crosses(b.k_start, b.k_stop)),
            )
            self._crossing[leaf.path] = hit
        return hit

    @cached_property
    def _crossing(self) -> dict[tuple[int, ...], tuple[tuple[Run, ...], tuple[Run, ...]]]:
        return {}

    @cached_property
    def _sources(self) -> dict[tuple[tuple[int, ...], bool], tuple[MergeSource, ...]]:
        return {}

    @cached_property
    def _empty(self) -> dict[tuple[int, ...], tuple[Run, ...]]:
        return {}

    def empty_rows(self, node: Node) -> tuple[tuple[int, int], ...]:
        """Node-local (start, stop) row ranges no block below the node reaches:
        their partial is the merge identity (out 0, lse -inf)."""
        hit = self._empty.get(node.path)
        if hit is None:
            if node.is_leaf:
                hit = tuple(node.blocks.empty_rows)  # type: ignore[union-attr]
            else:
                hit = tuple(
                    (s.start, s.start + s.length) for s in self.merge_sources(node) if not s.sources
                )
            self._empty[node.path] = hit
        return hit

    def merge_sources(self, node: Node, skip_empty: bool = True) -> tuple[MergeSource, ...]:
        """Row ranges of an inner node and the children that hold them, in child
        order (the fixed merge order); ranges with no sources are empty.

        With ``skip_empty`` (forward partials) a child whose query rows there
        are empty (nothing below it reaches them) is left out: merging the
        identity adds exactly zero, so skipping it only saves the reads. Each
        chunk is then split where that set changes. Gradient partials keep
        every holder: a row with no queries can still be an attended key.
        """
        hit = self._sources.get((node.path, skip_empty))
        if hit is not None:
            return hit
        offsets: dict[tuple[int, ...], dict[int, int]] = {}
        for child in node.children:
            pos = 0
            starts: dict[int, int] = {}
            for a, n in self.by_path[child].parent_ranges:
                starts[a] = pos
                pos += n
            offsets[child] = starts
        out: list[MergeSource] = []
        for a, n in node.chunks:
            if n == 0:
                continue
            holders = [c for c in node.children if a in offsets[c]]
            # per holder: its empty rows inside this chunk, in parent coordinates
            gaps = {}
            cuts = {a, a + n}
            for c in holders:
                off = offsets[c][a]
                g = [
                    (a + max(e0, off) - off, a + min(e1, off + n) - off)
                    for e0, e1 in self.empty_rows(self.by_path[c])
                    if e0 < off + n and e1 > off
                ]
                if not skip_empty:
                    g = []
                gaps[c] = g
                for g0, g1 in g:
                    cuts.update((g0, g1))
            edges = sorted(cuts)
            for lo, hi in zip(edges, edges[1:], strict=False):
                src = tuple(
                    (c, offsets[c][a] + lo - a)
                    for c in holders
                    if not any(g0 <= lo and hi <= g1 for g0, g1 in gaps[c])
                )
                prev = out[-1] if out and out[-1].start + out[-1].length == lo else None
                if (
                    prev is not None
                    and prev.start >= a
                    and [c for c, _ in prev.sources] == [c for c, _ in src]
                ):
                    out[-1] = MergeSource(prev.start, prev.length + hi - lo, prev.sources)
                else:
                    out.append(MergeSource(start=lo, length=hi - lo, sources=src))
        hit = tuple(out)
        self._sources[(node.path, skip_empty)] = hit
        return hit


def _union(ranges: Iterator[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, z in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], z)
        else:
            out.append([a, z])
    return tuple((a, z) for a, z in out)


__all__ = ["MergeSource", "Node", "Plan", "Run"]
