"""Scalar arguments: numpy scalars of the right kind work, wrong kinds are named.

Also the shared rules of ``streamcqsa.validate`` on their own (shape tuples,
as a store sees them) and the documented lse dtype.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import streamcqsa
from streamcqsa.attention import cached_plan

B, H, HKV, L, D = 1, 4, 2, 40, 8


def rnd(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)


@pytest.fixture(scope="module")
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rnd(B, H, L, D, seed=1), rnd(B, HKV, L, D, seed=2), rnd(B, HKV, L, D, seed=3)


def sdpa(q, k, v, causal: bool, scale: float) -> torch.Tensor:  # noqa: ANN001
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


ints = st.sampled_from([int, np.int8, np.int32, np.int64, np.uint16])
floats = st.sampled_from([float, np.float16, np.float32, np.float64, int, np.int64])
bools = st.sampled_from([bool, np.bool_])


@settings(max_examples=10, deadline=None)
@given(
    itr=st.integers(0, 2),
    itr_type=ints,
    quorum_type=ints,
    as_list=st.booleans(),
    scale=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    scale_type=floats,
    causal=st.booleans(),
    causal_type=bools,
)
def test_numpy_scalars_are_taken_as_their_python_values(
    qkv: tuple[torch.Tensor, ...],
    itr: int,
    itr_type: type,
    quorum_type: type,
    as_list: bool,
    scale: float,
    scale_type: type,
    causal: bool,
    causal_type: type,
) -> None:
    """Same bits as the plain Python arguments, and SDPA's result."""
    scale = scale if scale_type not in (int, np.int64) else 1 + int(scale)
    quorum = [quorum_type(3)] * itr if as_list else quorum_type(3)
    out = streamcqsa.attention(
        *qkv,
        itr=itr_type(itr),
        quorum=quorum,
        scale=scale_type(scale),
        is_causal=causal_type(causal),
        head_group=itr_type(1),
    )
    plain = streamcqsa.attention(*qkv, itr=itr, quorum=3, scale=float(scale), is_causal=causal)
    assert torch.equal(out, plain)
    torch.testing.assert_close(out, sdpa(*qkv, causal, float(scale)), rtol=1e-12, atol=1e-12)


def test_numpy_arguments_reach_the_plan_cache_as_plain_ints(qkv: tuple[torch.Tensor, ...]) -> None:
    cached_plan.cache_clear()
    streamcqsa.attention(*qkv, itr=np.int64(2), quorum=(np.int32(3), np.int64(4)))
    streamcqsa.attention(*qkv, itr=2, quorum=[3, 4])
    assert cached_plan.cache_info().currsize == 1


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"itr": np.bool_(True)}, TypeError, r"itr must be a non-negative int, got"),
        ({"itr": np.float64(2.0)}, TypeError, r"itr must be a non-negative int, got"),
        ({"itr": np.float32(1.0)}, TypeError, r"itr must be a non-negative int, got"),
        ({"itr": np.int64(-1)}, ValueError, r"itr must be >= 0, got -1"),
        ({"itr": torch.tensor(1)}, TypeError, r"itr must be a non-negative int, got"),
        ({"quorum": np.bool_(True)}, TypeError, r"quorum must be an int or a sequence"),
        ({"quorum": np.float64(3.0)}, TypeError, r"quorum must be an int or a sequence"),
        ({"quorum": [np.float32(3.0)]}, TypeError, r"quorum sizes must be ints, got"),
        ({"quorum": [np.bool_(True)]}, TypeError, r"quorum sizes must be ints, got"),
        ({"scale": np.bool_(True)}, TypeError, r"scale must be a float, got"),
        ({"scale": np.float32("nan")}, ValueError, r"scale must be finite and > 0"),
        ({"scale": np.float64(-0.5)}, ValueError, r"scale must be finite and > 0"),
        ({"scale": np.int64(0)}, ValueError, r"scale must be finite and > 0"),
        ({"scale": np.complex64(1)}, TypeError, r"scale must be a float, got"),
        ({"is_causal": np.int64(1)}, TypeError, r"is_causal must be a bool, got"),
        ({"is_causal": np.float32(0)}, TypeError, r"is_causal must be a bool, got"),
        ({"is_causal": torch.tensor(True)}, TypeError, r"is_causal must be a bool, got"),
        ({"allow_nonfinite": 1}, TypeError, r"allow_nonfinite must be a bool, got"),
        ({"head_group": True}, TypeError, r"head_group must be an int, got"),
        ({"head_group": np.float64(1.0)}, TypeError, r"head_group must be an int, got"),
        ({"head_group": np.int64(3)}, ValueError, r"head_group must be a positive divisor"),
    ],
)
def test_wrong_kinds_are_refused(
    qkv: tuple[torch.Tensor, ...], kwargs: dict[str, object], exc: type, pattern: str
) -> None:
    with pytest.raises(exc, match=pattern):
        streamcqsa.attention(*qkv, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "lse_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_lse_dtype_is_the_documented_one(dtype: torch.dtype, lse_dtype: torch.dtype) -> None:
    q, k, v = (rnd(1, 2, 24, 8, seed=s, dtype=dtype) for s in (4, 5, 6))
    out, lse = streamcqsa.attention(q, k, v, itr=1, return_lse=True)
    assert out.dtype == dtype and lse.dtype == lse_dtype
    doc = " ".join(streamcqsa.attention.__doc__.split())  # type: ignore[union-attr]
    assert "float64 for float64 inputs, float32 for the others" in doc
    scores = (q.double() @ k.double().transpose(-1, -2)) * 8**-0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)


