"""The CUDA paths this package's CPU tests trace on meta tensors, run for
real (marker ``gpu``; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

import streamcqsa
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.device import Device
from streamcqsa.kernels.flex import FlexBackend
from streamcqsa.kernels.merge import merge_partials
from streamcqsa.kernels.torch_ops import TorchBackend

pytestmark = pytest.mark.gpu
F64 = torch.float64


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.detach().cpu().double() - ref).norm() / ref.norm()).item()


def _reference(q, k, v, causal: bool, scale: float):  # noqa: ANN001, ANN202
    r = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse.unsqueeze(-1)).exp() @ v.repeat_interleave(r, 1), lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(2, 2, 320), (4, 2, 300)])
def test_efficient_half_gradients_within_sdpa_bounds(dtype, heads, kv_heads, head_dim):
    """Half types past flash's head dims (the memory-efficient backward),
    several heads, GQA: within 1.5x of SDPA's own (memory-efficient) error."""
    g = torch.Generator().manual_seed(head_dim)
    shapes = [(1, heads, 333, head_dim), (1, kv_heads, 333, head_dim), (1, kv_heads, 333, head_dim)]
    q, k, v = (torch.randn(s, generator=g, dtype=F64).to("cuda", dtype) for s in shapes)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    ref_in = [x.detach().cpu().double().requires_grad_() for x in leaves]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(*ref_in, is_causal=True, enable_gqa=True)
    r = heads // kv_heads  # SDPA's GQA would take its math path: give it whole heads
    sd = sdpa(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)
    out = streamcqsa.attention(*leaves, itr=1, is_causal=True)
    dout = torch.randn(ref.shape, generator=g, dtype=F64)
    want = torch.autograd.grad(ref, ref_in, dout)
    theirs = torch.autograd.grad(sd, leaves, dout.to("cuda", dtype))
    ours = torch.autograd.grad(out, leaves, dout.to("cuda", dtype))
    assert _rel(out, ref) <= 1.5 * _rel(sd, ref) + 1e-6
    for got, base, exact in zip(ours, theirs, want, strict=True):
        assert torch.isfinite(got).all()
        assert _rel(got, exact) <= 1.5 * _rel(base, exact) + 1e-6


def test_block_views_into_a_task_past_int32_strides():
    """fp32 (memory-efficient kernels): a block viewed in a task of 34M
    tokens, head stride over 2^31 elements (about 35 GB of device memory)."""
    n, rows, d = 34_000_000, 512, 64
    q_task = torch.empty(1, 2, n, d, device="cuda")
    kv_task = torch.empty(1, 2, n, d, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, kv = q_task[:, :, -rows:], kv_task[:, :, -2 * rows :]
    q.normal_(generator=g)
    kv.normal_(generator=g)
    out, lse = TorchBackend().block_forward(q, kv, kv, causal=False, scale=0.125)
    ref_out, ref_lse = _reference(
        q.cpu().double(), kv.cpu().double(), kv.cpu().double(), False, 0.125
    )
    assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-6
    dq, dk, dv = TorchBackend().block_backward(q, q, kv, kv, out, lse, causal=False, scale=0.125)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_merge_never_waits_for_the_device():
    g = torch.Generator(device="cuda").manual_seed(1)
    parts = [
        (
            torch.randn(1, 4, 256, 64, device="cuda", generator=g),
            torch.randn(1, 4, 256, device="cuda", generator=g),
        )
        for _ in range(3)
    ]
    parts[1][1][0, 0, :8] = float("inf")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        merge_partials(parts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_flex_on_cuda_compiled_only():
    with pytest.raises(ValueError, match="flex"):
        get_backend("flex", "cuda")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 256, 64, generator=g)
    k, v = (torch.randn(1, 2, 256, 64, generator=g) for _ in range(2))
    be = FlexBackend(compile=True)
    out, lse = be.block_forward(q.cuda(), k.cuda(), v.cuda(), causal=True, scale=0.125)
    ref_out, ref_lse = _reference(q.double(), k.double(), v.double(), True, 0.125)
    assert _rel(out, ref_out) < 1e-3 and _rel(lse, ref_lse) < 1e-4


def test_device_on_cuda():
    dev = Device.of("cuda")
    assert dev.device == torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(1024, 1024, device=dev.device)
    with dev.timer() as t:
        x @ x  # noqa: B018
    assert t.seconds > 0
    side = dev.stream()
    dev.adopt(side, [x])
    with dev.using(side):
        y = x * 2
    dev.wait(dev.record(side))  # the current stream waits for ``y`` on the device
    z = y + 1
    dev.synchronize()
    assert torch.equal(z, x * 2 + 1)
    assert torch.equal(y, x * 2)
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device=dev.device)
    except Exception as e:  # noqa: BLE001
        assert dev.is_oom(e)
    else:
        pytest.fail("a 1 PiB allocation succeeded")
    dev.empty_cache()
