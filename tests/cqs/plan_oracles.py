"""Oracles for the planner's tests that do not reuse the planner's code.

Token positions come from ``Node.runs`` (not segments), chunk membership comes
from the interest sets, and the CQS mask rule is re-derived from the chunk tags
of each segment; ``check_plan`` runs every check on one plan.
"""

from __future__ import annotations

import numpy as np

from streamcqsa.cqs import (
    Node,
    Plan,
    check_coverage,
    check_totals,
    chunk_count,
    pair_counts,
    work_ratio,
)

TILES = (1, 4, 16, 128)  # the planner grids the tests draw from

# --- independent oracles -----------------------------------------------------


def positions_from_runs(task: Node) -> np.ndarray:
    return np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in task.runs])


def counts_from_runs(plan: Plan) -> np.ndarray:
    """(q, k) pair counts built from the coalesced runs, not from segments."""
    n = plan.seq_len
    counts = np.zeros((n, n), dtype=np.int64)
    for task in plan.tasks:
        pos = positions_from_runs(task)
        for b in task.blocks.blocks:
            qs = pos[b.q_start : b.q_stop]
            ks = pos[b.k_start : b.k_stop]
            sub = np.ones((len(qs), len(ks)), dtype=np.int64)
            if b.causal:
                sub = np.tril(sub)
            np.add.at(counts, np.ix_(qs, ks), sub)
    return counts


def member_chunks(plan: Plan, level: int, owner: int) -> set[int]:
    n = chunk_count(plan.quorums[level])
    return {(owner + d) % n for d in plan.interest_sets[level]}


def cqs_allowed(plan: Plan, task: Node) -> np.ndarray:
    """Local segment-pair mask by the CQS rule: (s, t) is masked iff at some level
    both segments lie in the same chunk and the task does not own that chunk."""
    segs = task.segments
    ok = np.ones((len(segs), len(segs)), dtype=bool)
    for i, s in enumerate(segs):
        for j, t in enumerate(segs):
            for level in range(plan.itr):
                c = s.chunks[level]
                if c == t.chunks[level] and c != task.path[level]:
                    ok[i, j] = False
    return ok


# --- structural checks -----------------------------------------------------


def check_structure(plan: Plan) -> None:
    L = plan.seq_len
    itr = plan.itr
    assert len(plan.quorums) == itr
    max_segments = 1 + sum(k - 1 for k in plan.quorums)
    k_max = max(plan.quorums, default=1)
    assert max_segments <= itr * (k_max - 1) + 1

    paths = [node.path for node in plan.nodes]
    assert len(set(paths)) == len(paths)
    assert plan.root.path == ()
    seen: set[tuple[int, ...]] = set()
    for node in plan.nodes:  # post-order: children come before their parent
        for c in node.children:
            assert c in seen, f"child {c} listed after parent {node.path}"
            assert c[:-1] == node.path
        seen.add(node.path)

    for task in plan.tasks:
        assert task.is_leaf and len(task.path) == itr
        segs = task.segments
        assert segs, "a task without tokens"
        assert len(segs) <= max_segments
        assert segs[0].local_start == 0
        for a, b in zip(segs, segs[1:], strict=False):
            assert b.local_start == a.local_stop  # local positions are consecutive
            assert a.stop <= b.start  # sorted, disjoint in global positions
            assert a.chunks != b.chunks  # segments are maximal
        for s in segs:
            assert s.length > 0
            assert 0 <= s.start and s.stop <= L
            assert len(s.chunks) == itr
            for level, c in enumerate(s.chunks):
                assert c in member_chunks(plan, level, task.path[level])

        # runs are the coalesced segments: same tokens, maximal
        assert np.array_equal(
            positions_from_runs(task),
            np.concatenate([np.arange(s.start, s.stop) for s in segs]),
        )
        for (a, n), (b, _) in zip(task.runs, task.runs[1:], strict=False):
            assert a + n < b

        bl = task.blocks
        assert bl.length == task.length
        assert bl.is_causal == plan.is_causal
        assert bl.blocks, "tasks with no work must be left out of the plan"
        bounds = {s.local_start for s in segs} | {task.length}
        allowed = cqs_allowed(plan, task)
        seg_of = np.repeat(np.arange(len(segs)), [s.length for s in segs])
        touched = np.zeros(task.length, dtype=bool)
        for b in bl.blocks:
            assert 0 <= b.q_start < b.q_stop <= task.length
            assert 0 <= b.k_start < b.k_stop <= task.length
            assert {b.q_start, b.q_stop, b.k_start, b.k_stop} <= bounds
            if b.causal:
                assert plan.is_causal
                assert (b.q_start, b.q_stop) == (b.k_start, b.k_stop)
            elif plan.is_causal:  # rectangles lie wholly on or below the diagonal
                gq = positions_from_runs(task)
                assert gq[b.q_start] >= gq[b.k_stop - 1]
            # never a masked segment pair
            rows = np.unique(seg_of[b.q_start : b.q_stop])
            cols = np.unique(seg_of[b.k_start : b.k_stop])
            assert allowed[np.ix_(rows, cols)].all()
            assert b.fresh == (not touched[b.q_start : b.q_stop].any())
            touched[b.q_start : b.q_stop] = True
        empty = np.zeros(task.length, dtype=bool)
        for a, z in bl.empty_rows:
            empty[a:z] = True
        assert np.array_equal(empty, ~touched)


