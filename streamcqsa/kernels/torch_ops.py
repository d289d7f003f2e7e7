"""PyTorch's private attention ops that return lse: the default backend.

CPU: the flash op for CPU (GQA by broadcast, top-left causal). Half types are
computed as ``kernels.device`` rules (in fp32 unless the CPU multiplies them
in hardware). Its key tiles are 512 wide, so
it computes a causal block of under 512 tokens as a full square: triangles
of between 256 and 768 tokens run as two half triangles and the rectangle
between them.
CUDA: the flash op for fp16/bf16 (head dim <= 256), the memory-efficient op
otherwise. Called directly, these ops skip what SDPA's wrapper does for
them, so it is done here, as SDPA does it:

- head dims padded to a multiple of 8 (zero columns change no score);
- GQA: the flash kernels take fewer kv heads and sum dk/dv over each group
  themselves; the memory-efficient kernels do not, so only there are k and
  v repeated per query head (and dk/dv summed back);
- the flash backward's dense (not varlen) call;
- the memory-efficient backward's lse padded to 32 rows per head, the layout
  its forward returns and its kernel reads;
- the memory-efficient backward computes delta = rowsum(dO * O) itself for
  half types and reads ``out`` with a row stride fixed at heads x head dim,
  so ``out`` (and ``dout``, which it would copy anyway) go in laid out as
  SDPA's forward allocates them: [B, M, H, D] memory viewed as [B, H, M, D];
- the memory-efficient kernels keep row and head strides in int32: an input
  whose strides would overflow (a view into a long task) is copied into that
  same layout, whose strides are heads x head dim and head dim at any length.
  Kernels read rows through strides, so a copy gives the bits of a view.

A row whose scores are all -inf (only NaN/Inf inputs make one) comes back
with lse 0 from the CPU op and +inf from the CUDA flash op; both are set to
-inf, the empty partial, so that a merge gives it no weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamcqsa.kernels.backend import Backend
from streamcqsa.kernels.device import Device
from streamcqsa.kernels.merge import merge_partials, normalize_empty_rows

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_DIM = 256  # the CUDA flash kernels' largest head dim


_SPLIT = (256, 768)  # causal CPU blocks strictly between these sizes are split


def _split_at(n: int, causal: bool) -> int:
    """Where a causal CPU block of n tokens is cut in two (0: not cut)."""
    return n // 2 // 64 * 64 if causal and _SPLIT[0] < n < _SPLIT[1] else 0


def _cpu_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """The CPU flash op, with rows whose scores are all -inf given lse -inf.

    The op returns lse 0 (and out 0) for such rows, a weight a merge would
    count as real; they arise only from -inf scores (NaN/Inf inputs), and
    an lse of exactly 0 is rare otherwise, so the suspects are rechecked."""
    op = aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = op(q, k, v, 0.0, causal, scale=scale)[:2]
    zero = lse == 0
    if not zero.any():
        return out, lse
    lse = lse.clone()
    r = q.shape[1] // k.shape[1]
    for b, h in zero.any(dim=2).nonzero().tolist():
        rows = zero[b, h].nonzero().flatten()
        scores = (q[b, h, rows] @ k[b, h // r].transpose(0, 1)) * scale
        if causal:  # top-left: row i sees keys 0..i
            keys = torch.arange(k.shape[2], device=q.device)
            scores = scores.masked_fill(keys > rows.unsqueeze(1), float("-inf"))
        empty = rows[scores.amax(dim=1) == float("-inf")]
        lse[b, h, empty] = float("-inf")
    return out, lse


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):  # noqa: ANN202
    h = _split_at(q.shape[2], causal) if q.shape[2] == k.shape[2] else 0
    if not h:
        return _cpu_op(q, k, v, causal, scale)
    op = _cpu_op
    a, b = slice(None, h), slice(h, None)
    top = op(q[:, :, a], k[:, :, a], v[:, :, a], True, scale)
    below = op(q[:, :, b], k[:, :, a], v[:, :, a], False, scale)
    diag = op(q[:, :, b], k[:, :, b], v[:, :, b], True, scale)
    # the lower rows merge in fp32, however the kernel computed them
    out = top[0].new_empty(q.shape, dtype=torch.promote_types(q.dtype, torch.float32))
    lse = top[1].new_empty(q.shape[:-1])
    out[:, :, a] = top[0]
    lse[:, :, a] = top[1]
    merge_partials([below[:2], diag[:2]], out=(out[:, :, b], lse[:, :, b]))
    return out.to(top[0].dtype), lse


def _cpu_backward(dout, q, k, v, out, lse, causal: bool, scale: float):  # noqa: ANN001, ANN202
    h = _split_at(q.shape[2], causal) if q.shape[2] == k.shape[2] else 0
    op = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if not h:
        return op(dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    a, b = slice(None, h), slice(h, None)
    rows_a = (dout[:, :, a], q[:, :, a])
    rows_b = (dout[:, :, b], q[:, :, b])
    top = op(*rows_a, k[:, :, a], v[:, :, a], out[:, :, a], lse[:, :, a], 0.0, True, scale=scale)
    below = op(*rows_b, k[:, :, a], v[:, :, a], out[:, :, b], lse[:, :, b], 0.0, False, scale=scale)
    diag = op(*rows_b, k[:, :, b], v[:, :, b], out[:, :, b], lse[:, :, b], 0.0, True, scale=scale)
    dq = torch.cat([top[0], _add(below[0], diag[0])], dim=2)
    dk = torch.cat([_add(top[1], below[1]), diag[1]], dim=2)
    dv = torch.cat([_add(top[2], below[2]), diag[2]], dim=2)
    return dq, dk, dv


def _add(x: Tensor, y: Tensor) -> Tensor:
    """x + y rounded once: in fp32 (or wider) whatever the kernels' dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return (x.to(wide) + y.to(wide)).to(x.dtype)


