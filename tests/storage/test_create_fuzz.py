"""Fuzzed ``storage.create``: valid input is stored bit for bit, invalid is refused.

The valid strategy draws only inputs ``create`` must take (numpy float32 and
float16, torch bfloat16; any chunking), so every example ends in the check
that the store holds exactly the given q, k, v and problem; a tally asserted
at the end shows it. Each invalid-input rule has its own test: a valid draw
with that one rule broken must raise the named error and leave no store.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from fuzz_inputs import make_store_inputs, store_inputs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamcqsa.storage import create
from streamcqsa.storage import open as open_run
from streamcqsa.storage.layout import to_torch


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def _torch(x: object) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)


def _create(path: Path, a: dict, q: object, k: object, v: object, **kw: object) -> object:
    args = dict(is_causal=a["causal"], chunk_tokens=a["chunk"])
    args.update(kw)
    return create(path, q, k, v, **args)


def test_valid_inputs_are_stored_exactly(tmp_path_factory) -> None:
    tally: Counter[str] = Counter()

    @fuzz(25)
    @given(a=store_inputs())
    def check(a: dict) -> None:
        tally["examples"] += 1
        path = tmp_path_factory.mktemp("fuzz") / "s"
        q, k, v = make_store_inputs(a)
        _create(path, a, q, k, v)
        p = open_run(path).problem
        assert (p.batch, p.heads, p.kv_heads, p.seq_len, p.head_dim) == (
            a["b"], a["h"], a["hk"], a["length"], a["d"],
        )  # fmt: skip
        assert p.dtype == a["dtype"] and p.is_causal == a["causal"]
        g = zarr.open_group(path, mode="r")
        event("reached the stored-bits check")
        tally["exact"] += 1
        for name, x in zip("qkv", (q, k, v), strict=True):
            assert torch.equal(to_torch(g[name][:], p.dtype), _torch(x)), name

    check()
    print(f"\nfuzz: {tally['exact']}/{tally['examples']} examples reached the stored-bits check")
    assert tally["examples"] > 0 and tally["exact"] >= 0.9 * tally["examples"]


# --- one test per invalid-input rule: a named error, no store left ---------------------


def _refused(path: Path, exc: type[Exception], match: str, *args: object, **kw: object) -> None:
    with pytest.raises(exc, match=match):
        _create(path, *args, **kw)
    assert not path.exists(), "a refused store must leave nothing behind"


@fuzz(10)
@given(a=store_inputs(), extra=st.sampled_from([-1, 1, 3]))
def test_query_and_key_lengths_must_agree(tmp_path_factory, a: dict, extra: int) -> None:
    q, _, _ = make_store_inputs(a)
    n = a["length"] + extra if a["length"] + extra >= 1 else a["length"] + 1
    k, _, v = make_store_inputs({**a, "h": a["hk"], "length": n})
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(path, ValueError, rf"q has {a['length']} tokens but k/v have {n}", a, q, k, v)


@fuzz(10)
@given(a=store_inputs(), h=st.integers(1, 7))
def test_query_heads_must_be_a_multiple_of_kv_heads(tmp_path_factory, a: dict, h: int) -> None:
    hk = h + 1  # h < hk: never a multiple
    q, _, _ = make_store_inputs({**a, "h": h})
    k, _, v = make_store_inputs({**a, "h": hk, "hk": hk})
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(path, ValueError, rf"query heads \({h}\) must be a multiple .*\({hk}\)", a, q, k, v)


@fuzz(10)
@given(a=store_inputs(), axis=st.integers(0, 3))
def test_empty_dimensions_are_refused(tmp_path_factory, a: dict, axis: int) -> None:
    empty = tuple(slice(0, 0) if i == axis else slice(None) for i in range(4))
    q, k, v = (x[empty] for x in make_store_inputs(a))
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(path, ValueError, r"all dimensions must be >= 1", a, q, k, v)


@fuzz(10)
@given(a=store_inputs(), dtype=st.sampled_from(["float64", "int16", "int32"]))
def test_unsupported_dtype_is_refused(tmp_path_factory, a: dict, dtype: str) -> None:
    q, k, v = (np.asarray(_torch(x).float()).astype(dtype) for x in make_store_inputs(a))
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(path, TypeError, rf"unsupported dtype dtype\('{dtype}'\)", a, q, k, v)


@fuzz(10)
@given(a=store_inputs(), other=st.sampled_from(["float32", "float16"]))
def test_mixed_dtypes_are_refused(tmp_path_factory, a: dict, other: str) -> None:
    a = {**a, "dtype": "float16" if other == "float32" else "float32"}
    q, k, v = make_store_inputs(a)
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(path, TypeError, r"q, k, v dtypes differ", a, q, k, v.astype(other))


@fuzz(10)
@given(a=store_inputs(), which=st.sampled_from(["k", "v"]))
def test_k_and_v_shapes_must_agree(tmp_path_factory, a: dict, which: str) -> None:
    q, k, v = make_store_inputs(a)
    grown = make_store_inputs({**a, "d": a["d"] + 1})[1]
    k, v = (grown, v) if which == "k" else (k, grown)
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(path, ValueError, r"shapes differ|differ in batch or head dim", a, q, k, v)


@fuzz(10)
@given(a=store_inputs(), causal=st.sampled_from([0, 1, "yes", None]))
def test_is_causal_must_be_a_bool(tmp_path_factory, a: dict, causal: object) -> None:
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(
        path, TypeError, r"is_causal must be a bool", a, *make_store_inputs(a), is_causal=causal
    )


@fuzz(10)
@given(a=store_inputs(), chunk=st.sampled_from([0, -16, 16.0, "16", True]))
def test_chunk_tokens_must_be_a_positive_int(tmp_path_factory, a: dict, chunk: object) -> None:
    path = tmp_path_factory.mktemp("bad") / "s"
    _refused(
        path, (TypeError, ValueError), r"chunk_tokens must be a positive int", a,
        *make_store_inputs(a), chunk_tokens=chunk,
    )  # fmt: skip


@fuzz(10)
@given(a=store_inputs(), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nonfinite_input_is_named(tmp_path_factory, a: dict, bad: float) -> None:
    q, k, v = (_torch(x).clone() for x in make_store_inputs(a))
    t = a["length"] // 2
    k[0, 0, t, 0] = bad
    path = tmp_path_factory.mktemp("bad") / "s"
    match = rf"k has NaN/Inf at 1 token\(s\) in positions \[{t}, {t}\].*nothing was written"
    _refused(path, ValueError, match, a, q, k, v)
