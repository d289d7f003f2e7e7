"""Property tests for the CQS planner (streamcqsa.cqs.divide and coverage).

The plan is checked against oracles that do not reuse the planner's code:
token positions come from ``Node.runs`` (not segments), chunk membership comes
from the interest sets, and the CQS mask rule is re-derived from the chunk
tags of each segment.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_oracles import TILES, check_plan

from streamcqsa.cqs import (
    chunk_count,
    divide,
)

QUORUMS = (2, 3, 4, 5)
SMALL_PLAN = 7**3  # leaves at most: the default strategy's plans


# --- coverage: random plans ------------------------------------------------


@st.composite
def plans(draw: st.DrawFn, max_tasks: int | None = SMALL_PLAN) -> tuple:
    """(L, itr, quorum, causal, tile); with ``max_tasks``, no quorum whose chunk
    counts multiply past it is drawn (the checks below walk every node)."""
    L = draw(st.integers(1, 300), label="L")
    itr = draw(st.integers(0, 3), label="itr")
    cap = max_tasks or chunk_count(max(QUORUMS)) ** 3
    if draw(st.booleans(), label="as_list"):
        sizes: list[int] = []
        for level in range(itr):  # leave room for the smallest quorum (3 chunks) below
            room = cap // int(np.prod([chunk_count(k) for k in sizes])) // 3 ** (itr - 1 - level)
            sizes.append(draw(st.sampled_from([k for k in QUORUMS if chunk_count(k) <= room])))
        quorum: object = sizes
    else:
        quorum = draw(st.sampled_from([k for k in QUORUMS if chunk_count(k) ** itr <= cap]))
    causal = draw(st.booleans(), label="causal")
    tile = draw(st.sampled_from(TILES), label="tile")
    return L, itr, quorum, causal, tile


@settings(max_examples=50, deadline=None)
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


@settings(max_examples=40, deadline=None)
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


PROPERTIES = (
    test_random_plan_covers_each_pair_once,
    test_local_runs_gather_the_same_tokens,
    test_leaf_tokens_read_what_a_gather_reads,
    test_streamed_fold_rows_bounds,
    test_summed_fold_rows_holds_one_child_at_a_time,
    test_fold_rows_bounds,
)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(plans(max_tasks=None))
def test_large_plans_keep_every_property(args: tuple[int, int, object, bool, int]) -> None:
    """The properties above on plans of any size (up to 21**3 leaves)."""
    for prop in PROPERTIES:
        prop.hypothesis.inner_test(args)
