"""Fold children's partials into their parent's, chunk by chunk, in fixed order.

Forward partials merge by lse; gradient partials add. Both go chunk by chunk
of the parent in child order, so any executor that folds the same chunks
(whole or in row pieces) gets the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from streamcqsa.cqs.divide import MergeSource
from streamcqsa.kernels.merge import merge_partials

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
