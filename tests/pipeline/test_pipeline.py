"""The store pipeline: bit-identical to the in-memory engine, exact, inspectable,
and strict about bad input (with nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import streamcqsa
from streamcqsa.attention import Engine, cached_plan
from streamcqsa.errors import PlanMismatchError
from streamcqsa.kernels.backend import get_backend
from streamcqsa.pipeline import guardrail, run, run_backward, verify
from streamcqsa.storage import StoreError, create, create_random
from streamcqsa.storage import open as open_run
from streamcqsa.storage.layout import to_torch


def _load(path: Path, name: str, dtype: str) -> torch.Tensor:
    data = np.asarray(zarr.open_group(path, mode="r")[name][:])
    return data if name == "lse" else to_torch(data, dtype)


def _inputs(dtype: torch.dtype, b=2, h=2, hk=1, n=501, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, hh, n, d, generator=g).to(dtype) for hh in (h, hk, hk)]


CASES = [
    (torch.float32, False, 1),
    (torch.float32, True, 2),
    (torch.bfloat16, True, 1),
    (torch.bfloat16, False, 3),
    (torch.float16, True, 3),
]


# (dtype, causal, itr, unit_depth) of the fast suite: every unit depth once at
# itr=2, one deep (itr=3) bf16 plan, and each dtype; the other combinations of
# CASES and unit depths are marked slow.
FAST = {
    (torch.float32, True, 2, None),
    (torch.float32, True, 2, 1),
    (torch.float32, True, 2, 0),
    (torch.float32, False, 1, 1),
    (torch.bfloat16, True, 1, 0),
    (torch.bfloat16, False, 3, 1),
}


def _bit_cases() -> list:
    cases = []
    for dtype, causal, itr in CASES:
        for depth in (None, 1, 0):
            name = f"{str(dtype).removeprefix('torch.')}-{'causal' if causal else 'full'}"
            fast = (dtype, causal, itr, depth) in FAST
            cases.append(
                pytest.param(dtype, causal, itr, depth, id=f"{name}-itr{itr}-u{depth}",
                             marks=() if fast else pytest.mark.slow)
            )  # fmt: skip
    return cases


def _engine(q, k, v, dout, causal, itr, quorums, fold_depth):
    """The in-memory engine's out, lse and grads with a pass's fold depth
    (0: the whole tree folded in memory; u: units at depth u folded flat)."""
    plan = cached_plan(q.shape[2], itr, tuple(quorums), causal)
    eng = Engine(plan, get_backend("auto", q.device), q.shape[-1] ** -0.5, 1, None, fold_depth)
    out, lse = eng.forward(q, k, v)
    grads = eng.backward(q, k, v, dout, out.to(q.dtype), lse)
    return out.to(q.dtype), lse, [g.to(q.dtype) for g in grads]


@pytest.mark.usefixtures("default_threads")  # the engine's bits are compared with a pass's
@pytest.mark.parametrize(("dtype", "causal", "itr", "unit_depth"), _bit_cases())
def test_store_equals_engine_bit_for_bit(tmp_path, dtype, causal, itr, unit_depth):
    """Every leaf a unit (None), units at depth 1, or the whole tree per
    (batch, head group): the same bits as the engine folding at that depth,
    and at depth 0 the same bits as ``streamcqsa.attention`` itself."""
    q, k, v = _inputs(dtype)
    name = str(dtype).removeprefix("torch.")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)

    path = tmp_path / "s"
    create(path, q, k, v, is_causal=causal, chunk_tokens=64)
    stats = run(path, itr=itr, progress=False, head_group=1, unit_depth=unit_depth)
    depth = stats["plan"]["unit_depth"]
    assert stats["units_run"] > 0
    assert depth == (itr if unit_depth is None else min(unit_depth, itr))
    out, lse, grads = _engine(q, k, v, dout, causal, itr, stats["plan"]["quorums"], depth)
    if depth == 0:
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o2, l2 = streamcqsa.attention(
            qq, kk, vv, itr=itr, is_causal=causal, return_lse=True, head_group=1
        )
        assert torch.equal(o2, out) and torch.equal(l2, lse)
        g2 = torch.autograd.grad(o2, (qq, kk, vv), dout)
        assert all(torch.equal(a, b) for a, b in zip(g2, grads, strict=True))
    assert torch.equal(_load(path, "out", name), out)
    assert np.array_equal(_load(path, "lse", name), lse.numpy())
    run_backward(path, dout, progress=False, unit_depth=unit_depth)
    for gname, g in zip(("dq", "dk", "dv"), grads, strict=True):
        assert torch.equal(_load(path, gname, name), g), gname

    # against float64: the same bound the engine meets
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True
    )
    err = ((out.double() - ref).norm() / ref.norm()).item()
    err_sdpa = ((sdpa.double() - ref).norm() / ref.norm()).item()
    assert err <= 1.5 * err_sdpa + 1e-7


def test_rerun_is_a_no_op_and_resumes(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=700, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    first = run(path, itr=2, progress=False, unit_depth=1)
    before = _load(path, "out", "float32").clone()
    again = run(path, itr=2, progress=False, unit_depth=1)
    assert again["units_run"] == 0 and again["units_skipped"] == first["units_run"]
    stages = first["stages"]
    assert {"read", "compute", "fold", "write", "accumulate"} <= set(stages)
    assert 0 < stages["device_busy_fraction"] <= 1
    assert torch.equal(_load(path, "out", "float32"), before)


def test_keep_partials_false_deletes_partials(tmp_path):
    kept, dropped = tmp_path / "a", tmp_path / "b"
    for p in (kept, dropped):
        create_random(p, seq_len=900, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    s1 = run(kept, itr=2, progress=False, unit_depth=None, keep_partials=True)
    s2 = run(dropped, itr=2, progress=False, unit_depth=None)  # the default drops them
    assert s1["disk"]["kept_bytes"] > 0 == s2["disk"]["kept_bytes"]
    assert s1["partial_disk_bytes"] > s2["partial_disk_bytes"] > 0  # kept + accumulator

    def chunks(p):
        return [f for f in (p / "partials").rglob("*") if f.is_file() and "/c/" in f.as_posix()]

    assert len(chunks(kept)) > 0
    assert chunks(dropped) == []
    assert torch.equal(_load(kept, "out", "float32"), _load(dropped, "out", "float32"))


def test_run_object_for_notebooks(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=600, heads=2, head_dim=16, dtype="bfloat16", chunk_tokens=64)
    r = open_run(path)
    assert r.status()["fwd"] == "not started"
    run(path, itr=2, progress=False, unit_depth=None, keep_partials=True)  # every leaf's
    r = open_run(path)
    tasks = r.tasks()
    assert tasks and all(t.done for t in tasks)
    leaf = next(t for t in tasks if t.kind == "unit")
    part = r.partial(leaf)
    assert part.out.shape == (2, leaf.tokens, 16) and part.positions.shape == (leaf.tokens,)
    assert np.all(np.diff(part.positions) > 0) and np.isfinite(part.lse).all()
    assert r.arrays["q"].dtype == np.float32  # bf16 decoded on the fly
    assert "progress" in r._repr_html_()
    root = r.partial(tasks[-1])
    np.testing.assert_array_equal(root.lse, np.asarray(zarr.open_group(path)["lse"][0]))


def test_auto_units_store_less_and_say_where_partials_are(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=600, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    stats = run(path, itr=2, progress=False)  # small problem: one unit per (b, g)
    assert stats["plan"]["unit_depth"] == 0 and stats["partial_disk_bytes"] == 0
    assert "accumulate" not in stats["stages"]  # one unit per (b, g) writes the outputs
    r = open_run(path)
    kinds = {t.kind for t in r.tasks()}
    assert kinds == {"unit", "in-unit"} and all(t.done for t in r.tasks())
    inner = next(t for t in r.tasks() if t.kind == "in-unit")
    with pytest.raises(ValueError, match="keep_partials=True"):
        r.partial(inner)
    # a tight host budget pushes units deeper, never past the leaves
    tight = tmp_path / "t"
    create_random(tight, seq_len=600, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    s2 = run(tight, itr=2, progress=False, task_bytes=60_000)
    assert s2["plan"]["unit_depth"] >= 1 and s2["plan"]["head_group"] == 1
    # another fold order: the same result to rounding (its bits: the bit-for-bit test)
    torch.testing.assert_close(_load(tight, "out", "float32"), _load(path, "out", "float32"))


@pytest.mark.slow
def test_verify_65536_tokens(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=65536, heads=1, head_dim=16, dtype="float32", is_causal=True)
    run(path, itr=2, progress=False)
    res = verify(path, rows=16)
    assert res["ok"], res
    assert res["max_rel_error"] <= 1e-5


def test_verify_catches_a_wrong_output(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=300, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    run(path, itr=1, progress=False)
    g = zarr.open_group(path)
    g["out"][0, 1, 5, 3] = g["out"][0, 1, 5, 3] + 0.5
    res = verify(path, rows=300)
    assert not res["ok"]


# --- bad input: a clear error, nothing written -----------------------------------


def _tree(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


def test_missing_path_and_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        run(tmp_path / "nope", itr=1)
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a run store"):
        run(tmp_path / "plain", itr=1)
    zarr.open_group(tmp_path / "other", mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="not a stream-cqsa run store"):
        run(tmp_path / "other", itr=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        run(tmp_path / "file", itr=1)


def test_wrong_format_version(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=64, heads=1, head_dim=8, dtype="float32")
    g = zarr.open_group(path)
    meta = dict(g.attrs["stream_cqsa"])
    meta["format_version"] = 99
    g.attrs["stream_cqsa"] = meta
    before = _tree(path)
    with pytest.raises(StoreError, match="format version 99"):
        run(path, itr=1)
    assert _tree(path) == before


def test_rerun_with_other_plan_refused_unless_restart(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=500, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    run(path, itr=2, progress=False)
    with pytest.raises(StoreError, match="restart=True"):
        run(path, itr=1, progress=False)
    with pytest.raises(StoreError, match="restart=True"):
        run(path, itr=2, quorum=2, progress=False)
    stats = run(path, itr=1, progress=False, restart=True)
    assert stats["units_skipped"] == 0


def test_backward_needs_forward_and_dout(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=200, heads=2, head_dim=16, dtype="float32")
    with pytest.raises(StoreError, match="finished forward"):
        run_backward(path, np.zeros((1, 2, 200, 16), np.float32))
    run(path, itr=1, progress=False)
    with pytest.raises(StoreError, match="no complete dout"):
        run_backward(path)
    with pytest.raises(ValueError, match="shape"):
        run_backward(path, np.zeros((1, 2, 199, 16), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        run_backward(path, np.zeros((1, 2, 200, 16), np.float16))


def test_changed_inputs_are_caught(tmp_path):
    path = tmp_path / "s"
    create_random(path, seq_len=200, heads=2, head_dim=16, dtype="float32")
    g = zarr.open_group(path)
    g["k"][0, 0, 3, 3] = 7.0
    with pytest.raises(StoreError, match="inputs changed"):
        run(path, itr=1, progress=False)
    create_random(path, seq_len=200, heads=2, head_dim=16, dtype="float32", overwrite=True)
    run(path, itr=1, progress=False)
    zarr.open_group(path)["v"][0, 1, 5, 0] = 3.0
    with pytest.raises(StoreError, match="since the forward"):
        run_backward(path, np.ones((1, 2, 200, 16), np.float32), progress=False)


def test_local_fingerprint_equals_the_zarr_one(tmp_path):
    """The direct-file fingerprint must hash exactly what zarr's store API
    sees, or every store created before it would read as changed."""
    from streamcqsa.storage.store import fingerprint

    path = tmp_path / "s"
    create_random(path, seq_len=3000, heads=2, head_dim=16, dtype="bfloat16", chunk_tokens=512)
    run(path, itr=1, progress=False)
    g = zarr.open_group(path)
    assert fingerprint(g) == fingerprint(g, local=False)
    (path / "k" / "c" / "0" / "0" / "1" / "0.partial").write_bytes(b"junk")  # an orphan
    assert fingerprint(g) == fingerprint(g, local=False)
    g["k"][0, 0, 700, 3] = 7.0
    assert fingerprint(g) == fingerprint(g, local=False)


def test_create_refuses_bad_input_and_writes_nothing(tmp_path):
    path = tmp_path / "s"
    q = np.random.default_rng(0).standard_normal((1, 4, 64, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="multiple"):
        create(path, q, q[:, :3], q[:, :3])
    with pytest.raises(TypeError, match="dtypes differ"):
        create(path, q, q.astype(np.float16), q)
    with pytest.raises(ValueError, match="Lq must equal Lk"):
        create(path, q, q[:, :, :60], q[:, :, :60])
    with pytest.raises(TypeError, match="unsupported dtype"):
        create(path, q.astype(np.int32), q.astype(np.int32), q.astype(np.int32))
    assert not path.exists()
    create(path, q, q, q)
    with pytest.raises(StoreError, match="overwrite=True"):
        create(path, q, q, q)


def test_memory_store_and_dask_input():
    import dask.array as da

    q = da.random.default_rng(0).standard_normal((1, 2, 300, 16), chunks=(1, 1, 100, 16))
    q = q.astype(np.float32)
    store = zarr.storage.MemoryStore()
    create(store, q, q, q, is_causal=True)
    run(store, itr=2, progress=False)
    qt = torch.from_numpy(q.compute())
    expect = streamcqsa.attention(qt, qt, qt, itr=2, is_causal=True)
    got = torch.from_numpy(np.asarray(zarr.open_group(store, mode="r")["out"][:]))
    assert torch.equal(got, expect)
    assert verify(store, rows=20)["ok"]


def test_ctrl_c_stops_the_pass_and_a_rerun_resumes(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the compute (which runs on the calling thread)
    stops the pass at once; queued units give up; the rerun resumes."""
    ref, path = tmp_path / "ref", tmp_path / "s"
    for p in (ref, path):
        create_random(p, seq_len=700, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    run(ref, itr=2, progress=False, unit_depth=None)
    calls = 0

    def interrupt(task, n_cap):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(guardrail, "INJECT_OOM", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(path, itr=2, progress=False, unit_depth=None)
    status = open_run(path).status()["fwd"]
    assert 0 < status["units_done"] < status["units"]
    stats = run(path, itr=2, progress=False, unit_depth=None)
    assert stats["units_skipped"] > 0
    assert torch.equal(_load(path, "out", "float32"), _load(ref, "out", "float32"))


def test_rerun_keeps_the_units_it_started_with(tmp_path):
    """'auto' units are chosen once per pass: a rerun under another budget
    resumes instead of refusing; a store of an older layout is refused."""
    from streamcqsa.storage.store import open_group, update_meta

    path = tmp_path / "s"
    create_random(path, seq_len=600, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    first = run(path, itr=2, progress=False, task_bytes=60_000)
    assert first["plan"]["unit_depth"] >= 1
    again = run(path, itr=2, progress=False)  # the default budget would pick depth 0
    assert again["units_run"] == 0 and again["plan"] == first["plan"]
    older = tmp_path / "older"
    create_random(older, seq_len=600, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    run(older, itr=2, progress=False, unit_depth=None)
    group, _, meta = open_group(older)
    old = dict(meta["fwd"])
    old["plan"] = {k: v for k, v in old["plan"].items() if k not in ("unit_depth", "fold")}
    update_meta(group, fwd=old)  # a store of an older layout: refused, never misread
    with pytest.raises(PlanMismatchError, match="restart=True"):
        run(older, itr=2, progress=False)


@pytest.mark.parametrize("unit_depth", ["auto", 1])
def test_progress_counts_every_leaf_and_merge(tmp_path, capsys, unit_depth):
    """A unit may run a whole subtree: the bar still moves leaf by leaf."""
    from streamcqsa.cqs import divide

    path = tmp_path / "s"
    create_random(path, seq_len=700, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    stats = run(path, itr=2, progress=True, unit_depth=unit_depth, head_group=1)
    plan = divide(700, 2, 3)
    leaves = len(plan.tasks) * 2  # two head groups
    merges = stats["units_run"] - (2 if unit_depth == "auto" else 2 * len(plan.root.children))
    total = leaves + merges
    err = capsys.readouterr().err
    assert f"{total}/{total}" in err, err[-300:]
