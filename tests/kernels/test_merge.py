"""Exact log-space merging of attention partials (streamcqsa.kernels.merge)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcqsa.kernels import empty_partial, merge_partials, normalize_empty_rows

F32, F64 = torch.float32, torch.float64
Partial = tuple[torch.Tensor, torch.Tensor]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_same_bits(a: Partial, b: Partial) -> None:
    assert a[0].dtype == b[0].dtype == F32 and a[1].dtype == b[1].dtype == F32
    assert torch.equal(bits(a[0]), bits(b[0])), "out bits differ"
    assert torch.equal(bits(a[1]), bits(b[1])), "lse bits differ"


def attend64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Partial:
    """float64 (out, lse) of q over the keys given; no keys -> the empty partial."""
    if k.shape[-2] == 0:
        out = torch.zeros(q.shape, dtype=F64)
        return out, torch.full(q.shape[:-1], -math.inf, dtype=F64)
    s = q @ k.transpose(-1, -2) * scale
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def to32(p: Partial) -> Partial:
    return p[0].to(F32), p[1].to(F32)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.to(F64) - ref.to(F64)).norm() / ref.to(F64).norm()).item()


def merge64(parts: list[Partial]) -> Partial:
    """The exact merge, in float64, of the given partials."""
    lses = torch.stack([p[1].to(F64) for p in parts])
    lse = torch.logsumexp(lses, dim=0)
    w = (lses - lse).exp().nan_to_num(0.0)  # all-empty rows: -inf - -inf
    out = sum(w[j][..., None] * p[0].to(F64) for j, p in enumerate(parts))
    return out, lse


def merge_tree(parts: list[Partial], rng: random.Random) -> Partial:
    """Merge in a random order by a random tree (groups of 2 or 3 neighbours)."""
    parts = list(parts)
    rng.shuffle(parts)
    while len(parts) > 1:
        n = min(rng.randint(2, 3), len(parts))
        i = rng.randrange(len(parts) - n + 1)
        parts[i : i + n] = [merge_partials(parts[i : i + n])]
    return parts[0]


def random_split(n: int, m: int, rng: random.Random) -> list[list[int]]:
    """Keys 0..n-1 into m disjoint random subsets (some may be empty)."""
    labels = [rng.randrange(m) for _ in range(n)]
    return [[i for i in range(n) if labels[i] == j] for j in range(m)]


# --- against full attention --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 7),
    n_keys=st.integers(1, 60),
    rows=st.integers(1, 9),
    d=st.sampled_from([1, 8, 32]),
    std=st.sampled_from([0.3, 1.0, 4.0, 12.0]),
)
def test_merge_equals_attention_over_union(
    seed: int, m: int, n_keys: int, rows: int, d: int, std: float
) -> None:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, rows, d, generator=g, dtype=F64) * std
    k = torch.randn(2, 3, n_keys, d, generator=g, dtype=F64) * std
    v = torch.randn(2, 3, n_keys, d, generator=g, dtype=F64)
    scale = d**-0.5
    full_out, full_lse = attend64(q, k, v, scale)
    subsets = random_split(n_keys, m, rng)
    parts = [to32(attend64(q, k[:, :, idx], v[:, :, idx], scale)) for idx in subsets]

    flat = merge_partials(parts)
    results = [flat, merge_tree(parts, rng), merge_tree(parts, rng)]
    left = parts[0]
    for p in parts[1:]:
        left = merge_partials([left, p])
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = merge_partials([p, right])
    results += [left, right]

    # The merge itself: against the float64 merge of the same fp32 partials.
    ref_out, ref_lse = merge64(parts)
    big = max(1.0, full_lse.abs().max().item())
    for out, lse in results[:1]:
        assert rel(out, ref_out) <= 1e-6
        assert (lse.to(F64) - ref_lse).abs().max().item() <= 1e-6 * big
    # Against full attention and across groupings. An fp32 lse carries an
    # absolute error of up to half an ulp of |lse| (3e-5 at lse = 500), and a
    # weight exp(lse_j - lse) inherits it as a relative error; so the bound is
    # 1e-6 plus a few ulps of the largest |lse|. Intermediate merges round
    # their lse the same way, which is all that separates the groupings.
    tol = 1e-6 + 4 * 2.0**-24 * big
    for out, lse in results:
        assert out.dtype == F32 and lse.dtype == F32
        assert out.shape == full_out.shape and lse.shape == full_lse.shape
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        assert rel(out, full_out) <= tol
        assert (lse.to(F64) - full_lse).abs().max().item() <= 1e-6 * big
    for out, lse in results[1:]:  # associativity and order independence
        assert rel(out, flat[0]) <= tol
        assert (lse.to(F64) - flat[1].to(F64)).abs().max().item() <= 1e-6 * big


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 8), std=st.sampled_from([0.1, 1.0]))
def test_merge_is_associative_for_comparable_weights(seed: int, m: int, std: float) -> None:
    # lse of order 1, weights of comparable size: every grouping within 1e-6.
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    parts = [
        (torch.randn(3, 4, 6, 16, generator=g), std * torch.randn(3, 4, 6, generator=g))
        for _ in range(m)
    ]
    flat = merge_partials(parts)
    ref_out, ref_lse = merge64(parts)
    assert rel(flat[0], ref_out) <= 1e-6
    assert torch.allclose(flat[1].to(F64), ref_lse, rtol=0, atol=1e-6)
    for _ in range(3):
        out, lse = merge_tree(parts, rng)
        assert rel(out, flat[0]) <= 1e-6
        assert torch.allclose(lse, flat[1], rtol=0, atol=1e-6)


def test_merge_with_out_writes_the_same_bits() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [
        (torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 4, 5, generator=g) * 50)
        for _ in range(4)
    ]
    ref = merge_partials(parts)
    dst = (torch.full((2, 4, 5, 8), math.nan), torch.full((2, 4, 5), math.nan))
    got = merge_partials(parts, out=dst)
    assert got[0] is dst[0] and got[1] is dst[1]
    assert_same_bits(got, ref)
    # in place over the first partial, as a task runner does
    first = (parts[0][0].clone(), parts[0][1].clone())
    merge_partials([first, *parts[1:]], out=first)
    assert_same_bits(first, ref)


def test_single_partial_is_returned_unchanged() -> None:
    p = (torch.randn(3, 2, 4), torch.randn(3, 2))
    assert_same_bits(merge_partials([p]), p)
    dst = (torch.empty(3, 2, 4), torch.empty(3, 2))
    assert_same_bits(merge_partials([p], out=dst), p)


# --- empty rows -------------------------------------------------------------------


def test_empty_partial_is_the_identity_bit_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    p = (torch.randn(2, 3, 6, 16, generator=g), torch.randn(2, 3, 6, generator=g) * 30)
    e = empty_partial((2, 3, 6, 16))
    assert torch.isneginf(e[1]).all() and (e[0] == 0).all()
    for order in ([p, e], [e, p], [e, p, e], [e, e, p], [p, e, e, e]):
        assert_same_bits(merge_partials(order), p)
    # large lse too
    big = (p[0], p[1] + 500.0)
    assert_same_bits(merge_partials([e, big, e]), big)


def test_rows_empty_in_one_partial() -> None:
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, generator=g))
    b = (torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, generator=g))
    empty_rows = torch.tensor([True, False, True, False, False, False, True, False])
    b[0][:, :, empty_rows] = 0.0
    b[1][:, :, empty_rows] = -math.inf
    for out, lse in (merge_partials([a, b]), merge_partials([b, a])):
        # rows b does not reach: a's bits
        assert torch.equal(bits(out[:, :, empty_rows]), bits(a[0][:, :, empty_rows]))
        assert torch.equal(bits(lse[:, :, empty_rows]), bits(a[1][:, :, empty_rows]))
        # other rows: the usual weighted merge (float64 check)
        keep = ~empty_rows
        la, lb = a[1][:, :, keep].to(F64), b[1][:, :, keep].to(F64)
        ref_lse = torch.logaddexp(la, lb)
        wa, wb = (la - ref_lse).exp(), (lb - ref_lse).exp()
        ref_out = wa[..., None] * a[0][:, :, keep] + wb[..., None] * b[0][:, :, keep]
        assert torch.allclose(lse[:, :, keep].to(F64), ref_lse, atol=1e-6)
        assert torch.allclose(out[:, :, keep].to(F64), ref_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_all_empty_stays_empty(n: int) -> None:
    parts = [empty_partial((2, 3, 4, 8)) for _ in range(n)]
    dst = (torch.full((2, 3, 4, 8), math.nan), torch.full((2, 3, 4), math.nan))
    for out, lse in (merge_partials(parts), merge_partials(parts, out=dst)):
        assert torch.isneginf(lse).all()
        assert (out == 0).all()
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_all_empty_rows_next_to_live_rows() -> None:
    e = empty_partial((1, 1, 4, 3))
    p = (torch.randn(1, 1, 4, 3), torch.tensor([[[1.0, -math.inf, 700.0, -math.inf]]]))
    p[0][:, :, 1] = 0.0
    p[0][:, :, 3] = 0.0
    out, lse = merge_partials([e, p, e])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(p[1]))
    assert not torch.isnan(out).any()
    assert_same_bits((out, lse), p)


# --- large and infinite lse ------------------------------------------------------------


@pytest.mark.parametrize("offset", [88.0, 500.0, 3000.0, -500.0])
def test_large_lse_merges_without_overflow(offset: float) -> None:
    # exp(lse) overflows fp32 above 88.7 and underflows below -103.
    g = torch.Generator().manual_seed(3)
    parts = [
        (torch.randn(2, 2, 7, 8, generator=g), offset + 3 * torch.randn(2, 2, 7, generator=g))
        for _ in range(4)
    ]
    out, lse = merge_partials(parts)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    lses = torch.stack([p[1].to(F64) for p in parts])
    ref_lse = torch.logsumexp(lses, dim=0)
    w = (lses - ref_lse).exp()
    ref_out = sum(w[j][..., None] * parts[j][0].to(F64) for j in range(len(parts)))
    assert torch.allclose(lse.to(F64), ref_lse, rtol=1e-6, atol=1e-6)
    assert rel(out, ref_out) <= 1e-6
    if offset > 88.7:
        assert (lse > 88.7).all()


def test_normalize_empty_rows() -> None:
    out = torch.randn(2, 5, 4)
    lse = torch.tensor([[math.inf, 1.5, math.inf, -math.inf, 600.0], [math.inf] * 5])
    out[0, 0] = 0.0  # +inf with zero out: an empty row in FA2's encoding
    out[0, 3] = 0.0
    out[1, 1:3] = 0.0
    got = normalize_empty_rows(out, lse)
    want = lse.clone()
    want[0, 0] = -math.inf
    want[1, 1:3] = -math.inf
    assert torch.equal(bits(got), bits(want))
    assert got.dtype == lse.dtype
    # a +inf row with a non-zero out is not empty: left alone
    assert got[0, 2] == math.inf and got[1, 0] == math.inf and got[1, 4] == math.inf


def test_posinf_lse_dominates() -> None:
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, generator=g) + 500)
    b = (torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, generator=g))
    e = empty_partial((1, 2, 5, 8))
    inf_rows = torch.tensor([True, False, False, True, False])
    b[1][:, :, inf_rows] = math.inf
    for order in ([a, b], [b, a], [a, e, b], [e, b, a, e]):
        out, lse = merge_partials(order)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.isposinf(lse[:, :, inf_rows]).all()
        assert torch.equal(out[:, :, inf_rows], b[0][:, :, inf_rows])
        # the other rows: the ordinary merge, checked in float64
        rest = ~inf_rows
        lses = torch.stack([p[1][:, :, rest].to(F64) for p in order])
        ref_lse = torch.logsumexp(lses, dim=0)
        w = (lses - ref_lse).exp()
        ref_out = sum(w[j][..., None] * p[0][:, :, rest].to(F64) for j, p in enumerate(order))
        assert torch.allclose(lse[:, :, rest].to(F64), ref_lse, rtol=1e-6, atol=1e-6)
        assert torch.allclose(out[:, :, rest].to(F64), ref_out, rtol=1e-6, atol=1e-6)


def test_two_posinf_parts_share_the_row() -> None:
    a = (torch.randn(1, 1, 3, 4), torch.tensor([[[math.inf, 2.0, math.inf]]]))
    b = (torch.randn(1, 1, 3, 4), torch.tensor([[[math.inf, math.inf, 1.0]]]))
    c = (torch.randn(1, 1, 3, 4), torch.tensor([[[5.0, 3.0, -math.inf]]]))
    out, lse = merge_partials([a, b, c])
    assert torch.isposinf(lse).all()
    assert not torch.isnan(out).any()
    assert torch.allclose(out[0, 0, 0], (a[0][0, 0, 0] + b[0][0, 0, 0]) / 2)
    assert torch.equal(out[0, 0, 1], b[0][0, 0, 1])
    assert torch.equal(out[0, 0, 2], a[0][0, 0, 2])


@pytest.mark.parametrize(
    ("seq_len", "itr", "causal"), [(16384, 3, True), (4099, 2, False), (777, 3, True)]
)
def test_a_node_fold_in_one_batch_has_the_bits_of_range_by_range(seq_len, itr, causal):
    """``merge_fold`` (every multi-source range's weights at once) against
    ``fold`` with ``merge_combine`` (range by range), bit for bit, on random
    partials with empty (-inf), +inf and huge lse rows, for every node."""
    from streamcqsa.cqs.divide import divide
    from streamcqsa.kernels.fold import fold, merge_combine, merge_fold

    plan = divide(seq_len, itr, 3, is_causal=causal)
    g = torch.Generator().manual_seed(seq_len)
    folded = 0
    for node in plan.nodes:
        if node.is_leaf:
            continue
        parts = {}
        for c in node.children:
            n = plan.by_path[c].length
            o = torch.randn(1, 3, n, 8, generator=g)
            s = torch.randn(1, 3, n, generator=g) * 20
            s[..., ::17], o[..., ::17, :] = -math.inf, 0.0
            s[..., 5::41] = math.inf
            s[..., 7::53] = 1e30
            parts[c] = (o, s)
        a = (torch.full((1, 3, node.length, 8), 7.0), torch.full((1, 3, node.length), 7.0))
        b = (a[0].clone(), a[1].clone())
        fold(plan.merge_sources(node), parts, a, merge_combine, (0.0, -math.inf))
        merge_fold(plan.merge_sources(node), parts, b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), node.path
        folded += sum(len(s.sources) > 1 for s in plan.merge_sources(node))
    assert folded > 1  # the batched path ran
