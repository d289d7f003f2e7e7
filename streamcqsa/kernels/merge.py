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


def merge_partials(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge partials over the same rows, in the given order; fp32 in and out.

    out = sum_j w_j out_j / sum_j w_j with w_j = exp(lse_j - max_j lse_j),
    lse = max + log(sum_j w_j). Rows where every part is empty stay empty.
    """
    if not parts:
        raise ValueError("merge_partials needs at least one partial")
    if len(parts) == 1:
        return parts[0]
    lses = [lse for _, lse in parts]
    m = lses[0]
    for lse in lses[1:]:
        m = torch.maximum(m, lse)
    pos_inf = torch.isposinf(m)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weights = [
        torch.where(pos_inf, torch.isposinf(lse).to(lse.dtype), torch.exp(lse - m_safe))
        for lse in lses
    ]
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    nonzero = total > 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, total, torch.ones_like(total)), 0.0)
    out = parts[0][0] * (weights[0] * inv).unsqueeze(-1)
    for (o, _), w in zip(parts[1:], weights[1:], strict=True):
        out.addcmul_(o, (w * inv).unsqueeze(-1))
    lse = torch.where(nonzero, m_safe + torch.log(torch.where(nonzero, total, 1.0)), float("-inf"))
    lse = torch.where(pos_inf, m, lse)
    return out, lse
