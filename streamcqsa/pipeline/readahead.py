"""Read a unit's inputs piece by piece while its first leaves already compute.

A unit gathers its node's tokens once. Reading them all before the first
kernel leaves the device idle for the whole read, although the first leaf
needs only a few store chunks (2 of 8 for the root at itr=2). Here a thread
reads the pieces (the node's runs cut at store chunk boundaries) in the
order the subtree's leaves first need them, straight into the unit's
buffers, and each leaf waits only for the pieces its tokens lie in.

With a device the unit's buffers live there: each piece is read into one of
a few reused pinned host slots and copied on a copy stream, and a leaf's
kernels wait on that copy's event on the device, not on the host. Host
memory is then the pinned slots alone, whatever the unit's size.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from streamcqsa.cqs.divide import Node, Plan
from streamcqsa.kernels.device import Device
from streamcqsa.storage import chunkio
from streamcqsa.storage.layout import stored_dtype, to_torch, torch_dtype

Piece = tuple[int, int, int]  # (local start, local stop, global start)
WINDOW = 4  # pieces being read at once: latency of slow storage overlaps


def pieces(node: Node, chunk: int) -> list[Piece]:
    """The node's runs cut at store chunk boundaries, in local order."""
    out, pos = [], 0
    for a, n in node.runs:
        g = a
        while g < a + n:
            z = min(a + n, (g // chunk + 1) * chunk)
            out.append((pos + g - a, pos + z - a, g))
            g = z
        pos += n
    return out


def schedule(plan: Plan, node: Node, cut: Sequence[Piece]) -> tuple[list[int], dict]:
    """Piece order by first use in the subtree's leaf order, and per leaf the
    number of pieces that must be in before it runs."""
    starts = [p[0] for p in cut]
    order: list[int] = []
    rank: dict[int, int] = {}
    need: dict[tuple[int, ...], int] = {}
    for leaf in _leaves(plan, node):
        last = 0
        for a, n in plan.local_runs(leaf, node):
            i = int(np.searchsorted(starts, a, side="right")) - 1
            while i < len(cut) and cut[i][0] < a + n:
                if i not in rank:
                    rank[i] = len(order)
                    order.append(i)
                last = max(last, rank[i] + 1)
                i += 1
        need[leaf.path] = last
    order += [i for i in range(len(cut)) if i not in rank]
    return order, need


def _leaves(plan: Plan, node: Node) -> list[Node]:
    if node.is_leaf:
        return [node]
    return [x for c in node.children for x in _leaves(plan, plan.by_path[c])]


class ReadAhead:
    """Buffers for ``sources`` over ``node``'s tokens, filled on a reader thread.

    ``tensors`` are the unit's inputs (logical dtype, rows not yet read are
    uninitialised); ``wait(leaf)`` returns once every row that leaf reads is in.
    """

    def __init__(
        self,
        plan: Plan,
        node: Node,
        sources: Sequence[tuple[Any, slice]],  # (zarr array, heads)
        batch: int,
        dtype_name: str | Sequence[str],  # the sources' logical dtype, or one per source
        chunk: int,
        device: torch.device | None = None,
        stream: Any = None,  # the copy stream (default: a new one)
    ) -> None:
        cut = pieces(node, chunk)
        self._order, self._need = schedule(plan, node, cut)
        self._cut, self._sources, self._b = cut, list(sources), batch
        names = [dtype_name] * len(sources) if isinstance(dtype_name, str) else list(dtype_name)
        shapes = [(1, h.stop - h.start, node.length, *arr.shape[3:]) for arr, h in self._sources]
        self._copy: DeviceCopy | None = None
        if device is None:
            self._buffers = [
                np.empty(shape, dtype=np.dtype(stored_dtype(n)))
                for shape, n in zip(shapes, names, strict=True)
            ]
            self.tensors = tuple(
                to_torch(buf, n) for buf, n in zip(self._buffers, names, strict=True)
            )
        else:
            self._copy = DeviceCopy(device, names, len(shapes), stream)
            self.tensors = tuple(
                torch.empty(shape, dtype=torch_dtype(n), device=device)
                for shape, n in zip(shapes, names, strict=True)
            )
            self._copy.adopt(self.tensors)
        self._done = 0
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self.read_s = 0.0  # reader busy time
        self.waited_s = 0.0  # compute time lost waiting for pieces
        self._thread = threading.Thread(target=self._loop, name="streamcqsa-readahead", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        torch.set_num_threads(1)  # no second OpenMP team beside the compute's
        t0 = time.perf_counter()
        pending: deque = deque()  # (piece, [(source, staged, future)]) in order
        todo = iter(self._order)
        pool = ThreadPoolExecutor(
            max_workers=WINDOW * len(self._sources), thread_name_prefix="streamcqsa-read"
        )
        try:
            for i in itertools.islice(todo, WINDOW):
                pending.append((i, self._submit(pool, i)))
            while pending and not self._stop:
                i, reads = pending.popleft()
                la, lz, _ = self._cut[i]
                for j, staged, fut in reads:
                    fut.result()
                    if staged is not None:
                        self._copy.send(j, staged, self.tensors[j][:, :, la:lz])  # type: ignore[union-attr]
                if self._copy is not None:
                    self._copy.mark(i)
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()
                for nxt in itertools.islice(todo, 1):
                    pending.append((nxt, self._submit(pool, nxt)))
        except BaseException as e:  # noqa: BLE001 - raised to the waiting compute
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.read_s = time.perf_counter() - t0

    def _submit(self, pool: ThreadPoolExecutor, i: int) -> list:
        """Start reading piece ``i`` of every source (into its place, or into
        a staging slot for the device)."""
        la, lz, ga = self._cut[i]
        reads = []
        for j, (arr, h) in enumerate(self._sources):
            sel = (slice(self._b, self._b + 1), h, slice(ga, ga + lz - la))
            staged = None
            if self._copy is None:
                dst = self._buffers[j][:, :, la:lz]
            else:
                staged = self._copy.slot(j, (1, h.stop - h.start, lz - la, *arr.shape[3:]))
                dst = staged.numpy
            reads.append((j, staged, pool.submit(chunkio.read, arr, sel, out=dst)))
        return reads

    def _wait_for(self, count: int) -> None:
        if self._done >= count and self._error is None and not self._stop:
            return
        t = time.perf_counter()
        with self._cond:
            while self._done < count and self._error is None:
                self._cond.wait()
        self.waited_s += time.perf_counter() - t
        if self._error is not None:
            raise self._error

    def wait(self, leaf: Node) -> None:
        count = self._need[leaf.path]
        self._wait_for(count)
        if self._copy is not None and count:
            self._copy.wait(self._order[count - 1])

    @property
    def h2d_s(self) -> float:
        """Copy-stream time of the pieces (after ``finish``; 0 without a device)."""
        return 0.0 if self._copy is None else self._copy.elapsed()

    def finish(self, *, failed: bool = False) -> None:
        """Stop (after a failure) or wait for the reader; raise its error.

        After a failure a compute still waiting for pieces (the unit was
        cancelled while it ran on another slot) is woken with the error."""
        if failed:
            with self._cond:
                self._stop = True
                if self._error is None:
                    self._error = RuntimeError("the unit was cancelled")
                self._cond.notify_all()
        self._thread.join()
        if self._copy is not None:
            self._copy.synchronize()
        if self._error is not None and not failed:
            raise self._error


class _Slot:
    """A pinned host buffer viewed as numpy (for reads) and torch (for copies)."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.event: Any = None  # the last copy out of this slot

    def view(self, shape: tuple[int, ...], dtype: torch.dtype, np_dtype: np.dtype) -> _Staged:
        n = int(np.prod(shape)) * np_dtype.itemsize
        t = self.raw[:n].view(dtype).view(shape)
        return _Staged(t, self.raw[:n].numpy().view(np_dtype).reshape(shape), self)


class _Staged:
    def __init__(self, tensor: torch.Tensor, array: np.ndarray, slot: _Slot) -> None:
        self.tensor, self.numpy, self.slot = tensor, array, slot


class DeviceCopy:
    """Host-to-device copies on a stream of their own, through reused pinned
    slots (a ring of ``WINDOW + 1`` per source), each copy ordered by an event.

    Written against ``Device``'s streams and events only: on a CPU device the
    same calls copy synchronously (no streams, no pinning), so the same
    bookkeeping runs, and is tested, without a GPU.
    """

    def __init__(
        self,
        device: torch.device,
        dtype_name: str | Sequence[str],  # one for all sources, or one per source
        per_source: int,
        stream: Any = None,
    ) -> None:
        self.dev = Device.of(device)
        self.device = self.dev.device
        self.stream = stream if stream is not None else self.dev.stream()
        names = [dtype_name] * per_source if isinstance(dtype_name, str) else list(dtype_name)
        self._dtypes = [torch_dtype(n) for n in names]
        self._nps = [np.dtype(stored_dtype(n)) for n in names]
        self._rings: list[list[_Slot]] = [[] for _ in range(per_source)]
        self._turn = [0] * per_source
        self._marks: dict[int, Any] = {}
        self._start: Any = None

    def adopt(self, tensors: Sequence[torch.Tensor]) -> None:
        """Device buffers allocated on the caller's stream become safe to fill
        on the copy stream (``Device.adopt``)."""
        self.dev.adopt(self.stream, tensors)

    def slot(self, source: int, shape: tuple[int, ...]) -> _Staged:
        """A free staging buffer (pinned on CUDA) for one piece of one source."""
        nbytes = int(np.prod(shape)) * self._nps[source].itemsize
        ring = self._rings[source]
        if len(ring) < WINDOW + 1:  # a slot is reused only after its piece was sent
            ring.append(_Slot(nbytes, self.dev.pins_host))
        i = self._turn[source] = (self._turn[source] + 1) % len(ring)
        slot = ring[i]
        if slot.event is not None:
            slot.event.synchronize()  # its previous copy has left it
        if slot.raw.numel() < nbytes:
            slot = ring[i] = _Slot(nbytes, self.dev.pins_host)
        return slot.view(shape, self._dtypes[source], self._nps[source])

    def send(self, source: int, host: _Staged, dst: torch.Tensor) -> None:
        with self.dev.using(self.stream):
            if self._start is None:
                self._start = self.dev.record(self.stream, timing=True)
            dst.copy_(host.tensor, non_blocking=True)  # synchronous on CPU
            host.slot.event = self.dev.record(self.stream)  # waited on by the host

    def mark(self, piece: int) -> None:
        """Record that ``piece`` is fully sent (all sources)."""
        self._marks[piece] = self.dev.record(self.stream, timing=True)

    def wait(self, piece: int) -> None:
        """The compute stream waits (on the device) for ``piece`` and all before it."""
        self.dev.wait(self._marks[piece])

    def synchronize(self) -> None:
        """Return once every copy queued has run (no copy may outlive the buffers)."""
        self.dev.record(self.stream).synchronize()

    def elapsed(self) -> float:
        """Span of the copy stream, first copy to last (gaps waiting for reads
        included)."""
        if self._start is None or not self._marks:
            return 0.0
        last = list(self._marks.values())[-1]
        last.synchronize()
        return self._start.elapsed_time(last) / 1e3
