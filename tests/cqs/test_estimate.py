"""The scaled evaluation: its fits, its plan arithmetic at a billion tokens, and a
measured pipeline predicted from smaller runs (the report's arithmetic here; how
close the prediction comes is checked in the bench, where repeats tame a shared
machine's noise)."""

from __future__ import annotations

import json
import math

import pytest

from streamcqsa.cqs.divide import divide
from streamcqsa.estimate import (
    Calibration,
    Line,
    Shape,
    check_model,
    choose_plan,
    estimate,
    fit_line,
    fit_nonneg,
    pick_tasks,
    plan_cost,
    task_bytes,
)

GiB = 1 << 30


def test_fit_nonneg_recovers_a_line_and_never_goes_negative():
    xs = [1.0, 2.0, 4.0, 8.0, 16.0]
    (a, b), err = fit_nonneg([[1.0] * 5, xs], [0.5 + 2 * x for x in xs])
    assert a == pytest.approx(0.5) and b == pytest.approx(2.0) and err < 1e-9
    # data that a negative intercept would fit best: clamped at zero instead
    (a, b), _ = fit_nonneg([[1.0] * 5, xs], [2 * x - 1 for x in xs])
    assert a == 0.0 and b > 0


def test_fit_line_drops_points_that_load_slowed_down():
    xs = [float(x) for x in range(1, 13)]
    ys = [1.0 + 3.0 * x for x in xs]
    ys[3] *= 4  # two samples hit by a burst of load
    ys[8] *= 3
    line = fit_line(xs, ys, relative=True, drop_above=1.4)
    assert line.points == 10
    assert line.a == pytest.approx(1.0, rel=1e-6) and line.b == pytest.approx(3.0, rel=1e-6)


def test_plan_cost_by_hand_at_itr_0_and_1():
    s = Shape(7 * 256, 4, 2, 16, dtype="float32")
    c0 = plan_cost(divide(s.seq_len, 0), s, head_group=2, chunk_tokens=256)
    assert c0.tasks == 1 and c0.leaf_tokens == s.seq_len
    assert c0.entries == s.seq_len**2 * 4
    assert c0.read_bytes["fwd"] == s.seq_len * 16 * 4 * (4 + 2 * 2)
    assert c0.fold_elems == {"fwd": 0, "bwd": 0} and c0.disk["fwd_partials"] == 0
    # itr=1: 7 leaves of 3 chunks; the root folds each child's rows once
    c1 = plan_cost(divide(s.seq_len, 1), s, head_group=1, chunk_tokens=256)
    assert c1.tasks == 7 * 2 and c1.leaves == 7 and c1.leaf_tokens == 3 * 256
    assert c1.fold_elems["fwd"] == 7 * 3 * 256 * 2 * 17 * 2  # rows x hq x (D+1) x groups
    # the accumulator: each token row holds hq x (D+1) floats and a counter per group
    assert c1.disk["fwd_partials"] == 7 * 256 * 2 * (2 * 17 + 1) * 4
    # same work however the heads are grouped
    assert c1.entries == c0.entries


