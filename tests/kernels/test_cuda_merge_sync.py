"""The merge is branch-free (no host sync on a GPU) and keeps its bits.

A branch on tensor values needs them on the host: on CUDA that waits for the
device on every merge. Meta tensors have no values, so a merge that runs on
them has no such branch. The bits are compared with the implementation that
branched, kept here, on partials with -inf (empty), +inf and NaN rows.
"""

from __future__ import annotations

import pytest
import torch

from streamcqsa.kernels.merge import merge_partials


def _merge_with_branch(parts, out=None):  # noqa: ANN001, ANN202
    """The merge as it was, with its rare-case branch on ``isposinf(m).any()``."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])
    m = lses.amax(dim=0)
    if torch.isposinf(m).any():
        pos = torch.isposinf(m)
        m_safe = torch.where(torch.isfinite(m), m, 0.0)
        w = torch.where(pos, torch.isposinf(lses).to(lses.dtype), torch.exp(lses - m_safe))
        total = w.sum(dim=0)
        lse = torch.where(pos, m, m_safe + torch.log(total))
    else:
        m_safe = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
        w = torch.exp(lses - m_safe)
        total = w.sum(dim=0)
        lse = m_safe + torch.log(total)
    c = (w / total.clamp_min(1.0)).unsqueeze(-1)
    acc = torch.mul(parts[0][0], c[0], out=out[0] if out else None)
    for j in range(1, len(parts)):
        acc.addcmul_(parts[j][0], c[j])
    if out is not None:
        out[1].copy_(lse)
        return out
    return acc, lse


def _partials(seed: int, n: int, specials: bool, dtype=torch.float32):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n):
        out = torch.randn(2, 3, 40, 8, generator=g, dtype=dtype)
        lse = torch.randn(2, 3, 40, generator=g, dtype=dtype) * 30
        if specials:
            pick = torch.rand(lse.shape, generator=g)
            lse[pick < 0.25] = float("-inf")  # empty rows
            lse[(pick > 0.9) & (pick < 0.95)] = float("inf")
            lse[pick > 0.98] = float("nan")
            out[torch.isneginf(lse)] = 0.0
        parts.append((out, lse))
    return parts


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("specials", [False, True])
@pytest.mark.parametrize("into", [False, True])
def test_branch_free_merge_gives_the_same_bits(seed, n, specials, into):
    parts = _partials(seed * 10 + n, n, specials)
    if specials:
        assert any(torch.isposinf(lse).any() for _, lse in parts)
        assert any(torch.isneginf(lse).any() for _, lse in parts)
    outs = []
    for fn in (merge_partials, _merge_with_branch):
        dst = (torch.empty_like(parts[0][0]), torch.empty_like(parts[0][1])) if into else None
        outs.append(fn(parts, out=dst))
    (o1, l1), (o2, l2) = outs
    assert _same_bits(o1, o2) and _same_bits(l1, l2)


def test_rows_without_specials_keep_their_bits_in_float64():
    parts = _partials(7, 4, False, dtype=torch.float64)
    (o1, l1), (o2, l2) = merge_partials(parts), _merge_with_branch(parts)
    assert _same_bits(o1, o2) and _same_bits(l1, l2)


def test_merge_needs_no_values_on_the_host():
    """Runs on meta tensors, which have no values to branch on."""
    parts = [
        (torch.empty(1, 2, 64, 8, device="meta"), torch.empty(1, 2, 64, device="meta"))
        for _ in range(3)
    ]
    out, lse = merge_partials(parts)
    assert out.shape == (1, 2, 64, 8) and lse.shape == (1, 2, 64)
    dst = (torch.empty(1, 2, 64, 8, device="meta"), torch.empty(1, 2, 64, device="meta"))
    assert merge_partials(parts, out=dst) is dst
