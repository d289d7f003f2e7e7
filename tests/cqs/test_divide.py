"""Property tests for the CQS planner (streamcqsa.cqs.divide and coverage).

The plan is checked against oracles that do not reuse the planner's code:
token positions come from ``Node.runs`` (not segments), chunk membership comes
from the interest sets, and the CQS mask rule is re-derived from the chunk
tags of each segment.
"""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcqsa.cqs import (
    Node,
    Plan,
    check_coverage,
    check_totals,
    chunk_count,
    dense_ratio,
    divide,
    pair_counts,
    split_lengths,
    work_ratio,
)

QUORUMS = (2, 3, 4, 5)
TILES = (1, 4, 16, 128)


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


# --- coverage: random plans ------------------------------------------------


@st.composite
def plans(draw: st.DrawFn) -> tuple[int, int, object, bool, int]:
    L = draw(st.integers(1, 300), label="L")
    itr = draw(st.integers(0, 3), label="itr")
    if draw(st.booleans(), label="as_list"):
        quorum: object = draw(st.lists(st.sampled_from(QUORUMS), min_size=itr, max_size=itr))
    else:
        quorum = draw(st.sampled_from(QUORUMS))
    causal = draw(st.booleans(), label="causal")
    tile = draw(st.sampled_from(TILES), label="tile")
    return L, itr, quorum, causal, tile


@settings(max_examples=70, deadline=None)
@given(plans())
def test_random_plan_covers_each_pair_once(args: tuple[int, int, object, bool, int]) -> None:
    L, itr, quorum, causal, tile = args
    plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
    assert plan.seq_len == L and plan.itr == itr and plan.tile == tile
    assert plan.is_causal is causal
    if isinstance(quorum, list):
        assert plan.quorums == tuple(quorum)
    else:
        assert plan.quorums == (quorum,) * itr
    check_plan(plan)


def _positions(runs) -> np.ndarray:
    return np.concatenate([np.arange(a, a + n) for a, n in runs]) if runs else np.array([], int)


@settings(max_examples=60, deadline=None)
@given(plans())
def test_local_runs_gather_the_same_tokens(args: tuple[int, int, object, bool, int]) -> None:
    """A unit gathers an ancestor's tokens once; each descendant's local runs
    into that buffer must pick exactly the descendant's global tokens."""
    L, itr, quorum, causal, tile = args
    plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
    for node in plan.nodes:
        want = _positions(node.runs)
        for d in range(node.depth + 1):
            base = plan.by_path[node.path[:d]]
            buf = _positions(base.runs)
            got = buf[_positions(plan.local_runs(node, base))]
            assert np.array_equal(got, want), (node.name, base.name)
    if len(plan.nodes) > 1:
        leaf, other = plan.tasks[0], plan.nodes[-2]
        if other.path[: leaf.depth] != leaf.path and leaf.path[: other.depth] != other.path:
            with pytest.raises(ValueError, match="not an ancestor"):
                plan.local_runs(other, leaf)


@settings(max_examples=40, deadline=None)
@given(plans())
def test_leaf_tokens_read_what_a_gather_reads(args: tuple[int, int, object, bool, int]) -> None:
    """Every block reads through ``Tokens`` the same rows a full gather holds,
    as a view of the source when it lies inside one run (nothing copied)."""
    import torch

    from streamcqsa.kernels.tokens import Tokens, gather_runs, leaf_tokens

    L, itr, quorum, causal, tile = args
    plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
    x = torch.arange(L, dtype=torch.float32).view(1, 1, L, 1) + 0.5
    for leaf in plan.tasks:
        full = gather_runs(x, leaf.runs)
        used, crossing = plan.used_ranges(leaf), plan.crossing_ranges(leaf)
        tq = leaf_tokens(x, leaf.runs, None, used[0], crossing[0])
        tk = leaf_tokens(x, leaf.runs, None, used[1], crossing[1])
        assert isinstance(tq, Tokens) == (len(leaf.runs) > 1)
        for b in leaf.blocks.blocks:  # type: ignore[union-attr]
            for t, a, z in ((tq, b.q_start, b.q_stop), (tk, b.k_start, b.k_stop)):
                got = t.rows(a, z) if isinstance(t, Tokens) else t[:, :, a:z]
                assert torch.equal(got, full[:, :, a:z])
                inside = not any(a < e < z for e in np.cumsum([n for _, n in leaf.runs]))
                assert (
                    got.data_ptr() >= x.data_ptr()
                    and got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                ) == inside


@settings(max_examples=40, deadline=None)
@given(plans())
def test_streamed_fold_rows_bounds(args: tuple[int, int, object, bool, int]) -> None:
    """Folding ranges early and freeing children never needs more rows than
    keeping every child to the end, and never fewer than the node plus its
    largest child's own peak."""
    L, itr, quorum, causal, tile = args
    plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
    for node in plan.nodes:
        got = plan.streamed_fold_rows(node)
        if node.is_leaf:
            assert got == node.length
            continue
        assert got <= plan.fold_rows(node) + node.length
        assert got >= node.length + max(plan.fold_rows(plan.by_path[c]) for c in node.children)


@settings(max_examples=40, deadline=None)
@given(plans())
def test_summed_fold_rows_holds_one_child_at_a_time(args: tuple) -> None:
    """Gradient folds add each child in as it finishes: the node's rows plus
    the largest child's own peak, down the tree."""
    L, itr, quorum, causal, tile = args
    plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
    for node in plan.nodes:
        got = plan.summed_fold_rows(node)
        kids = [plan.summed_fold_rows(plan.by_path[c]) for c in node.children]
        assert got == node.length + max(kids, default=0)
        subtree = sum(n.length for n in plan.nodes if n.path[: node.depth] == node.path)
        assert node.length <= got <= subtree


