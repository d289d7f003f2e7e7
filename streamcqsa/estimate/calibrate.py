"""Fitting the measurements into this machine's cost models (``Calibration``).

``calibrate`` runs the timings of ``timing`` in rounds and fits the kernel
line and the end-to-end pipeline overhead that ``report`` extrapolates.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from streamcqsa.cqs.divide import Node, divide
from streamcqsa.estimate.model import (
    PASSES,
    Line,
    PlanCost,
    Shape,
    fit_line,
    fit_nonneg,
    plan_cost,
)
from streamcqsa.estimate.timing import (
    default_device,
    pick_tasks,
    pipeline_run,
    reduced_plans,
    time_fold,
    time_store,
    time_tasks,
)

# (seq_len, itr) of the small end-to-end pipeline runs the overhead is fitted on:
# both depths, and sizes where the kernels are a good share of the time, so
# that the kernel coefficient is pinned down
CALIBRATION_POINTS = ((2048, 1), (4096, 1), (4096, 2), (8192, 1), (8192, 2))
QUICK_POINTS = ((1024, 1), (1024, 2), (2048, 1), (2048, 2))


@dataclass
class Calibration:
    """This machine's fitted cost models for one task shape (hq, hk, D, dtype)."""

    device: str
    kernel: dict[str, Line]  # seconds vs score entries x query heads, per task
    fold_s_per_elem: dict[str, float]
    read_Bps: float
    write_Bps: float
    memory: dict[str, Line] | None = None  # CUDA: peak bytes vs task tokens, per pass
    pipeline: dict[str, dict[str, float]] | None = None  # c0, alpha, beta per pass
    samples: list[dict] = field(default_factory=list)
    pipeline_runs: list[dict] = field(default_factory=list)

    def spread(self) -> dict[str, dict[str, float]]:
        """How far repeated timings of one sample task landed apart, per pass:
        the median and largest (slowest / fastest - 1) over the samples, and
        how many samples were timed more than once. Load on a shared machine
        shows up here, and the fits inherit it."""
        out = {}
        for p in PASSES:
            rel = sorted(
                s[f"{p}_s_max"] / s[f"{p}_s"] - 1.0
                for s in self.samples
                if s.get(f"{p}_s_max") is not None and s[f"{p}_s"] > 0
            )
            out[p] = {
                "median": rel[len(rel) // 2] if rel else 0.0,
                "max": rel[-1] if rel else 0.0,
                "samples": len(rel),
            }
        return out

    def components(
        self, cost: PlanCost, kernel_s: dict[str, float] | None = None
    ) -> dict[str, dict[str, float]]:
        """Isolated seconds per pass: kernels (from the fitted line unless measured
        sums are given), folds, store I/O."""
        out = {}
        for p in PASSES:
            k = self.kernel[p]
            out[p] = {
                "kernel_s": kernel_s[p] if kernel_s else k.a * cost.tasks + k.b * cost.entries,
                "fold_s": self.fold_s_per_elem[p] * cost.fold_elems[p],
                "io_s": cost.read_bytes[p] / self.read_Bps + cost.write_bytes[p] / self.write_Bps,
            }
        return out

    def predict(self, cost: PlanCost) -> dict[str, dict[str, float]]:
        """Per pass: the isolated components and the pipeline's wall seconds."""
        comp = self.components(cost)
        for p, c in comp.items():
            if self.pipeline is None:
                c["pipeline_s"] = c["kernel_s"] + c["fold_s"] + c["io_s"]
            else:
                f = self.pipeline[p]
                c["pipeline_s"] = (
                    f["c0"] + f["alpha"] * c["kernel_s"] + f["beta"] * (c["fold_s"] + c["io_s"])
                )
        return comp

    def fit_pipeline(self, runs: Sequence[dict]) -> None:
        """Fit ``T = c0 + alpha * kernel_s [+ beta * (fold_s + io_s)]`` per pass over
        measured runs (each with ``components``); repeats of one (L, itr) enter as
        their best time (load on a shared machine only ever adds time).

        ``alpha >= 1`` and ``c0, beta >= 0``: a pass runs its kernels on one
        device, so its wall time is never below its kernel time, and a fit
        that says otherwise (noise, or kernel timings taken under load) would
        extrapolate to a wall time below the kernel hours it reports.

        With or without the beta term is chosen by how well each, fitted on the
        smaller points, predicts the largest ones: the model is for
        extrapolating, and a term that only soaks up noise at small sizes
        extrapolates badly. The chosen form is then refitted on all points.
        """
        by_point: dict[tuple[int, int], list[dict]] = {}
        for r in runs:
            by_point.setdefault((r["seq_len"], r["itr"]), []).append(r)
        pts = sorted(by_point.items())
        top = max(L for (L, _), _ in pts)
        self.pipeline = {}
        for p in PASSES:
            comp = [rs[0]["components"][p] for _, rs in pts]
            cols = [
                [1.0] * len(pts),
                [c["kernel_s"] for c in comp],
                [c["fold_s"] + c["io_s"] for c in comp],
            ]
            y = [min(r[f"{p}_s"] for r in rs) for _, rs in pts]
            train = [i for i, ((L, _), _) in enumerate(pts) if L < top]
            test = [i for i in range(len(pts)) if i not in train]
            best: tuple[float, int] = (math.inf, 3)
            kern = cols[1]  # alpha = 1 + the fitted extra: wall >= kernel
            for ncols in (2, 3):
                if len(train) < ncols:
                    continue
                coef, _ = fit_nonneg(
                    [[c[i] for i in train] for c in cols[:ncols]],
                    [y[i] for i in train],
                    offset=[kern[i] for i in train],
                )
                err = max(
                    abs((kern[i] + sum(coef[j] * cols[j][i] for j in range(ncols))) / y[i] - 1)
                    for i in test
                )
                if err < best[0]:
                    best = (err, ncols)
            ncols = best[1]
            coef, err = fit_nonneg(cols[:ncols], y, offset=kern)
            coef += [0.0] * (3 - ncols)
            self.pipeline[p] = {
                "c0": coef[0],
                "alpha": 1.0 + coef[1],
                "beta": coef[2],
                "rel_rms": err,
                "holdout_error": best[0],
                "terms": ncols,
            }
        self.pipeline_runs = list(runs)

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread()}


