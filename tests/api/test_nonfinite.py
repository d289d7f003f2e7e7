"""allow_nonfinite=True: NaN/Inf in q, k, v reach the output as in float64 SDPA.

The reference is ``F.scaled_dot_product_attention`` in float64 on the CPU,
with sequences that fit one key tile of its fused kernel (there it follows
the dense rule the attention docstring states); longer ones are checked
against its math backend. Every check compares the NaN, +Inf and -Inf
positions exactly and the finite values to float64 rounding, at itr 0..3.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import streamcqsa

INF, NAN = float("inf"), float("nan")
L, H, HKV, D = 300, 4, 2, 8


def rnd(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def assert_same(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-12) -> None:
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(out), test(ref)
        assert torch.equal(got, want), (
            f"{name} at {int(got.sum())} positions, SDPA at {int(want.sum())}; "
            f"rows differ: {(got != want).any(-1).nonzero()[:5].tolist()}"
        )
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("itr", [0, 1, 2, 3])
def test_inf_in_v_causal_same_rows_as_sdpa_at_every_itr(itr: int) -> None:
    """The reported case: one Inf in v at token 100 of 300, causal. SDPA's dense
    product makes every row NaN or Inf in that column (0 * Inf before 100)."""
    q, k, v = rnd(1, H, L, D, seed=1), rnd(1, HKV, L, D, seed=2), rnd(1, HKV, L, D, seed=3)
    v[0, 0, 100, 3] = INF
    out = streamcqsa.attention(q, k, v, itr=itr, is_causal=True, allow_nonfinite=True)
    ref = sdpa(q, k, v, True)
    assert ref[0, :2, :100, 3].isnan().all() and ref[0, :2, 100:, 3].isposinf().all()
    assert_same(out, ref)


@pytest.mark.parametrize("itr", [1, 2, 3])
def test_row_of_only_minus_inf_scores_in_a_block_is_empty(itr: int) -> None:
    """A -inf score on the first key of a causal block makes that block's first
    row all -inf; the CPU op's lse 0 for it must not weigh in the merge."""
    q, k, v = rnd(1, 2, L, D, seed=4), rnd(1, 2, L, D, seed=5), rnd(1, 2, L, D, seed=6)
    q[..., 3] = q[..., 3].abs() + 0.1  # q . k = -inf wherever k[..., 3] = -inf
    k[0, 0, 64, 3] = -INF  # 64 starts a causal block at every itr >= 1
    out = streamcqsa.attention(q, k, v, itr=itr, is_causal=True, allow_nonfinite=True)
    assert_same(out, sdpa(q, k, v, True))


where = st.sampled_from("qkv")
value = st.sampled_from([INF, -INF, NAN])


