"""Planning stays bounded and exact: deep itr, both passes' memory, honest estimates.

``data/plan_digests.json`` holds digests of the plans an earlier ``divide`` made
over a grid of (L, quorum, causal, tile, itr): every plan it made must come
out the same, node for node, except where levels that split nothing are now
left out (then it is the stored plan of the depth kept, with the same work).
Regenerate only for an intended plan change: run this file as a script,
``python tests/cqs/test_planning_limits.py OUT.json``, against the version whose
plans are the reference.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import streamcqsa
from streamcqsa.cqs import check_coverage, divide
from streamcqsa.cqs.budget import Budget, choose, leaf_device_bytes
from streamcqsa.cqs.coverage import local_to_global
from streamcqsa.estimate import Calibration, Line, Shape, choose_plan, format_report
from streamcqsa.estimate import estimate as run_estimate

GiB = 2**30
DIGESTS = Path(__file__).parents[1] / "data" / "plan_digests.json"
LIVENESS_S = 300  # catches a hang only, even on a loaded machine


def plan_digest(p) -> str:
    h = hashlib.sha256()
    h.update(repr((p.seq_len, p.itr, p.quorums, p.interest_sets, p.is_causal, p.tile)).encode())
    for n in p.nodes:
        h.update(repr(n).encode())
    return h.hexdigest()[:20]


def work_digest(p) -> str:
    """Per leaf: its global tokens and the global (query, key) pairs it computes."""
    leaves = []
    for t in p.tasks:
        pos = local_to_global(t)
        pairs = []
        for b in t.blocks.blocks:
            for qi in range(b.q_start, b.q_stop):
                for ki in range(b.k_start, b.k_stop):
                    if b.causal and ki - b.k_start > qi - b.q_start:
                        continue
                    pairs.append((int(pos[qi]), int(pos[ki])))
        leaves.append(repr((tuple(int(x) for x in pos), tuple(sorted(pairs)))))
    return hashlib.sha256("\n".join(sorted(leaves)).encode()).hexdigest()[:20]


def _case(key: str):
    L, q, c, tile, itr = key.split(",")
    quorum = [int(x) for x in q.split("-")] if "-" in q else (int(q) if int(itr) else 3)
    return int(L), quorum, q, bool(int(c)), int(tile), int(itr)


def _check_against_digests(keys: list[str], stored: dict) -> None:
    for key in keys:
        L, quorum, q, causal, tile, itr = _case(key)
        p = divide(L, itr, quorum, is_causal=causal, tile=tile)
        assert getattr(p, "requested_itr", itr) == itr
        if p.itr == itr:
            assert plan_digest(p) == stored[key]["plan"], key
            continue
        # levels left out: exactly the stored plan of the depth kept, same work
        assert p.capped and p.itr < itr
        kept = f"{L},{q},{int(causal)},{tile},{p.itr}"
        assert plan_digest(p) == stored[kept]["plan"], key
        if "work" in stored[key]:
            assert work_digest(p) == stored[key]["work"], key


def test_plans_unchanged_small_grid() -> None:
    stored = json.loads(DIGESTS.read_text())
    keys = [k for k, v in stored.items() if v["nodes"] <= 150]
    assert len(keys) > 900
    _check_against_digests(keys, stored)


@pytest.mark.slow
def test_plans_unchanged_whole_grid() -> None:
    stored = json.loads(DIGESTS.read_text())
    _check_against_digests(sorted(stored), stored)


# --- 10: deep itr --------------------------------------------------------------------


def test_deep_itr_plans_return() -> None:
    """Planning any itr <= 64 ends: levels that split nothing are left out of large
    plans, and plans too large to build are refused at once. Run apart, so a hang
    fails the test instead of stalling the suite."""
    code = textwrap.dedent(
        """
        from streamcqsa.cqs import divide
        for L, itr, q, causal in [(64, 20, 3, False), (64, 64, 3, True), (200, 8, 3, False),
                                  (1, 64, 3, False), (2, 64, 2, True), (13, 64, 4, False)]:
            p = divide(L, itr, q, is_causal=causal)
            assert p.entries == p.useful_entries, (L, itr)
            assert p.requested_itr == itr and p.capped == (L >= 64), (L, itr)  # small: kept
        for L, itr in [(10**9, 64), (10**9, 9), (4096, 64), (10**6, 20)]:
            try:
                divide(L, itr)
            except ValueError as e:
                assert "nodes" in str(e) and "smaller itr" in str(e), e
            else:
                raise AssertionError(f"divide({L}, {itr}) should be refused")
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=LIVENESS_S
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


