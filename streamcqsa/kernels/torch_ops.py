"""PyTorch's private attention ops that return lse: the default backend.

CPU: the flash op for CPU (GQA by broadcast, top-left causal). Half types are
computed in fp32 on CPU: as fast as the half kernels there and more exact.
CUDA: the flash op for fp16/bf16 (head dim <= 256), the memory-efficient op
otherwise. Called directly, these ops skip what SDPA's wrapper does for
them, so it is done here: head dims padded to a multiple of 8 (zero columns
change no score), the flash backward's dense (not varlen) call, and the
memory-efficient backward's lse padded to 32 rows per head, the layout its
forward returns and its kernel reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamcqsa.kernels.backend import Backend

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_DIM = 256  # the CUDA flash kernels' largest head dim


def _padded_dim(d: int) -> int:
    return -(-d // 8) * 8


def _pad_dim(x: Tensor, d: int) -> Tensor:
    return x if x.shape[-1] == d else F.pad(x, (0, d - x.shape[-1]))


def _expand_kv(k: Tensor, heads: int) -> Tensor:
    if k.shape[1] == heads:
        return k
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def _reduce_kv(dk: Tensor, kv_heads: int) -> Tensor:
    if dk.shape[1] == kv_heads:
        return dk
    b, h, n, d = dk.shape
    return dk.reshape(b, kv_heads, h // kv_heads, n, d).sum(dim=2)


class TorchBackend(Backend):
    name = "torch"

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return dtype

    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, scale=scale
            )
        d, dp = q.shape[-1], _padded_dim(q.shape[-1])
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        q, k, v = (_pad_dim(x, dp) for x in (q, k, v))
        if q.dtype in _HALF and dp <= _FLASH_MAX_DIM:
            res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
            return res[0][..., :d], res[1]
        res = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )
        return res[0][..., :d], res[1][..., : q.shape[2]]

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
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, causal, scale=scale
            )
        kv_heads, m = k.shape[1], q.shape[2]
        d, dp = q.shape[-1], _padded_dim(q.shape[-1])
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        dout, out = dout.to(q.dtype), out.to(q.dtype)
        q, k, v, dout, out = (_pad_dim(x, dp) for x in (q, k, v, dout, out))
        if q.dtype in _HALF and dp <= _FLASH_MAX_DIM:
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
