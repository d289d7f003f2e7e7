"""The planner: budgets respected, predictions move the right way."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcqsa import Budget, plan
from streamcqsa.cqs.budget import estimate
from streamcqsa.cqs.divide import divide

MIB = 2**20


@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(1, 200_000),
    kv=st.sampled_from([1, 2, 4]),
    r=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([32, 64, 128]),
    dev=st.integers(1, 4096),
    host=st.integers(256, 8192),
    causal=st.booleans(),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
)
def test_budgets_are_respected(seq_len, kv, r, d, dev, host, causal, dtype):
    budget = Budget(dev * MIB, host * MIB)
    try:
        est = plan(
            seq_len=seq_len,
            heads=kv * r,
            kv_heads=kv,
            head_dim=d,
            budget=budget,
            dtype=dtype,
            is_causal=causal,
            max_itr=4,
        )
    except ValueError as e:
        assert "fits" in str(e)
        return
    assert est.device_bytes <= budget.device_memory
    assert est.host_bytes <= budget.host_memory
    assert kv % est.head_group == 0 and est.n_cap >= 1
    useful = seq_len * (seq_len + 1) // 2 if causal else seq_len**2
    assert est.entries == useful * kv * r


def _est(**kw):
    args = dict(
        seq_len=1 << 16,
        heads=8,
        kv_heads=8,
        head_dim=64,
        budget=Budget(256 * MIB, 4096 * MIB),
        is_causal=True,
    )
    args.update(kw)
    return plan(**args)


def test_predictions_move_the_right_way():
    small, big = _est(seq_len=1 << 15), _est(seq_len=1 << 16)
    assert big.seconds > small.seconds and big.disk_bytes > small.disk_bytes
    assert big.read_bytes > small.read_bytes
    # less device memory: never shallower, never more resident bytes
    prev = None
    for mib in (1024, 256, 64, 16):
        e = _est(budget=Budget(mib * MIB, 4096 * MIB))
        if prev is not None:
            assert e.itr >= prev.itr and e.device_bytes <= prev.device_bytes
        prev = e
    # heads are split before the sequence: a generous budget keeps every head in one task
    assert _est(budget=Budget(64 << 30, 64 << 30)).head_group == 8
    # twice the heads, twice the work
    assert _est(heads=16, kv_heads=16).entries == 2 * _est().entries


def test_estimate_matches_the_plan():
    p = divide(5000, 2, 3, is_causal=False)
    e = estimate(
        p,
        batch=1,
        heads=4,
        kv_heads=2,
        head_dim=32,
        dtype="float32",
        head_group=1,
        n_cap=2,
        throughput=1e9,
        chunk_tokens=128,
    )
    assert e.entries == 4 * 5000 * 5000 and e.leaf_tokens == max(t.length for t in p.tasks)
    assert e.tasks == 2 * len(p.tasks)


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="no plan up to itr=2 fits"):
        plan(
            seq_len=1 << 20, heads=8, kv_heads=8, head_dim=64, budget=Budget(1000, 1000), max_itr=2
        )


def test_run_itr_auto_fits_the_budget_without_oom(tmp_path):
    from streamcqsa.pipeline import run, verify
    from streamcqsa.storage import create_random

    path = tmp_path / "s"
    create_random(path, seq_len=4096, heads=4, head_dim=32, dtype="float16", is_causal=True)
    stats = run(path, itr="auto", device_memory=2 << 20, progress=False)
    assert stats["plan"]["itr"] >= 1  # the whole problem does not fit 2 MiB
    assert stats["guardrail"]["events"] == []  # the planned tasks never hit the budget
    assert verify(path, rows=16)["ok"]


@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(1, 20_000),
    itr=st.integers(0, 3),
    kv=st.sampled_from([1, 2, 4, 6]),
    r=st.sampled_from([1, 2]),
    budget=st.integers(10_000, 400 * MIB),
    kind=st.sampled_from(["fwd", "bwd"]),
    width=st.sampled_from([1, 2, 8]),
)
def test_unit_choice_fits_the_host_budget(seq_len, itr, kv, r, budget, kind, width):
    """choose_units takes the shallowest stored level that fits, with units
    running their leaves ``width`` at a time; a tighter budget or a wider
    slot never makes units shallower, and the leaves are the floor."""
    from streamcqsa.cqs.budget import unit_host_bytes
    from streamcqsa.pipeline.choose import choose_units

    problem = _problem(seq_len, kv, r, "float32", causal=False)
    p = divide(seq_len, itr, 3)
    depth, hg = choose_units(p, problem, None, budget, kind, width=width)
    assert 0 <= depth <= itr and kv % hg == 0
    units = [n for n in p.nodes if n.depth == depth or (n.is_leaf and n.depth < depth)]
    need = max(
        unit_host_bytes(p, n, group_ratio=r, head_group=hg, head_dim=32, kind=kind, width=width)
        for n in units
    )
    if depth < itr:
        assert need <= budget
    tighter, _ = choose_units(p, problem, None, budget // 3, kind, width=width)
    assert tighter >= depth
    wider, _ = choose_units(p, problem, hg, budget, kind, width=2 * width)
    assert wider >= depth


@settings(max_examples=40, deadline=None)
@given(
    seq_len=st.integers(1, 20_000),
    itr=st.integers(0, 3),
    kv=st.sampled_from([1, 2, 4]),
    r=st.sampled_from([1, 2]),
    budget=st.integers(10_000, 400 * MIB),
    itemsize=st.sampled_from([2, 4]),
)
def test_gpu_unit_choice_fits_the_device_budget(seq_len, itr, kv, r, budget, itemsize):
    """Forward units on a GPU are sized by their device bytes (inputs in the
    compute dtype): every non-leaf unit chosen fits, a tighter budget never
    makes units shallower, and device bytes grow with L and with heads."""
    from streamcqsa.cqs.budget import unit_device_bytes
    from streamcqsa.pipeline.choose import choose_units

    problem = _problem(seq_len, kv, r, "float16" if itemsize == 2 else "float32", causal=True)
    p = divide(seq_len, itr, 3, is_causal=True)
    depth, hg = choose_units(p, problem, None, budget, "fwd", itemsize)
    units = [n for n in p.nodes if n.depth == depth and not n.is_leaf]
    kw = dict(group_ratio=r, head_dim=32, itemsize=itemsize)
    if depth < itr:
        assert all(unit_device_bytes(p, n, head_group=hg, **kw) <= budget for n in units)
    tighter, _ = choose_units(p, problem, None, budget // 3, "fwd", itemsize)
    assert tighter >= depth
    root = p.root
    one = unit_device_bytes(p, root, head_group=1, **kw)
    assert unit_device_bytes(p, root, head_group=kv, **kw) >= one
    longer = divide(seq_len * 2, itr, 3, is_causal=True)
    assert unit_device_bytes(longer, longer.root, head_group=1, **kw) > one


def _problem(seq_len: int, kv: int, r: int, dtype: str, *, causal: bool):  # noqa: ANN202
    """A one-batch store problem with head_dim 32 for the unit-choice tests."""
    from streamcqsa.storage.layout import Problem

    return Problem(
        batch=1,
        heads=kv * r,
        kv_heads=kv,
        seq_len=seq_len,
        head_dim=32,
        dtype=dtype,
        is_causal=causal,
        scale=32**-0.5,
        chunk_tokens=512,
    )
