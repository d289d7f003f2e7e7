"""Timing that reads the same on every device: events and a with-block timer.

On CUDA they are CUDA events (blocking, so a host reading a figure sleeps
rather than spins); where nothing is queued, host clocks with the same
interface (``HostEvent``), so spans and timers are read one way everywhere.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class HostEvent:
    """An event on a device that queues nothing: complete when made; keeps
    the host time it was made at, so spans read the same way as CUDA's."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        """Milliseconds from this event to ``end`` (CUDA's unit)."""
        return (end.t - self.t) * 1e3


class Timer:
    """Seconds its with-block took: CUDA events on ``cuda`` (a device), else
    ``perf_counter``. The CUDA figure is read only when asked for."""

    def __init__(self, cuda: torch.device | None = None) -> None:
        self._cuda = cuda
        self._done = False

    def __enter__(self) -> Timer:
        if self._cuda is not None:
            stream = torch.cuda.current_stream(self._cuda)
            # blocking: a host reading the figure sleeps rather than spins
            self._start = torch.cuda.Event(enable_timing=True, blocking=True)
            self._end = torch.cuda.Event(enable_timing=True, blocking=True)
            self._start.record(stream)
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda is not None:
            self._end.record(torch.cuda.current_stream(self._cuda))
        else:
            self._elapsed = time.perf_counter() - self._t0
        self._done = True

    @property
    def seconds(self) -> float:
        if not self._done:
            raise RuntimeError("the timer's with-block has not ended")
        if self._cuda is not None:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._elapsed


__all__ = ["HostEvent", "Timer"]