def _padded_dim(d: int) -> int:
    return -(-d // 8) * 8


def _pad_dim(x: Tensor, d: int) -> Tensor:
    return x if x.shape[-1] == d else F.pad(x, (0, d - x.shape[-1]))


def _uses_flash(dtype: torch.dtype, padded_dim: int) -> bool:
    """The CUDA flash kernels take fp16/bf16 up to head dim 256."""
    return dtype in _HALF and padded_dim <= _FLASH_MAX_DIM


_INT32_MAX = 2**31 - 1


def _efficient_input(
    x: Tensor, heads: int, dp: int, dtype: torch.dtype, *, bmhd: bool = False
) -> Tensor:
    """x [B, h, n, d] as the memory-efficient kernels read it: ``heads`` heads
    (kv heads repeated per query head), head dim padded to ``dp``, ``dtype``,
    row and head strides within int32; with ``bmhd`` in [B, n, heads, dp]
    memory. A copy, when one is needed, is always laid out that way."""
    b, h, n, d = x.shape
    if bmhd:
        laid_out = x.transpose(1, 2).is_contiguous()
    else:
        laid_out = x.stride(3) == 1 and max(x.stride(1), x.stride(2)) <= _INT32_MAX
    if laid_out and h == heads and d == dp and x.dtype == dtype:
        return x
    buf = x.new_empty((b, n, heads, dp), dtype=dtype)
    if dp > d:
        buf[..., d:].zero_()
    buf.view(b, n, h, heads // h, dp)[..., :d].copy_(x.transpose(1, 2).unsqueeze(3))
    return buf.transpose(1, 2)


def _reduce_kv(dk: Tensor, kv_heads: int) -> Tensor:
    if dk.shape[1] == kv_heads:
        return dk
    b, h, n, d = dk.shape
    return dk.reshape(b, kv_heads, h // kv_heads, n, d).sum(dim=2)


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float):  # noqa: ANN202
    heads, m = q.shape[1], q.shape[2]
    d, dp = q.shape[-1], _padded_dim(q.shape[-1])
    if _uses_flash(q.dtype, dp):
        q, k, v = (_pad_dim(x, dp) for x in (q, k, v))
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        out, lse = res[0][..., :d], res[1]
    else:
        q, k, v = (_efficient_input(x, heads, dp, q.dtype) for x in (q, k, v))
        res = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        out, lse = res[0][..., :d], res[1][..., :m]
    # a row whose scores are all -inf (NaN/Inf inputs) must merge as empty
    return out, normalize_empty_rows(out, lse)


def _cuda_backward(dout, q, k, v, out, lse, causal: bool, scale: float):  # noqa: ANN001, ANN202
    heads, kv_heads, m = q.shape[1], k.shape[1], q.shape[2]
    d, dp = q.shape[-1], _padded_dim(q.shape[-1])
    if _uses_flash(q.dtype, dp):
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        q, k, v, dout, out = (_pad_dim(x, dp) for x in (q, k, v, dout, out))
        seed = torch.zeros((), dtype=torch.int64)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse.contiguous(),
            None,  # defined cumulative lengths would select the varlen kernel
            None,
            m,
            k.shape[2],
            0.0,
            causal,
            seed,
            seed,
            scale=scale,
        )[:3]
    else:
        q, k, v = (_efficient_input(x, heads, dp, q.dtype) for x in (q, k, v))
        dout, out = (_efficient_input(x, heads, dp, q.dtype, bmhd=True) for x in (dout, out))
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        rows = F.pad(lse, (0, (-m) % 32), value=float("inf")).contiguous()  # exp(-inf) = 0
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout,
            q,
            k,
            v,
            None,
            out,
            rows,
            seed,
            seed,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
    dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]
    return dq, _reduce_kv(dk, kv_heads), _reduce_kv(dv, kv_heads)


class TorchBackend(Backend):
    name = "torch"

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return Device.of(device).compute_dtype(dtype)

    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        if q.device.type == "cpu":
            return _cpu_forward(q, k, v, causal, scale)
        return _cuda_forward(q, k, v, causal, scale)

    def block_backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if q.device.type == "cpu":
            return _cpu_backward(dout, q, k, v, out, lse, causal, scale)
        return _cuda_backward(dout, q, k, v, out, lse, causal, scale)
