"""Bad input to streamcqsa.attention and the planner: clear errors, early."""

from __future__ import annotations

import pytest
import torch

import streamcqsa
from streamcqsa.cqs import divide
from streamcqsa.kernels import forward as task_forward
from streamcqsa.kernels import get_backend, merge_partials


def rnd(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


B, H, HKV, L, D = 2, 4, 2, 16, 8


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rnd(B, H, L, D), rnd(B, HKV, L, D), rnd(B, HKV, L, D)


def test_good_input_works(qkv: tuple[torch.Tensor, ...]) -> None:
    out = streamcqsa.attention(*qkv, itr=2)
    assert out.shape == (B, H, L, D)


# --- shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        (((2, 4, 16, 8), (3, 2, 16, 8), (3, 2, 16, 8)), r"batch sizes differ: q has 2, k/v have 3"),
        (((2, 4, 16, 8), (2, 2, 16, 4), (2, 2, 16, 4)), r"head dims differ: q has 8, k/v have 4"),
        (((2, 4, 16, 8), (2, 2, 16, 8), (2, 2, 16, 6)), r"k and v shapes differ"),
        (((2, 4, 16, 8), (2, 2, 16, 8), (2, 1, 16, 8)), r"k and v shapes differ"),
        (((2, 4, 16, 8), (2, 2, 16, 8), (2, 2, 12, 8)), r"k and v shapes differ"),
        (((2, 4, 16, 8), (2, 2, 12, 8), (2, 2, 12, 8)), r"q has 16 tokens but k/v have 12"),
        (((2, 3, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8)), r"query heads \(3\).*value heads \(2\)"),
        (((2, 2, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8)), r"query heads \(2\).*value heads \(4\)"),
        (((2, 4, 16, 8), (2, 0, 16, 8), (2, 0, 16, 8)), r"key/value heads \(0\)"),
        (((2, 4, 0, 8), (2, 2, 0, 8), (2, 2, 0, 8)), r"sequence length must be >= 1"),
    ],
)
def test_shape_mismatch(shapes: tuple[tuple[int, ...], ...], pattern: str) -> None:
    q, k, v = (rnd(*s) for s in shapes)
    with pytest.raises(ValueError, match=pattern):
        streamcqsa.attention(q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(16, 8), (4, 16, 8), (1, 2, 4, 16, 8)])
def test_not_4d(qkv: tuple[torch.Tensor, ...], which: str, shape: tuple[int, ...]) -> None:
    args = dict(zip("qkv", qkv, strict=True))
    args[which] = rnd(*shape)
    with pytest.raises(ValueError, match=rf"{which} must be 4-D \[B, H, L, D\], got shape"):
        streamcqsa.attention(args["q"], args["k"], args["v"])


def test_zero_head_dim() -> None:
    q, k, v = rnd(1, 2, 8, 0), rnd(1, 2, 8, 0), rnd(1, 2, 8, 0)
    try:
        out = streamcqsa.attention(q, k, v)
    except ValueError as e:
        assert "head dim" in str(e)
    else:
        assert out.shape == (1, 2, 8, 0)


# --- types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtypes", "pattern"),
    [
        ((torch.float32, torch.float16, torch.float32), r"dtypes differ"),
        ((torch.bfloat16, torch.bfloat16, torch.float16), r"dtypes differ"),
        ((torch.float64, torch.float32, torch.float32), r"dtypes differ"),
    ],
)
def test_mixed_dtypes(dtypes: tuple[torch.dtype, ...], pattern: str) -> None:
    q, k, v = (rnd(B, H, L, D, dtype=dt) for dt in dtypes)
    with pytest.raises(TypeError, match=pattern):
        streamcqsa.attention(q, k, v)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]
)
def test_unsupported_dtype(dtype: torch.dtype) -> None:
    q, k, v = (torch.randint(0, 2, (B, H, L, D)).to(dtype) for _ in range(3))
    with pytest.raises(TypeError, match=rf"q has dtype {dtype}; supported"):
        streamcqsa.attention(q, k, v)


