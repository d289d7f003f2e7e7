"""Correctness on CUDA (marker ``gpu``; skipped without a GPU).

Run by bench/gpu_check.sh on a lent GPU machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

import streamcqsa
from streamcqsa.pipeline import guardrail, run, run_backward
from streamcqsa.storage import create

pytestmark = pytest.mark.gpu
F64 = torch.float64


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def _check_against_sdpa(q, k, v, dtype, causal: bool, itr: int, g) -> None:  # noqa: ANN001
    """Ours on CUDA in ``dtype`` against float64 SDPA, forward and backward:
    within 1.5x of CUDA SDPA's own error in the same dtype."""
    qc, kc, vc = (x.to("cuda", dtype).requires_grad_() for x in (q, k, v))
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (qc, kc, vc))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(q64, k64, v64, is_causal=causal, enable_gqa=True)
    sd = sdpa(qc, kc, vc, is_causal=causal, enable_gqa=True)
    out = streamcqsa.attention(qc, kc, vc, itr=itr, is_causal=causal)
    assert out.shape == qc.shape
    assert _rel(out.cpu(), ref) <= 1.5 * _rel(sd.cpu(), ref) + 1e-6
    dout = torch.randn(out.shape, generator=g, dtype=F64)
    gref = torch.autograd.grad(ref, (q64, k64, v64), dout)
    gsd = torch.autograd.grad(sd, (qc, kc, vc), dout.to("cuda", dtype))
    got = torch.autograd.grad(out, (qc, kc, vc), dout.to("cuda", dtype))
    for a, s, r in zip(got, gsd, gref, strict=True):
        assert a.shape == r.shape
        assert _rel(a.cpu(), r) <= 1.5 * _rel(s.cpu(), r) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("itr", [0, 1, 2])
def test_cuda_forward_backward_within_bounds(dtype, causal, itr):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1009, 64, generator=g, dtype=F64)
    k = torch.randn(2, 2, 1009, 64, generator=g, dtype=F64)
    v = torch.randn(2, 2, 1009, 64, generator=g, dtype=F64)
    _check_against_sdpa(q, k, v, dtype, causal, itr, g)


@pytest.fixture
def deterministic():
    """Both CUDA backward kernels split work with atomics by default, so their
    gradient bits vary between calls; deterministic mode gives one answer."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for it
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_cuda_pipeline_equals_engine(tmp_path, deterministic):
    """Forward and backward units held on the device (the backward's inputs
    copied there, its gradients summed there): the engine's bits."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 3000, 64, generator=g).half() for _ in range(3))
    create(tmp_path / "s", q, k, v, is_causal=True)
    run(tmp_path / "s", itr=2, device="cuda", progress=False, head_group=4)
    qc, kc, vc = (x.cuda().requires_grad_() for x in (q, k, v))
    out = streamcqsa.attention(qc, kc, vc, itr=2, is_causal=True)
    got = zarr.open_group(tmp_path / "s", mode="r")["out"][:]
    assert np.array_equal(got, out.detach().cpu().numpy())
    dout = torch.randn(out.shape, generator=g).half()
    bstats = run_backward(tmp_path / "s", dout, device="cuda", progress=False)
    assert "h2d" in bstats["stages"], bstats["stages"]  # units held on the device
    grads = torch.autograd.grad(out, (qc, kc, vc), dout.cuda())
    grp = zarr.open_group(tmp_path / "s", mode="r")
    for name, gr in zip(("dq", "dk", "dv"), grads, strict=True):
        assert np.array_equal(grp[name][:], gr.cpu().numpy()), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [36, 320])
