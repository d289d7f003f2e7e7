"""The kernel floor: a plan's kernel calls alone, against SDPA, on one thread.

The engine's time is its kernel calls plus everything around them (gathers,
merges inside a leaf, folds, the schedule). This section times the calls
alone: every leaf's calls (``runner.calls``) through the same backend, their
inputs gathered and cut before the clock starts, one after another on one
thread, against SDPA on one thread on the same inputs. No schedule of this
plan with this kernel can beat that ratio on any number of cores, since the
calls are the same work and SDPA splits its own evenly. So the ratio is the
floor under the engine's ratio; the note gives the engine run on one thread
too, whose distance from the floor is the work around the calls.

One thread on both sides keeps the comparison about the calls: at width 2
both would share the machine, and the schedule would enter the figure.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from table import row  # bench/ is not a package: suite.py puts it on the path

from streamcqsa import attention
from streamcqsa.cqs import divide
from streamcqsa.cqs.divide import Plan
from streamcqsa.kernels import runner, threads
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.tokens import gather_runs

SECTION = "kernel floor (one thread)"


def kernels_alone(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Seconds the plan's kernel calls take, each leaf's inputs cut ahead."""
    cpu = torch.device("cpu")
    be = get_backend("torch", cpu)
    dt = be.compute_dtype(q.dtype, cpu)
    scale = q.shape[-1] ** -0.5
    total = 0.0
    for leaf in plan.tasks:
        ql, kl, vl = (gather_runs(x, leaf.runs, dt).contiguous() for x in (q, k, v))
        every = slice(None)
        args = [  # as the runner cuts them: row views, keys joined only across ranges
            (
                ql[:, :, c.q_start : c.q_stop],
                runner._keys(kl, c.ranges, every, every),
                runner._keys(vl, c.ranges, every, every),
                c.causal,
            )
            for c in runner.calls(leaf.blocks)  # type: ignore[arg-type]
        ]
        t = time.perf_counter()
        for qc, kc, vc, causal in args:
            be.block_forward(qc, kc, vc, causal=causal, scale=scale)
        total += time.perf_counter() - t
    return total


def floor_rows(L: int, H: int, D: int, reps: int, itrs: list[int], dtypes: list) -> list[dict]:
    """Per dtype, causal and itr: the plan's kernel calls alone ÷ SDPA, both
    on one thread, interleaved per repeat with the engine on one thread."""
    rows = []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, L, D, generator=g).to(dtype) for _ in range(3))
        for causal in (False, True):
            plans = {itr: divide(L, itr, 3, is_causal=causal) for itr in itrs}
            times: dict[str, list[float]] = {}

            def add(key: str, seconds: float, times: dict[str, list[float]] = times) -> None:
                times.setdefault(key, []).append(seconds)

            with torch.no_grad(), threads.scope(1):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # warm up
                attention(q, k, v, itr=1, is_causal=causal)
                for _ in range(reps):
                    t = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    add("sdpa", time.perf_counter() - t)
                    for itr, plan in plans.items():
                        add(f"k{itr}", kernels_alone(plan, q, k, v))
                        t = time.perf_counter()
                        attention(q, k, v, itr=itr, is_causal=causal)
                        add(f"e{itr}", time.perf_counter() - t)
            base = statistics.median(times["sdpa"])
            for itr, plan in plans.items():
                kern = statistics.median(times[f"k{itr}"])
                eng = statistics.median(times[f"e{itr}"])
                rows.append(
                    row(
                        SECTION,
                        dtype=name,
                        causal=causal,
                        itr=itr,
                        L=L,
                        ours="kernel calls alone",
                        baseline="SDPA",
                        ours_s=kern,
                        base_s=base,
                        ratio=kern / base,
                        work=plan.entries / L**2,
                        base_work=plan.useful_entries / L**2,
                        note=(
                            f"{sum(len(runner.calls(t.blocks)) for t in plan.tasks)} calls; "  # type: ignore[arg-type]
                            f"engine on one thread {eng:.3f} s = {eng / base:.2f}× SDPA"
                        ),
                    )
                )
    return rows
