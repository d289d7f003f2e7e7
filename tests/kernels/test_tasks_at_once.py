"""Leaves at once (``kernels.tree``, ``kernels.flat``): the bits of one by one,
results handed on in order, at most ``ahead`` held, failures raised."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from sdpa_reference import BF16, F32, make_inputs

from streamcqsa.attention import Engine
from streamcqsa.cqs import divide
from streamcqsa.kernels import schedule, threads
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.schedule import leaf_groups

L, D = 700, 16


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the groups handed to ``run_tasks`` / ``run_in_order``."""
    sizes: list[int] = []
    run_tasks, run_in_order = threads.run_tasks, threads.run_in_order

    def tasks(fns, costs):  # noqa: ANN001, ANN202
        sizes.append(len(fns))
        return run_tasks(fns, costs)

    def in_order(fns, consume, ahead=None, **kw):  # noqa: ANN001, ANN003, ANN202
        sizes.append(len(fns))
        return run_in_order(fns, consume, ahead, **kw)

    monkeypatch.setattr(threads, "run_tasks", tasks)
    monkeypatch.setattr(threads, "run_in_order", in_order)
    return sizes


def _run(width: int, dtype: torch.dtype, causal: bool, itr: int, fold_depth: int):
    q, k, v, dout = make_inputs(3, L, D, dtype, B=1, H=4, Hkv=2)
    plan = divide(L, itr, 3, is_causal=causal)
    eng = Engine(plan, get_backend("auto", q.device), D**-0.5, None, None, fold_depth)
    with threads.scope(width):
        out, lse = eng.forward(q, k, v)
        grads = eng.backward(q, k, v, dout, out.to(dtype), lse)
    return (out, lse, *grads), (eng.counter.entries, eng.counter.calls)