@settings(max_examples=12, deadline=None)
@given(
    bad=st.lists(
        st.tuples(where, st.integers(0, L - 1), st.integers(0, D - 1), value),
        min_size=1,
        max_size=4,
    ),
    is_causal=st.booleans(),
    itr=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_nonfinite_positions_match_sdpa(
    bad: list[tuple[str, int, int, float]], is_causal: bool, itr: int, seed: int
) -> None:
    qkv = {
        "q": rnd(1, H, L, D, seed=seed),
        "k": rnd(1, HKV, L, D, seed=seed + 1),
        "v": rnd(1, HKV, L, D, seed=seed + 2),
    }
    for name, token, col, x in bad:
        qkv[name][0, token % qkv[name].shape[1], token, col] = x
    q, k, v = qkv["q"], qkv["k"], qkv["v"]
    out = streamcqsa.attention(q, k, v, itr=itr, is_causal=is_causal, allow_nonfinite=True)
    assert_same(out, sdpa(q, k, v, is_causal))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_positions_in_lower_precision(dtype: torch.dtype) -> None:
    q, k, v = (rnd(1, 2, L, D, seed=s).to(dtype) for s in (7, 8, 9))
    v[0, 1, 150, 2], v[0, 0, 40, 5], k[0, 1, 200, 0], q[0, 0, 10, 1] = INF, NAN, -INF, NAN
    ref = sdpa(q.double(), k.double(), v.double(), True)
    for itr in range(4):
        out = streamcqsa.attention(q, k, v, itr=itr, is_causal=True, allow_nonfinite=True)
        assert_same(out.double(), ref, tol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_longer_than_one_key_tile_follows_the_dense_rule() -> None:
    """Past 512 keys SDPA's fused CPU kernel skips masked tiles; the documented
    rule (0 * Inf = NaN for every row before the token) is its math backend's."""
    n = 600
    q, k, v = rnd(1, 2, n, D, seed=10), rnd(1, 1, n, D, seed=11), rnd(1, 1, n, D, seed=12)
    v[0, 0, 550, 4] = -INF
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(q, k, v, True)
    for itr in (0, 2):
        out = streamcqsa.attention(q, k, v, itr=itr, is_causal=True, allow_nonfinite=True)
        assert_same(out, ref)


def test_lse_of_finite_rows_is_exact() -> None:
    q, k, v = rnd(1, 2, L, D, seed=13), rnd(1, 2, L, D, seed=14), rnd(1, 2, L, D, seed=15)
    k[0, 1, 30, 2], v[0, 0, 90, 1] = -INF, NAN
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -INF)
    ref = torch.logsumexp(scores, dim=-1)
    undefined = (scores.isnan() | scores.isposinf()).any(-1)  # Inf - Inf in the softmax
    assert 0 < int(undefined.sum()) < L
    for itr in range(4):
        _, lse = streamcqsa.attention(
            q, k, v, itr=itr, is_causal=True, allow_nonfinite=True, return_lse=True
        )
        torch.testing.assert_close(lse[~undefined], ref[~undefined], rtol=1e-12, atol=1e-12)
        assert not lse[undefined].isfinite().any()


def test_streamed_helpers_equal_whole() -> None:
    """A caller that streams v and out in token ranges gets the same NaN."""
    from streamcqsa.kernels.nonfinite import last_nonfinite, poison_masked_rows

    v = rnd(2, 2, 100, 4, seed=16)
    v[1, 0, 70, 2], v[0, 1, 10, 3], v[0, 1, 55, 3] = INF, NAN, -INF
    whole = last_nonfinite(v)
    assert whole is not None and whole[1, 0, 2] == 70 and whole[0, 1, 3] == 55
    assert (whole >= 0).sum() == 2
    parts = [last_nonfinite(v[:, :, a : a + 30], offset=a) for a in range(0, 100, 30)]
    folded = torch.stack([p if p is not None else torch.full_like(whole, -1) for p in parts])
    assert torch.equal(folded.amax(dim=0), whole)
    assert last_nonfinite(torch.full((1, 1, 4, 2), 3e38)) is None  # an overflowing sum
    out = rnd(2, 4, 100, 4, seed=17)
    ref = poison_masked_rows(out.clone(), whole)
    pieces = out.clone()
    for a in range(0, 100, 30):
        poison_masked_rows(pieces[:, :, a : a + 30], whole, start=a)
    assert torch.equal(pieces.isnan(), ref.isnan())
    assert ref[1, :2, :70, 2].isnan().all() and not ref[1, :2, 70:, 2].isnan().any()
    assert ref[0, 2:, :55, 3].isnan().all() and not ref[1, 2:].isnan().any()


@pytest.mark.parametrize(("itr", "unit_depth"), [(0, "auto"), (1, None), (2, 1), (3, None)])
def test_store_pipeline_propagates_like_sdpa(tmp_path, itr, unit_depth) -> None:
    """The same rule through a store (float32, so the pipeline keeps the
    bits): an Inf and a NaN in v reach the rows SDPA's dense product does,
    whatever the depth and wherever the units are cut."""
    import numpy as np
    import zarr

    from streamcqsa.pipeline import run
    from streamcqsa.storage import create

    q, k, v = (rnd(1, h, L, D, seed=s).float() for h, s in ((H, 4), (HKV, 5), (HKV, 6)))
    v[0, 0, 100, 3] = INF
    v[0, 1, 250, 5] = NAN
    create(tmp_path / "s", q, k, v, is_causal=True, allow_nonfinite=True, chunk_tokens=64)
    run(tmp_path / "s", itr=itr, progress=False, unit_depth=unit_depth)
    got = torch.from_numpy(np.asarray(zarr.open_group(tmp_path / "s", mode="r")["out"][:]))
    ref = sdpa(q.double(), k.double(), v.double(), True)
    assert_same(got.double(), ref, tol=1e-5)
