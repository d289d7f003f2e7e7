"""The OOM guardrail (paper §2.5): at most ``n_cap`` tasks resident per device.

On out-of-memory the task is evicted and requeued and ``n_cap`` drops by one.
At ``n_cap == 1`` a task that still does not fit divides itself: its blocks go
to the device one at a time (only that block's rows and keys resident), with
the same kernel calls merged in the same order, so the partial it writes is
bit-identical to the undivided task's. Out-of-memory is what the device
says it is (``Device.is_oom``): on CUDA the allocator's error, on CPU a
failed host allocation; on either, a task over the configured memory budget,
or an out-of-memory a test injects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from streamcqsa.cqs.blocks import BlockList
from streamcqsa.cqs.footprint import leaf_device_bytes
from streamcqsa.errors import DeviceOOM
from streamcqsa.kernels.device import Device


def task_bytes(blocks: BlockList, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Device bytes of a whole task (the planner's per-task figure)."""
    return leaf_device_bytes(blocks.length, heads, kv_heads, head_dim, itemsize)


def block_bytes(blocks: BlockList, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Device bytes of the largest single block (the divided task's footprint)."""
    worst = 0
    for b in blocks.blocks:
        rows, keys = b.q_stop - b.q_start, b.k_stop - b.k_start
        worst = max(
            worst,
            head_dim * (itemsize * (2 * heads * rows + 2 * kv_heads * keys) + 4 * heads * rows)
            + 4 * heads * rows,
        )
    return worst


# A test's hook, (task, n_cap) -> raise out-of-memory there?, taken by each
# guardrail made while it is set (tests set it with monkeypatch); the library
# never sets it, and it is not part of any public call.
INJECT_OOM: Callable[[str, int], bool] | None = None


_OOM = object()  # ``Guardrail._attempt``: the device ran out of memory


@dataclass(kw_only=True)
class Guardrail:
    """Shared by the tasks of one process and device."""

    device: Device  # whose out-of-memory it catches, whose cache it empties
    n_cap: int = 2
    budget_bytes: int | None = None  # CPU: the memory budget to enforce
    inject: Callable[[str, int], bool] | None = None  # default: INJECT_OOM
    events: list[dict] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _resident: int = 0
    _used: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_cap, bool) or not isinstance(self.n_cap, int) or self.n_cap < 1:
            raise ValueError(f"n_cap must be an int >= 1, got {self.n_cap!r}")
        self._units = 0  # units holding device memory (``unit``)
        if self.inject is None:
            self.inject = INJECT_OOM

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[int]:
        """Hold one unit's device memory (yields ``n_cap`` as it entered): at
        most ``n_cap`` units at once, a bound that follows ``n_cap`` down.
        Out-of-memory inside (read-ahead
        buffers, folds, gathers: a unit's allocations outside its leaves)
        lowers ``n_cap`` and is raised again; the caller then retries the
        unit, or at ``n_cap`` 1 runs it another way."""
        with self._cond:
            while self._units >= self.n_cap:
                self._cond.wait()
            self._units += 1
            cap = self.n_cap
        try:
            yield cap
        except BaseException as e:
            if self.device.is_oom(e) and not getattr(e, "final", False):
                self.device.empty_cache()
                with self._cond:
                    if self.n_cap > 1:
                        self.n_cap -= 1
                        self.events.append({"task": name, "event": "unit oom", "n_cap": self.n_cap})
            raise
        finally:
            with self._cond:
                self._units -= 1
                self._cond.notify_all()

    def run(
        self,
        name: str,
        whole: tuple[int, Callable[[], Any]],
        divided: tuple[int, Callable[[], Any]],
        *,
        gate: bool = True,
    ) -> Any:
        """Run ``whole`` (bytes, fn); on OOM requeue, shrink n_cap, then divide.

        ``gate=False``: the caller's own threads bound what runs at once (a CPU
        unit's leaves at once), so no device slot is taken, and an OOM goes
        straight to block by block."""
        nbytes, fn = whole
        if not gate:
            got = self._attempt(name, nbytes, self.n_cap, fn)
            if got is not _OOM:
                return got
        while gate:
            with self._cond:
                while self._resident >= self.n_cap:
                    self._cond.wait()
                cap = self.n_cap
                self._resident += 1
            try:
                got = self._attempt(name, nbytes, cap, fn)
            finally:
                with self._cond:
                    self._resident -= 1
                    self._cond.notify_all()
            if got is not _OOM:
                return got
            with self._cond:  # evicted: requeue with one task fewer resident
                if self.n_cap > 1:
                    self.n_cap -= 1
                    self.events.append({"task": name, "event": "oom", "n_cap": self.n_cap})
                    continue
            break
        self.events.append({"task": name, "event": "divide", "n_cap": self.n_cap})
        return self._run_divided(name, divided, gate=gate)

    def _attempt(self, name: str, nbytes: int, cap: int, fn: Callable[[], Any]) -> Any:
        """``fn()`` with ``nbytes`` reserved, or ``_OOM`` if the device ran out."""
        try:
            self._reserve(name, nbytes, cap)
            try:
                return fn()
            finally:
                self._release(nbytes)
        except BaseException as e:
            if not self.device.is_oom(e):
                raise
        self.device.empty_cache()
        return _OOM

    def _run_divided(
        self, name: str, divided: tuple[int, Callable[[], Any]], *, gate: bool = True
    ) -> Any:
        nbytes, fn = divided
        if gate:
            with self._cond:
                while self._resident >= 1:
                    self._cond.wait()
                self._resident += 1
        try:
            try:
                self._reserve(name, nbytes, 1, divided=True)
            except DeviceOOM as e:
                err = DeviceOOM(
                    f"task {name}: even one block ({nbytes} bytes) does not fit the device "
                    "budget; run with a larger itr"
                )
                err.final = True  # no retry can help: ``unit`` and its caller pass it on
                raise err from e
            try:
                return fn()
            finally:
                self._release(nbytes)
        finally:
            if gate:
                with self._cond:
                    self._resident -= 1
                    self._cond.notify_all()

    def _reserve(self, name: str, nbytes: int, cap: int, divided: bool = False) -> None:
        if self.inject is not None and not divided and self.inject(name, cap):
            raise DeviceOOM(f"injected out-of-memory in task {name}")
        with self._cond:
            if self.budget_bytes is not None and self._used + nbytes > self.budget_bytes:
                raise DeviceOOM(
                    f"task {name} needs {nbytes} bytes; {self._used} of "
                    f"{self.budget_bytes} already in use"
                )
            self._used += nbytes

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._used -= nbytes
