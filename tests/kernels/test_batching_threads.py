"""Kernel threads (``kernels.threads``): cells, scopes, helper threads, fork."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import pytest
import torch
from sdpa_reference import F32, make_inputs

import streamcqsa
from streamcqsa.cqs import divide
from streamcqsa.kernels import runner, threads
from streamcqsa.kernels.tokens import gather_runs


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- cells and dealing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "kv_heads", "width"),
    [(1, 4, 2), (1, 4, 3), (2, 3, 4), (3, 2, 4), (1, 1, 2), (5, 3, 7), (2, 8, 1), (4, 1, 16)],
)
def test_cells_cover_every_unit_once(batch: int, kv_heads: int, width: int) -> None:
    cells = threads.cells(batch, kv_heads, width)
    assert 1 <= len(cells) <= min(width, batch * kv_heads)
    units = [
        (b, h)
        for cell in cells
        for bs, hs in cell
        for b in range(batch)[bs]
        for h in range(kv_heads)[hs]
    ]
    assert sorted(units) == [(b, h) for b in range(batch) for h in range(kv_heads)]
    sizes = [sum(len(range(batch)[bs]) * len(range(kv_heads)[hs]) for bs, hs in c) for c in cells]
    assert max(sizes) - min(sizes) <= 1


def test_deal_balances_costs_the_same_way_every_time() -> None:
    costs = [5, 1, 4, 4, 2, 9, 3]
    groups = threads.deal(costs, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(costs)))
    loads = sorted(sum(costs[i] for i in g) for g in groups)
    assert loads == [9, 9, 10]
    assert threads.deal(costs, 3) == groups
    assert sorted(threads.deal(costs, 10)) == [[i] for i in range(len(costs))]


# --- scope ---------------------------------------------------------------------------


def test_scope_runs_the_caller_single_threaded_and_restores(torch_threads: None) -> None:
    torch.set_num_threads(2)
    with threads.scope() as w:
        assert (w, threads.width(), torch.get_num_threads()) == (2, 2, 1)
        with threads.scope() as inner:  # nested: the outer width, not this thread's 1
            assert inner == 2
        with threads.scope(3) as wide:
            assert (wide, threads.width()) == (3, 3)
        assert threads.width() == 2
    assert torch.get_num_threads() == 2
    assert threads.width() == 2  # outside a scope: torch's count


def test_scope_refuses_no_threads() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with threads.scope(0):
            pass


# --- helper threads ------------------------------------------------------------------


def test_run_cells_waits_for_every_cell_then_raises_the_first_error() -> None:
    finished = threading.Event()

    def first() -> None:
        raise ValueError("first cell")

    def slow() -> int:
        finished.wait(0.2)  # still running when the first cell has failed
        finished.set()
        return 2

    def second() -> None:
        raise KeyError("second cell")

    with pytest.raises(ValueError, match="first cell"):
        threads.run_cells([first, slow, second], 1)
    assert finished.is_set()
    assert threads.run_cells([lambda: 1, lambda: 2, lambda: 3], 1) == [1, 2, 3]


def test_helper_cells_run_single_threaded_under_the_callers_autograd_mode() -> None:
    seen: list[tuple[int, bool, bool]] = []

    def probe() -> None:
        seen.append(
            (torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        )

    with threads.scope(3), torch.inference_mode():
        threads.run_cells([probe, probe, probe], 1)
    assert seen == [(1, False, True)] * 3


# --- whole tasks at once ----------------------------------------------------------


def test_run_tasks_gives_each_task_one_thread_and_keeps_the_order() -> None:
    seen: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def task(i: int) -> int:
        with lock:
            seen.append((threading.get_ident(), threads.width(), torch.get_num_threads()))
        # a task's own runner calls see width 1: run_cells stays on this thread
        assert threads.run_cells([lambda: i, lambda: -i], 1) == [i, -i]
        return i * i

    fns = [lambda i=i: task(i) for i in range(7)]
    with threads.scope(2):
        got = threads.run_tasks(fns, costs=[3, 1, 4, 1, 5, 9, 2])
    assert got == [i * i for i in range(7)]
    assert {(w, n) for _, w, n in seen} == {(1, 1)}
    assert len({t for t, _, _ in seen}) == 2


def test_tasks_at_once_give_the_bits_of_tasks_one_by_one() -> None:
    L = 400
    plan = divide(L, 2, 3, is_causal=True)
    q, k, v, _ = make_inputs(7, L, 16, F32, B=1, H=2, Hkv=2)
    counter = runner.WorkCounter()

    def task(leaf):  # noqa: ANN001, ANN202
        xs = [gather_runs(t, leaf.runs) for t in (q, k, v)]
        return runner.forward(*xs, leaf.blocks, counter=counter)

    one_by_one = [task(leaf) for leaf in plan.tasks]
    entries, calls = counter.entries, counter.calls
    with threads.scope(3):
        at_once = threads.run_tasks(
            [lambda leaf=leaf: task(leaf) for leaf in plan.tasks],
            [leaf.blocks.entries for leaf in plan.tasks],
        )
    for (o1, s1), (o2, s2) in zip(one_by_one, at_once, strict=True):
        assert torch.equal(o1, o2) and torch.equal(s1, s2)
    assert (counter.entries, counter.calls) == (2 * entries, 2 * calls)  # no add lost


# --- fork ----------------------------------------------------------------------------


def _child(conn) -> None:  # noqa: ANN001
    q, k, v, _ = make_inputs(5, 300, 16, F32, B=1, H=4, Hkv=4)
    # the whole call in a scope: libgomp itself cannot open a team in a forked
    # child once the parent has used one, so nothing here may open one
    with threads.scope(2):
        out = streamcqsa.attention(q, k, v, itr=1)
    conn.send(float(out.abs().sum()))


def test_a_forked_child_computes_with_threads_of_its_own() -> None:
    """The parent's helper threads do not exist in a forked child: it must
    start its own instead of waiting forever for them (and, in a scope, it
    opens no OpenMP team, which would hang in a forked child)."""
    with threads.scope(2):
        threads.run_cells([lambda: None, lambda: None], 1)  # the parent has a helper
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child,))
    p.start()
    p.join(60)  # liveness only: a hang is the defect
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive and p.exitcode == 0
    assert parent.recv() > 0
