"""In-memory exact CQS attention with SDPA's conventions, differentiable.

The sequence is divided by a plan; every leaf task runs through the one task
runner (``kernels.runner``); partials fold up the task tree chunk by chunk
(``kernels.fold``). Backward is the exact CQS backward: each task's partial
gradients from the global out and lse, added up the same tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from streamcqsa.cqs.divide import Node, Plan, check_quorum, divide
from streamcqsa.kernels import threads
from streamcqsa.kernels.backend import Backend, get_backend
from streamcqsa.kernels.device import Device
from streamcqsa.kernels.flat import backward_flat, forward_flat
from streamcqsa.kernels.nonfinite import last_nonfinite, poison_masked_rows
from streamcqsa.kernels.runner import WorkCounter, accumulator_dtype
from streamcqsa.kernels.runner import backward as task_backward
from streamcqsa.kernels.runner import forward as task_forward
from streamcqsa.kernels.tree import backward_tree, forward_tree
from streamcqsa.kernels.workspace import Workspace
from streamcqsa.validate import (
    as_flag,
    as_int,
    as_itr,
    as_quorum,
    as_scale,
    check_finite,
    check_tensors,
    supported_dtypes,
)

SUPPORTED_DTYPES = supported_dtypes()


@lru_cache(maxsize=64)
def cached_plan(seq_len: int, itr: int, quorum: int | tuple[int, ...], is_causal: bool) -> Plan:
    return divide(seq_len, itr, quorum, is_causal=is_causal)


class Engine:
    """Runs a plan over in-memory tensors; used by the autograd Function."""

    def __init__(
        self,
        plan: Plan,
        backend: Backend,
        scale: float,
        head_group: int | None = None,
        masked_values: Tensor | None = None,
        fold_depth: int = 0,
        nonfinite: bool = False,
    ) -> None:
        self.plan = plan
        self.nonfinite = nonfinite  # inputs may hold NaN/Inf (``Device.nonfinite_dtype``)
        # 0: the whole tree folded in memory; u > 0: units cut at depth u and
        # folded into whole-sequence accumulators, the bits of a store pass
        # with that unit depth (``kernels.flat``)
        self.fold_depth = fold_depth
        self.backend = backend
        self.scale = scale
        self.head_group = head_group
        self.counter = WorkCounter()
        # last non-finite V token per (batch, kv head, column), from
        # ``kernels.nonfinite.last_nonfinite``: the rows before it get NaN there
        self.masked_values = masked_values

    def units(self, q: Tensor, k: Tensor) -> list[tuple[int, slice, slice]]:
        """(batch, query heads, kv heads) of each unit, as the pipeline splits them.

        Kernel calls then have the same shapes as the pipeline's, which keeps
        kernels whose internal reduction order depends on B*H bit-identical.
        """
        hk = k.shape[1]
        hg = hk if self.head_group is None else self.head_group
        r = q.shape[1] // hk
        return [
            (b, slice(g * hg * r, (g + 1) * hg * r), slice(g * hg, (g + 1) * hg))
            for b in range(q.shape[0])
            for g in range(hk // hg)
        ]

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        with threads.computing(q.device):
            return self._forward(q, k, v)

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, out: Tensor, lse: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        with threads.computing(q.device):
            return self._backward(q, k, v, dout, out, lse)

    def compute_dtype(self, q: Tensor) -> torch.dtype:
        dt = self.backend.compute_dtype(q.dtype, q.device)
        return Device.of(q.device).nonfinite_dtype(dt) if self.nonfinite else dt

    def _forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        dt = self.compute_dtype(q)
        units = self.units(q, k)
        if len(units) == 1:
            out, lse = self._forward_node(self.plan.root, q, k, v, dt)
        else:
            acc = accumulator_dtype(dt)
            out = torch.empty(q.shape, dtype=acc, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
            for b, qh, kh in units:
                o, s = self._forward_node(
                    self.plan.root, q[b : b + 1, qh], k[b : b + 1, kh], v[b : b + 1, kh], dt
                )
                out[b : b + 1, qh] = o
                lse[b : b + 1, qh] = s
        return poison_masked_rows(out, self.masked_values), lse

    def _forward_node(self, node: Node, q: Tensor, k: Tensor, v: Tensor, dt: torch.dtype):
        if self.fold_depth:
            return forward_flat(self.plan, self.fold_depth, (q, k, v), self._leaf_forward, dt)
        return forward_tree(self.plan, node, (q, k, v), self._leaf_forward, dt)

    def _leaf_forward(
        self,
        node: Node,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        fill_empty: bool,
        workspace: Workspace | None = None,
    ):
        return task_forward(
            q,
            k,
            v,
            node.blocks,
            scale=self.scale,
            backend=self.backend,
            counter=self.counter,
            fill_empty=fill_empty,
            workspace=workspace,
        )

    def _backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, out: Tensor, lse: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        dt = self.compute_dtype(q)
        units = self.units(q, k)
        if len(units) == 1:
            return self._backward_node(self.plan.root, (q, k, v, dout, out, lse), dt)
        acc = accumulator_dtype(dt)
        grads = tuple(torch.empty(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
        for b, qh, kh in units:
            one = (
                q[b : b + 1, qh],
                k[b : b + 1, kh],
                v[b : b + 1, kh],
                dout[b : b + 1, qh],
                out[b : b + 1, qh],
                lse[b : b + 1, qh],
            )
            dq, dk, dv = self._backward_node(self.plan.root, one, dt)
            grads[0][b : b + 1, qh] = dq
            grads[1][b : b + 1, kh] = dk
            grads[2][b : b + 1, kh] = dv
        return grads

    def _backward_node(self, node: Node, xs: tuple[Tensor, ...], dt: torch.dtype):
        if self.fold_depth:
            return backward_flat(self.plan, self.fold_depth, xs, self._leaf_backward, dt)
        return backward_tree(self.plan, node, xs, self._leaf_backward, dt)

    def _leaf_backward(self, node: Node, *xs: Tensor, workspace: Workspace | None = None):
        return task_backward(
            *xs,
            node.blocks,
            scale=self.scale,
            backend=self.backend,
            counter=self.counter,
            workspace=workspace,
        )


class _CQSAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, engine: Engine):  # noqa: ANN001, ANN205
        out32, lse = engine.forward(q, k, v)
        out = out32.to(q.dtype)
        ctx.engine = engine
        # like SDPA, backward uses the output as returned (what a store keeps)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.engine.backward(q, k, v, dout, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    itr: int = 1,
    quorum: int | Sequence[int] = 3,
    is_causal: bool = False,
    scale: float | None = None,
    backend: str | Backend = "auto",
    return_lse: bool = False,
    counter: WorkCounter | None = None,
    allow_nonfinite: bool = False,
    head_group: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention of q [B,H,L,D] over k, v [B,Hkv,L,D] by CQS division.

    Matches ``scaled_dot_product_attention(q, k, v, is_causal=..., scale=...,
    enable_gqa=True)``. ``itr`` levels of ``quorum`` (one k, or one per level)
    divide the sequence; ``itr=0`` is one undivided task. Scalar arguments
    follow ``streamcqsa.validate`` (numpy scalars of the right kind are
    accepted; a bool is not an int, nor an int a bool).

    With ``return_lse`` also returns the natural-log lse [B,H,L] in the
    accumulator dtype: float64 for float64 inputs, float32 for the others
    (the half types are accumulated in float32, and a store keeps float32).
    ``counter`` receives the score entries computed (forward and backward).
    Work runs per batch entry and per ``head_group`` kv heads (default: all),
    the units the store pipeline uses, so both give the same bits.

    NaN/Inf inputs raise a ValueError naming the tokens unless
    ``allow_nonfinite``; then the output's NaN/Inf are SDPA's, the same at
    every ``itr``, by the rule of its dense product softmax(q k^T) @ v:
    a masked key's score is -inf whatever q and k hold, so a NaN/Inf in q or k
    reaches only the rows that attend that key; a NaN/Inf in ``v[j, c]``
    reaches column c of every row, as Inf times a positive probability and
    NaN times a zero one (0 * Inf), so in causal attention every row before j
    is NaN there. SDPA's fused CPU kernel follows this rule while the keys
    fit in one of its 512-key tiles; for longer sequences it skips masked
    tiles, leaving some of those earlier rows finite, where its math backend
    (and this function) make them NaN. The rule is the forward's; gradients
    of non-finite inputs are left unspecified.
    """
    b, h, hkv, n, d = check_tensors(q, k, v)
    s = as_scale(scale, d)
    itr = as_itr(itr)
    is_causal = as_flag("is_causal", is_causal)
    allow_nonfinite = as_flag("allow_nonfinite", allow_nonfinite)
    quorum_key = as_quorum(quorum)
    check_quorum(quorum_key, itr)
    if head_group is not None:
        head_group = as_int("head_group", head_group)
        if head_group < 1 or hkv % head_group:
            raise ValueError(f"head_group must be a positive divisor of kv heads ({hkv})")
    if not allow_nonfinite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_finite(name, t.detach())
    plan = cached_plan(n, itr, quorum_key, is_causal)
    masked = last_nonfinite(v.detach()) if allow_nonfinite and is_causal else None
    engine = Engine(
        plan, get_backend(backend, q.device), s, head_group, masked, nonfinite=allow_nonfinite
    )
    if counter is not None:
        engine.counter = counter
    out, lse = _CQSAttention.apply(q, k, v, engine)
    return (out, lse) if return_lse else out
