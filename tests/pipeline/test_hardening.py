"""Hardening: corrupt chunks, disk full, concurrent runs, non-finite input,
read-only stores, and fuzzed input that is either exact or refused cleanly."""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore, WrapperStore

import streamcqsa
from streamcqsa.pipeline import repair, run, run_backward, verify
from streamcqsa.storage import StoreError, create, create_random
from streamcqsa.storage.integrity import CorruptChunkError
from streamcqsa.storage.lock import LOCK_NAME, StoreLock

OUTPUTS = ("out", "lse", "dq", "dk", "dv")


def _small(path, **kw):
    args = dict(
        seq_len=700,
        heads=4,
        kv_heads=2,
        head_dim=16,
        dtype="float32",
        chunk_tokens=64,
        is_causal=True,
    )
    args.update(kw)
    create_random(path, **args)


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _full_run(path):
    # every forward partial stored; backward units are depth-1 subtrees
    run(path, itr=2, progress=False, head_group=1, unit_depth=None)
    dout = np.random.default_rng(0).standard_normal((1, 4, 700, 16)).astype(np.float32)
    run_backward(path, dout, progress=False, unit_depth=1)


def test_flipped_byte_is_named_and_repaired(tmp_path):
    ref, bad = tmp_path / "ref", tmp_path / "bad"
    for p in (ref, bad):
        _small(p)
        _full_run(p)
    victims = [
        sorted(glob.glob(f"{bad}/partials/fwd/d2/out/c/*/*/*/*"))[0],
        f"{bad}/out/c/0/1/3/0",
        sorted(glob.glob(f"{bad}/partials/bwd/d1/dk/c/*/*/*/*"))[0],
    ]
    for f in victims:
        _flip(f)
    with pytest.raises(CorruptChunkError, match=r"array 'out' chunk \(0, 1, 3, 0\)"):
        verify(bad, rows=700)
    report = repair(bad)
    assert {name for name, _ in report["fwd"]} == {"out", "partials/fwd/d2/out"}
    assert {name for name, _ in report["bwd"]} == {"partials/bwd/d1/dk"}
    total = zarr.open_group(bad)["progress/fwd"].shape[0]
    assert 0 < report["fwd_units_reset"] < total / 2  # only the affected units
    s1 = run(bad, itr=2, progress=False, head_group=1, unit_depth=None)
    s2 = run_backward(bad, progress=False, unit_depth=1)
    assert s1["units_run"] == report["fwd_units_reset"]
    assert s2["units_run"] == report["bwd_units_reset"]
    gr, gb = zarr.open_group(ref, mode="r"), zarr.open_group(bad, mode="r")
    for name in OUTPUTS:
        assert np.array_equal(gr[name][:], gb[name][:]), name


def test_corrupt_input_chunk_is_reported(tmp_path):
    _small(tmp_path / "s")
    _flip(sorted(glob.glob(f"{tmp_path}/s/k/c/0/1/*/0"))[2])
    with pytest.raises(StoreError, match="input chunks are corrupt"):
        repair(tmp_path / "s")


class _DiskFull(WrapperStore):
    """Raises ENOSPC after ``limit`` chunk writes."""

    writes = 0
    limit = 10**9

    async def set(self, key, value):  # noqa: ANN001
        if "/c/" in key and not key.startswith("progress"):
            type(self).writes += 1
            if type(self).writes > type(self).limit:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await self._store.set(key, value)


@pytest.mark.parametrize("limit", [3, 40, 90])
def test_disk_full_stops_cleanly_and_resumes(tmp_path, limit):
    ref, path = tmp_path / "ref", tmp_path / "s"
    for p in (ref, path):
        _small(p, seq_len=900, heads=2, kv_heads=2)
    run(ref, itr=2, progress=False, unit_depth=None)
    _DiskFull.writes, _DiskFull.limit = 0, limit
    store = _DiskFull(LocalStore(path))
    with pytest.raises(StoreError, match="disk full.*run again to resume"):
        run(store, itr=2, progress=False, unit_depth=None)
    _DiskFull.limit = 10**9
    stats = run(store, itr=2, progress=False, unit_depth=None)
    assert stats["units_skipped"] > 0 or limit < 10
    for name in ("out", "lse"):
        assert np.array_equal(zarr.open_group(ref)[name][:], zarr.open_group(path)[name][:])