def test_capped_plan_is_the_effective_depth_plan() -> None:
    # a plan whose fifth level splits nothing and which is large: stops at 4
    p = divide(129, 5, 5)
    assert p.itr == 4
    assert (p.requested_itr, p.capped) == (5, True)
    assert p.quorums == (5,) * 4
    ref = divide(129, 4, 5)
    assert not ref.capped and ref.nodes == p.nodes
    check_coverage(p)  # every (query, key) pair exactly once


def test_capped_attention_is_exact(monkeypatch) -> None:
    """attention at a capped itr is the effective depth's, bit for bit, and exact
    (the limit is lowered so that a small problem is capped)."""
    monkeypatch.setattr(sys.modules["streamcqsa.cqs.divide"], "MAX_FULL_DEPTH_NODES", 0)
    L = 24
    plan = divide(L, 30, is_causal=True)
    assert plan.capped and plan.itr < 30
    check_coverage(plan)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    deep = streamcqsa.attention(q, k, v, itr=30, is_causal=True)
    eff = streamcqsa.attention(q, k, v, itr=plan.itr, is_causal=True)
    assert torch.equal(deep, eff)
    s = q @ k.transpose(-1, -2) / math.sqrt(16)
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(deep, torch.softmax(s, -1) @ v, rtol=1e-12, atol=1e-12)


# --- 11: one chooser, sized for both passes ------------------------------------------


def test_plan_fits_the_backward_too() -> None:
    """At L=1e9, H=8, D=64, 80 GiB the forward fits at itr 4 but the backward does
    not: the chooser must go deeper (as the estimate always did)."""
    from streamcqsa.estimate.model import task_bytes

    budget = Budget(80 * GiB, 64 * GiB)
    est = choose(seq_len=10**9, heads=8, kv_heads=8, head_dim=64, budget=budget)
    leaf = max(t.length for t in divide(10**9, est.itr).tasks)
    hg = est.head_group
    bwd = task_bytes(leaf, hg, hg, 64, 2, 2)["device"]["bwd"]
    assert bwd * est.n_cap <= budget.device_memory
    assert bwd == leaf_device_bytes(leaf, hg, hg, 64, 2, "bwd")
    assert est.bwd_device_bytes_per_task == bwd
    assert est.device_bytes_per_task == max(bwd, est.fwd_device_bytes_per_task)


@pytest.mark.parametrize(
    ("seq_len", "heads", "kv_heads", "dev_gib", "causal"),
    [(10**9, 8, 8, 80, False), (10**8, 16, 4, 24, True), (10**6, 8, 2, 1, False)],
)
def test_estimate_uses_the_same_chooser(seq_len, heads, kv_heads, dev_gib, causal) -> None:
    budget = Budget(dev_gib * GiB, 64 * GiB)
    est = choose(
        seq_len=seq_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=64,
        budget=budget,
        is_causal=causal,
        n_cap=1,
        chunk_tokens=65536,
        max_itr=7,
    )
    shape = Shape(seq_len, heads, kv_heads, 64, dtype="float16", is_causal=causal)
    plan, hg = choose_plan(
        shape, device_memory=budget.device_memory, host_memory=budget.host_memory, device="cuda"
    )
    assert (plan.itr, hg) == (est.itr, est.head_group)


# --- 12: the estimate's wall time, and how much to trust it --------------------------


def _calibration(samples: list[dict] | None = None) -> Calibration:
    return Calibration(
        device="cpu",
        kernel={"fwd": Line(1e-3, 2e-9), "bwd": Line(3e-3, 5e-9)},
        fold_s_per_elem={"fwd": 1e-10, "bwd": 1e-10},
        read_Bps=1e9,
        write_Bps=5e8,
        samples=samples or [],
    )


