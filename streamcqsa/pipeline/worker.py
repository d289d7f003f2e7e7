"""Where a pass's compute runs: the calling thread, while Dask's threads do I/O.

A unit reads its inputs on a Dask thread, hands its compute (the subtree's
kernels and in-memory folds, or a merge) to the pass's compute slots, and
writes the result back on its Dask thread, so one unit's I/O overlaps
another's compute.

Why the calling thread: libgomp gives every thread that launches parallel
work its own OpenMP team, and while the teams hold more threads than there
are cores it stops spinning between parallel regions. Many small kernels
(itr=3 runs about a thousand) then pay a wake-up each: measured 20-30%
slower on 2 cores, and that lasts for as long as the extra threads live.
Computing on the thread that called ``run`` (plus ``n_cap - 1`` helpers that
end with the pass) adds no team: the pipeline runs like the in-memory engine,
and leaves nothing behind that slows the caller's later work. Worker
processes of a distributed run keep one pool per device instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import torch

_WAKE = object()  # wakes the serving thread; helpers skip it


class Cancelled(RuntimeError):
    """The pass was interrupted; units still waiting for compute give up."""


def _settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless ``close`` already failed it."""
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except InvalidStateError:
        pass


def _run(job: tuple[Future, Callable[[], Any], int | None], *, reraise: bool) -> None:
    fut, fn, threads = job
    try:
        if not fut.set_running_or_notify_cancel():
            return
    except RuntimeError:  # already failed by close()
        return
    try:
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # per thread under OpenMP
        result = fn()
    except BaseException as e:  # noqa: BLE001 - the caller gets it
        _settle(fut, error=e)
        if reraise and not isinstance(e, Exception):
            raise  # KeyboardInterrupt on the serving thread stops the pass
    else:
        _settle(fut, result)


class ComputeSlots:
    """Compute slots of one pass: the thread that calls ``serve`` plus helpers.

    ``close`` fails every job not yet finished (queued, or lost to an
    interrupt between dequeue and run), so no Dask thread waits forever.
    """

    def __init__(self, slots: int, threads: int | None) -> None:
        self.threads = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._pending: set[Future] = set()
        self._helpers = [
            threading.Thread(target=self._helper, name=f"streamcqsa-compute-{i}", daemon=True)
            for i in range(max(1, slots) - 1)
        ]
        for t in self._helpers:
            t.start()

    def call(self, fn: Callable[[], Any], threads: int | None = None) -> Any:
        """Run ``fn`` on a slot; wait for its result (from a Dask thread)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise Cancelled("the pass was interrupted")
            self._pending.add(fut)
            self._jobs.put((fut, fn, threads or self.threads))
        try:
            return fut.result()
        finally:
            with self._lock:
                self._pending.discard(fut)

    def _helper(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job is not _WAKE and not self._closed:
                _run(job, reraise=False)
            job = None  # do not keep the last unit's tensors alive while idle

    def wake(self) -> None:
        """Called when the graph is done, so ``serve`` returns at once."""
        self._jobs.put(_WAKE)

    def serve(self, done: threading.Event) -> None:
        """Run jobs on this thread until ``done`` is set (the graph finished)."""
        before = torch.get_num_threads()
        try:
            while not done.is_set():
                try:
                    job = self._jobs.get(timeout=0.05)
                except queue.Empty:
                    continue
                if job is not None and job is not _WAKE:
                    _run(job, reraise=True)
                job = None
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        """Fail every unfinished job, then stop the helpers."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        for fut in pending:  # queued, running on a helper, or lost to an interrupt
            _settle(fut, error=Cancelled("the pass was interrupted"))
        for _ in self._helpers:
            self._jobs.put(None)
        for t in self._helpers:
            t.join()


class Inline:
    """Compute on the calling thread (the synchronous scheduler)."""

    def call(self, fn: Callable[[], Any], threads: int | None = None) -> Any:
        before = torch.get_num_threads()
        if threads and before != threads:
            torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)


class DevicePool:
    """A distributed worker process's compute threads for one device (made once,
    kept for the process's life: its Dask threads only do I/O)."""

    def __init__(self, device: str, slots: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(slots):
            threading.Thread(
                target=self._loop, name=f"streamcqsa-{device}-{i}", daemon=True
            ).start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            _run(job, reraise=False)
            job = None

    def call(self, fn: Callable[[], Any], threads: int | None = None) -> Any:
        fut: Future = Future()
        self._jobs.put((fut, fn, threads))
        return fut.result()


_POOLS: dict[tuple[str, int], DevicePool] = {}  # a process's compute threads, per device
_POOLS_LOCK = threading.Lock()


def device_pool(device: str, slots: int) -> DevicePool:
    """This process's compute threads for ``device`` (a distributed worker's:
    made on first use and kept, like any thread pool of the process)."""
    key = (device, max(1, slots))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = DevicePool(*key)
        return _POOLS[key]


__all__ = ["Cancelled", "ComputeSlots", "DevicePool", "Inline", "device_pool"]
