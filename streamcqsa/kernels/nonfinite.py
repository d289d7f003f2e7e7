"""NaN/Inf in V reach the rows that do not attend them, as in SDPA's dense product.

SDPA multiplies the probabilities by V as one dense product, so a masked
key's probability is an exact 0 and 0 * Inf = 0 * NaN = NaN: a non-finite
``v[j, c]`` makes column ``c`` of every row before ``j`` NaN in causal
attention. CQS never multiplies a masked key's probability by its value
(most masked pairs are in no task at all), so without this step how many
rows turned NaN would depend on how the plan happened to cut the sequence.
Rows that attend ``j`` need nothing: the task kernels and the lse merge
carry Inf (times a positive weight) and NaN (times any weight) there.

Both helpers work on token ranges, so a caller that streams V in chunks can
fold ``last_nonfinite`` over them (``torch.maximum``) and poison each range
of output rows as it is written.
"""

from __future__ import annotations

import torch
from torch import Tensor


def last_nonfinite(v: Tensor, offset: int = 0) -> Tensor | None:
    """[B, Hkv, D] int64: the last token (plus ``offset``) with a non-finite
    value in each column of v [B, Hkv, n, D], -1 for none; None if v is finite."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    if torch.isfinite(v.sum(dtype=acc)):  # one pass in the usual case
        return None
    bad = ~torch.isfinite(v)
    if not bad.any():  # the sum merely overflowed
        return None
    pos = torch.arange(offset, offset + v.shape[2], device=v.device).view(1, 1, -1, 1)
    return torch.where(bad, pos, -1).amax(dim=2)


def poison_masked_rows(out: Tensor, last: Tensor | None, start: int = 0) -> Tensor:
    """Set ``out[b, h, i, c]`` to NaN where a later token holds a non-finite
    ``v[b, h // (H/Hkv), :, c]``; out [B, H, n, D] are the rows from ``start``.

    In place; returns ``out``. Only causal attention has such rows."""
    if last is None or out.numel() == 0:
        return out
    b, h, n, d = out.shape
    hk = last.shape[1]
    rows = torch.arange(start, start + n, device=out.device).view(1, 1, 1, n, 1)
    mask = rows < last.to(out.device).view(b, hk, 1, 1, d)  # [B, Hkv, 1, n, D]
    out.unflatten(1, (hk, h // hk)).masked_fill_(mask, float("nan"))  # a view at any strides
    return out


__all__ = ["last_nonfinite", "poison_masked_rows"]