@pytest.mark.parametrize("itr", [2, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fold", ["tree", "flat-mid", "flat-leaves"])
@pytest.mark.parametrize("tail", [False, True], ids=["", "tail"])
def test_leaves_at_once_give_the_bits_of_one_by_one(
    spy: list[int],
    monkeypatch: pytest.MonkeyPatch,
    tail: bool,
    fold: str,
    dtype: torch.dtype,
    causal: bool,
    itr: int,
) -> None:
    """Also with every run's last leaves split off (``tail``): those run one
    by one on the whole width, their runner calls in cells."""
    if tail:
        monkeypatch.setattr(schedule, "TAIL_MIN", 0)
    depth = {"tree": 0, "flat-mid": 1, "flat-leaves": itr}[fold]
    one, work1 = _run(1, dtype, causal, itr, depth)
    assert max(spy) == 1  # width 1: every group is one leaf
    spy.clear()
    at_once, work2 = _run(2, dtype, causal, itr, depth)
    assert max(spy) > 1  # leaves did run at once
    for a, b in zip(one, at_once, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert work1 == work2  # no counter add lost


def test_nothing_at_once_outside_a_scope_on_a_gpu_or_when_switched_off(
    spy: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = divide(L, 2, 3)
        leaves = [n for n in plan.nodes if n.is_leaf]
        assert len(leaf_groups(leaves, torch.device("cpu"))) == len(leaves)  # no scope
        with threads.scope(2):
            assert len(leaf_groups(leaves, torch.device("cpu"))) == 1
            assert len(leaf_groups(leaves, torch.device("meta"))) == len(leaves)
            with threads.scope(tasks=False) as w:  # a pipeline's compute slot may say so
                assert w == 2
                assert len(leaf_groups(leaves, torch.device("cpu"))) == len(leaves)
                with threads.computing("cpu"):  # nested: keeps the outer choice
                    assert len(leaf_groups(leaves, torch.device("cpu"))) == len(leaves)
            assert len(leaf_groups(leaves, torch.device("cpu"))) == 1
            monkeypatch.setattr(threads, "TASKS_AT_ONCE", False)
            assert len(leaf_groups(leaves, torch.device("cpu"))) == len(leaves)
    finally:
        torch.set_num_threads(before)


def _nodes(kinds: str, entries: int) -> list:
    """Stand-ins for plan nodes: L a leaf of ``entries`` score entries, N an inner node."""
    leaf = SimpleNamespace(entries=entries)
    return [SimpleNamespace(is_leaf=c == "L", i=i, blocks=leaf if c == "L" else None)
            for i, c in enumerate(kinds)]  # fmt: skip


def _groups(nodes: list, width: int, heads: int = 1) -> list[list[int]]:
    with threads.scope(width):
        return [[n.i for n in g] for g in leaf_groups(nodes, torch.device("cpu"), heads)]


def test_leaf_groups_keep_order_and_group_only_consecutive_leaves() -> None:
    kinds = "LLNLNNLLLNLLL"
    small = _groups(_nodes(kinds, 1), 2, 4)
    assert small == [[0, 1], [2], [3], [4], [5], [6, 7, 8], [9], [10, 11, 12]]
    # large leaves: a run's last leaf that the width leaves over runs on its own
    big = _groups(_nodes(kinds, schedule.TAIL_MIN // 4), 2, 4)
    assert big == [[0, 1], [2], [3], [4], [5], [6, 7], [8], [9], [10, 11], [12]]
    # fewer large leaves than threads: one by one, each on the whole width
    assert _groups(_nodes("LLL", schedule.TAIL_MIN), 4) == [[0], [1], [2]]
    assert _groups(_nodes("LLL", schedule.TAIL_MIN - 1), 4) == [[0, 1, 2]]


# --- run_in_order -------------------------------------------------------------------


@pytest.mark.parametrize("ahead", [1, 2, 3, None])
def test_run_in_order_consumes_in_order_holding_at_most_ahead(ahead: int | None) -> None:
    lock = threading.Lock()
    held, most, eaten = [0], [0], []
    ranks: set[int] = set()

    def task(i: int) -> int:
        with lock:
            held[0] += 1
            most[0] = max(most[0], held[0])
            ranks.add(threading.get_ident())
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    def consume(i: int, r: int) -> None:
        assert torch.get_num_threads() == 1
        eaten.append((i, r))
        with lock:
            held[0] -= 1

    with threads.scope(2):
        threads.run_in_order([lambda i=i: task(i) for i in range(9)], consume, ahead)
    assert eaten == [(i, i * i) for i in range(9)]
    assert most[0] <= (4 if ahead is None else ahead)  # default: twice the width
    assert len(ranks) <= 2


def test_run_in_order_raises_the_failure_and_starts_nothing_after() -> None:
    started: list[int] = []

    def task(i: int) -> int:
        started.append(i)
        if i == 1:
            raise KeyError(i)
        time.sleep(0.05)  # the other thread fails meanwhile
        return i

    with threads.scope(2), pytest.raises(KeyError):
        threads.run_in_order([lambda i=i: task(i) for i in range(8)], lambda i, r: None, 8)
    assert sorted(started) == [0, 1]


@pytest.mark.parametrize(("n", "sides"), [(0, 3), (1, 1), (6, 2), (6, 0)])
@pytest.mark.parametrize("width", [1, 2])
def test_run_in_order_runs_side_jobs_each_once_beside_the_tasks(
    n: int, sides: int, width: int
) -> None:
    """Side jobs (a tree's queued folds and adds) each run once, on the
    scope's threads, and change nothing of the tasks' in-order hand-over."""
    ran: list[int] = []
    eaten: list[int] = []

    def task(i: int) -> int:
        time.sleep(0.002 * (i % 2))
        return i

    def side(j: int) -> None:
        assert torch.get_num_threads() == 1
        ran.append(j)

    with threads.scope(width):
        threads.run_in_order(
            [lambda i=i: task(i) for i in range(n)],
            lambda i, r: eaten.append(r),
            side=[lambda j=j: side(j) for j in range(sides)],
        )
    assert eaten == list(range(n))
    assert sorted(ran) == list(range(sides))


def test_run_in_order_raises_a_side_jobs_failure() -> None:
    def boom() -> None:
        raise KeyError("side")

    with threads.scope(2), pytest.raises(KeyError, match="side"):
        threads.run_in_order([lambda: 1, lambda: 2], lambda i, r: None, side=[boom])


def test_a_job_never_waits_behind_a_blocked_one() -> None:
    """One caller's tasks wait for an event that another caller sets only
    after its own cells ran: a helper must be free for those cells (the
    pipeline's guardrail makes such waits)."""
    gate = threading.Event()
    with threads.scope(2):
        blocked = threading.Thread(
            target=lambda: threads.run_tasks([gate.wait, gate.wait, gate.wait], [1, 1, 1])
        )
        blocked.start()
        time.sleep(0.05)  # its helper is now waiting on the gate
        assert threads.run_cells([lambda: 1, lambda: 2], 1) == [1, 2]
        gate.set()
        blocked.join(10)
    assert not blocked.is_alive()
