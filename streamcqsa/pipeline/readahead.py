"""Read a unit's inputs piece by piece while its first leaves already compute.

A unit gathers its node's tokens once. Reading them all before the first
kernel leaves the device idle for the whole read, although the first leaf
needs only a few store chunks (2 of 8 for the root at itr=2). Here a thread
reads the pieces (the node's runs cut at store chunk boundaries) in the
order the subtree's leaves first need them, straight into the unit's
buffers, and each leaf waits only for the pieces its tokens lie in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from streamcqsa.cqs.divide import Node, Plan
from streamcqsa.storage import chunkio
from streamcqsa.storage.layout import stored_dtype, to_torch

Piece = tuple[int, int, int]  # (local start, local stop, global start)


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
    """Buffers for ``names`` over ``node``'s tokens, filled on a reader thread.

    ``tensors`` are the unit's inputs (logical dtype, rows not yet read are
    uninitialised); ``wait(leaf)`` returns once every row that leaf reads is in.
    """

    def __init__(
        self,
        plan: Plan,
        node: Node,
        sources: Sequence[tuple[Any, slice]],  # (zarr array, heads)
        batch: int,
        dtype_name: str,
        chunk: int,
    ) -> None:
        cut = pieces(node, chunk)
        self._order, self._need = schedule(plan, node, cut)
        self._cut, self._sources, self._b = cut, list(sources), batch
        np_dtype = np.dtype(stored_dtype(dtype_name))
        self._buffers = [
            np.empty((1, h.stop - h.start, node.length, *arr.shape[3:]), dtype=np_dtype)
            for arr, h in self._sources
        ]
        self.tensors = tuple(to_torch(buf, dtype_name) for buf in self._buffers)
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
        try:
            for i in self._order:
                if self._stop:
                    return
                la, lz, ga = self._cut[i]
                for (arr, h), buf in zip(self._sources, self._buffers, strict=True):
                    sel = (slice(self._b, self._b + 1), h, slice(ga, ga + lz - la))
                    chunkio.read(arr, sel, out=buf[:, :, la:lz])
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - raised to the waiting compute
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            self.read_s = time.perf_counter() - t0

    def _wait_for(self, count: int) -> None:
        if self._done >= count and self._error is None:
            return
        t = time.perf_counter()
        with self._cond:
            while self._done < count and self._error is None:
                self._cond.wait()
        self.waited_s += time.perf_counter() - t
        if self._error is not None:
            raise self._error

    def wait(self, leaf: Node) -> None:
        self._wait_for(self._need[leaf.path])

    def finish(self, *, failed: bool = False) -> None:
        """Stop (after a failure) or wait for the reader; raise its error."""
        if failed:
            self._stop = True
        self._thread.join()
        if self._error is not None and not failed:
            raise self._error
