"""Scaled evaluation (the paper's §3.3): time real tasks small, extrapolate to the full plan.

A billion-token pass is far too long to run just to learn its cost, but its
plan is cheap to build (``divide`` is segment-level: its cost grows with the
node count, about n = k^2 - k + 1 times per level, not with L) and its leaf
tasks are all of one shape family. So, on this machine's device:

1. time a sample of real leaf tasks (``kernels.runner.forward/backward`` on
   random data) drawn from plans of the same depth, quorum, head group and
   dtype at reduced sequence lengths, and fit ``t = a + b * score entries``;
2. time the fold arithmetic per partial element and the store's read/write
   bandwidth in isolation;
3. run the real pipeline (``pipeline.run`` / ``run_backward``) end to end on a
   few small stores, time every leaf of those plans alone, and fit
   ``T = c0 + alpha * kernel_s + beta * (fold_s + io_s)`` per pass, so that
   whatever the pipeline does around the kernels (threads, checksums, how it
   groups tasks into units) is measured, not assumed;
4. sum the fitted models over the full plan.

The kernel model is linear, so the full plan's kernel time only needs the
number of leaves and their summed score entries: nothing per token.

Layout: ``model`` (shapes, fits, plan costs and plan choice: arithmetic only),
``timing`` (measuring tasks, folds, the store and small pipeline runs),
``calibrate`` (fitting those into a ``Calibration``), ``report`` (``estimate``
and ``check_model``), ``printing`` (their plain-text form). Everything is
re-exported here, so ``streamcqsa.estimate.X`` works as before the split.
"""

from streamcqsa.estimate.calibrate import CALIBRATION_POINTS, QUICK_POINTS, Calibration, calibrate
from streamcqsa.estimate.model import (
    PASSES,
    Line,
    PlanCost,
    Shape,
    choose_plan,
    compute_dtype,
    fit_line,
    fit_nonneg,
    plan_choice,
    plan_cost,
    task_bytes,
)
from streamcqsa.estimate.printing import format_check, format_report, human_bytes
from streamcqsa.estimate.report import check_model, estimate
from streamcqsa.estimate.timing import (
    default_device,
    pick_tasks,
    pipeline_run,
    reduced_plans,
    time_fold,
    time_store,
    time_tasks,
)

__all__ = [
    "CALIBRATION_POINTS",
    "PASSES",
    "QUICK_POINTS",
    "Calibration",
    "Line",
    "PlanCost",
    "Shape",
    "calibrate",
    "check_model",
    "choose_plan",
    "compute_dtype",
    "default_device",
    "estimate",
    "fit_line",
    "fit_nonneg",
    "format_check",
    "format_report",
    "human_bytes",
    "pick_tasks",
    "pipeline_run",
    "plan_choice",
    "plan_cost",
    "reduced_plans",
    "task_bytes",
    "time_fold",
    "time_store",
    "time_tasks",
]