def test_billion_token_plan_fits_both_passes():
    s = Shape(10**9, 8, 8, 64, dtype="float16", is_causal=True)
    plan, hg = choose_plan(s, device_memory=80 * GiB, host_memory=64 * GiB, device="cpu")
    cost = plan_cost(plan, s, hg, 65536, "cpu")
    assert max(cost.device_bytes_per_task.values()) <= 80 * GiB
    assert cost.device_bytes_per_task["bwd"] > cost.device_bytes_per_task["fwd"]
    assert cost.entries == plan.entries * 8  # all heads, nothing lost or doubled
    assert plan.entries == plan.useful_entries
    assert cost.tasks == len(plan.tasks) * (8 // hg)
    # half the memory: fewer heads per task first, then (if needed) deeper
    tighter, hg2 = choose_plan(s, device_memory=40 * GiB, host_memory=64 * GiB, device="cpu")
    assert (tighter.itr, -hg2) > (plan.itr, -hg)


def test_given_itr_only_chooses_the_head_group():
    s = Shape(4096, 8, 4, 32, dtype="float32")
    plan, hg = choose_plan(s, device_memory=GiB, host_memory=GiB, itr=1)
    assert plan.itr == 1 and hg == 4
    dev = task_bytes(3 * 4096 // 7 + 128, 2, 1, 32, 4, 4)["device"]["bwd"]
    plan, hg = choose_plan(s, device_memory=2 * dev, host_memory=GiB, itr=1)
    assert hg in (1, 2)


def _fake_calibration() -> Calibration:
    return Calibration(
        device="cpu",
        kernel={"fwd": Line(1e-3, 2e-9), "bwd": Line(3e-3, 5e-9)},
        fold_s_per_elem={"fwd": 1e-10, "bwd": 1e-10},
        read_Bps=1e9,
        write_Bps=5e8,
        pipeline={
            "fwd": {"c0": 0.1, "alpha": 1.2, "beta": 0.5, "rel_rms": 0.0},
            "bwd": {"c0": 0.1, "alpha": 1.1, "beta": 0.5, "rel_rms": 0.0},
        },
    )


def test_estimate_extrapolates_the_fitted_models():
    cal = _fake_calibration()
    s = Shape(10**9, 8, 8, 64, dtype="float16", is_causal=True)
    rep = estimate(s, device_memory=80 * GiB, host_memory=64 * GiB, device="cpu", calibration=cal)
    fw = rep["passes"]["fwd"]
    entries = rep["plan"]["entries"]
    assert entries == pytest.approx(10**9 * (10**9 + 1) // 2 * 8)
    kernel_s = 1e-3 * fw["tasks"] + 2e-9 * entries
    assert fw["kernel_device_hours"] == pytest.approx(kernel_s / 3600)
    assert fw["pipeline_hours"] > 1.2 * fw["kernel_device_hours"]
    json.dumps(rep)  # JSON-able
    # twice the heads: twice the work, the same plan
    rep2 = estimate(
        Shape(10**9, 16, 16, 64, dtype="float16", is_causal=True),
        device_memory=80 * GiB,
        host_memory=64 * GiB,
        itr=rep["plan"]["itr"],
        device="cpu",
        calibration=cal,
    )
    ratio = (
        rep2["passes"]["bwd"]["kernel_device_hours"] / rep["passes"]["bwd"]["kernel_device_hours"]
    )
    assert ratio == pytest.approx(2.0, rel=1e-3)


def test_sampled_tasks_end_at_the_heaviest_leaf():
    plan = divide(20000, 2, 3, is_causal=True)
    picked = pick_tasks(plan, 3)
    heaviest = max(t.blocks.entries for t in plan.tasks)
    assert len(picked) == 3 and picked[-1].blocks.entries == heaviest


def test_check_model_reports_a_prediction_and_a_measurement(tmp_path):
    """Calibrated on L <= 1024, predicts L = 2048 and measures it. Only the
    report's arithmetic is checked: how close a prediction comes on a shared
    machine is the bench's question (bench/, with repeats), not a unit test's."""
    res = check_model(
        Shape(2048, 2, 2, 32, dtype="float32", is_causal=True),
        itr=1,
        calibration_points=((512, 1), (1024, 1), (1024, 2)),
        leaf_tokens=(128, 256, 512),
        directory=tmp_path,
    )
    cal = res["calibration"]
    rows = res["passes"]
    for p in ("fwd", "bwd"):
        assert cal["kernel"][p]["b"] > 0
        f = cal["pipeline"][p]
        assert min(f["c0"], f["alpha"], f["beta"]) >= 0
        row = rows[p]
        assert row["measured_s"] > 0 and math.isfinite(row["predicted_s"])
        assert row["predicted_s"] >= row["kernel_s"] > 0  # the pipeline adds to the kernel
        assert row["rel_error"] == pytest.approx(row["predicted_s"] / row["measured_s"] - 1)
    for key in ("predicted_s", "measured_s"):
        assert rows["total"][key] == pytest.approx(rows["fwd"][key] + rows["bwd"][key])
    assert res["measured_runs"][0]["seq_len"] == 2048
    assert not list(tmp_path.iterdir())  # stores are cleaned up