@pytest.mark.parametrize(
    ("value", "name"),
    [([[0.5]], "list"), (3.0, "float"), (None, "NoneType"), ("q", "str")],
)
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(qkv: tuple[torch.Tensor, ...], which: str, value: object, name: str) -> None:
    args: dict[str, object] = dict(zip("qkv", qkv, strict=True))
    args[which] = value
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor, got {name}"):
        streamcqsa.attention(args["q"], args["k"], args["v"])  # type: ignore[arg-type]


def test_numpy_array_is_not_a_tensor(qkv: tuple[torch.Tensor, ...]) -> None:
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got ndarray"):
        streamcqsa.attention(q.numpy(), k, v)  # type: ignore[arg-type]


# --- quorum -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quorum", "itr", "nearest"),
    [
        (7, 1, "6 or 8"),
        (11, 1, "10 or 12"),
        (7, 3, "6 or 8"),
        ([3, 7], 2, "6 or 8"),
        ([11, 3, 4], 3, "10 or 12"),
        (16, 1, "17"),
        (1, 1, "2"),
        (0, 2, "2"),
    ],
)
def test_quorum_without_interest_set(
    qkv: tuple[torch.Tensor, ...], quorum: object, itr: int, nearest: str
) -> None:
    bad = quorum if isinstance(quorum, int) else next(k for k in quorum if k in (7, 11))
    pattern = rf"\b{bad}\b.*nearest valid quorum sizes?: {nearest}$"
    with pytest.raises(ValueError, match=pattern):
        streamcqsa.attention(*qkv, itr=itr, quorum=quorum)
    with pytest.raises(ValueError, match=pattern):
        divide(100, itr, quorum)


@pytest.mark.parametrize(
    ("quorum", "itr", "pattern"),
    [
        ([3], 2, r"quorum lists 1 levels but itr is 2"),
        ([3, 3, 3], 2, r"quorum lists 3 levels but itr is 2"),
        ([], 1, r"quorum lists 0 levels but itr is 1"),
        ((3,), 0, r"quorum lists 1 levels but itr is 0"),
    ],
)
def test_quorum_list_length(
    qkv: tuple[torch.Tensor, ...], quorum: object, itr: int, pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        streamcqsa.attention(*qkv, itr=itr, quorum=quorum)
    with pytest.raises(ValueError, match=pattern):
        divide(100, itr, quorum)


@pytest.mark.parametrize(
    ("quorum", "itr"), [("3", 1), (True, 1), (2.5, 1), ([3, "3"], 2), ([3, 2.5], 2)]
)
def test_quorum_wrong_type(qkv: tuple[torch.Tensor, ...], quorum: object, itr: int) -> None:
    with pytest.raises(TypeError, match=r"quorum"):
        streamcqsa.attention(*qkv, itr=itr, quorum=quorum)
    with pytest.raises(TypeError, match=r"quorum"):
        divide(100, itr, quorum)


@pytest.mark.parametrize(("good", "bad", "itr"), [(3, 3.0, 1), ([3, 3], [3.0, 3], 2)])
def test_float_quorum_rejected_even_after_int_quorum(
    qkv: tuple[torch.Tensor, ...], good: object, bad: object, itr: int
) -> None:
    streamcqsa.attention(*qkv, itr=itr, quorum=good)
    with pytest.raises(TypeError, match=r"quorum"):
        streamcqsa.attention(*qkv, itr=itr, quorum=bad)


# --- itr ------------------------------------------------------------------------------


@pytest.mark.parametrize("itr", [-1, -5])
def test_itr_negative(qkv: tuple[torch.Tensor, ...], itr: int) -> None:
    with pytest.raises(ValueError, match=rf"itr must be >= 0, got {itr}"):
        streamcqsa.attention(*qkv, itr=itr)
    with pytest.raises(ValueError, match=r"itr must be >= 0"):
        divide(100, itr)


@pytest.mark.parametrize("itr", [1.5, 2.0, True, False, "2", None])
def test_itr_not_an_int(qkv: tuple[torch.Tensor, ...], itr: object) -> None:
    with pytest.raises(TypeError, match=r"itr must be a non-negative int"):
        streamcqsa.attention(*qkv, itr=itr)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"itr must be an integer"):
        divide(100, itr)  # type: ignore[arg-type]


