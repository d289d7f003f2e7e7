"""Fuzzed ``streamcqsa.attention``: valid input is exact, each invalid kind is refused.

The valid strategy draws only inputs the rules accept (empty batches and
head counts included), so every example ends in the exactness check against
float64 SDPA on the same (cast) values; a tally asserted at the end shows it.
Each invalid-input rule has its own test: a valid draw with that one rule
broken must raise the named error, matched by its message. No branch accepts
"some error", so an error raised by a bug fails the test.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import streamcqsa
from streamcqsa.cqs.interest import chunk_count, valid_quorums

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# relative norm error allowed against float64: a few units of the dtype's rounding
TOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
QUORUMS = valid_quorums(5)
MAX_TASKS = 64


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


@st.composite
def valid_inputs(draw: st.DrawFn) -> dict:
    """Arguments ``attention`` must take: SDPA's shape rules, a planned quorum.

    The plan's task count (the product of each level's chunk count) stays at
    most MAX_TASKS: these inputs are short, and a deeper plan only adds empty
    tasks."""
    hk = draw(st.integers(1, 3))
    itr = draw(st.integers(0, 3))
    sizes: list[int] = []
    for level in range(itr):  # room for the smallest size (3 chunks) at every level left
        left = MAX_TASKS // math.prod(chunk_count(k) for k in sizes) // 3 ** (itr - 1 - level)
        sizes.append(draw(st.sampled_from([k for k in QUORUMS if chunk_count(k) <= left])))
    if not itr:
        quorum: object = 3  # one undivided task: any quorum but the default is refused
    elif len(set(sizes)) == 1 and draw(st.booleans()):
        quorum = sizes[0]  # one size for every level
    else:
        quorum = sizes
    return dict(
        b=draw(st.integers(0, 2)),
        h=hk * draw(st.integers(0, 3)),
        hk=hk,
        length=draw(st.integers(1, 48)),
        d=draw(st.integers(1, 24)),
        dtype=draw(st.sampled_from(DTYPES)),
        itr=itr,
        quorum=quorum,
        causal=draw(st.booleans()),
        scale=draw(st.none() | st.floats(0.05, 2.0)),
        seed=draw(st.integers(0, 2**16)),
    )


def _tensors(a: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 q, k, v cast to the drawn dtype (never zeros)."""
    g = torch.Generator().manual_seed(a["seed"])
    q = torch.randn(a["b"], a["h"], a["length"], a["d"], generator=g, dtype=torch.float64)
    k = torch.randn(a["b"], a["hk"], a["length"], a["d"], generator=g, dtype=torch.float64)
    v = torch.randn(a["b"], a["hk"], a["length"], a["d"], generator=g, dtype=torch.float64)
    return q.to(a["dtype"]), k.to(a["dtype"]), v.to(a["dtype"])


def _call(a: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object):  # noqa: ANN202
    args = dict(itr=a["itr"], quorum=a["quorum"], is_causal=a["causal"], scale=a["scale"])
    args.update(kw)
    return streamcqsa.attention(q, k, v, **args)


def test_valid_inputs_are_exact() -> None:
    tally: Counter[str] = Counter()

    @fuzz(60)
    @given(a=valid_inputs())
    def check(a: dict) -> None:
        tally["examples"] += 1
        q, k, v = _tensors(a)
        out = _call(a, q, k, v)
        ref = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), is_causal=a["causal"], scale=a["scale"],
            enable_gqa=True,
        )  # fmt: skip
        assert out.dtype == a["dtype"] and out.shape == q.shape
        err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        event("reached the exactness check")
        tally["exact"] += 1
        assert err <= TOL[a["dtype"]], f"relative error {err:.3g} in {a['dtype']}"

    check()
    print(f"\nfuzz: {tally['exact']}/{tally['examples']} examples reached the exactness check")
    assert tally["examples"] > 0 and tally["exact"] >= 0.9 * tally["examples"]


# --- one test per invalid-input rule -----------------------------------------------


@fuzz(15)
@given(a=valid_inputs(), extra=st.integers(1, 8), longer=st.booleans())
def test_query_and_key_lengths_must_agree(a: dict, extra: int, longer: bool) -> None:
    q, k, v = _tensors(a)
    n = a["length"] + extra if longer else max(a["length"] - extra, 1)
    if n == a["length"]:
        n += 1
    k2, v2 = (torch.randn(a["b"], a["hk"], n, a["d"]).to(a["dtype"]) for _ in "kv")
    with pytest.raises(ValueError, match=rf"q has {a['length']} tokens but k/v have {n}"):
        _call(a, q, k2, v2)


