"""The two reports: ``estimate`` (a full plan extrapolated from calibration) and
``check_model`` (a measured pipeline run compared with its prediction).

Both return JSON-able dicts; ``printing`` turns them into text.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streamcqsa.cqs.divide import divide, quorum_for
from streamcqsa.cqs.footprint import peak_disk
from streamcqsa.estimate.calibrate import (
    CALIBRATION_POINTS,
    QUICK_POINTS,
    Calibration,
    _with_components,
    calibrate,
)
from streamcqsa.estimate.model import PASSES, Shape, plan_choice, plan_cost
from streamcqsa.estimate.timing import default_device, pipeline_run
from streamcqsa.kernels.device import default_n_cap

# Repeats of one sample task further apart than this (median over the
# samples) mean the machine was busy while calibrating: the fitted times,
# and so the hours, can be off by as much; the report says so.
SPREAD_WARNING = 0.25


def estimate(
    shape: Shape,
    *,
    device_memory: int,
    host_memory: int,
    itr: int | str = "auto",
    quorum: int = 3,
    device: str | None = None,
    quick: bool = False,
    pipeline: bool = True,
    calibration: Calibration | None = None,
    directory: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan ``shape`` under the budgets, calibrate this machine, extrapolate both passes.

    Returns a JSON-able report: the plan, per pass the task count, kernel
    device-hours, modelled pipeline hours, memory per task, I/O, and disk.
    ``calibration`` skips the measuring (tests, or reuse across shapes).
    """
    from streamcqsa.storage.layout import default_chunk_tokens

    device = device or default_device()
    n_cap = default_n_cap(device.split(":")[0])  # the pipeline's default
    chunk = default_chunk_tokens(shape.seq_len)
    t0 = time.perf_counter()
    plan, hg, n_cap = plan_choice(
        shape,
        device_memory=device_memory,
        host_memory=host_memory,
        itr=itr,
        quorum=quorum,
        n_cap=n_cap,
        chunk_tokens=chunk,
        device=device,
    )
    t_plan = time.perf_counter() - t0
    cost = plan_cost(plan, shape, hg, chunk, device)
    if calibration is None:
        if not pipeline:
            points: tuple[tuple[int, int], ...] = ()
        elif quick:
            points = QUICK_POINTS
        else:
            points = CALIBRATION_POINTS
        calibration = calibrate(
            shape,
            itr=plan.itr,
            quorum=quorum_for(plan.itr, quorum),
            head_group=hg,
            # leaves as large as is cheap: small leaves run small blocks, whose
            # per-entry cost is higher than the huge blocks of the full plan
            leaf_tokens=(512, 1024, 2048) if quick else (2048, 4096, 8192, 16384),
            per_size=2,
            pipeline_points=points,
            repeats=1 if quick or not points else 2,
            device=device,
            directory=directory,
            log=log,
        )
    pred = calibration.predict(cost)
    passes = {}
    for p in PASSES:
        c = pred[p]
        passes[p] = {
            "tasks": cost.tasks,
            "kernel_device_hours": c["kernel_s"] / 3600,
            "pipeline_hours": c["pipeline_s"] / 3600,
            "fold_hours": c["fold_s"] / 3600,
            "io_hours": c["io_s"] / 3600,
            "device_bytes_per_task": cost.device_bytes_per_task[p],
            "host_bytes_per_task": cost.host_bytes_per_task[p],
            "read_bytes": cost.read_bytes[p],
            "write_bytes": cost.write_bytes[p],
            "partial_disk_bytes": cost.disk[f"{p}_partials"],
            "output_disk_bytes": cost.disk[f"{p}_outputs"],
        }
        if calibration.memory is not None:  # CUDA: the fitted measured peak
            passes[p]["measured_fit_device_bytes_per_task"] = calibration.memory[p](
                cost.leaf_tokens
            )
    return {
        "shape": asdict(shape),
        "device": device,
        "budget": {"device_memory": device_memory, "host_memory": host_memory, "n_cap": n_cap},
        "warnings": warnings(calibration),
        "plan": {
            "itr": plan.itr,
            "requested_itr": plan.requested_itr,
            "quorum": quorum,
            "head_group": hg,
            "leaves_per_group": cost.leaves,
            "leaf_tokens": cost.leaf_tokens,
            "chunk_tokens": chunk,
            "entries": cost.entries,
            "work_over_useful": plan.entries / plan.useful_entries,
            "dense_over_useful": plan.dense_entries / plan.useful_entries,
            "plan_seconds": t_plan,
            "fits": max(cost.device_bytes_per_task.values()) * n_cap <= device_memory
            and max(cost.host_bytes_per_task.values()) * n_cap <= host_memory,
        },
        "disk": {**cost.disk, "total": _peak_disk(cost.disk)},
        "passes": passes,
        "calibration": calibration.to_dict(),
    }


