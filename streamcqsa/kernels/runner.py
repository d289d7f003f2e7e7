"""Run one task: its gathered q, k, v and its blocks in, its partial out.

This is the only place that loops over a task's blocks. The in-memory
``streamcqsa.attention`` and the store pipeline both call it, so both compute
bit-identical partials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamcqsa.cqs.blocks import BlockList
from streamcqsa.kernels.backend import Backend, get_backend
from streamcqsa.kernels.merge import merge_partials
from streamcqsa.kernels.tokens import Tokens, rows
from streamcqsa.kernels.workspace import Workspace

Local = Tensor | Tokens  # a task's local tokens, copied or viewed (``kernels.tokens``)


@dataclass
class WorkCounter:
    """Score entries computed (summed over batch and heads) and kernel calls."""

    entries: int = 0
    calls: int = 0

    def add(self, entries: int, calls: int = 1) -> None:
        self.entries += entries
        self.calls += calls


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulators (fp64 only for fp64 inputs, which want fp64 results)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(blocks: BlockList, q: Local, is_causal: bool | None) -> None:
    if is_causal is not None and bool(is_causal) != blocks.is_causal:
        raise ValueError(
            f"blocks were planned with is_causal={blocks.is_causal}, called with {is_causal}"
        )
    if q.shape[2] != blocks.length:
        raise ValueError(f"task has {blocks.length} tokens but q has {q.shape[2]}")


def forward(
    q: Local,
    k: Local,
    v: Local,
    blocks: BlockList,
    is_causal: bool | None = None,
    scale: float | None = None,
    *,
    backend: str | Backend = "auto",
    counter: WorkCounter | None = None,
    block_device: torch.device | None = None,
    fill_empty: bool = True,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Partial (out fp32 [B,H,L,D], lse fp32 [B,H,L]) of one task.

    With ``block_device`` the task stays where it is and each block's rows
    and keys visit that device alone (the guardrail's divided mode): the same
    kernel calls, merged in the same order, so the same bits.

    Rows with no block stay empty (out 0, lse -inf); with ``fill_empty=False``
    they are left unwritten, for a partial that is folded in memory, where
    the fold never reads a child's empty rows (``Plan.merge_sources``).
    Blocks that reach rows already written merge into them, in block order.
    With ``workspace`` the partial's buffers are lent from it.
    """
    _check(blocks, q, is_causal)
    dev = q.device if block_device is None else torch.device(block_device)
    be = get_backend(backend, dev)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = accumulator_dtype(q.dtype)
    new = torch.empty if workspace is None else workspace.empty
    out = new(q.shape, dtype=acc, device=q.device)
    lse = new(q.shape[:-1], dtype=acc, device=q.device)
    if all(b.fresh for b in blocks.blocks):
        for a, z in blocks.empty_rows if fill_empty else ():
            out[:, :, a:z] = 0.0
            lse[:, :, a:z] = float("-inf")
    else:  # some block merges over rows partly untouched: start from the identity
        out.zero_()
        lse.fill_(float("-inf"))
    bh = q.shape[0] * q.shape[1]
    for b in blocks.blocks:
        o, s = be.block_forward(
            rows(q, b.q_start, b.q_stop).to(dev),
            rows(k, b.k_start, b.k_stop).to(dev),
            rows(v, b.k_start, b.k_stop).to(dev),
            causal=b.causal,
            scale=scale,
        )
        o, s = o.to(out.device), s.to(out.device)
        dst = (out[:, :, b.q_start : b.q_stop], lse[:, :, b.q_start : b.q_stop])
        if b.fresh:  # merging into the identity would give these same bits
            dst[0].copy_(o)
            dst[1].copy_(s)
        else:
            merge_partials([dst, (o.to(acc), s.to(acc))], out=dst)
        if counter is not None:
            counter.add(b.entries * bh)
    return out, lse


def backward(
    q: Local,
    k: Local,
    v: Local,
    dout: Local,
    out: Local,
    lse: Local,
    blocks: BlockList,
    is_causal: bool | None = None,
    scale: float | None = None,
    *,
    backend: str | Backend = "auto",
    counter: WorkCounter | None = None,
    block_device: torch.device | None = None,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Partial (dq, dk, dv) fp32 of one task, from the *global* out and lse rows.

    Per block: P = exp(S * scale - lse), so every block's gradients are exact
    partials of the full gradient and simply add up. With ``workspace`` the
    gradients' buffers are lent from it.
    """
    _check(blocks, q, is_causal)
    dev = q.device if block_device is None else torch.device(block_device)
    be = get_backend(backend, dev)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = accumulator_dtype(q.dtype)
    new = torch.empty if workspace is None else workspace.empty
    dq = new(q.shape, dtype=acc, device=q.device).zero_()
    dk = new(k.shape, dtype=acc, device=q.device).zero_()
    dv = new(v.shape, dtype=acc, device=q.device).zero_()
    bh = q.shape[0] * q.shape[1]
    for b in blocks.blocks:
        qr = slice(b.q_start, b.q_stop)
        kr = slice(b.k_start, b.k_stop)
        gq, gk, gv = be.block_backward(
            rows(dout, b.q_start, b.q_stop).to(dev, q.dtype),
            rows(q, b.q_start, b.q_stop).to(dev),
            rows(k, b.k_start, b.k_stop).to(dev),
            rows(v, b.k_start, b.k_stop).to(dev),
            rows(out, b.q_start, b.q_stop).to(dev, q.dtype),
            rows(lse, b.q_start, b.q_stop).to(dev),
            causal=b.causal,
            scale=scale,
        )
        gq, gk, gv = gq.to(dq.device), gk.to(dq.device), gv.to(dq.device)
        dq[:, :, qr] += gq
        dk[:, :, kr] += gk
        dv[:, :, kr] += gv
        if counter is not None:
            counter.add(2 * b.entries * bh)
    return dq, dk, dv
