"""The argument rules every entry point shares: types coerced, shapes checked.

Each layer (planner, kernels, store, pipeline, API, CLI) takes the same
arguments, so the rules live here once and every layer applies them the same
way. This module imports nothing from the package but ``streamcqsa.errors``,
so any layer may use it; torch is imported only by the checks that take
tensors, so the planner can use the scalar rules without it.

Scalar rules: numpy scalars are accepted where Python's of the same kind are
(``np.int64`` for an int, ``np.float32`` for a float, ``np.bool_`` for a
bool) and come back as the plain Python value, so that caches keyed on them
see one key. A bool is never an int here (``itr=True`` is a mistake, not 1),
an int is never a bool (``is_causal=1`` is refused), and a float is never an
int (``itr=2.0`` is refused). Tensors are not scalars.

Shape rules (SDPA's, with ``enable_gqa=True``): q is [B, H, L, D], k and v
are [B, Hkv, L, D] with the same shape, H is a multiple of Hkv, and the
query and key lengths agree (CQS is self-attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


def _is_bool(x: object) -> bool:
    return isinstance(x, (bool, np.bool_))


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not _is_bool(x)


def as_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """``value`` as a plain int: a Python or numpy integer, never a bool or float."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    v = int(value)  # type: ignore[call-overload]
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def as_itr(itr: object) -> int:
    """Division levels: a non-negative int."""
    if not _is_int(itr):
        raise TypeError(f"itr must be a non-negative int, got {itr!r}")
    return as_int("itr", itr, minimum=0)


def as_quorum(quorum: object) -> int | tuple[int, ...]:
    """One quorum size, or a sequence of them (one per level), as plain ints.

    Only types are checked here; which sizes have an interest set, and how
    many levels a list must have, are the planner's rules."""
    if isinstance(quorum, (str, bytes)) or _is_bool(quorum):
        raise TypeError(f"quorum must be an int or a sequence of ints, got {quorum!r}")
    if isinstance(quorum, (Sequence, np.ndarray)):
        sizes = tuple(quorum)
        for k in sizes:
            if not _is_int(k):
                raise TypeError(f"quorum sizes must be ints, got {k!r}")
        return tuple(int(k) for k in sizes)
    if not _is_int(quorum):
        raise TypeError(f"quorum must be an int or a sequence of ints, got {quorum!r}")
    return int(quorum)  # type: ignore[call-overload]


def as_flag(name: str, value: object) -> bool:
    """A Python or numpy bool, as a plain bool (0 and 1 are refused)."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def as_scale(scale: object, head_dim: int) -> float:
    """Score scale: a finite positive real; ``None`` means 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if _is_bool(scale) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return s


def check_shapes(
    q: Sequence[int], k: Sequence[int], v: Sequence[int]
) -> tuple[int, int, int, int, int]:
    """(B, H, Hkv, L, D) of q [B,H,L,D] and k, v [B,Hkv,L,D], by SDPA's rules."""
    for name, s in (("q", q), ("k", k), ("v", v)):
        if len(s) != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(s)}")
    if tuple(k) != tuple(v):
        raise ValueError(f"k and v shapes differ: {tuple(k)} vs {tuple(v)}")
    b, h, lq, d = (int(x) for x in q)
    bk, hk, lk, dk = (int(x) for x in k)
    if b != bk:
        raise ValueError(f"batch sizes differ: q has {b}, k/v have {bk}")
    if d != dk:
        raise ValueError(f"head dims differ: q has {d}, k/v have {dk}")
    if lq != lk:
        raise ValueError(f"q has {lq} tokens but k/v have {lk}: CQS self-attention needs Lq == Lk")
    if lq < 1:
        raise ValueError("sequence length must be >= 1")
    if d < 1:
        raise ValueError(f"head dim must be >= 1, got {d}")
    if hk < 1 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    return b, h, hk, lq, d


def supported_dtypes() -> tuple[Any, ...]:
    """Torch dtypes the in-memory attention takes."""
    import torch

    return (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensors(q: object, k: object, v: object) -> tuple[int, int, int, int, int]:
    """SDPA's rules for q, k, v tensors: types, one dtype, one device, shapes.

    float64 is refused on CUDA: torch's fused attention kernels there take
    float16, bfloat16 and float32 only."""
    import torch

    dtypes = supported_dtypes()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {dtypes}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    assert isinstance(v, torch.Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise TypeError(
            "float64 on CUDA: torch's fused attention kernels take float16, bfloat16 and "
            "float32 there; cast to float32, or run float64 on the CPU"
        )
    return check_shapes(q.shape, k.shape, v.shape)


def check_finite(name: str, x: Tensor, offset: int = 0) -> None:
    """ValueError naming the token range of any NaN/Inf in x [B, H, L, D]."""
    import torch

    # one vectorised pass in the usual case: a NaN/Inf makes the sum non-finite,
    # and a sum that merely overflows falls through to the exact check below
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if torch.isfinite(x.sum(dtype=acc)):
        return
    bad = ~torch.isfinite(x)
    if not bad.any():
        return
    tokens = bad.any(dim=3).any(dim=1).any(dim=0).nonzero().flatten()
    first, last = int(tokens[0]) + offset, int(tokens[-1]) + offset
    raise ValueError(
        f"{name} has NaN/Inf at {len(tokens)} token(s) in positions [{first}, {last}]; "
        "pass allow_nonfinite=True to propagate them like SDPA"
    )


__all__ = [
    "as_flag",
    "as_int",
    "as_itr",
    "as_quorum",
    "as_scale",
    "check_finite",
    "check_shapes",
    "check_tensors",
    "supported_dtypes",
]