def test_second_run_is_refused_and_stale_lock_taken_over(tmp_path):
    path = tmp_path / "s"
    _small(path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "since": 0}
        (path / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(StoreError, match=rf"in use by pid {holder.pid} on host"):
            run(path, itr=1, progress=False)
        assert zarr.open_group(path).attrs["stream_cqsa"].get("fwd") is None
    finally:
        holder.kill()
        holder.wait()
    run(path, itr=1, progress=False)  # the owner is dead: the stale lock is taken over
    assert not (path / LOCK_NAME).exists()


def test_lock_is_exclusive_in_process(tmp_path):
    _small(tmp_path / "s")
    with StoreLock(tmp_path / "s"):
        with pytest.raises(StoreError, match="in use by pid"):
            with StoreLock(tmp_path / "s"):
                pass


def test_nonfinite_inputs(tmp_path):
    q = torch.randn(1, 2, 300, 16)
    q[0, 1, 120, 3] = float("nan")
    k = torch.randn(1, 2, 300, 16)
    k[0, 0, 7, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"q has NaN/Inf at 1 token\(s\) in positions \[120, 120\]"
    ):
        streamcqsa.attention(q, k, k)
    with pytest.raises(ValueError, match=r"k has NaN/Inf .* \[7, 7\]"):
        streamcqsa.attention(k.nan_to_num(), k, k.nan_to_num())
    out = streamcqsa.attention(q, k.nan_to_num(), k.nan_to_num(), allow_nonfinite=True, itr=2)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k.nan_to_num(), k.nan_to_num())
    assert torch.equal(out.isnan(), sd.isnan())
    with pytest.raises(ValueError, match=r"q has NaN/Inf .*\[120, 120\].*nothing was written"):
        create(tmp_path / "s", q.numpy(), k.nan_to_num().numpy(), k.nan_to_num().numpy())
    assert not (tmp_path / "s").exists()


def test_read_only_store_and_file_path(tmp_path):
    path = tmp_path / "s"
    _small(path)
    os.chmod(path, 0o555)
    try:
        with pytest.raises(StoreError, match="read-only"):
            run(path, itr=1, progress=False)
    finally:
        os.chmod(path, 0o755)
    assert not (path / "progress").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        run(tmp_path / "f", itr=1)
    with pytest.raises(StoreError, match="is a file"):
        create_random(tmp_path / "f", seq_len=8, heads=1, head_dim=4)


# --- fuzz: exact or a clean ValueError/TypeError ----------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]
TOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(0, 2),
    h=st.integers(0, 5),
    hk=st.integers(0, 5),
    lq=st.integers(0, 40),
    lk=st.integers(0, 40),
    d=st.integers(0, 24),
    dtype=st.sampled_from(DTYPES),
    itr=st.one_of(st.integers(-1, 3), st.just(1.5)),
    quorum=st.sampled_from([2, 3, 4, 7, [2, 3]]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_attention(b, h, hk, lq, lk, d, dtype, itr, quorum, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, lk, d, generator=g, dtype=torch.float64)
    qc, kc, vc = (x.to(dtype) for x in (q, k, v))
    try:
        out = streamcqsa.attention(qc, kc, vc, itr=itr, quorum=quorum, is_causal=causal)
    except (ValueError, TypeError) as e:
        assert str(e)  # a message naming the problem
        return
    ref = torch.nn.functional.scaled_dot_product_attention(
        qc.double(), kc.double(), vc.double(), is_causal=causal, enable_gqa=True
    )
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= TOL[dtype] and out.dtype == dtype and out.shape == q.shape


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    shape_q=st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 50), st.integers(0, 9)),
    hk=st.integers(0, 4),
    dlk=st.integers(-1, 1),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "int16", "float64"]),
    causal=st.sampled_from([True, False, 1]),
    chunk=st.sampled_from([None, 0, 16, 1000]),
)
def test_fuzz_store_creation(tmp_path_factory, shape_q, hk, dlk, dtype, causal, chunk):
    path = tmp_path_factory.mktemp("fuzz") / "s"
    b, h, n, d = shape_q
    rng = np.random.default_rng(0)
    np_dtype = "float32" if dtype == "bfloat16" else dtype
    q = rng.standard_normal(shape_q).astype(np_dtype)
    k = rng.standard_normal((b, hk, max(n + dlk, 0), d)).astype(np_dtype)
    if dtype == "bfloat16":
        q, k = torch.from_numpy(q).bfloat16(), torch.from_numpy(k).bfloat16()
    try:
        create(path, q, k, k, is_causal=causal, chunk_tokens=chunk)
    except (ValueError, TypeError) as e:
        assert str(e)
        assert not path.exists(), "a refused store must leave nothing behind"
        return
    run(path, itr=1, progress=False)
    assert verify(path, rows=8)["ok"]


def test_nonfinite_dout_is_refused(tmp_path):
    path = tmp_path / "s"
    _small(path, seq_len=300)
    run(path, itr=1, progress=False)
    dout = np.random.default_rng(0).standard_normal((1, 4, 300, 16)).astype(np.float32)
    dout[0, 2, 250, 1] = np.nan
    with pytest.raises(ValueError, match=r"dout has NaN/Inf .*\[250, 250\].*not stored"):
        run_backward(path, dout, progress=False)
    with pytest.raises(StoreError, match="no complete dout"):
        run_backward(path, progress=False)


def test_orphans_are_cleaned_outside_the_inputs(tmp_path):
    """A run removes killed writers' temp files wherever passes write, and
    does not walk the input arrays, which passes never write."""
    from streamcqsa.pipeline.run import clean_orphans

    path = tmp_path / "s"
    _small(path)
    run(path, itr=1, progress=False)
    planted = [path / "out" / "c" / "0" / "0" / "0" / "0.abc.partial", path / "stray.partial"]
    for f in planted:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"torn")
    inputs_junk = path / "q" / "c" / "0" / "0" / "0" / "0.abc.partial"
    inputs_junk.write_bytes(b"torn")
    assert clean_orphans(path) == 2
    assert not any(f.exists() for f in planted) and inputs_junk.exists()
