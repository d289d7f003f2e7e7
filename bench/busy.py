"""A busy neighbour: one CPU-bound process beside a measurement.

Shared servers, laptops and batch nodes rarely give a run every core. The
suite's "busy neighbour" section measures the engine (and the pipeline) again
while one other process spins on a core, against SDPA measured under the same
load in the same run, so the ratio shows how each degrades when a core is
shared. Usage: ``with BusyNeighbour() as n: ...``; ``n.cpu_s`` is the CPU time
the neighbour got (a neighbour that got none measured nothing).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import psutil

SPIN = "while True: pass"


class BusyNeighbour:
    """One ``python -c 'while True: pass'`` process for the duration."""

    def __init__(self, settle_s: float = 0.3) -> None:
        self.settle_s = settle_s
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> BusyNeighbour:
        self._proc = subprocess.Popen([sys.executable, "-c", SPIN])
        self._ps = psutil.Process(self._proc.pid)
        self._t0 = time.perf_counter()
        time.sleep(self.settle_s)  # running, not starting, when the timing begins
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        try:
            t = self._ps.cpu_times()
            self.cpu_s = t.user + t.system
        except psutil.Error:
            pass
        self.wall_s = time.perf_counter() - self._t0
        self._proc.kill()
        self._proc.wait()

    @property
    def share(self) -> float:
        """Cores the neighbour held on average (about 1.0 when it ran freely)."""
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


def busy_rows(sdpa_rows: Callable[..., list[dict]], **kw: object) -> list[dict]:
    """``sdpa_rows(label=..., **kw)`` measured beside a ``BusyNeighbour``: SDPA,
    engine and pipeline all under that same load, interleaved, so the ratios
    say how each degrades when a core is shared. Each row's note gives the
    cores the neighbour held."""
    with BusyNeighbour() as n:
        rows = sdpa_rows(label=" (busy neighbour)", **kw)
    for r in rows:
        share = f"neighbour held {n.share:.2f} cores on average"
        r["note"] = f"{r['note']}; {share}" if r["note"] else share
    return rows
