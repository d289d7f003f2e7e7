"""Kernel threads that stay fast when the machine's cores are shared.

The CPU kernels parallelise with OpenMP: every call above a small size opens
a parallel region whose end waits for all of its team. libgomp's team
threads spin between regions; when another process holds a core, a region
waits until the OS runs the descheduled team thread again, and a run made of
many short regions pays that wait every time. The rule here: CPU kernels
run single-threaded, and the cores are used by running several of them at
once on threads of our own, which sleep (on a lock) when they wait, so a
core they do not need goes to whoever does. docs/speed.md has the measured
options and why this one.

- ``scope(threads)`` covers a whole computation: the calling thread's own
  OpenMP team is one thread (so the merges and copies between kernel calls
  open no team either) and ``threads`` is the width its runner calls use.
  Outside a scope a runner call opens one for itself, as wide as the
  caller's torch thread count.
- A runner call deals its (batch, kv-head) units into ``cells``, one thread
  each; with fewer units than threads it runs its kernel calls at once
  instead (``runner._execute``). ``run_tasks`` runs whole independent tasks
  at once, each single-threaded inside: one hand-over per group of tasks;
  ``run_in_order`` does too, handing results on in order, a few at a time.
  ``kernels.tree`` and ``kernels.flat`` run the leaves under a node so
  where ``tasks_width`` allows.
- The bits do not depend on the width: a kernel computes each (batch, head)
  on its own, always single-threaded, and merges and sums are elementwise,
  applied per element in a fixed order whichever thread does it.
- Helper threads are made when a job finds none free, and kept. A helper
  runs what it is given inline, never waiting for another helper; a forked
  child starts with none.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Piece = tuple[slice, slice]  # (batch entries, kv heads) of one rectangle of units
Cell = tuple[Piece, ...]

_local = threading.local()


TASKS_AT_ONCE = True  # False: tree and flat run their leaves one by one (for comparison)


def width() -> int:
    """Threads a runner call on this thread may use: the scope's, else torch's."""
    w = getattr(_local, "width", None)
    return torch.get_num_threads() if w is None else w


def _set_threads(n: int) -> None:
    if torch.get_num_threads() != n:  # the get also runs torch's per-thread setup
        torch.set_num_threads(n)


@contextlib.contextmanager
def scope(threads: int | None = None, *, tasks: bool | None = None) -> Iterator[int]:
    """Run a computation of many kernel calls on ``threads`` (default: this
    thread's torch thread count) without OpenMP teams.

    Inside, this thread's own OpenMP team is one thread (the memory-bound
    merges and copies between runner calls then open no parallel region),
    and runner calls spread their work over ``threads`` threads of their
    own. A nested scope without ``threads`` keeps the outer width. Yields
    the width. torch's thread count is per thread under OpenMP, but threads
    that first use torch while a scope is open start from its count (1).

    ``tasks=False``: ``kernels.tree`` and ``kernels.flat`` run their leaves
    one by one here, each on the whole width (for a caller whose leaves
    wait on something shared, such as a pipeline's guardrail, which would
    let only a few run at once). None keeps the outer scope's choice (at
    the top: at once).
    """
    outer_tasks = getattr(_local, "tasks", True)
    _local.tasks = outer_tasks if tasks is None else tasks
    try:
        with _width(threads) as w:
            yield w
    finally:
        _local.tasks = outer_tasks


@contextlib.contextmanager
def _width(threads: int | None) -> Iterator[int]:
    outer = getattr(_local, "width", None)
    if threads is None and outer is not None:
        yield outer
        return
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    w = before if threads is None else int(threads)
    _local.width = w
    _set_threads(1)
    try:
        yield w
    finally:
        _local.width = outer
        _set_threads(before)


def tasks_width(device: torch.device | str) -> int:
    """Threads for whole tasks at once: the scope's width on the CPU; else 1
    (outside a scope, in one with ``tasks=False``, or on a GPU: tasks run
    one by one)."""
    w = getattr(_local, "width", None)
    at_once = TASKS_AT_ONCE and getattr(_local, "tasks", True)
    if not at_once or w is None or torch.device(device).type != "cpu":
        return 1
    return w


def computing(
    device: torch.device | str, *, tasks: bool | None = None
) -> contextlib.AbstractContextManager:
    """``scope(tasks=tasks)`` for a computation on ``device`` if it is the
    CPU; else nothing (a GPU's kernels do not use OpenMP teams)."""
    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return scope(tasks=tasks)


def cells(batch: int, kv_heads: int, threads: int) -> list[Cell]:
    """The (batch, kv-head) units split into at most ``threads`` contiguous cells.

    Units are taken in (batch, head) order and dealt out in runs whose sizes
    differ by at most one; a run that crosses a batch entry is kept as a
    few rectangles (pieces), each a plain slice of the tensors.
    """
    units = batch * kv_heads
    n = max(1, min(threads, units))
    out: list[Cell] = []
    start = 0
    for i in range(n):
        stop = start + units // n + (i < units % n)
        out.append(_pieces(start, stop, kv_heads))
        start = stop
    return out


def _pieces(start: int, stop: int, kv_heads: int) -> Cell:
    """Units [start, stop) in (batch, head) order as at most three rectangles."""
    pieces: list[Piece] = []
    while start < stop:
        b, h = divmod(start, kv_heads)
        if h or stop - start < kv_heads:  # part of one batch entry's heads
            z = min(stop, (b + 1) * kv_heads)
            pieces.append((slice(b, b + 1), slice(h, h + z - start)))
        else:  # whole batch entries
            nb = (stop - start) // kv_heads
            z = start + nb * kv_heads
            pieces.append((slice(b, b + nb), slice(0, kv_heads)))
        start = z
    return tuple(pieces)


def deal(costs: Sequence[int], threads: int) -> list[list[int]]:
    """Indices of ``costs`` dealt to at most ``threads`` groups, costliest
    first, each to the group with the least so far (ties: the first)."""
    n = max(1, min(threads, len(costs)))
    loads = [0] * n
    groups: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += costs[i]
    return [sorted(g) for g in groups if g]


class _Helpers:
    """Threads that run cells other than the caller's, single queue, FIFO.

    Every job submitted finds a helper that is free or about to be (one is
    made when none is): a job never queues behind another caller's, which
    may wait on something (a pipeline's guardrail) that this job's caller
    holds."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._count = 0
        self._spare = 0  # helpers idle, or done with their job, and not yet promised one
        self._lock = threading.Lock()

    def submit(self, job: tuple[Callable[[], Any], int, tuple[bool, bool], Any, int]) -> None:
        with self._lock:
            if self._spare:
                self._spare -= 1
            else:
                threading.Thread(
                    target=self._serve, name=f"streamcqsa-kernel-{self._count}", daemon=True
                ).start()
                self._count += 1
        self._jobs.put(job)

    def _serve(self) -> None:
        _local.helper = True  # a helper's own cells run inline: helpers never wait for helpers
        while True:
            fn, threads, (grad, inference), done, index = self._jobs.get()
            result, error = None, None
            try:
                _set_threads(threads)
                # autograd modes are per thread: the caller's hold for its cells
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                error = e
            with self._lock:  # free before the caller hears: its next job may take this one
                self._spare += 1
            done.put((index, result, error))


_HELPERS = _Helpers()


def _after_fork() -> None:
    global _HELPERS
    _HELPERS = _Helpers()  # the parent's threads do not exist in the child
    _local.__dict__.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def run_cells(fns: Sequence[Callable[[], Any]], threads: int) -> list[Any]:
    """Run ``fns`` at once, each with ``threads`` OpenMP threads; their results.

    The caller runs the first and waits (asleep) for the rest. Every one is
    waited for, even after one fails, since they may write into shared
    tensors; then the first failure in ``fns`` order is raised.
    """
    if not fns:
        return []
    before = torch.get_num_threads()
    if len(fns) == 1 or getattr(_local, "helper", False):
        _set_threads(threads)
        try:
            return [fn() for fn in fns]
        finally:
            _set_threads(before)
    done: queue.SimpleQueue = queue.SimpleQueue()
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    for i, fn in enumerate(fns[1:], start=1):
        _HELPERS.submit((fn, threads, modes, done, i))
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)
    _set_threads(threads)
    try:
        results[0] = fns[0]()
    except BaseException as e:  # noqa: BLE001 - raised below, after the others end
        errors[0] = e
    finally:
        _set_threads(before)
    pending = len(fns) - 1
    while pending:
        try:
            i, res, err = done.get()
        except BaseException as e:  # noqa: BLE001 - an interrupt: still wait for the cells
            errors[0] = errors[0] or e
            continue
        results[i], errors[i] = res, err
        pending -= 1
    for e in errors:
        if e is not None:
            raise e
    return results


def run_tasks(fns: Sequence[Callable[[], Any]], costs: Sequence[int]) -> list[Any]:
    """Run independent tasks (whole runner calls and their gathers) at once on
    this thread's width, each single-threaded inside; their results in order.

    For a caller that holds several independent tasks at a time (the leaves
    under one node, whose partials are all kept until their parent's fold):
    one hand-over per group of tasks instead of one per task. Threads take
    the next task, costliest first, as they come free, so a thread the OS
    has set aside holds up one task, not a share of them. The bits are
    those of running the tasks one by one: a task's result does not depend
    on which thread runs it or on its width.
    """
    w = width()
    if w < 2 or len(fns) < 2:
        return [fn() for fn in fns]
    order = sorted(range(len(fns)), key=lambda i: (-costs[i], i))
    taken = itertools.count()  # next() is atomic under the GIL
    out: list[Any] = [None] * len(fns)

    def take() -> None:
        with scope(1):
            for j in iter(taken.__next__, None):
                if j >= len(order):
                    return
                out[order[j]] = fns[order[j]]()

    with scope(w):
        run_cells([take] * min(w, len(fns)), 1)
    return out


def run_in_order(
    fns: Sequence[Callable[[], Any]],
    consume: Callable[[int, Any], None],
    ahead: int | None = None,
    *,
    side: Sequence[Callable[[], None]] = (),
) -> None:
    """Run independent tasks at once as ``run_tasks`` does, and call
    ``consume(i, result)`` for each in ``fns`` order, one call at a time, on
    whichever thread is free (single-threaded, like the tasks).

    A task starts only while fewer than ``ahead`` (default: twice the width)
    are running or waiting for ``consume``, so a caller that frees each
    result there holds at most ``ahead`` at a time, and a thread done before
    the one ahead of it mostly finds another task to take. After a failure
    no task starts; those running are waited for, then the first failure is
    raised.

    ``side``: other independent jobs, their results dropped (work left over
    from the caller's previous call), each taken by a thread with nothing
    else to do: no result to hand on and no task it may start. So they fill
    the gaps, mostly at the end, where a thread would wait for the others.
    """
    w, n = width(), len(fns)
    if w < 2 or n + len(side) < 2:
        for i, fn in enumerate(fns):
            consume(i, fn())
        for job in side:
            job()
        return
    ahead = max(1, 2 * w if ahead is None else ahead)
    cond = threading.Condition()
    done: dict[int, Any] = {}
    errors: list[BaseException] = []
    started = consumed = 0
    consuming = False
    extra = list(side)[::-1]  # popped from the end: in order

    def next_job() -> tuple[int, bool] | None:  # (index, consume it?); under cond
        nonlocal started, consuming
        while not errors and consumed < n:
            if not consuming and consumed in done:
                consuming = True
                return consumed, True
            if started < min(n, consumed + ahead):
                started += 1
                return started - 1, False
            if extra:
                return -1, False  # one of ``side``: nothing else to do yet
            cond.wait()
        return (-1, False) if extra and not errors else None

    def work() -> None:
        nonlocal consumed, consuming
        with scope(1):
            try:
                while True:
                    with cond:
                        job = next_job()
                        if job is None:
                            return
                        i, eat = job
                        if i < 0:
                            job_side = extra.pop()
                        result = done.pop(i) if eat else None
                    if i < 0:
                        job_side()
                        continue
                    if eat:
                        consume(i, result)
                        result = None  # the caller may have freed it
                    else:
                        result = fns[i]()
                    with cond:
                        if eat:
                            consumed, consuming = consumed + 1, False
                        else:
                            done[i] = result
                        cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - raised by the caller below
                with cond:
                    errors.append(e)
                    cond.notify_all()

    with scope(w):
        run_cells([work] * min(w, n + len(side)), 1)
    if errors:
        raise errors[0]
