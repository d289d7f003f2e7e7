"""streamcqsa.attention against float64 SDPA, forward and backward.

Inputs are made in float64 and cast to the test dtype; the reference is torch
SDPA in float64 on the *cast* values, so the only error measured is the
computation's. The bound for CQS is 1.5x the error torch SDPA itself makes in
that dtype on the same inputs (and <= 1e-5 for fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sdpa_reference import (
    BF16,
    DTYPES,
    F32,
    F64,
    Tensor,
    assert_close,
    check_forward,
    make_inputs,
    sdpa,
)

import streamcqsa

# --- forward -------------------------------------------------------------------

FORWARD_CASES = [
    # (L, itr, quorum, D): prime L at every depth, L = n^itr, mixed quorum lists
    (1009, 0, 3, 64),
    (1009, 1, 5, 64),
    (1009, 2, [4, 2], 128),
    (1009, 3, [5, 3, 2], 32),
    (1009, 3, 2, 64),
    (343, 3, 3, 64),
    (169, 2, 4, 128),
    (441, 2, 5, 32),
    (27, 3, 2, 64),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("L", "itr", "quorum", "D"), FORWARD_CASES)
def test_forward(
    L: int, itr: int, quorum: object, D: int, dtype: torch.dtype, causal: bool
) -> None:
    check_forward(L, itr, quorum, causal, D, dtype, seed=L + itr)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("itr", [1, 2, 3])
@pytest.mark.parametrize("L", [1, 2, 7])
def test_forward_tiny(L: int, itr: int, dtype: torch.dtype, causal: bool) -> None:
    quorum = [2, 3, 4, 5][(L + itr) % 4]
    check_forward(L, itr, quorum, causal, 32, dtype, seed=10 * L + itr)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_without_gqa(causal: bool) -> None:
    check_forward(300, 2, 3, causal, 64, F32, Hkv=8)
    check_forward(300, 2, 3, causal, 64, BF16, Hkv=8)


@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 130),
    itr=st.integers(0, 3),
    data=st.data(),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_random_plans(
    L: int, itr: int, data: st.DataObject, causal: bool, seed: int
) -> None:
    quorum = data.draw(st.lists(st.sampled_from([2, 3, 4, 5]), min_size=itr, max_size=itr))
    check_forward(L, itr, quorum, causal, 16, F32, seed=seed, H=2, Hkv=1)


# --- memory layout -------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("L", "itr"), [(200, 0), (200, 1), (200, 2), (7, 1), (2, 3)])
def test_non_contiguous_inputs(L: int, itr: int, causal: bool) -> None:
    """[B, L, H, D] storage viewed as [B, H, L, D], and k/v heads broadcast by expand."""
    g = torch.Generator().manual_seed(L + itr)
    q = torch.randn(2, L, 8, 32, generator=g, dtype=F64).to(F32).transpose(1, 2)
    k = torch.randn(2, L, 2, 32, generator=g, dtype=F64).to(F32).transpose(1, 2)
    v = torch.randn(2, 1, L, 32, generator=g, dtype=F64).to(F32).expand(2, 2, L, 32)
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(1) == 0
    ref = sdpa(q.to(F64), k.to(F64), v.to(F64), causal=causal)
    base = sdpa(q, k, v, causal=causal)
    out = streamcqsa.attention(q, k, v, itr=itr, is_causal=causal)
    assert_close("out", out, ref, base)


@pytest.mark.parametrize(
    ("L", "itr"),
    [
        pytest.param(200, 0),
        pytest.param(2, 1),
        pytest.param(7, 2),
    ],
)
def test_last_dim_strided_inputs(L: int, itr: int) -> None:
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(2, 4, L, 64, generator=g, dtype=F64).to(F32)[..., ::2] for _ in range(3))
    assert q.stride(-1) == 2
    ref = sdpa(q.to(F64), k.to(F64), v.to(F64), causal=False)
    base = sdpa(q, k, v, causal=False)
    out = streamcqsa.attention(q, k, v, itr=itr)
    assert_close("out", out, ref, base)


# --- large scores ---------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("itr", "quorum"), [(0, 3), (2, 3), (3, [2, 4, 3])])
def test_large_scores(itr: int, quorum: object, dtype: torch.dtype, causal: bool) -> None:
    # std 12 inputs: scores of std 144, row lse in the hundreds. Anything that
    # exponentiates a raw lse in fp32 overflows above 88.7.
    q, k, v, lse = check_forward(150, itr, quorum, causal, 64, dtype, seed=7, std=12.0)
    assert (lse > 88.7).float().mean() > 0.5
    assert torch.isfinite(lse).all()
    ref = reference_lse(q, k, v, causal=causal, scale=None)
    assert torch.allclose(lse.to(F64), ref, rtol=2e-6, atol=1e-4)


# --- lse --------------------------------------------------------------------------


def reference_lse(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None) -> Tensor:
    q, k = q.to(F64), k.to(F64)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * s
    if causal:
        L = q.shape[2]
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    ("L", "itr", "quorum", "dtype"),
    [(1, 2, 3, F32), (7, 3, 2, F32), (100, 0, 3, F32), (100, 2, [3, 5], F32), (90, 3, 3, BF16)],
)
def test_return_lse(L: int, itr: int, quorum: object, dtype: torch.dtype, causal: bool) -> None:
    q, k, v, lse = check_forward(L, itr, quorum, causal, 32, dtype, seed=3)
    ref = reference_lse(q, k, v, causal=causal, scale=None)
    assert torch.allclose(lse.to(F64), ref, rtol=1e-6, atol=1e-5), (lse.to(F64) - ref).abs().max()
    out_only = streamcqsa.attention(q, k, v, itr=itr, quorum=quorum, is_causal=causal)
    assert isinstance(out_only, torch.Tensor)


# --- custom scale --------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.7])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_custom_scale(scale: float, causal: bool) -> None:
    q, k, v, lse = check_forward(200, 2, 3, causal, 64, F32, seed=5, scale=scale)
    ref = reference_lse(q, k, v, causal=causal, scale=scale)
    assert torch.allclose(lse.to(F64), ref, rtol=1e-6, atol=1e-5)
    check_forward(200, 3, [2, 3, 2], causal, 64, BF16, seed=6, scale=scale)


# --- backward ---------------------------------------------------------------------

BACKWARD_CASES = [
    # (L, itr, quorum, D, scale)
    (343, 3, 3, 64, None),
    (1009, 2, [2, 5], 32, None),
    (200, 1, 4, 128, 0.2),
    (7, 2, 3, 32, None),
    (2, 3, 2, 32, None),
    (1, 1, 3, 32, None),
]


def check_backward(
    L: int,
    itr: int,
    quorum: object,
    causal: bool,
    D: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    scale: float | None = None,
    std: float = 1.0,
) -> None:
    # The fp32 1e-5 cap is for well-conditioned inputs; with std-12 inputs the
    # softmax is nearly one-hot, dS = P (dP - D) cancels, and fp32 SDPA itself
    # errs by ~3e-5 on dq/dk, so there only the 1.5x-SDPA bound applies.
    fp32_abs = std <= 1.0
    q, k, v, dout = make_inputs(seed, L, D, dtype, std=std)
    x64 = [t.detach().to(F64).requires_grad_() for t in (q, k, v)]
    ref = sdpa(*x64, causal=causal, scale=scale)
    ref_grads = torch.autograd.grad(ref, x64, dout.to(F64))

    xs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base = sdpa(*xs, causal=causal, scale=scale)
    base_grads = torch.autograd.grad(base, xs, dout)

    xc = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = streamcqsa.attention(*xc, itr=itr, quorum=quorum, is_causal=causal, scale=scale)
    grads = torch.autograd.grad(out, xc, dout)

    assert_close("out", out, ref, base)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads, strict=True):
        if L == 1 and name != "dv":
            # One key: softmax is constant, dq and dk are exactly 0 and any
            # relative error is meaningless. Both SDPA and CQS leave rounding
            # residue of dS = P (dout.v - dout.out); bound it by D ulps of
            # |dout||v| carried through scale * |k| (or |q|).
            other = k if name == "dq" else q
            s = scale if scale is not None else D**-0.5
            eps = torch.finfo(dtype).eps
            lim = eps * D * dout.abs().max() * v.abs().max() * s * other.abs().max()
            assert g.dtype == dtype and torch.isfinite(g).all()
            assert g.abs().max().item() <= lim.item(), f"{name} should be ~0: {g.abs().max()}"
        else:
            assert_close(name, g, r, b, fp32_abs=fp32_abs)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("L", "itr", "quorum", "D", "scale"), BACKWARD_CASES)
def test_backward(
    L: int,
    itr: int,
    quorum: object,
    D: int,
    scale: float | None,
    dtype: torch.dtype,
    causal: bool,
) -> None:
    check_backward(L, itr, quorum, causal, D, dtype, seed=L + 1, scale=scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_backward_large_scores(dtype: torch.dtype, causal: bool) -> None:
    check_backward(150, 2, 3, causal, 64, dtype, seed=11, std=12.0)