@settings(max_examples=40, deadline=None)
@given(plans())
def test_fold_rows_bounds(args: tuple[int, int, object, bool, int]) -> None:
    """The in-memory fold's peak holds at least the node and at most every
    node of its subtree at once."""
    L, itr, quorum, causal, tile = args
    plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
    for node in plan.nodes:
        subtree = sum(n.length for n in plan.nodes if n.path[: node.depth] == node.path)
        assert node.length <= plan.fold_rows(node) <= subtree
        if not node.is_leaf:
            kids = sum(plan.by_path[c].length for c in node.children)
            assert plan.fold_rows(node) >= kids + node.length


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("L", "itr", "quorum"),
    [(343, 3, 3), (169, 2, 4), (441, 2, 5), (27, 3, 2), (7, 1, 3), (21, 1, 5), (13, 1, 4)],
)
def test_exact_power_lengths(L: int, itr: int, quorum: int, causal: bool) -> None:
    n = chunk_count(quorum)
    assert L == n**itr
    for tile in TILES:
        check_plan(divide(L, itr, quorum, is_causal=causal, tile=tile))
    # On the unit grid every split is even: each leaf holds k^itr tokens, so the
    # paper's dense leaves cost (k^2/n)^itr L^2 when all n^itr leaves are kept
    # (leaves whose pairs are all masked are dropped, e.g. 9 of 343 at k=3).
    plan = divide(L, itr, quorum, is_causal=causal, tile=1)
    assert all(t.length == quorum**itr for t in plan.tasks)
    assert len(plan.tasks) <= n**itr
    assert Fraction(plan.dense_entries, L * L) == Fraction(len(plan.tasks), n**itr) * (
        Fraction(quorum * quorum, n) ** itr
    )
    if itr == 1:  # every child owns a non-empty chunk, so it has work
        assert len(plan.tasks) == n


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("itr", [1, 2, 3])
@pytest.mark.parametrize("L", [1, 2, 7])
@pytest.mark.parametrize("quorum", [2, 3, 5, [5, 2, 4]])
def test_tiny_lengths(L: int, itr: int, quorum: object, causal: bool) -> None:
    if isinstance(quorum, list):
        quorum = quorum[:itr]
    for tile in TILES:
        plan = divide(L, itr, quorum, is_causal=causal, tile=tile)
        check_plan(plan)


def test_itr_zero_is_one_dense_task() -> None:
    for causal in (False, True):
        plan = divide(50, 0, [], is_causal=causal)
        assert len(plan.tasks) == 1 and plan.root is plan.tasks[0]
        assert plan.root.runs == ((0, 50),)
        check_plan(plan)


def test_tasks_without_work_are_dropped() -> None:
    # Fewer tokens than chunks: many children get no tokens or only masked
    # pairs; none of them may remain, and every kept node has a task below it.
    for causal in (False, True):
        plan = divide(4, 2, 5, is_causal=causal)
        assert 0 < len(plan.tasks) < 21**2
        for node in plan.nodes:
            assert node.is_leaf or node.children
        check_plan(plan)


# --- work ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_work_at_4096(causal: bool) -> None:
    L = 4096
    plan = divide(L, 3, 3, is_causal=causal)
    check_coverage(plan)
    bound = 0.52 if causal else 1.02
    assert plan.entries / L**2 <= bound
    assert plan.entries == plan.useful_entries
    # The paper's dense leaves do about (9/7)^3 = 2.1 times L^2 (causal or not).
    assert plan.dense_entries / L**2 > 1.9
    assert dense_ratio(plan) == plan.dense_entries / L**2


@pytest.mark.parametrize("causal", [False, True])
def test_billion_token_plan_is_cheap(causal: bool) -> None:
    L = 10**9
    start = time.perf_counter()
    plan = divide(L, 3, 5, is_causal=causal)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"planning took {elapsed:.2f}s"
    check_totals(plan)
    assert plan.entries == plan.useful_entries
    total = sum(t.length for t in plan.tasks)
    if causal:
        assert total <= 5**3 * L
    else:  # each token lies in k chunks' children at every level
        assert total == 5**3 * L
        assert len(plan.tasks) == 21**3
    for t in plan.tasks[:50]:
        assert len(t.segments) <= 3 * 4 + 1


# --- split_lengths ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 20000),
    st.sampled_from([chunk_count(k) for k in (2, 3, 4, 5, 6, 8)] + [1, 2]),
    st.sampled_from([1, 2, 4, 16, 64, 128, 256]),
)
def test_split_lengths(length: int, n: int, tile: int) -> None:
    sizes = split_lengths(length, n, tile)
    assert len(sizes) == n
    assert sum(sizes) == length
    assert all(s >= 0 for s in sizes)
    assert all(s > 0 for s in sizes) == (length >= n)
    # the grid: tile halved until every chunk gets a unit (or 1)
    g = tile
    while g > 1 and length < n * g:
        g //= 2
    bounds = np.cumsum(sizes)[:-1]
    assert all(int(b) % g == 0 for b in bounds)
    if length >= n * tile:
        assert g == tile
        assert all(int(b) % tile == 0 for b in bounds)
        assert all(s >= tile for s in sizes)
    # even spread: whole units differ by at most one; the last takes the tail
    units = [s // g for s in sizes[:-1]] + [(sizes[-1] - length % g) // g]
    assert max(units) - min(units) <= 1
    assert units == sorted(units, reverse=True)


def test_split_lengths_examples() -> None:
    assert split_lengths(343, 7, 1) == [49] * 7
    assert split_lengths(7 * 128 + 5, 7, 128) == [128] * 6 + [133]
    assert split_lengths(300, 3, 128) == [128, 64, 108]
    assert split_lengths(2, 3, 128) == [1, 1, 0]