def warnings(cal: Calibration) -> list[str]:
    """What a reader of the estimate must know about how it was measured."""
    out = []
    for p, sp in cal.spread().items():
        if sp["samples"] and sp["median"] > SPREAD_WARNING:
            out.append(
                f"{p} timings of the same sample tasks varied by {sp['median']:.0%} "
                f"(median; up to {sp['max']:.0%}): this machine was busy while calibrating, "
                "so the hours may be off by as much; rerun on a quiet machine"
            )
    return out


def check_model(
    shape: Shape | None = None,
    *,
    itr: int = 2,
    quorum: int = 3,
    calibration_points: Sequence[tuple[int, int]] = CALIBRATION_POINTS,
    leaf_tokens: Sequence[int] = (512, 1024, 2048, 4096),
    repeats: int = 1,
    device: str | None = None,
    workers: int = 2,
    directory: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict a full pipeline run (forward and backward) from smaller
    calibration runs, then run it and compare.

    The model never sees the checked size: its kernel time comes from the
    line fitted on sample leaves, and the pipeline fit uses
    ``calibration_points`` only, so the relative error measures an
    extrapolation, as at a billion tokens. The checked run is measured once
    per calibration round and its best compared, like every other item.
    """
    shape = shape or Shape(16384, 4, 4, 64, dtype="float32", is_causal=True)
    device = device or default_device()
    if not calibration_points or any(L >= shape.seq_len for L, _ in calibration_points):
        raise ValueError("calibration points must be given and smaller than the checked size")
    root = Path(directory) if directory else Path(tempfile.gettempdir())
    hg = shape.kv_heads
    measured: list[dict] = []

    def checked_run() -> None:
        if log:
            log(f"measured run: L={shape.seq_len} itr={itr}")
        measured.append(
            pipeline_run(root, shape, itr, head_group=hg, quorum=quorum, workers=workers)
        )

    cal = calibrate(
        shape,
        itr=itr,
        quorum=quorum,
        head_group=hg,
        leaf_tokens=leaf_tokens,
        pipeline_points=calibration_points,
        repeats=repeats,
        device=device,
        workers=workers,
        directory=directory,
        log=log,
        each_round=checked_run,
    )
    for m in measured:
        _with_components(m, cal, shape, quorum, None)
    pred = cal.predict(
        plan_cost(
            divide(shape.seq_len, itr, quorum_for(itr, quorum), is_causal=shape.is_causal),
            shape,
            hg,
            measured[0]["chunk_tokens"],
            device,
        )
    )
    rows: dict[str, dict[str, float]] = {}
    for p in PASSES:
        meas = min(m[f"{p}_s"] for m in measured)
        rows[p] = {
            "predicted_s": pred[p]["pipeline_s"],
            "measured_s": meas,
            "rel_error": pred[p]["pipeline_s"] / meas - 1.0,
            "kernel_s": pred[p]["kernel_s"],
        }
    tp = sum(r["predicted_s"] for r in rows.values())
    tm = sum(r["measured_s"] for r in rows.values())
    rows["total"] = {"predicted_s": tp, "measured_s": tm, "rel_error": tp / tm - 1.0}
    return {
        "shape": asdict(shape),
        "itr": itr,
        "device": device,
        "repeats": repeats,
        "calibration_points": [list(x) for x in calibration_points],
        "passes": rows,
        "rel_error": rows["total"]["rel_error"],
        "measured_runs": measured,
        "calibration": cal.to_dict(),
    }


def _peak_disk(disk: dict) -> int:
    """Inputs, the forward's outputs, then the backward's peak (each pass's
    peak is ``cqs.footprint.peak_disk``; a pass drops its accumulator)."""
    fwd = peak_disk(disk["fwd_outputs"], disk["fwd_partials"])
    bwd = disk["fwd_outputs"] + peak_disk(disk["bwd_outputs"], disk["bwd_partials"])
    return disk["inputs"] + max(fwd, bwd)
