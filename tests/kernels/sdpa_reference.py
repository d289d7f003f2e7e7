"""float64 SDPA references and error bounds shared by the kernel tests.

Inputs are made in float64 and cast to the test dtype; the reference is torch
SDPA in float64 on the *cast* values, so the only error measured is the
computation's. The bound for CQS is 1.5x the error torch SDPA itself makes in
that dtype on the same inputs (and <= 1e-5 for fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import streamcqsa

Tensor = torch.Tensor
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = [F32, BF16, F16]

# An absolute floor under the 1.5x-SDPA bound. In degenerate cases (L = 1: the
# output is v itself) SDPA's error and the rounding error of the reference can
# be exactly 0; a relative bound of 0 would then demand bit-identical results
# for no reason. The floors sit far below each dtype's unit roundoff (fp32
# 6e-8, fp16 4.9e-4, bf16 3.9e-3), so they never hide a real error.
FLOOR = {F32: 2.0**-23, BF16: 2.0**-16, F16: 2.0**-19, F64: 1e-13}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().to(F64), ref.detach().to(F64)
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def bound(dtype: torch.dtype, sdpa_err: float, ref: torch.Tensor) -> float:
    """1.5x torch SDPA's error; SDPA in half types can land exactly on the
    rounded reference, so rounding the reference itself is the other baseline.
    FLOOR: below it errors are rounding noise (fp32: one ulp, 2^-23; at L=2
    a merged row's few roundings measured 5.9e-8 against SDPA's 3.7e-8)."""
    round_err = rel_err(ref.to(dtype), ref)
    return max(1.5 * sdpa_err, 1.5 * round_err, FLOOR[dtype])


def assert_close(
    name: str, got: torch.Tensor, ref: torch.Tensor, sdpa: torch.Tensor, *, fp32_abs: bool = True
) -> None:
    dtype = sdpa.dtype
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, ref)
    sdpa_err = rel_err(sdpa, ref)
    lim = bound(dtype, sdpa_err, ref)
    assert err <= lim, f"{name}: rel err {err:.3e} > {lim:.3e} (SDPA {sdpa_err:.3e})"
    if dtype == F32 and fp32_abs:
        assert err <= 1e-5, f"{name}: fp32 rel err {err:.3e}"


def make_inputs(
    seed: int,
    L: int,
    D: int,
    dtype: torch.dtype,
    *,
    B: int = 2,
    H: int = 8,
    Hkv: int = 2,
    std: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=F64) * std
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=F64) * std
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=F64) * std
    dout = torch.randn(B, H, L, D, generator=g, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def check_forward(
    L: int,
    itr: int,
    quorum: object,
    causal: bool,
    D: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    H: int = 8,
    Hkv: int = 2,
    std: float = 1.0,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of CQS vs SDPA; returns the cast q, k, v and the CQS lse."""
    q, k, v, _ = make_inputs(seed, L, D, dtype, H=H, Hkv=Hkv, std=std)
    ref = sdpa(q.to(F64), k.to(F64), v.to(F64), causal=causal, scale=scale)
    base = sdpa(q, k, v, causal=causal, scale=scale)
    out, lse = streamcqsa.attention(
        q, k, v, itr=itr, quorum=quorum, is_causal=causal, scale=scale, return_lse=True
    )
    assert_close("out", out, ref, base)
    assert lse.shape == q.shape[:3] and lse.dtype == (F64 if dtype == F64 else F32)
    assert torch.isfinite(lse).all()
    return q, k, v, lse