def test_pipeline_fit_never_below_kernel_time() -> None:
    """Runs whose measured wall is below their summed kernel time (kernels timed
    under load) must not fit a pipeline faster than its kernels."""
    cal = _calibration()
    runs = []
    for L, kern in ((1024, 2.0), (2048, 4.0), (4096, 9.0), (8192, 20.0)):
        comp = {p: {"kernel_s": kern, "fold_s": 0.1 * kern, "io_s": 0.05 * kern} for p in "fb"}
        comp = {"fwd": comp["f"], "bwd": comp["b"]}
        runs.append(
            {"seq_len": L, "itr": 1, "components": comp, "fwd_s": 0.4 * kern, "bwd_s": 0.45 * kern}
        )
    cal.fit_pipeline(runs)
    for p in ("fwd", "bwd"):
        f = cal.pipeline[p]  # type: ignore[index]
        assert f["alpha"] >= 1.0 and f["c0"] >= 0 and f["beta"] >= 0
    rep = run_estimate(
        Shape(10**6, 8, 8, 64),
        device_memory=80 * GiB,
        host_memory=64 * GiB,
        itr=3,
        device="cpu",
        calibration=cal,
    )
    for p in ("fwd", "bwd"):
        assert rep["passes"][p]["pipeline_hours"] >= rep["passes"][p]["kernel_device_hours"]


def test_calibration_spread_is_reported_and_warned() -> None:
    samples = [
        {"tokens": n, "entries": n * n, "fwd_s": 1e-3 * n, "fwd_s_max": 3e-3 * n,
         "bwd_s": 2e-3 * n, "bwd_s_max": 2.1e-3 * n}
        for n in (512, 1024, 2048)
    ]  # fmt: skip
    cal = _calibration(samples)
    spread = cal.spread()
    assert spread["fwd"]["median"] == pytest.approx(2.0)
    assert spread["bwd"]["max"] == pytest.approx(0.05)
    rep = run_estimate(
        Shape(10**6, 8, 8, 64),
        device_memory=80 * GiB,
        host_memory=64 * GiB,
        itr=3,
        device="cpu",
        calibration=cal,
    )
    assert rep["calibration"]["spread"] == spread
    assert len(rep["warnings"]) == 1 and "fwd timings" in rep["warnings"][0]
    text = format_report(rep)
    assert "WARNING: fwd timings of the same sample tasks varied by 200%" in text
    assert "fwd 200% median / 200% max" in text
    quiet = run_estimate(
        Shape(10**6, 8, 8, 64),
        device_memory=80 * GiB,
        host_memory=64 * GiB,
        itr=3,
        device="cpu",
        calibration=_calibration([{**s, "fwd_s_max": s["fwd_s"]} for s in samples]),
    )
    assert quiet["warnings"] == [] and "WARNING" not in format_report(quiet)


# --- 14: a quorum with no division ---------------------------------------------------


def test_quorum_is_checked_at_itr0() -> None:
    with pytest.raises(ValueError, match=r"quorum 7 .*nearest valid quorum sizes: 6 or 8"):
        divide(100, 0, 7)
    with pytest.raises(ValueError, match=r"quorum 7 .*nearest valid quorum sizes: 6 or 8"):
        choose(seq_len=1000, heads=8, kv_heads=8, head_dim=64, budget=Budget(GiB, GiB), quorum=7)
    from streamcqsa.cqs import check_quorum

    with pytest.raises(ValueError, match=r"quorum 5 has no effect with itr=0"):
        check_quorum(5, 0)
    check_quorum(3, 0)
    check_quorum([], 0)
    check_quorum(5, 1)
    assert divide(100, 0, 5).quorums == ()  # code choosing the depth may pass its quorum


if __name__ == "__main__":  # regenerate the digests (see the module notes)
    grid = []
    for L in (1, 2, 3, 5, 7, 8, 13, 21, 40, 64, 100, 129, 200, 257, 1000, 4096, 10**5, 10**9):
        for q in (2, 3, 4, 5):
            for c in (0, 1):
                for tile in (128, 4):
                    if tile == 4 and (L > 4096 or q == 5):
                        continue
                    for itr in range(12):
                        grid.append(f"{L},{q},{c},{tile},{itr}")
    for qs in ("3-2", "2-3-4", "2-2-2-2", "4-3"):
        for L in (13, 64, 200, 1000, 10**5):
            for c in (0, 1):
                grid.append(f"{L},{qs},{c},128,{qs.count('-') + 1}")
    out = {}
    for key in grid:
        L, quorum, _, causal, tile, itr = _case(key)
        try:
            p = divide(L, itr, quorum, is_causal=causal, tile=tile)
        except ValueError:  # too large to build
            continue
        if len(p.nodes) > 25_000:
            continue
        out[key] = {"nodes": len(p.nodes), "plan": plan_digest(p)}
        if L <= 300:
            out[key]["work"] = work_digest(p)
    lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(out.items())]
    Path(sys.argv[1]).write_text("{\n" + ",\n".join(lines) + "\n}\n")
