"""Batched CPU runner calls: kernels on threads of their own, never an OpenMP
team, and bits that do not depend on the thread count.

A CPU runner call must not open an OpenMP team per kernel (on a shared
machine every team waits for a descheduled thread); it runs single-threaded
kernels on threads of its own, and the result is the same for any count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from sdpa_reference import F32, F64, assert_close, make_inputs

import streamcqsa
from streamcqsa.cqs import divide
from streamcqsa.kernels import runner
from streamcqsa.kernels.tokens import gather_runs
from streamcqsa.kernels.torch_ops import TorchBackend


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Recording(TorchBackend):
    """The torch backend, noting which thread ran each kernel and its team size."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def _note(self) -> None:
        with self._lock:
            self.seen.append((threading.get_ident(), torch.get_num_threads()))

    def block_forward(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
        self._note()
        return super().block_forward(*args, **kw)

    def block_backward(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
        self._note()
        return super().block_backward(*args, **kw)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["cells", "calls-at-once"])
def test_a_task_uses_its_threads_without_an_openmp_team(kv_heads: int, torch_threads: None) -> None:
    """Two threads, two kernel threads, each kernel single-threaded: across
    heads when there are enough, across a task's calls when there are not."""
    L = 300
    plan = divide(L, 2, 3, is_causal=False)
    task = max(plan.tasks, key=lambda t: len(t.blocks.blocks))
    q, k, v, dout = (
        gather_runs(t, task.runs).contiguous()
        for t in make_inputs(0, L, 16, F32, B=1, H=4, Hkv=kv_heads)
    )
    torch.set_num_threads(2)
    fwd, bwd = Recording(), Recording()
    out, lse = runner.forward(q, k, v, task.blocks, backend=fwd)
    runner.backward(q, k, v, dout, out, lse, task.blocks, backend=bwd)
    assert torch.get_num_threads() == 2
    for be in (fwd, bwd):
        assert {n for _, n in be.seen} == {1}
        assert len({t for t, _ in be.seen}) == 2


# --- bits ----------------------------------------------------------------------------


def _attention_and_grads(q, k, v, dout, **kw):  # noqa: ANN001, ANN003, ANN202
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = streamcqsa.attention(q, k, v, **kw)
    (out * dout).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    ("B", "H", "Hkv", "D"), [(2, 4, 2, 32), (1, 3, 1, 16), (1, 4, 4, 64)], ids=str
)
def test_bits_do_not_depend_on_the_thread_count(
    B: int, H: int, Hkv: int, D: int, causal: bool, torch_threads: None
) -> None:
    q, k, v, dout = make_inputs(3, 700, D, F32, B=B, H=H, Hkv=Hkv)
    runs = {}
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        runs[n] = _attention_and_grads(q, k, v, dout, itr=2, is_causal=causal)
    for n in (2, 3):
        for name, a, b in zip(("out", "dq", "dk", "dv"), runs[1], runs[n], strict=True):
            assert torch.equal(a, b), f"{name} differs between 1 and {n} threads"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("itr", [1, 3])
def test_threaded_engine_is_as_exact_as_sdpa(itr: int, causal: bool, torch_threads: None) -> None:
    """Against float64, the engine on two kernel threads: within 1.5x of
    SDPA's own error on the same inputs, forward and backward."""
    torch.set_num_threads(2)
    q, k, v, dout = make_inputs(4, 900, 32, F32, B=1, H=4, Hkv=2)
    got = _attention_and_grads(q, k, v, dout, itr=itr, is_causal=causal)
    ref = _sdpa_and_grads(q.to(F64), k.to(F64), v.to(F64), dout.to(F64), causal)
    base = _sdpa_and_grads(q, k, v, dout, causal)
    for name, g, r, s in zip(("out", "dq", "dk", "dv"), got, ref, base, strict=True):
        assert_close(name, g, r, s)


def _sdpa_and_grads(q, k, v, dout, causal):  # noqa: ANN001, ANN202
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    (out * dout).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]
