"""Overwriting a store: invalid input, a failure midway, or a run holding the
store's lock leave the old store, its finished forward included, as it was."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import zarr

from streamcqsa.errors import StoreBusyError, StoreError
from streamcqsa.pipeline import run
from streamcqsa.storage import create, create_random
from streamcqsa.storage import lock as lock_mod
from streamcqsa.storage import store as store_mod
from streamcqsa.storage.lock import LOCK_NAME, StoreLock

SMALL = dict(seq_len=256, heads=2, head_dim=8, dtype="float32", chunk_tokens=64)


def _snapshot(path) -> dict:
    """Every file of the store, byte for byte."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


@pytest.fixture
def finished(tmp_path):
    """A store with a finished forward, and its files."""
    path = tmp_path / "s"
    create_random(path, seed=1, **SMALL)
    run(path, itr=1, progress=False)
    g = zarr.open_group(path)
    assert g.attrs["stream_cqsa"].get("fwd")
    assert np.abs(g["out"][:]).max() > 0  # a real result, not the fill value
    return path, _snapshot(path)


def _inputs(n=256, seed=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, n, 8)).astype(np.float32) for _ in range(3)]


def test_overwrite_with_nan_keeps_the_old_store(finished):
    path, before = finished
    q, k, v = _inputs()
    q[0, 1, 200, 3] = np.nan
    with pytest.raises(ValueError, match=r"q has NaN/Inf .*\[200, 200\].*nothing was written"):
        create(path, q, k, v, overwrite=True, chunk_tokens=64)
    assert _snapshot(path) == before  # out, lse and the forward's record, bit for bit


@pytest.mark.parametrize("maker", ["create", "create_random"])
def test_overwrite_failing_midway_keeps_the_old_store(finished, monkeypatch, maker):
    path, before = finished
    real, calls = store_mod._stored_block, []

    def failing(block, dtype):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("injected failure while writing chunks")
        return real(block, dtype)

    monkeypatch.setattr(store_mod, "_stored_block", failing)
    with pytest.raises(OSError, match="injected"):
        if maker == "create":
            create(path, *_inputs(), overwrite=True, chunk_tokens=64)
        else:
            create_random(path, seed=3, overwrite=True, **SMALL)
    assert len(calls) == 6
    assert _snapshot(path) == before


def test_overwrite_failing_in_the_swap_puts_the_old_store_back(finished, monkeypatch):
    path, before = finished
    real = os.rename

    def rename(src, dst):
        if os.path.basename(src) == "v" and ".stream-cqsa-build" in str(src):
            raise OSError("injected failure while swapping")
        return real(src, dst)

    monkeypatch.setattr(lock_mod.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        create_random(path, seed=3, overwrite=True, **SMALL)
    assert _snapshot(path) == before


def test_overwrite_of_a_locked_store_is_refused(finished):
    path, before = finished
    with StoreLock(path):
        with pytest.raises(StoreBusyError, match=rf"in use by pid {os.getpid()} on host"):
            create_random(path, seed=3, overwrite=True, **SMALL)
        with pytest.raises(StoreBusyError, match="in use by pid"):
            create(path, *_inputs(), overwrite=True, chunk_tokens=64)
    assert _snapshot(path) == before


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        (dict(std=float("nan")), ValueError, "std must be finite and >= 0"),
        (dict(std=float("inf")), ValueError, "std must be finite and >= 0"),
        (dict(std=-1.0), ValueError, "std must be finite and >= 0"),
        (dict(std="1"), TypeError, "std must be a float"),
        (dict(std=True), TypeError, "std must be a float"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(std=1e6, dtype="float16"), ValueError, "too large for float16"),
    ],
)
def test_create_random_refuses_bad_arguments(tmp_path, finished, kw, err, match):
    new = tmp_path / "new"
    with pytest.raises(err, match=match):
        create_random(new, **{**SMALL, **kw})
    assert not new.exists()
    path, before = finished
    with pytest.raises(err, match=match):
        create_random(path, overwrite=True, **{**SMALL, **kw})
    assert _snapshot(path) == before


def test_overwrite_replaces_and_leaves_nothing_behind(finished):
    """A successful overwrite is the new store alone: no forward, no lock,
    no build or swap directories (also a dead create's are cleared)."""
    path, before = finished
    (path / ".stream-cqsa-build-1-dead").mkdir()
    (path / ".stream-cqsa-build-1-dead" / "junk").write_bytes(b"x")
    create_random(path, seed=3, overwrite=True, **SMALL)
    assert sorted(p.name for p in path.iterdir()) == ["k", "q", "v", "zarr.json"]
    g = zarr.open_group(path)
    assert "fwd" not in g.attrs["stream_cqsa"]
    fresh = path.parent / "fresh"
    create_random(fresh, seed=3, **SMALL)
    for name in ("q", "k", "v"):
        assert np.array_equal(g[name][:], zarr.open_group(fresh)[name][:])
    run(path, itr=1, progress=False)


def test_stale_lock_of_a_dead_run_does_not_block_overwrite(finished):
    path, _ = finished
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    owner = {"pid": gone.pid, "host": socket.gethostname(), "since": 0}
    (path / LOCK_NAME).write_text(json.dumps(owner))
    create_random(path, seed=3, overwrite=True, **SMALL)
    assert not (path / LOCK_NAME).exists()


def test_refusals_before_touching_anything(tmp_path, finished):
    path, before = finished
    with pytest.raises(StoreError, match="pass overwrite=True"):
        create_random(path, seed=3, **SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a run store; refusing"):
        create_random(other, overwrite=True, **SMALL)
    assert [p.name for p in other.iterdir()] == ["data.txt"]
    assert _snapshot(path) == before