# --- scale, is_causal, backend ---------------------------------------------------------


@pytest.mark.parametrize("scale", [0, 0.0, -1, -0.5, float("nan"), float("inf"), -float("inf")])
def test_bad_scale_value(qkv: tuple[torch.Tensor, ...], scale: float) -> None:
    with pytest.raises(ValueError, match=r"scale must be finite and > 0"):
        streamcqsa.attention(*qkv, scale=scale)


@pytest.mark.parametrize("scale", ["x", "0.5", True, [0.5], torch.tensor(0.5)])
def test_bad_scale_type(qkv: tuple[torch.Tensor, ...], scale: object) -> None:
    with pytest.raises(TypeError, match=r"scale must be a float"):
        streamcqsa.attention(*qkv, scale=scale)  # type: ignore[arg-type]


@pytest.mark.parametrize("is_causal", [1, 0, "yes", None])
def test_is_causal_not_bool(qkv: tuple[torch.Tensor, ...], is_causal: object) -> None:
    with pytest.raises(TypeError, match=r"is_causal must be a bool"):
        streamcqsa.attention(*qkv, is_causal=is_causal)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["nope", "cuda", "Torch", ""])
def test_unknown_backend(qkv: tuple[torch.Tensor, ...], name: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown backend {name!r}; choose from"):
        streamcqsa.attention(*qkv, backend=name)
    with pytest.raises(ValueError, match=r"unknown backend"):
        get_backend(name)


def test_backend_wrong_type(qkv: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(TypeError, match=r"backend must be a name or a Backend, got int"):
        streamcqsa.attention(*qkv, backend=3)  # type: ignore[arg-type]


def test_flash_backend_unavailable_on_cpu(qkv: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(ValueError, match=r"backend 'flash_attn' is not available on cpu"):
        streamcqsa.attention(*qkv, backend="flash_attn")


# --- planner and kernels ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "pattern"),
    [
        ((0, 1), {}, ValueError, r"seq_len must be >= 1, got 0"),
        ((-3, 1), {}, ValueError, r"seq_len must be >= 1"),
        ((10.0, 1), {}, TypeError, r"seq_len must be an integer"),
        ((10, 1), {"tile": 0}, ValueError, r"tile must be >= 1, got 0"),
        ((10, 1), {"tile": 2.0}, TypeError, r"tile must be an integer"),
        ((10, 2), {"interest_sets": [(0, 1, 3)]}, ValueError, r"interest_sets has 1 entries"),
        ((10, 1, 3), {"interest_sets": [(0, 1, 2)]}, ValueError, r"not a \(7, 3, 1\) difference"),
    ],
)
def test_divide_bad_arguments(
    args: tuple[object, ...], kwargs: dict[str, object], exc: type[Exception], pattern: str
) -> None:
    with pytest.raises(exc, match=pattern):
        divide(*args, **kwargs)  # type: ignore[arg-type]


def test_task_forward_checks_its_blocks() -> None:
    plan = divide(40, 1, 3, is_causal=True)
    task = plan.tasks[0]
    q = rnd(1, 2, task.length, 8)
    with pytest.raises(ValueError, match=r"planned with is_causal=True, called with False"):
        task_forward(q, q, q, task.blocks, False)
    short = q[:, :, :-1]
    with pytest.raises(ValueError, match=rf"task has {task.length} tokens but q has"):
        task_forward(short, short, short, task.blocks, True)


def test_merge_needs_a_partial() -> None:
    with pytest.raises(ValueError, match=r"at least one partial"):
        merge_partials([])


def test_finite_check_survives_an_overflowing_sum():
    """The fast check sums in fp32; a sum that overflows on finite inputs must
    fall through to the exact check, not be taken for a NaN/Inf."""
    from streamcqsa.attention import check_finite

    check_finite("q", torch.full((1, 1, 8, 4), 3e38))
    with pytest.raises(ValueError, match=r"positions \[5, 5\]"):
        x = torch.full((1, 1, 8, 4), 3e38)
        x[0, 0, 5, 1] = float("inf")
        check_finite("q", x)
