"""Write a unit's finished partial chunk by chunk while its compute goes on.

A unit's node folds each merge range once its last child is done
(``kernels.tree``). With the cyclic quorum most store chunks of the node are
final before the last child starts (4 of 7 at quorum 3), so writing them on
this thread hides most of the write behind that child's kernels instead of
adding it after the compute. On a GPU the rows are copied back here too,
on this thread, once the device has finished them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from streamcqsa.kernels.device import Device

Write = Callable[[int, int, Tensor, Tensor], None]  # (a, z, out, lse): rows [a, z)


class ChunkWriter:
    """Collects final row ranges from the compute thread; writes each store
    chunk [jC, (j+1)C) of the node once all its rows are final."""

    def __init__(
        self, write: Write, length: int, chunk: int, device: Device, stream: Any = None
    ) -> None:
        self._write = write
        self._dev = device  # where the rows are computed
        self._length, self._chunk = length, chunk
        self._left = [min(chunk, length - j * chunk) for j in range(-(-length // chunk))]
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._stream: Any = stream  # the writes' (None: made on first use, if the device queues)
        self._thread = threading.Thread(target=self._loop, name="streamcqsa-writeback", daemon=True)
        self._thread.start()

    def rows(self, a: int, z: int, out: Tensor, lse: Tensor) -> None:
        """Rows [a, z) of (out, lse) are final (called on the compute thread;
        on a GPU, once the kernels queued so far have run)."""
        if self._error is not None:  # stop the compute early: its result cannot be stored
            raise self._error
        done = self._dev.record()  # the rows' kernels queued so far
        self._jobs.put((a, z, out, lse, done))

    def _loop(self) -> None:
        torch.set_num_threads(1)  # no second OpenMP team beside the compute's
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue
            a, z, out, lse, done = job
            self._tensors = (out, lse)
            try:
                done.synchronize()  # the writer sleeps until they have run
                if self._stream is None:  # copies off the compute's stream
                    self._stream = self._dev.stream()
                for j in range(a // self._chunk, -(-z // self._chunk)):
                    lo, hi = j * self._chunk, min((j + 1) * self._chunk, self._length)
                    self._left[j] -= min(z, hi) - max(a, lo)
                    if self._left[j] == 0:
                        with self._dev.using(self._stream):
                            self._write(lo, hi, out, lse)
            except BaseException as e:  # noqa: BLE001 - re-raised by finish()
                self._error = e
            job = None
        self._tensors = None

    def finish(self, *, failed: bool = False) -> None:
        """Wait for the writes; raise the first write error unless ``failed``
        (the compute already failed and its error is the one to report)."""
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None and not failed:
            raise self._error
        if not failed and any(self._left):
            raise RuntimeError("a unit finished with rows never reported final")
