"""Exact, associative merging of attention partials (out, lse).

Partials are merged in log space around the running maximum, so nothing ever
exponentiates a raw lse: that overflows fp32 once lse > 88.7, which large
scores reach easily. Empty rows carry lse = -inf and out = 0 and drop out of
any merge. A genuine lse = +inf dominates the rows it appears in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def empty_partial(
    out_shape: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """The merge identity: out = 0, lse = -inf (fp32)."""
    out = torch.zeros(tuple(out_shape), dtype=torch.float32, device=device)
    lse = torch.full(tuple(out_shape[:-1]), float("-inf"), dtype=torch.float32, device=device)
    return out, lse


def normalize_empty_rows(out: Tensor, lse: Tensor) -> Tensor:
    """Map other kernels' empty-row lse encodings (+inf from FA2) to -inf."""
    empty = torch.isposinf(lse) & (out == 0).all(dim=-1)
    return torch.where(empty, torch.full_like(lse, float("-inf")), lse)


def merge_weights(lses: Tensor) -> tuple[Tensor, Tensor]:
    """For partials' lse stacked [S, ...]: the merged lse, and each part's
    weight [S, ..., 1] on its out (the weights of a row sum to 1, or are all
    0 for a row where every part is empty).

    One branch-free formula for every row: a branch on the values would wait
    for the device. Rows whose max is +inf are shared equally by their +inf
    parts; rows without a finite max (all empty, NaN) shift by 0."""
    m = lses.amax(dim=0)
    pos = torch.isposinf(m)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    w = torch.where(pos, torch.isposinf(lses).to(lses.dtype), torch.exp(lses - m_safe))
    total = w.sum(dim=0)
    lse = torch.where(pos, m, m_safe + torch.log(total))  # total == 0 (all empty) gives -inf
    # total is 0 or >= 1 (the max term is exp(0)), so clamping only fixes 0/0
    return lse, (w / total.clamp_min(1.0)).unsqueeze(-1)


def merge_partials(
    parts: Sequence[tuple[Tensor, Tensor]],
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge partials over the same rows, in the given order; fp32 in and out.

    out = sum_j w_j out_j / sum_j w_j with w_j = exp(lse_j - max_j lse_j),
    lse = max + log(sum_j w_j). Rows where every part is empty stay empty.
    With ``out`` the result is written into those (out, lse) tensors.
    """
    if not parts:
        raise ValueError("merge_partials needs at least one partial")
    if len(parts) == 1:
        if out is None:
            return parts[0]
        out[0].copy_(parts[0][0])
        out[1].copy_(parts[0][1])
        return out
    lse, c = merge_weights(torch.stack([lse for _, lse in parts]))
    acc = torch.mul(parts[0][0], c[0], out=out[0] if out else None)
    for j in range(1, len(parts)):
        acc.addcmul_(parts[j][0], c[j])
    if out is not None:
        out[1].copy_(lse)
        return out
    return acc, lse