def _empty_mask(plan: Plan) -> dict[tuple[int, ...], np.ndarray]:
    """Per node, which local rows nothing below it reaches, by brute force:
    a leaf's rows no block covers; an inner row empty in every holder."""
    masks: dict[tuple[int, ...], np.ndarray] = {}
    for node in plan.nodes:  # post-order: children first
        if node.is_leaf:
            m = np.ones(node.length, dtype=bool)
            for b in node.blocks.blocks:
                m[b.q_start : b.q_stop] = False
        else:
            m = np.ones(node.length, dtype=bool)
            for c in node.children:
                pos = 0
                for a, n in plan.by_path[c].parent_ranges:
                    m[a : a + n] &= masks[c][pos : pos + n]
                    pos += n
        masks[node.path] = m
    return masks


def check_merge_sources(plan: Plan) -> None:
    masks = _empty_mask(plan)
    for node in plan.nodes:
        if node.is_leaf:
            continue
        level = node.depth
        k = plan.quorums[level]
        n = chunk_count(k)
        assert len(node.chunks) == n
        starts = np.cumsum([0] + [m for _, m in node.chunks])[:-1]
        assert [a for a, _ in node.chunks] == starts.tolist()
        assert sum(m for _, m in node.chunks) == node.length
        sources = plan.merge_sources(node)
        # the ranges tile the node's rows, in order, never across a chunk edge
        assert sources[0].start == 0 and all(s.length > 0 for s in sources)
        for s0, s1 in zip(sources, sources[1:], strict=False):
            assert s0.start + s0.length == s1.start
        assert sources[-1].start + sources[-1].length == node.length
        empty = np.zeros(node.length, dtype=bool)
        for src in sources:
            j = max(i for i, (a, _) in enumerate(node.chunks) if a <= src.start)
            ca, cn = node.chunks[j]
            assert src.start + src.length <= ca + cn
            holders = [c for c in node.children if (j - c[-1]) % n in plan.interest_sets[level]]
            got = [c for c, _ in src.sources]
            # the holders whose rows here are not empty, in child order
            for c in holders:
                child = plan.by_path[c]
                ranges = child.parent_ranges
                off = sum(m for _, m in ranges[: ranges.index((ca, cn))]) + src.start - ca
                rows = masks[c][off : off + src.length]
                assert rows.all() or not rows.any()  # split where emptiness changes
                assert (c in got) == (not rows.any())
                if c in got:
                    assert dict(src.sources)[c] == off
            assert got == [c for c in holders if c in got] and len(got) <= k
            empty[src.start : src.start + src.length] = not got
        assert np.array_equal(empty, masks[node.path])
        assert plan.empty_rows(node) == tuple(
            (s.start, s.start + s.length) for s in sources if not s.sources
        )
        if node is plan.root:  # every query row has work (its own diagonal)
            assert all(src.sources for src in sources)
        # gradient partials keep every holder: one range per non-empty chunk
        full = plan.merge_sources(node, skip_empty=False)
        assert [(s.start, s.length) for s in full] == [(a, m) for a, m in node.chunks if m]
        for src in full:
            j = next(i for i, (a, _) in enumerate(node.chunks) if a == src.start)
            holders = [c for c in node.children if (j - c[-1]) % n in plan.interest_sets[level]]
            assert [c for c, _ in src.sources] == holders
    for node in plan.nodes:
        if node.path:
            assert sum(m for _, m in node.parent_ranges) == node.length


def check_plan(plan: Plan) -> None:
    check_coverage(plan)
    counts = counts_from_runs(plan)
    expected = np.ones_like(counts)
    if plan.is_causal:
        expected = np.tril(expected)
    assert np.array_equal(counts, expected)
    assert np.array_equal(pair_counts(plan), counts)
    check_totals(plan)
    assert plan.entries == plan.useful_entries
    assert work_ratio(plan) == 1.0
    check_structure(plan)
    check_merge_sources(plan)
