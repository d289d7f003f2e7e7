"""The CQS planner on chosen cases: exact powers, tiny and billion-token lengths,
the work at 4096 tokens, and ``split_lengths``; checked by the oracles of
``plan_oracles`` (see tests/cqs/test_divide.py for random plans)."""

from __future__ import annotations

import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_oracles import TILES, check_plan

from streamcqsa.cqs import (
    check_coverage,
    check_totals,
    chunk_count,
    dense_ratio,
    divide,
    split_lengths,
)


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
def test_billion_token_plan_is_made_per_task_not_per_token(causal: bool) -> None:
    """A billion tokens are planned in task-sized pieces: the plan's whole
    allocation (traced for the full plan, the larger one) stays far below one
    byte per token."""
    L = 10**9
    if causal:
        plan = divide(L, 3, 5, is_causal=causal)
    else:
        tracemalloc.start()
        try:
            plan = divide(L, 3, 5, is_causal=causal)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 * 2**20, f"planning allocated {peak / 2**20:.0f} MiB"
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