# --- streamcqsa.validate on its own ---------------------------------------------------


def test_validate_imports_only_errors_from_the_package() -> None:
    import streamcqsa.validate as validate

    tree = ast.parse(Path(validate.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [m for m in names if m.startswith("streamcqsa")] in ([], ["streamcqsa.errors"])


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        (((2, 4, 16), (2, 2, 16, 8), (2, 2, 16, 8)), r"q must be 4-D \[B, H, L, D\]"),
        (((2, 4, 16, 8), (2, 2, 16, 8, 1), (2, 2, 16, 8)), r"k must be 4-D"),
        (((2, 4, 16, 8), (2, 2, 16, 8), (2, 2, 16, 4)), r"k and v shapes differ"),
        (((2, 4, 16, 8), (3, 2, 16, 8), (3, 2, 16, 8)), r"batch sizes differ: q has 2, k/v"),
        (((2, 4, 16, 8), (2, 2, 16, 4), (2, 2, 16, 4)), r"head dims differ: q has 8"),
        (((2, 4, 16, 8), (2, 2, 12, 8), (2, 2, 12, 8)), r"q has 16 tokens but k/v have 12"),
        (((2, 4, 0, 8), (2, 2, 0, 8), (2, 2, 0, 8)), r"sequence length must be >= 1"),
        (((2, 4, 16, 0), (2, 2, 16, 0), (2, 2, 16, 0)), r"head dim must be >= 1, got 0"),
        (((2, 3, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8)), r"query heads \(3\) must be a multiple"),
        (((2, 4, 16, 8), (2, 0, 16, 8), (2, 0, 16, 8)), r"of key/value heads \(0\)"),
    ],
)
def test_shape_rules(shapes: tuple[tuple[int, ...], ...], pattern: str) -> None:
    from streamcqsa.validate import check_shapes

    with pytest.raises(ValueError, match=pattern):
        check_shapes(*shapes)


def test_shape_rules_accept_gqa_and_numpy_shapes() -> None:
    from streamcqsa.validate import check_shapes

    k = np.zeros((2, 2, 16, 8)).shape
    assert check_shapes((2, 6, 16, 8), k, k) == (2, 6, 2, 16, 8)
    assert all(
        type(x) is int for x in check_shapes((np.int64(1), 2, 3, 4), (1, 1, 3, 4), (1, 1, 3, 4))
    )
