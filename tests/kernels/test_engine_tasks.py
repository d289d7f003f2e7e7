"""The engine's tasks: work counted once per pair, partials that follow the CQS
mask, float64 kept float64, and no read of memory left unwritten."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sdpa_reference import (
    F32,
    F64,
    assert_close,
    check_forward,
    make_inputs,
)

import streamcqsa
from streamcqsa.cqs import divide
from streamcqsa.kernels import WorkCounter
from streamcqsa.kernels import forward as task_forward
from streamcqsa.kernels.tokens import gather_runs

# --- work counter -----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("L", "quorum"), [(300, 3), (169, 4), (50, [2, 5])])
def test_work_counter(L: int, quorum: object, causal: bool) -> None:
    B, H = 2, 8
    q, k, v, dout = make_inputs(1, L, 16, F32, B=B, H=H, Hkv=2)
    useful = L * (L + 1) // 2 if causal else L * L
    counter = WorkCounter()
    q.requires_grad_()
    out = streamcqsa.attention(q, k, v, itr=2, quorum=quorum, is_causal=causal, counter=counter)
    assert counter.entries == B * H * useful
    assert counter.calls > 0
    calls = counter.calls
    plan = divide(L, 2, quorum, is_causal=causal)
    assert calls >= len(plan.tasks)
    (out * dout).sum().backward()
    assert counter.entries == 3 * B * H * useful  # backward: 2 per entry
    assert counter.calls == 2 * calls


# --- one task through kernels.forward ---------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_task_partials_follow_the_cqs_mask(causal: bool) -> None:
    """Each task's partial equals float64 attention under the CQS rule: (s, t)
    masked iff at some level both tokens share a chunk the task does not own."""
    L, D = 61, 16
    plan = divide(L, 2, [3, 2], is_causal=causal, tile=4)
    q, k, v, _ = make_inputs(2, L, D, F32, B=1, H=2, Hkv=1)
    scale = 0.4
    for task in plan.tasks:
        tq, tk, tv = (gather_runs(t, task.runs) for t in (q, k, v))
        counter = WorkCounter()
        out, lse = task_forward(
            tq, tk, tv, task.blocks, causal, scale, backend="torch", counter=counter
        )
        assert counter.entries == 2 * task.blocks.entries
        chunks = [s.chunks for s in task.segments for _ in range(s.length)]
        pos = [p for a, n in task.runs for p in range(a, a + n)]
        n = task.length
        allowed = torch.ones(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                for level in range(plan.itr):
                    c = chunks[i][level]
                    if c == chunks[j][level] and c != task.path[level]:
                        allowed[i, j] = False
                if causal and pos[j] > pos[i]:
                    allowed[i, j] = False
        kk = tk.to(F64).repeat_interleave(2, dim=1)
        vv = tv.to(F64).repeat_interleave(2, dim=1)
        scores = (tq.to(F64) @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
        ref_lse = torch.logsumexp(scores, dim=-1)
        empty = ~allowed.any(dim=-1)
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        ref_out = p @ vv
        assert torch.equal(torch.isneginf(lse[0, 0]), empty)
        assert (out[:, :, empty] == 0).all()
        fin = ~empty
        assert torch.allclose(lse[:, :, fin].to(F64), ref_lse[:, :, fin], rtol=1e-6, atol=1e-5)
        assert torch.allclose(out.to(F64), ref_out, rtol=1e-5, atol=1e-5)


# --- fp64 ---------------------------------------------------------------------------


def test_forward_fp64_is_fp64_accurate() -> None:
    check_forward(200, 2, 3, False, 64, F64, seed=9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("itr", [2, 3])
def test_nothing_reads_memory_left_unwritten(monkeypatch, causal, itr):
    """Gathers copy only the rows and keys blocks read, and leaves folded in
    memory skip filling their empty rows. Poison every torch.empty with NaN:
    if anything read such memory, NaN would reach the output or gradients."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, h, 1111, 32, generator=g) for h in (4, 2, 2))
    dout = torch.randn(1, 4, 1111, 32, generator=g)
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True
    )
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    monkeypatch.setattr(torch, "empty", poisoned)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = streamcqsa.attention(qq, kk, vv, itr=itr, is_causal=causal)
    grads = torch.autograd.grad(out, (qq, kk, vv), dout)
    monkeypatch.undo()
    assert_close("out", out.detach(), ref.float(), sdpa)
    assert all(torch.isfinite(gr).all() for gr in grads)
