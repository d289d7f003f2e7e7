"""What one pass holds while it runs, in each process: slots, guardrail, counts.

A pass's steps share a ``Runtime``: where compute runs (the driver's compute
slots, or a worker process's device pool), the device guardrail (which
also bounds the units resident on a device), its streams, stage times and the progress
callback. It lives on the pass's ``Context`` and is never pickled: a worker
process that receives the context builds its own, so nothing about a pass
is kept in module-level registries, and a pass that has ended leaves no
state behind.

Policy: in the driver the slots exist only while the pass executes
(``attach``/``detach``); a step that asks for compute after that is a
straggler of a failed or interrupted pass and gets ``Cancelled``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from streamcqsa.kernels.device import Device
from streamcqsa.kernels.runner import WorkCounter
from streamcqsa.pipeline.guardrail import Guardrail
from streamcqsa.pipeline.worker import Cancelled, device_pool


class StageTimes:
    """Seconds spent per stage, summed over the steps of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, **stages: float) -> None:
        with self._lock:
            for k, v in stages.items():
                self.seconds[k] = self.seconds.get(k, 0.0) + v

    def summary(self, wall: float) -> dict:
        out = {k: round(v, 4) for k, v in sorted(self.seconds.items())}
        out["device_busy_fraction"] = (
            round(self.seconds.get("compute", 0.0) / wall, 4) if wall else 0
        )
        return out


class Runtime:
    """One pass's shared state in one process (see the module docstring)."""

    def __init__(
        self,
        *,
        device: str,
        n_cap: int,
        budget_bytes: int | None = None,
        distributed: bool = False,
    ) -> None:
        self.device = device
        self.distributed = distributed
        self.guardrail = Guardrail(n_cap=n_cap, device=Device.of(device), budget_bytes=budget_bytes)
        self.stages = StageTimes()
        self.counter = WorkCounter()
        self.progress: Callable[[int], None] | None = None
        self._slots: Any = None
        self._streams: dict[str, Any] = {}
        self._lock = threading.Lock()

    def stream(self, role: str) -> Any:
        """The pass's stream for ``role`` ("h2d": read-ahead copies, "d2h":
        write-back, "compute-<thread>": a compute slot's kernels) in this
        process, made once and shared by its units (copies in one direction
        take turns on the device anyway); None where the device queues
        nothing."""
        with self._lock:
            if role not in self._streams:
                self._streams[role] = self.guardrail.device.stream()
            return self._streams[role]

    def attach(self, slots: Any, progress: Callable[[int], None] | None = None) -> None:
        """The driver's compute slots (and progress bar) for the pass's run."""
        with self._lock:
            self._slots, self.progress = slots, progress

    def detach(self) -> None:
        with self._lock:
            self._slots, self.progress = None, None

    def compute(self, fn: Callable[[], Any], threads: int | None) -> Any:
        """Run ``fn`` on a compute slot and wait for its result.

        On a device that queues work, the slot queues it on its own stream,
        handed over from and back to the calling thread's (``Device.run_on``)."""
        with self._lock:
            slots = self._slots
            if slots is None:
                if not self.distributed:
                    raise Cancelled("the pass has ended")
                slots = self._slots = device_pool(self.device, self.guardrail.n_cap)
        dev = self.guardrail.device
        caller = dev.current_stream()
        if caller is None:
            return slots.call(fn, threads)

        def on_slot_stream() -> Any:
            return dev.run_on(self.stream(f"compute-{threading.get_ident()}"), caller, fn)

        return slots.call(on_slot_stream, threads)

    def leaf_done(self) -> None:
        update = self.progress
        if update is not None:
            update(1)

    def guard_stats(self) -> dict:
        g = self.guardrail
        return {"n_cap": g.n_cap, "events": list(g.events)}


__all__ = ["Runtime", "StageTimes"]
