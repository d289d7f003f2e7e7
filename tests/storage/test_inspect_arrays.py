"""``storage.open``'s Run: ``run.out``, ``run["out"]`` ... are lazy dask arrays in
their logical dtype (bf16 decoded from its stored uint16 bits to float32); an
array not stored yet is an AttributeError (``hasattr`` is False) or a KeyError
naming what the store has; the HTML view shows each pass's progress."""

from __future__ import annotations

import shutil

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from streamcqsa.pipeline import run, run_backward
from streamcqsa.storage import create_random
from streamcqsa.storage import open as open_run

SHAPE = dict(seq_len=300, heads=2, kv_heads=1, head_dim=16, chunk_tokens=64, is_causal=True)
NAMES = ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def store(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("arrays") / "s.zarr"
    create_random(path, dtype=request.param, **SHAPE)
    run(path, itr=1, progress=False)
    return path


def _logical(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The stored numpy array as values (bf16: uint16 bit patterns to float32)."""
    if dtype == "bfloat16":
        return torch.from_numpy(raw).view(torch.bfloat16).float().numpy()
    return raw


def test_arrays_as_attributes_and_items(store):
    r = open_run(store)
    g = zarr.open_group(store, mode="r")
    want_dtype = np.float32 if r.problem.dtype in ("float32", "bfloat16") else np.float16
    B, H, Hkv, L, D = 1, SHAPE["heads"], SHAPE["kv_heads"], SHAPE["seq_len"], SHAPE["head_dim"]
    shapes = {"q": (B, H, L, D), "k": (B, Hkv, L, D), "v": (B, Hkv, L, D), "out": (B, H, L, D)}
    for name, shape in shapes.items():
        a, b = getattr(r, name), r[name]
        assert isinstance(a, da.Array) and isinstance(b, da.Array)
        assert a.shape == shape and a.dtype == want_dtype, name
        got = a.compute()
        assert np.array_equal(got, _logical(g[name][:], r.problem.dtype)), name
        assert np.array_equal(got, b.compute()), name
    assert r.lse.shape == (B, H, L) and r.lse.dtype == np.float32
    assert np.array_equal(r.lse.compute(), g["lse"][:])
    assert set(r.arrays) == {"q", "k", "v", "out", "lse"}


def test_absent_arrays_are_named(store):
    r = open_run(store)
    for name in ("dout", "dq", "dk", "dv"):
        assert not hasattr(r, name)
        with pytest.raises(AttributeError, match=rf"no array '{name}' in this store yet"):
            getattr(r, name)
        with pytest.raises(KeyError, match=r"it has: q, k, v, out, lse"):
            r[name]


def test_gradients_after_backward(store, tmp_path):
    path = tmp_path / "b.zarr"
    shutil.copytree(store, path)
    r = open_run(path)
    dout = np.random.default_rng(0).standard_normal(r.q.shape).astype(np.float32)
    if r.problem.dtype == "bfloat16":
        dout = torch.from_numpy(dout).to(torch.bfloat16)
    run_backward(path, dout, progress=False)
    r.refresh()
    assert set(r.arrays) == set(NAMES)
    for name in ("dout", "dq", "dk", "dv"):
        like = r.q if name in ("dout", "dq") else r.k
        assert r[name].shape == like.shape and r[name].dtype == like.dtype, name
        assert np.isfinite(getattr(r, name).compute()).all(), name


def test_html_view_shows_progress(store):
    r = open_run(store)
    view = r._repr_html_()
    units = r.status()["fwd"]["units"]
    assert "<progress" in view and "fwd: " in view and f"{units}/{units}" in view
    assert "bwd" in view and "not started" in view