def test_cuda_head_dims_the_kernels_do_not_take_directly(dtype, head_dim):
    """Head dims padded to a multiple of 8 (36), or past flash's 256 (320):
    forward and backward stay within the bounds, at an odd length."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 333, head_dim, generator=g, dtype=F64) for _ in range(3))
    _check_against_sdpa(q, k, v, dtype, True, 2, g)


def test_cuda_rejects_float64():
    x = torch.randn(1, 1, 8, 8, device="cuda", dtype=F64)
    with pytest.raises(TypeError, match="float64 on CUDA"):
        streamcqsa.attention(x, x, x)


@pytest.mark.parametrize(
    ("dtype", "itr", "unit_depth", "overlap"),
    [("bfloat16", 3, 1, None), ("float16", 1, 0, None), ("float16", 2, 0, False)],
)
def test_cuda_units_on_device_keep_the_bits_and_report_stages(
    tmp_path, dtype, itr, unit_depth, overlap
):
    """Units held on the device (read-ahead through pinned slots on a copy
    stream, folds on the device, write-back from a D2H stream): the engine's
    bits, and stage times for H2D, compute and D2H."""
    from streamcqsa.storage.layout import to_torch, torch_dtype

    g = torch.Generator().manual_seed(2)
    td = torch_dtype(dtype)
    q, k, v = (torch.randn(1, h, 2500, 64, generator=g).to(td) for h in (8, 2, 2))
    create(tmp_path / "s", q, k, v, is_causal=True, chunk_tokens=256)
    stats = run(
        tmp_path / "s",
        itr=itr,
        device="cuda",
        progress=False,
        unit_depth=unit_depth,
        overlap_io=overlap,
    )
    st = stats["stages"]
    assert st["d2h"] > 0 and st["device_busy_fraction"] > 0, st  # two slots may overlap
    if overlap is None:  # read-ahead through the copy stream
        assert st["h2d"] > 0, st
    out = streamcqsa.attention(q.cuda(), k.cuda(), v.cuda(), itr=itr, is_causal=True)
    got = to_torch(np.asarray(zarr.open_group(tmp_path / "s", mode="r")["out"][:]), dtype)
    assert torch.equal(got, out.cpu())


@pytest.mark.parametrize(
    ("dtype", "head_dim", "unit_depth", "oom"),
    [
        ("float32", 36, None, False),  # every leaf a unit: held on the host
        ("float16", 64, 0, True),  # injected OOM: n_cap lowered, then divided
        ("bfloat16", 320, 1, False),  # padded head dim, units folded flat
    ],
)
def test_cuda_pipeline_paths_within_bounds(tmp_path, monkeypatch, dtype, head_dim, unit_depth, oom):
    """device="auto" through the store pipeline, forward and backward, on the
    paths the bit test does not take: outputs verified, gradients within
    1.5x of CUDA SDPA's own error against float64."""
    from streamcqsa.pipeline import verify
    from streamcqsa.storage.layout import to_torch, torch_dtype

    g = torch.Generator().manual_seed(4)
    td = torch_dtype(dtype)
    q, k, v = (torch.randn(1, h, 1200, head_dim, generator=g, dtype=F64) for h in (4, 2, 2))
    create(tmp_path / "s", q.to(td), k.to(td), v.to(td), is_causal=True, chunk_tokens=128)

    def inject(task: str, n_cap: int) -> bool:
        return oom and n_cap > 0  # every whole task: the guardrail divides

    monkeypatch.setattr(guardrail, "INJECT_OOM", inject)
    stats = run(tmp_path / "s", itr=2, progress=False, unit_depth=unit_depth)
    if unit_depth is not None:  # "auto" chose CUDA: units held there
        assert "h2d" in stats["stages"], stats["stages"]
    if oom:
        assert any(e["event"] == "divide" for e in stats["guardrail"]["events"])
    assert verify(tmp_path / "s")["ok"]
    dout = torch.randn(1, 4, 1200, head_dim, generator=g, dtype=F64)
    run_backward(tmp_path / "s", dout.to(td), progress=False, unit_depth=unit_depth)
    q64, k64, v64 = (x.clone().requires_grad_() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(q64, k64, v64, is_causal=True, enable_gqa=True)
    gref = torch.autograd.grad(ref, (q64, k64, v64), dout)
    qc, kc, vc = (x.to("cuda", td).requires_grad_() for x in (q, k, v))
    sd = sdpa(qc, kc, vc, is_causal=True, enable_gqa=True)
    gsd = torch.autograd.grad(sd, (qc, kc, vc), dout.to("cuda", td))
    grp = zarr.open_group(tmp_path / "s", mode="r")
    for name, s, r in zip(("dq", "dk", "dv"), gsd, gref, strict=True):
        got = to_torch(np.asarray(grp[name][:]), dtype)
        assert _rel(got, r) <= 1.5 * _rel(s.cpu(), r) + 1e-6, name
