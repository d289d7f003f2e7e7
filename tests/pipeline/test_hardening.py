"""Hardening: corrupt chunks, disk full, concurrent runs, non-finite input,
read-only stores, orphaned temp files.

Fuzzed input lives in tests/api/test_fuzz_attention.py (the in-memory API),
tests/storage/test_create_fuzz.py (store creation) and
tests/pipeline/test_fuzz_store_run.py (passes over fuzzed stores)."""

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
from zarr.storage import LocalStore, WrapperStore

import streamcqsa
from streamcqsa.errors import DiskFullError
from streamcqsa.pipeline import repair, run, run_backward, verify
from streamcqsa.storage import StoreError, create, create_random
from streamcqsa.storage.integrity import CorruptChunkError
from streamcqsa.storage.lock import LOCK_NAME, StoreLock

OUTPUTS = ("out", "lse", "dq", "dk", "dv")


def _flip(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _full_run(path):
    # every forward leaf's partial kept; backward units are depth-1 subtrees, kept
    run(path, itr=2, progress=False, head_group=1, unit_depth=None, keep_partials=True)
    dout = np.random.default_rng(0).standard_normal((1, 4, 700, 16)).astype(np.float32)
    run_backward(path, dout, progress=False, unit_depth=1, keep_partials=True)


def test_flipped_byte_is_named_and_repaired(make_store):
    ref, bad = make_store("ref"), make_store("bad")
    for p in (ref, bad):
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
    assert 0 < report["fwd_units_reset"] <= total / 2  # only the affected (b, g)
    s1 = run(bad, itr=2, progress=False, head_group=1, unit_depth=None, keep_partials=True)
    s2 = run_backward(bad, progress=False, unit_depth=1, keep_partials=True)
    assert s1["units_run"] == report["fwd_units_reset"]
    assert s2["units_run"] == report["bwd_units_reset"]
    gr, gb = zarr.open_group(ref, mode="r"), zarr.open_group(bad, mode="r")
    for name in OUTPUTS:
        assert np.array_equal(gr[name][:], gb[name][:]), name


def test_corrupt_input_chunk_is_reported(make_store):
    path = make_store()
    _flip(sorted(glob.glob(f"{path}/k/c/0/1/*/0"))[2])
    with pytest.raises(StoreError, match="input chunks are corrupt"):
        repair(path)


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


@pytest.mark.parametrize("limit", [3, pytest.param(40, marks=pytest.mark.slow), 90])
def test_disk_full_stops_cleanly_and_resumes(make_store, limit):
    ref, path = (make_store(name, seq_len=900, heads=2, kv_heads=2) for name in ("ref", "s"))
    run(ref, itr=2, progress=False, unit_depth=None)
    _DiskFull.writes, _DiskFull.limit = 0, limit
    store = _DiskFull(LocalStore(path))
    with pytest.raises(DiskFullError, match="disk full.*run again to resume"):
        run(store, itr=2, progress=False, unit_depth=None)
    _DiskFull.limit = 10**9
    stats = run(store, itr=2, progress=False, unit_depth=None)
    assert stats["units_skipped"] > 0 or limit < 10
    for name in ("out", "lse"):
        assert np.array_equal(zarr.open_group(ref)[name][:], zarr.open_group(path)[name][:])


def test_second_run_is_refused_and_stale_lock_taken_over(make_store):
    path = make_store()
    holder = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
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


def test_lock_is_exclusive_in_process(make_store):
    path = make_store()
    with StoreLock(path):
        with pytest.raises(StoreError, match="in use by pid"):
            with StoreLock(path):
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


def test_read_only_store_and_file_path(tmp_path, make_store):
    path = make_store()
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


def test_nonfinite_dout_is_refused(make_store):
    path = make_store(seq_len=300)
    run(path, itr=1, progress=False)
    dout = np.random.default_rng(0).standard_normal((1, 4, 300, 16)).astype(np.float32)
    dout[0, 2, 250, 1] = np.nan
    with pytest.raises(ValueError, match=r"dout has NaN/Inf .*\[250, 250\].*not stored"):
        run_backward(path, dout, progress=False)
    with pytest.raises(StoreError, match="no complete dout"):
        run_backward(path, progress=False)


def test_orphans_are_cleaned_outside_the_inputs(make_store):
    """A run removes killed writers' temp files wherever passes write, and
    does not walk the input arrays, which passes never write."""
    from streamcqsa.pipeline.passes import clean_orphans

    path = make_store()
    run(path, itr=1, progress=False)
    planted = [path / "out" / "c" / "0" / "0" / "0" / "0.abc.partial", path / "stray.partial"]
    for f in planted:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"torn")
    inputs_junk = path / "q" / "c" / "0" / "0" / "0" / "0.abc.partial"
    inputs_junk.write_bytes(b"torn")
    assert clean_orphans(path) == 2
    assert not any(f.exists() for f in planted) and inputs_junk.exists()
