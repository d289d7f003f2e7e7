"""A pass's compute dtype: decided once, recorded, kept by a resumed pass.

A CPU's rule depends on the CPU (bf16 as stored with AMX, else fp32), so a
pass resumed elsewhere must not mix roundings: it keeps the dtype its
finished units used. A store whose inputs may hold NaN/Inf computes in fp32
on a CPU, as the in-memory engine does with ``allow_nonfinite``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from streamcqsa.kernels import device as device_mod
from streamcqsa.pipeline import guardrail, run
from streamcqsa.storage import create, create_random
from streamcqsa.storage.store import ATTR

NATIVE, NONE = frozenset({"bfloat16"}), frozenset()


def _meta(path) -> dict:  # noqa: ANN001
    return dict(zarr.open_group(path, mode="r").attrs[ATTR])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dtype") / "s"
    create_random(
        path, seq_len=900, heads=2, kv_heads=1, head_dim=16, dtype="bfloat16",
        chunk_tokens=128, is_causal=True, seed=1,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("rule", [NATIVE, NONE])
def test_a_resumed_pass_keeps_its_compute_dtype(store, tmp_path, monkeypatch, rule):
    want = "bfloat16" if rule else "float32"
    ref, path = tmp_path / "ref", tmp_path / "s"
    shutil.copytree(store, ref)
    shutil.copytree(store, path)
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: rule)
    run(ref, itr=2, progress=False, unit_depth=None)
    assert _meta(ref)["fwd"]["compute_dtype"] == want
    calls = [0]

    def interrupt(task: str, n_cap: int) -> bool:
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(guardrail, "INJECT_OOM", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(path, itr=2, progress=False, unit_depth=None)
    monkeypatch.setattr(guardrail, "INJECT_OOM", None)
    # resumed where the CPU's rule is the other one
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: NONE if rule else NATIVE)
    stats = run(path, itr=2, progress=False, unit_depth=None)
    assert stats["units_skipped"] > 0
    assert _meta(path)["fwd"]["compute_dtype"] == want
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(path, mode="r")
    for name in ("out", "lse"):
        assert np.array_equal(a[name][:], b[name][:]), name


def test_a_store_that_allows_nonfinite_computes_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: NATIVE)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g).bfloat16() for _ in range(3))
    v[0, 1, 40, 3] = float("nan")
    create(tmp_path / "s", q, k, v, is_causal=True, allow_nonfinite=True)
    run(tmp_path / "s", itr=2, progress=False)
    assert _meta(tmp_path / "s")["fwd"]["compute_dtype"] == "float32"
    create(tmp_path / "t", q, k, v.nan_to_num(), is_causal=True)
    run(tmp_path / "t", itr=2, progress=False)
    assert _meta(tmp_path / "t")["fwd"]["compute_dtype"] == "bfloat16"
