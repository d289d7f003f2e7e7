"""The CUDA block calls against the kernels' own rules, checked without a GPU.

Meta tensors carry shapes and strides but no memory, so the CUDA branch runs
on them with a spy around each op that checks what the kernels would read:

- CUTLASS memory-efficient kernels: no GQA (k, v with the query heads), row
  and head strides in int32, and in the backward ``out`` at a row stride of
  heads x head dim (the kernel computes delta = rowsum(dO * O) itself for
  half types and assumes [B, M, H, D] memory), lse padded to 32 rows;
- flash kernels: GQA taken as is (k, v with the kv heads).

The same bookkeeping (padding, GQA repeat and sum, slicing, lse padding)
also runs on CPU float64 tensors through stand-in ops that keep those rules,
against a float64 reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streamcqsa.kernels import torch_ops
from streamcqsa.kernels.torch_ops import TorchBackend

aten = torch.ops.aten
INT32_MAX = 2**31 - 1
EFF_FWD = "_scaled_dot_product_efficient_attention"
EFF_BWD = "_scaled_dot_product_efficient_attention_backward"
FLASH_FWD = "_scaled_dot_product_flash_attention"
FLASH_BWD = "_scaled_dot_product_flash_attention_backward"


def _efficient_rules(q, k, v, out=None) -> None:  # noqa: ANN001
    """What the CUTLASS kernels assume of the [B, H, M, D] tensors they get
    (the op hands them over transposed to [B, M, H, D])."""
    assert q.shape[1] == k.shape[1] == v.shape[1], "memory-efficient kernels have no GQA"
    for name, t in (("q", q), ("k", k), ("v", v)):
        t = t.transpose(1, 2)
        assert t.stride(-1) == 1, name
        assert t.stride(1) <= INT32_MAX, f"{name}: row stride {t.stride(1)} overflows int32"
        assert t.stride(2) <= INT32_MAX, f"{name}: head stride {t.stride(2)} overflows int32"
    if out is not None:
        o = out.transpose(1, 2)
        assert o.stride(-1) == 1
        assert o.stride(1) == q.shape[1] * v.shape[-1], (
            f"out row stride {o.stride(1)}: the kernel reads it at heads x head dim "
            f"= {q.shape[1] * v.shape[-1]}"
        )


def _spy(monkeypatch, impl=None) -> list[tuple[str, tuple]]:  # noqa: ANN001
    """Record every CUDA op call (checking the kernels' rules), then run
    ``impl[name]`` if given, else the real op (on meta tensors)."""
    calls: list[tuple[str, tuple]] = []

    def wrap(name):  # noqa: ANN001, ANN202
        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls.append((name, a))
            if name == EFF_FWD:
                _efficient_rules(*a[:3])
            if name == EFF_BWD:
                _efficient_rules(a[1], a[2], a[3], out=a[5])
                assert a[6].shape[-1] % 32 == 0 and a[6].is_contiguous()
            return (impl or {}).get(name, getattr(aten, name))(*a, **kw)

        return call

    names = (EFF_FWD, EFF_BWD, FLASH_FWD, FLASH_BWD)
    monkeypatch.setattr(torch_ops, "aten", SimpleNamespace(**{n: wrap(n) for n in names}))
    return calls


def _meta(*shape, dtype=torch.float16):  # noqa: ANN001, ANN002, ANN202
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(2, 2, 320), (4, 2, 300), (8, 8, 264)])
def test_efficient_backward_gets_out_in_sdpa_layout(monkeypatch, dtype, heads, kv_heads, head_dim):
    """Half types past flash's head dims, more than one head: ``out`` reaches
    the backward kernel at the row stride it assumes (the NaN gradients of
    the first GPU run came from reading it at the wrong one)."""
    calls = _spy(monkeypatch)
    q = _meta(1, heads, 333, head_dim, dtype=dtype)
    k = _meta(1, kv_heads, 333, head_dim, dtype=dtype)
    be = TorchBackend()
    out, lse = be.block_forward(q, k, k, causal=True, scale=0.1)
    assert out.shape == q.shape
    out_rows = _meta(1, heads, 400, head_dim, dtype=torch.float32)[:, :, 50:383]  # runner's rows
    grads = be.block_backward(q, q, k, k, out_rows, lse, causal=True, scale=0.1)
    assert [n for n, _ in calls] == [EFF_FWD, EFF_BWD]
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    args = calls[1][1]
    assert args[0].dtype == args[5].dtype == dtype  # dout and out in the kernel's dtype


@pytest.mark.parametrize(
    ("dtype", "head_dim", "task_len", "rows"),
    [
        (torch.float32, 64, 34_000_000, 1024),  # a short block viewed in a long task
        (torch.float16, 320, 6_800_000, 6_800_000),  # one block longer than int32 / D
        (torch.float32, 36, 60_000_000, 512),  # padded: the copy must fit too
    ],
)
def test_efficient_strides_fit_int32_on_long_tasks(monkeypatch, dtype, head_dim, task_len, rows):
    """Views into a task of tens of millions of tokens (meta: no memory)."""
    calls = _spy(monkeypatch)
    q_task = _meta(1, 4, task_len, head_dim, dtype=dtype)
    kv_task = _meta(1, 2, task_len, head_dim, dtype=dtype)
    q, k = q_task[:, :, :rows], kv_task[:, :, task_len - rows :]
    be = TorchBackend()
    out, lse = be.block_forward(q, k, k, causal=False, scale=0.1)
    out_task = _meta(1, 4, task_len, head_dim, dtype=torch.float32)
    lse_task = _meta(1, 4, task_len, dtype=torch.float32)
    grads = be.block_backward(
        out_task[:, :, :rows],
        q,
        k,
        k,
        out_task[:, :, :rows],
        lse_task[:, :, :rows],
        causal=False,
        scale=0.1,
    )
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    assert [n for n, _ in calls] == [EFF_FWD, EFF_BWD]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_path_takes_gqa_unexpanded(monkeypatch, dtype):
    """The flash kernels take fewer kv heads and sum dk/dv per group
    themselves: k and v reach them with the kv heads, not copied per head."""
    calls = _spy(monkeypatch)
    q = _meta(2, 8, 300, 64, dtype=dtype)
    k = _meta(2, 2, 300, 64, dtype=dtype)
    be = TorchBackend()
    out, lse = be.block_forward(q, k, k, causal=True, scale=0.1)
    grads = be.block_backward(q, q, k, k, out.float(), lse, causal=True, scale=0.1)
    assert [n for n, _ in calls] == [FLASH_FWD, FLASH_BWD]
    fwd, bwd = calls[0][1], calls[1][1]
    assert [t.shape[1] for t in fwd[:3]] == [8, 2, 2]
    assert [t.shape[1] for t in bwd[:4]] == [8, 8, 2, 2]  # dout, q, k, v
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]


# --- the same bookkeeping, run on CPU float64 through stand-in kernels ----------


def _cpu_flash(q, k, v, causal, scale):  # noqa: ANN001, ANN202
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]


def _stand_ins() -> dict:
    """CPU float64 versions of the CUDA ops: same arguments and outputs (the
    memory-efficient ones return [B, M, H, D] memory and a 32-padded lse)."""

    def eff_fwd(q, k, v, bias, lse_wanted, p, causal, *, scale):  # noqa: ANN001, ANN202
        out, lse = _cpu_flash(q, k, v, causal, scale)
        sdpa_out = out.transpose(1, 2).contiguous().transpose(1, 2)
        pad = torch.full((*lse.shape[:2], (-lse.shape[2]) % 32), float("nan"), dtype=lse.dtype)
        return sdpa_out, torch.cat([lse, pad], dim=2), None, None

    def eff_bwd(dout, q, k, v, bias, out, lse, seed, off, p, mask, causal, *, scale):  # noqa: ANN001, ANN202
        lse = lse[..., : q.shape[2]].contiguous()
        op = aten._scaled_dot_product_flash_attention_for_cpu_backward
        return (*op(dout, q, k, v, out, lse, 0.0, causal, scale=scale), None)

    def flash_fwd(q, k, v, p, causal, debug, *, scale):  # noqa: ANN001, ANN202
        return _cpu_flash(q, k, v, causal, scale)

    def flash_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, p, causal, s, o, *, scale):  # noqa: ANN001, ANN202
        assert cq is None and ck is None
        op = aten._scaled_dot_product_flash_attention_for_cpu_backward
        return op(dout, q, k, v, out, lse, 0.0, causal, scale=scale)

    return {EFF_FWD: eff_fwd, EFF_BWD: eff_bwd, FLASH_FWD: flash_fwd, FLASH_BWD: flash_bwd}


def _reference(q, k, v, causal: bool, scale: float):  # noqa: ANN001, ANN202
    r = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse.unsqueeze(-1)).exp() @ v.repeat_interleave(r, 1), lse


@pytest.mark.parametrize("path", ["flash", "efficient"])
@pytest.mark.parametrize(
    ("causal", "m", "n", "head_dim"), [(True, 70, 70, 36), (False, 50, 90, 64)]
)
def test_cuda_bookkeeping_on_cpu_matches_float64(monkeypatch, path, causal, m, n, head_dim):
    """GQA (4 query heads, 2 kv heads), padded and unpadded head dims, row
    views into longer tensors as the runner passes them: forward and backward
    of the CUDA branch, computed by stand-in kernels, equal float64."""
    calls = _spy(monkeypatch, _stand_ins())
    monkeypatch.setattr(torch_ops, "_uses_flash", lambda dtype, dp: path == "flash")
    g = torch.Generator().manual_seed(m + n)
    f64 = torch.float64
    q_all = torch.randn(2, 4, m + 9, head_dim, generator=g, dtype=f64)
    k_all, v_all = (torch.randn(2, 2, n + 5, head_dim, generator=g, dtype=f64) for _ in range(2))
    q, k, v = q_all[:, :, 9:], k_all[:, :, :n], v_all[:, :, 5:]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*leaves, causal, 0.3)
    dout = torch.randn(ref_out.shape, generator=g, dtype=f64)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)

    out, lse = torch_ops._cuda_forward(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=1e-10, atol=1e-10)
    out_all = torch.zeros(2, 4, m + 3, head_dim, dtype=f64)
    out_all[:, :, 3:] = ref_out.detach()
    grads = torch_ops._cuda_backward(dout, q, k, v, out_all[:, :, 3:], lse, causal, 0.3)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    fwd = FLASH_FWD if path == "flash" else EFF_FWD
    assert [c for c, _ in calls] == [fwd, FLASH_BWD if path == "flash" else EFF_BWD]
