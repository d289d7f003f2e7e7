"""streamcqsa.attention against float64 SDPA, forward and backward.

Inputs are made in float64 and cast to the test dtype; the reference is torch
SDPA in float64 on the *cast* values, so the only error measured is the
computation's. The bound for CQS is 1.5x the error torch SDPA itself makes in
that dtype on the same inputs (and <= 1e-5 for fp32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import streamcqsa
from streamcqsa.cqs import divide
from streamcqsa.kernels import WorkCounter
from streamcqsa.kernels import forward as task_forward
from streamcqsa.kernels.tokens import gather_runs

Tensor = torch.Tensor
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = [F32, BF16, F16]

# An absolute floor under the 1.5x-SDPA bound. In degenerate cases (L = 1: the
# output is v itself) SDPA's error and the rounding error of the reference can
# be exactly 0; a relative bound of 0 would then demand bit-identical results
# for no reason. The floors sit far below each dtype's unit roundoff (fp32
# 6e-8, fp16 4.9e-4, bf16 3.9e-3), so they never hide a real error.
FLOOR = {F32: 2.0**-23, BF16: 2.0**-16, F16: 2.0**-19, F64: 1e-13}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These ops are small: intra-op threads only add sync cost, and on a busy
    # 2-core machine spinning OpenMP workers made this file 4x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# --- work counter -----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("L", "quorum"), [(300, 3), (169, 4), (50, [2, 5])])
def test_work_counter(L: int, quorum: object, causal: bool) -> None:
    B, H = 2, 8
    q, k, v, dout = make_inputs(1, L, 16, F32, B=B, H=H, Hkv=2)
    useful = L * (L + 1) // 2 if causal else L * L
    counter = WorkCounter()
    q.requires_grad_()
    out = streamcqsa.attention(q, k, v, itr=2, quorum=quorum, is_causal=causal, counter=counter)
    assert counter.entries == B * H * useful
    assert counter.calls > 0
    calls = counter.calls
    plan = divide(L, 2, quorum, is_causal=causal)
    assert calls >= len(plan.tasks)
    (out * dout).sum().backward()
    assert counter.entries == 3 * B * H * useful  # backward: 2 per entry
    assert counter.calls == 2 * calls


# --- one task through kernels.forward ---------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_task_partials_follow_the_cqs_mask(causal: bool) -> None:
    """Each task's partial equals float64 attention under the CQS rule: (s, t)
    masked iff at some level both tokens share a chunk the task does not own."""
    L, D = 61, 16
    plan = divide(L, 2, [3, 2], is_causal=causal, tile=4)
    q, k, v, _ = make_inputs(2, L, D, F32, B=1, H=2, Hkv=1)
    scale = 0.4
    for task in plan.tasks:
        tq, tk, tv = (gather_runs(t, task.runs) for t in (q, k, v))
        counter = WorkCounter()
        out, lse = task_forward(
            tq, tk, tv, task.blocks, causal, scale, backend="torch", counter=counter
        )
        assert counter.entries == 2 * task.blocks.entries
        chunks = [s.chunks for s in task.segments for _ in range(s.length)]
        pos = [p for a, n in task.runs for p in range(a, a + n)]
        n = task.length
        allowed = torch.ones(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                for level in range(plan.itr):
                    c = chunks[i][level]
                    if c == chunks[j][level] and c != task.path[level]:
                        allowed[i, j] = False
                if causal and pos[j] > pos[i]:
                    allowed[i, j] = False
        kk = tk.to(F64).repeat_interleave(2, dim=1)
        vv = tv.to(F64).repeat_interleave(2, dim=1)
        scores = (tq.to(F64) @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
        ref_lse = torch.logsumexp(scores, dim=-1)
        empty = ~allowed.any(dim=-1)
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        ref_out = p @ vv
        assert torch.equal(torch.isneginf(lse[0, 0]), empty)
        assert (out[:, :, empty] == 0).all()
        fin = ~empty
        assert torch.allclose(lse[:, :, fin].to(F64), ref_lse[:, :, fin], rtol=1e-6, atol=1e-5)
        assert torch.allclose(out.to(F64), ref_out, rtol=1e-5, atol=1e-5)


# --- fp64 ---------------------------------------------------------------------------


def test_forward_fp64_is_fp64_accurate() -> None:
    check_forward(200, 2, 3, False, 64, F64, seed=9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("itr", [2, 3])
def test_nothing_reads_memory_left_unwritten(monkeypatch, causal, itr):
    """Gathers copy only the rows and keys blocks read, and leaves folded in
    memory skip filling their empty rows. Poison every torch.empty with NaN:
    if anything read such memory, NaN would reach the output or gradients."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, h, 1111, 32, generator=g) for h in (4, 2, 2))
    dout = torch.randn(1, 4, 1111, 32, generator=g)
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True
    )
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    monkeypatch.setattr(torch, "empty", poisoned)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = streamcqsa.attention(qq, kk, vv, itr=itr, is_causal=causal)
    grads = torch.autograd.grad(out, (qq, kk, vv), dout)
    monkeypatch.undo()
    assert_close("out", out.detach(), ref.float(), sdpa)
    assert all(torch.isfinite(gr).all() for gr in grads)
