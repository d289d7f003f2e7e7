"""In-memory exact CQS attention with SDPA's conventions, differentiable.

The sequence is divided by a plan; every leaf task runs through the one task
runner (``kernels.runner``); partials fold up the task tree chunk by chunk
(``kernels.fold``). Backward is the exact CQS backward: each task's partial
gradients from the global out and lse, added up the same tree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from streamcqsa.cqs.divide import Node, Plan, divide
from streamcqsa.kernels.backend import Backend, get_backend
from streamcqsa.kernels.runner import WorkCounter, accumulator_dtype
from streamcqsa.kernels.runner import backward as task_backward
from streamcqsa.kernels.runner import forward as task_forward
from streamcqsa.kernels.tree import backward_tree, forward_tree
from streamcqsa.kernels.workspace import Workspace

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@lru_cache(maxsize=64)
def cached_plan(seq_len: int, itr: int, quorum: int | tuple[int, ...], is_causal: bool) -> Plan:
    return divide(seq_len, itr, quorum, is_causal=is_causal)


def validate(q: object, k: object, v: object, scale: object) -> float:
    """Check SDPA-style inputs; return the scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.dtype == torch.float64 and q.device.type == "cuda":
        raise TypeError(
            "float64 on CUDA: torch's fused attention kernels take float16, bfloat16 and "
            "float32 there; cast to float32, or run float64 on the CPU"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, h, lq, d = q.shape
    bk, hk, lk, dk = k.shape
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
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def check_finite(name: str, x: Tensor, offset: int = 0) -> None:
    """ValueError naming the token range of any NaN/Inf in x [B, H, L, D]."""
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


def _check_itr(itr: object) -> int:
    if isinstance(itr, bool) or not isinstance(itr, int):
        raise TypeError(f"itr must be a non-negative int, got {itr!r}")
    if itr < 0:
        raise ValueError(f"itr must be >= 0, got {itr}")
    return itr


def _quorum_key(quorum: object) -> int | tuple[int, ...]:
    """Plain ints for the plan cache (3.0 must not hit the entry for 3)."""

    def one(x: object) -> int:
        if isinstance(x, bool) or not hasattr(x, "__index__"):
            raise TypeError(f"quorum sizes must be ints, got {x!r}")
        return int(x.__index__())  # type: ignore[attr-defined]

    if isinstance(quorum, (str, bytes)):
        raise TypeError(f"quorum must be an int or a sequence of ints, got {quorum!r}")
    if hasattr(quorum, "__iter__"):
        return tuple(one(x) for x in quorum)  # type: ignore[union-attr]
    return one(quorum)


class Engine:
    """Runs a plan over in-memory tensors; used by the autograd Function."""

    def __init__(
        self, plan: Plan, backend: Backend, scale: float, head_group: int | None = None
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.scale = scale
        self.head_group = head_group
        self.counter = WorkCounter()

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
        dt = self.backend.compute_dtype(q.dtype, q.device)
        units = self.units(q, k)
        if len(units) == 1:
            return self._forward_node(self.plan.root, q, k, v, dt)
        acc = accumulator_dtype(dt)
        out = torch.empty(q.shape, dtype=acc, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        for b, qh, kh in units:
            o, s = self._forward_node(
                self.plan.root, q[b : b + 1, qh], k[b : b + 1, kh], v[b : b + 1, kh], dt
            )
            out[b : b + 1, qh] = o
            lse[b : b + 1, qh] = s
        return out, lse

    def _forward_node(self, node: Node, q: Tensor, k: Tensor, v: Tensor, dt: torch.dtype):
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

    def backward(
        self, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, out: Tensor, lse: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        dt = self.backend.compute_dtype(q.dtype, q.device)
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
    divide the sequence; ``itr=0`` is one undivided task. With ``return_lse``
    also returns the natural-log lse (fp32, [B,H,L]). ``counter`` receives the
    score entries computed (forward and backward). NaN/Inf inputs raise a
    ValueError naming the tokens unless ``allow_nonfinite``. Work runs per
    batch entry and per ``head_group`` kv heads (default: all), the units the
    store pipeline uses, so both give the same bits.
    """
    s = validate(q, k, v, scale)
    if not allow_nonfinite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_finite(name, t.detach())
    itr = _check_itr(itr)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    plan = cached_plan(q.shape[2], itr, _quorum_key(quorum), is_causal)
    if head_group is not None and (
        isinstance(head_group, bool)
        or not isinstance(head_group, int)
        or head_group < 1
        or k.shape[1] % head_group
    ):
        raise ValueError(f"head_group must be a positive divisor of kv heads ({k.shape[1]})")
    engine = Engine(plan, get_backend(backend, q.device), s, head_group)
    if counter is not None:
        engine.counter = counter
    out, lse = _CQSAttention.apply(q, k, v, engine)
    return (out, lse) if return_lse else out
