"""The CPU backend's split of mid-sized causal blocks: exact, and only where it pays."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streamcqsa.kernels import torch_ops
from streamcqsa.kernels.torch_ops import TorchBackend, _split_at

aten = torch.ops.aten


def test_split_only_mid_sized_causal_blocks() -> None:
    assert [_split_at(n, True) for n in (256, 257, 300, 512, 640, 767, 768)] == [
        0,
        128,
        128,
        256,
        320,
        320,
        0,
    ]
    assert _split_at(512, False) == 0


def _count_kernel_calls(monkeypatch) -> dict[str, int]:  # noqa: ANN001
    """Count the backend's calls of the CPU kernels (the test's own reference
    calls go through ``torch.ops.aten`` and are not counted)."""
    calls: dict[str, int] = {}

    def counted(op, name):  # noqa: ANN001, ANN202
        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls[name] = calls.get(name, 0) + 1
            return op(*a, **kw)

        return call

    monkeypatch.setattr(
        torch_ops,
        "aten",
        SimpleNamespace(
            _scaled_dot_product_flash_attention_for_cpu=counted(
                aten._scaled_dot_product_flash_attention_for_cpu, "forward"
            ),
            _scaled_dot_product_flash_attention_for_cpu_backward=counted(
                aten._scaled_dot_product_flash_attention_for_cpu_backward, "backward"
            ),
        ),
    )
    return calls


@pytest.mark.parametrize("n", [300, 512, 701])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_block_matches_the_whole_triangle(monkeypatch, n: int, kv_heads: int) -> None:
    """Forward and backward of a split causal block against the kernel's own
    unsplit call, in float64 (so only rounding can differ), GQA included."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 4, n, 32, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, n, 32, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    be = TorchBackend()
    calls = _count_kernel_calls(monkeypatch)
    out, lse = be.block_forward(q, k, v, causal=True, scale=0.2)
    assert calls == {"forward": 3}  # it did split: two triangles and a rectangle
    ref_out, ref_lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, True, scale=0.2
    )[:2]
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    grads = be.block_backward(dout, q, k, v, ref_out, ref_lse, causal=True, scale=0.2)
    assert calls == {"forward": 3, "backward": 3}
    ref = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, ref_out, ref_lse, 0.0, True, scale=0.2
    )
    for a, b in zip(grads, ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [36, 64, 320])
def test_cuda_branch_traced_on_meta_tensors(monkeypatch, dtype, head_dim) -> None:
    """The CUDA calls, traced on meta tensors (no GPU here): the ops accept our
    arguments, GQA and padded head dims come back in the caller's shapes, the
    flash backward gets the dense call (no cumulative lengths) and the
    memory-efficient backward an lse padded to a multiple of 32 rows."""
    seen: dict[str, tuple] = {}

    def spy(name):  # noqa: ANN001, ANN202
        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            seen[name] = a
            return getattr(aten, name)(*a, **kw)

        return call

    names = [
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    ]
    monkeypatch.setattr(torch_ops, "aten", SimpleNamespace(**{n: spy(n) for n in names}))
    q = torch.empty(1, 4, 333, head_dim, device="meta", dtype=dtype)
    k = torch.empty(1, 2, 333, head_dim, device="meta", dtype=dtype)
    be = TorchBackend()
    out, lse = be.block_forward(q, k, k, causal=True, scale=0.1)
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    grads = be.block_backward(q, q, k, k, out.float(), lse, causal=True, scale=0.1)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    flash = dtype != torch.float32 and head_dim <= 256
    if flash:
        args = seen["_scaled_dot_product_flash_attention_backward"]
        assert args[6] is None and args[7] is None  # cum_seq_q, cum_seq_k
    else:
        args = seen["_scaled_dot_product_efficient_attention_backward"]
        assert args[6].shape[-1] % 32 == 0 and args[6].shape[-1] >= 333  # logsumexp
    assert all(a.shape[-1] % 8 == 0 for a in args[:4])  # head dims padded for the kernels
