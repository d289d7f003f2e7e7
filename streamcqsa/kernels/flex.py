"""FlexAttention as a block backend (forward); backward uses PyTorch's ops.

Each call is one full block or one causal triangle, so nothing masked is
computed beyond the triangle's upper half. FlexAttention has no backward on
CPU, and a block's backward only needs the global out and lse, so backward
goes through the torch backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from streamcqsa.kernels.backend import Backend
from streamcqsa.kernels.torch_ops import TorchBackend


def _causal(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's mask_mod signature
    return q_idx >= kv_idx


class FlexBackend(Backend):
    name = "flex"

    def __init__(self) -> None:
        self._torch = TorchBackend()
        self._masks: dict[tuple[int, str], object] = {}

    def available(self, device: torch.device) -> bool:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return False
        return True

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return self._torch.compute_dtype(dtype, device)

    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = None
        if causal:
            key = (q.shape[2], str(q.device))
            if key not in self._masks:
                self._masks[key] = create_block_mask(
                    _causal, None, None, q.shape[2], q.shape[2], device=str(q.device)
                )
            mask = self._masks[key]
        out, lse = flex_attention(
            q,
            k,
            v,
            block_mask=mask,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
            return_lse=True,
        )
        return out, _natural_log(lse)

    def block_backward(self, dout, q, k, v, out, lse, *, causal, scale):  # noqa: ANN001
        return self._torch.block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)


def _natural_log(lse: Tensor) -> Tensor:
    """FlexAttention's lse is natural log in current torch; kept as a hook."""
    return lse.float() * (1.0 if _LSE_IS_NATURAL else math.log(2.0))


_LSE_IS_NATURAL = True
