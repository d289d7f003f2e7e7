"""Fold children's partials into their parent's, chunk by chunk, in fixed order.

Forward partials merge by lse; gradient partials add. Both go chunk by chunk
of the parent in child order, so any executor that folds the same chunks
(whole or in row pieces) gets the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from streamcqsa.cqs.divide import MergeSource
from streamcqsa.kernels.merge import merge_partials, merge_weights

Path = tuple[int, ...]


def sum_partials(
    parts: Sequence[tuple[Tensor, ...]], out: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, ...]:
    """Add gradient partials in order (fp32), into ``out`` if given."""
    if out is None:
        acc = tuple(t.clone() for t in parts[0])
    else:
        acc = out
        for a, t in zip(acc, parts[0], strict=True):
            a.copy_(t)
    for p in parts[1:]:
        for a, t in zip(acc, p, strict=True):
            a += t
    return acc


def fold(
    sources: Sequence[MergeSource],
    parts: Mapping[Path, tuple[Tensor, ...]],
    out: tuple[Tensor, ...],
    combine: Callable[..., tuple[Tensor, ...]],
    identity: tuple[float, ...],
) -> tuple[Tensor, ...]:
    """Write the fold of ``parts`` into the parent tensors ``out`` (may be empty).

    Every tensor is [B, H, rows, ...]; ``combine(pieces, out=...)`` writes in
    place. Rows of chunks with no sources get ``identity`` (per tensor).
    """
    for src in sources:
        rows = slice(src.start, src.start + src.length)
        dst = tuple(t[:, :, rows] for t in out)
        if not src.sources:
            for t, value in zip(dst, identity, strict=True):
                t.fill_(value)
            continue
        pieces = [
            tuple(t[:, :, off : off + src.length] for t in parts[path]) for path, off in src.sources
        ]
        combine(pieces, out=dst)
    return out


def merge_combine(
    parts: Sequence[tuple[Tensor, ...]], out: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, ...]:
    return merge_partials([(p[0], p[1]) for p in parts], out=out)  # type: ignore[arg-type]


def merge_fold(
    sources: Sequence[MergeSource],
    parts: Mapping[Path, tuple[Tensor, ...]],
    out: tuple[Tensor, ...],
) -> tuple[Tensor, ...]:
    """``fold(sources, parts, out, merge_combine, (0, -inf))`` with the same
    bits and fewer, larger torch calls.

    A node's fold is many short row ranges (a few hundred rows each at
    itr 3), and merging each on its own costs some twenty small calls whose
    dispatch outweighs their arithmetic. Here the ranges with two or more
    sources have their lse stacked into one [S, B, H, rows] tensor, the
    merge weights are computed once for all of them, and each range then
    only scales and adds its outs. Missing sources stack as empty partials
    (lse -inf), whose weight is exactly 0 and which add nothing, so every
    row sees the arithmetic ``merge_partials`` does for its own sources."""
    multi = [src for src in sources if len(src.sources) > 1]
    if len(multi) < 2:
        return fold(sources, parts, out, merge_combine, (0.0, -math.inf))
    few = [src for src in sources if len(src.sources) < 2]
    fold(few, parts, out, merge_combine, (0.0, -math.inf))
    lse0 = parts[multi[0].sources[0][0]][1]
    depth = max(len(src.sources) for src in multi)
    rows = sum(src.length for src in multi)
    lses = torch.full(
        (depth, *lse0.shape[:2], rows), -math.inf, dtype=lse0.dtype, device=lse0.device
    )
    at = 0
    for src in multi:
        for j, (path, off) in enumerate(src.sources):
            lses[j, :, :, at : at + src.length] = parts[path][1][:, :, off : off + src.length]
        at += src.length
    lse, c = merge_weights(lses)
    at = 0
    for src in multi:
        dst = out[0][:, :, src.start : src.start + src.length]
        span = slice(at, at + src.length)
        for j, (path, off) in enumerate(src.sources):
            piece = parts[path][0][:, :, off : off + src.length]
            if j == 0:
                torch.mul(piece, c[0, :, :, span], out=dst)
            else:
                dst.addcmul_(piece, c[j, :, :, span])
        out[1][:, :, src.start : src.start + src.length] = lse[:, :, span]
        at += src.length
    return out
