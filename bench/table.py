"""The suite's measuring helpers and its one table (``bench/suite.py``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch


class PeakRSS:
    """Peak resident memory above the start, sampled every 5 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float]:
    """(seconds, peak MiB): RSS growth on CPU, allocated bytes above the start on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return dt, (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as m:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
    return dt, m.mib


def row(section: str, **kw: Any) -> dict:
    """One line of the table; every section fills the same columns."""
    base = {
        "section": section,
        "device": "cpu",
        "dtype": "float32",
        "causal": None,
        "itr": None,
        "L": None,
        "ours": "",
        "baseline": "",
        "ours_s": None,
        "base_s": None,
        "ratio": None,
        "work": None,
        "base_work": None,
        "ours_mib": None,
        "base_mib": None,
        "note": "",
    }
    base.update(kw)
    print({k: v for k, v in base.items() if v not in (None, "")}, flush=True)
    return base


def _f(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Benchmark suite",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['threads']} torch threads), "
        f"torch {meta['torch']}"
        + (f", commit {meta['commit']}" if meta.get("commit") else "")
        + f". B=1, H={meta['H']}, D={meta['D']}; vs-SDPA rows at "
        f"L={meta['L']}, medians of {meta['reps']} interleaved repeats after one untimed "
        "warm-up call of each (SDPA, engine, pipeline); dense-leaf rows at "
        f"L={meta['L_dense']}. Regenerate: `{meta['command']}` ({meta['wall_s']:.0f} s).",
        "",
        "| section | dtype | causal | itr | L | ours s | baseline s | ours / baseline "
        "| work / L² (ours) | work / L² (baseline) | peak MiB (ours) | peak MiB (baseline) "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sect = r["section"] if r["device"] == "cpu" else f"{r['section']} ({r['device']})"
        lines.append(
            f"| {sect} | {r['dtype']} | {_f(r['causal'], '')} | {_f(r['itr'], '')} | "
            f"{_f(r['L'], '')} | {_f(r['ours_s'], '.3f')} | {_f(r['base_s'], '.3f')} | "
            f"**{_f(r['ratio'], '.3f')}** | {_f(r['work'], '.4f')} | "
            f"{_f(r['base_work'], '.3f')} | {_f(r['ours_mib'], '.0f')} | "
            f"{_f(r['base_mib'], '.0f')} | {r['note']} |"
        )
    lines += [
        "",
        "How to read it:",
        "",
        "- *engine / pipeline vs SDPA*: ours = `streamcqsa.attention` (in memory) or "
        "`pipeline.run` over an on-disk Zarr store (fp32 only; includes the input "
        "checksum check, reads, partial writes and out/lse writes), baseline = "
        "`F.scaled_dot_product_attention` on the same tensors. Work columns: score "
        "entries computed / L² (SDPA: L², or L(L+1)/2 causal). Peak MiB is RSS growth "
        "over the process's state before the call, sampled every 5 ms; the allocator "
        "reuses freed memory, so small figures mean 'no new memory', not 'no memory'.",
        "- *(busy neighbour)*: the same rows measured again while one other process "
        "(`python -c 'while True: pass'`) spins on a core; SDPA is measured under that "
        "same load in the same repeats, so the ratio says how much worse than SDPA the "
        "engine degrades when a core is shared. The note gives the cores the neighbour "
        "actually held (see docs/speed.md).",
        "- *kernel floor (one thread)*: `bench/floor.py`; ours = every kernel call of "
        "the plan, inputs cut before the clock starts, one after another; baseline = "
        "SDPA; both on one thread. No schedule of the plan's calls beats this ratio on "
        "any number of cores, so it is the floor under the engine's ratio at that itr; "
        "the note gives the engine on one thread, whose distance from the floor is "
        "the work around the calls (gathers, merges, folds).",
        "- *block-sparse vs dense leaves*: every leaf of the plan, run alone with the "
        "same CPU flash kernel: ours skips masked blocks; the paper's way runs the "
        "leaf's whole square with an explicit -inf mask, evaluating (k²/n)^itr of the "
        "L² pairs (more when causal, as the full squares ignore causality). Gathers and "
        "masks are built outside the timed region; no folds.",
        "- *I/O overlap*: `bench/overlap.py`; ratio = time with delayed reads and real "
        "compute over max(I/O-only time, compute-only time): 1.0 is perfect overlap, "
        "'both / sum' 1.0 is none.",
        "- *estimate model*: `streamcqsa.estimate.check_model`: kernel line from sample "
        "leaves, pipeline overhead fitted on smaller end-to-end runs, then the checked "
        "size measured end to end (forward + backward).",
        "",
        meta["gpu_note"],
        "",
    ]
    return "\n".join(lines)