def _best(old: list[dict] | None, new: list[dict]) -> list[dict]:
    """Per task, the best time of every round so far (and the worst, as ``*_max``)."""
    if old is None:
        return new
    for o, n in zip(old, new, strict=True):
        for key in ("fwd_s", "bwd_s"):
            o[key] = min(o[key], n[key])
            o[f"{key}_max"] = max(o.get(f"{key}_max", o[key]), n.get(f"{key}_max", n[key]))
    return old


def _with_components(
    run: dict, cal: Calibration, shape: Shape, quorum: int, kernel: dict[str, float] | None
) -> dict:
    plan = divide(run["seq_len"], run["itr"], quorum, is_causal=shape.is_causal)
    s = replace(shape, seq_len=run["seq_len"])
    cost = plan_cost(plan, s, run["head_group"], run["chunk_tokens"], cal.device)
    run["components"] = cal.components(cost, kernel)
    return run


def calibrate(
    shape: Shape,
    *,
    itr: int,
    quorum: int = 3,
    head_group: int | None = None,
    leaf_tokens: Sequence[int] = (512, 1024, 2048, 4096),
    per_size: int = 3,
    pipeline_points: Sequence[tuple[int, int]] = CALIBRATION_POINTS,
    repeats: int = 1,
    device: str | None = None,
    backend: str = "auto",
    workers: int = 2,
    directory: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    each_round: Callable[[], None] | None = None,
) -> Calibration:
    """Measure this machine for tasks shaped like one (batch, head group) of ``shape``.

    The kernel line is fitted on sample leaves of reduced plans of depth
    ``itr`` (the target's family). ``pipeline_points`` are (seq_len, itr) of
    small end-to-end runs over one head group; their overhead is fitted
    against the measured kernel time of *all* their leaves, so the fit does
    not inherit the line's error. Pass ``()`` to skip them (the prediction is
    then the plain sum of the components).

    Everything is measured in ``repeats`` rounds (samples, calibration
    leaves, pipeline runs, then ``each_round``), keeping each item's best: on
    a shared machine load only ever adds time, and rounds spread over time
    let every item catch a quiet moment and keep the items comparable.
    """
    device = device or default_device()
    say = log or (lambda s: None)
    hk = head_group or shape.kv_heads
    small = replace(shape, heads=hk * shape.ratio, kv_heads=hk, batch=1)
    root = Path(directory) if directory else Path(tempfile.gettempdir())
    kw: dict[str, Any] = dict(
        hq=small.heads,
        hk=hk,
        head_dim=shape.head_dim,
        dtype=shape.dtype,
        device=device,
        backend=backend,
    )
    sample_tasks: list[Node] = []
    for p in reduced_plans(itr, quorum, shape.is_causal, leaf_tokens):
        sample_tasks += pick_tasks(p, per_size)
    plans = {pt: divide(pt[0], pt[1], quorum, is_causal=shape.is_causal) for pt in pipeline_points}
    leaf_tasks = [t for p in plans.values() for t in p.tasks]
    samples: list[dict] | None = None
    leaves: list[dict] | None = None
    runs: list[dict] = []
    rounds = max(1, repeats)
    for r in range(rounds):
        say(
            f"round {r + 1}/{rounds}: {len(sample_tasks)} sample tasks ({small.heads} q heads, "
            f"{hk} kv heads) on {device}"
            + (f", {len(leaf_tasks)} calibration leaves" if leaf_tasks else "")
        )
        # alone (no pipeline rounds to interleave with): several rounds at once
        # (two at least when alone, so that the spread of repeats is measured)
        n = 5 if not pipeline_points and rounds == 1 else 2 if rounds == 1 else 1
        samples = _best(samples, time_tasks(sample_tasks, repeats=n, warmup=r == 0, **kw))
        if leaf_tasks:
            leaves = _best(leaves, time_tasks(leaf_tasks, repeats=1, warmup=r == 0, **kw))
        for L, i in pipeline_points:
            say(f"round {r + 1}/{rounds}: pipeline run L={L} itr={i}")
            runs.append(
                pipeline_run(
                    root,
                    replace(small, seq_len=L),
                    i,
                    head_group=hk,
                    quorum=quorum,
                    workers=workers,
                )
            )
        if each_round is not None:
            each_round()
    assert samples is not None
    xs = [s["entries"] for s in samples]
    kernel = {
        p: fit_line(xs, [s[f"{p}_s"] for s in samples], relative=True, drop_above=1.4)
        for p in PASSES
    }
    memory = None
    if samples and "fwd_peak_bytes" in samples[0]:
        toks = [s["tokens"] for s in samples]
        memory = {p: fit_line(toks, [s[f"{p}_peak_bytes"] for s in samples]) for p in PASSES}
    from streamcqsa.storage.layout import default_chunk_tokens

    bw = time_store(root, small.heads, shape.head_dim, default_chunk_tokens(8192))
    cal = Calibration(
        device=device,
        kernel=kernel,
        fold_s_per_elem=time_fold(small.heads, hk, shape.head_dim, device),
        read_Bps=bw["read_Bps"],
        write_Bps=bw["write_Bps"],
        memory=memory,
        samples=samples,
    )
    if runs:
        sums, i = {}, 0
        for pt, p in plans.items():
            m = len(p.tasks)
            sums[pt] = {q: sum(x[f"{q}_s"] for x in leaves[i : i + m]) for q in PASSES}  # type: ignore[index]
            i += m
        for run in runs:
            _with_components(run, cal, small, quorum, sums[(run["seq_len"], run["itr"])])
        cal.fit_pipeline(runs)
    return cal