@fuzz(15)
@given(a=valid_inputs(), h=st.integers(1, 9))
def test_query_heads_must_be_a_multiple_of_kv_heads(a: dict, h: int) -> None:
    hk = h + 1 if h % 2 else h + 2  # never divides h, or 0 < h < hk
    q = torch.randn(a["b"], h, a["length"], a["d"]).to(a["dtype"])
    k = torch.randn(a["b"], hk, a["length"], a["d"]).to(a["dtype"])
    with pytest.raises(ValueError, match=rf"query heads \({h}\) must be a multiple .*\({hk}\)"):
        _call(a, q, k, k)


@fuzz(10)
@given(a=valid_inputs())
def test_empty_sequence_is_refused(a: dict) -> None:
    q, k, v = (x[:, :, :0] for x in _tensors(a))
    with pytest.raises(ValueError, match=r"sequence length must be >= 1"):
        _call(a, q, k, v)


@fuzz(10)
@given(a=valid_inputs())
def test_empty_head_dim_is_refused(a: dict) -> None:
    q, k, v = (x[..., :0] for x in _tensors(a))
    with pytest.raises(ValueError, match=r"head dim must be >= 1, got 0"):
        _call(a, q, k, v)


@fuzz(10)
@given(a=valid_inputs(), dtype=st.sampled_from([torch.int32, torch.int64, torch.bool]))
def test_non_float_dtype_is_refused(a: dict, dtype: torch.dtype) -> None:
    q, k, v = (x.to(dtype) for x in _tensors(a))
    with pytest.raises(TypeError, match=rf"q has dtype {dtype}; supported"):
        _call(a, q, k, v)


@fuzz(10)
@given(a=valid_inputs(), other=st.sampled_from(DTYPES))
def test_mixed_dtypes_are_refused(a: dict, other: torch.dtype) -> None:
    q, k, v = _tensors(a)
    if other == a["dtype"]:
        other = torch.float32 if other != torch.float32 else torch.float16
    with pytest.raises(TypeError, match=r"q, k, v dtypes differ"):
        _call(a, q, k, v.to(other))


@fuzz(10)
@given(a=valid_inputs(), itr=st.integers(-5, -1))
def test_negative_itr_is_refused(a: dict, itr: int) -> None:
    with pytest.raises(ValueError, match=rf"itr must be >= 0, got {itr}"):
        _call(a, *_tensors(a), itr=itr, quorum=3)


@fuzz(10)
@given(a=valid_inputs(), itr=st.sampled_from([1.5, 2.0, True, False, "2", None]))
def test_non_int_itr_is_refused(a: dict, itr: object) -> None:
    with pytest.raises(TypeError, match=r"itr must be a non-negative int"):
        _call(a, *_tensors(a), itr=itr, quorum=3)


@fuzz(10)
@given(a=valid_inputs(), bad=st.sampled_from([7, 11, 13, 15, 16]), itr=st.integers(1, 3))
def test_quorum_without_an_interest_set_is_refused(a: dict, bad: int, itr: int) -> None:
    with pytest.raises(ValueError, match=rf"\b{bad}\b.*nearest valid quorum size"):
        _call(a, *_tensors(a), itr=itr, quorum=bad)


@fuzz(10)
@given(a=valid_inputs(), levels=st.integers(0, 4), itr=st.integers(0, 3))
def test_quorum_list_must_give_one_size_per_level(a: dict, levels: int, itr: int) -> None:
    if levels == itr:
        levels += 1
    with pytest.raises(ValueError, match=rf"quorum lists {levels} levels but itr is {itr}"):
        _call(a, *_tensors(a), itr=itr, quorum=[3] * levels)


@fuzz(10)
@given(a=valid_inputs(), quorum=st.sampled_from([2, 4, 5, 8]))
def test_quorum_other_than_the_default_at_itr_0_is_refused(a: dict, quorum: object) -> None:
    with pytest.raises(ValueError, match=r"has no effect with itr=0"):
        _call(a, *_tensors(a), itr=0, quorum=quorum)


@fuzz(10)
@given(a=valid_inputs(), scale=st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
def test_scale_must_be_finite_and_positive(a: dict, scale: float) -> None:
    with pytest.raises(ValueError, match=r"scale must be finite and > 0"):
        _call(a, *_tensors(a), scale=scale)


@fuzz(10)
@given(a=valid_inputs(), flag=st.sampled_from([0, 1, "yes", None]))
def test_is_causal_must_be_a_bool(a: dict, flag: object) -> None:
    with pytest.raises(TypeError, match=r"is_causal must be a bool"):
        _call(a, *_tensors(a), is_causal=flag)


@fuzz(10)
@given(a=valid_inputs(), bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_nonfinite_input_is_named(a: dict, bad: float) -> None:
    if a["b"] * a["h"] == 0:
        a = {**a, "b": 1, "h": a["hk"]}
    q, k, v = _tensors(a)
    t = a["length"] // 2
    q[0, 0, t, 0] = bad
    match = rf"q has NaN/Inf at 1 token\(s\) in positions \[{t}, {t}\]"
    with pytest.raises(ValueError, match=match):
        _call(a, q, k, v)
