"""flash-attn (FA2) as an optional CUDA block backend; imported lazily.

FA2 takes [B, L, H, D], aligns causal masks bottom-right (we only ask for
square diagonal blocks, where both alignments agree) and writes lse = +inf
for empty rows, which we map to -inf. Backward uses PyTorch's CUDA ops: a
block's partial gradients only need the global out and lse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamcqsa.kernels.backend import Backend
from streamcqsa.kernels.merge import normalize_empty_rows
from streamcqsa.kernels.torch_ops import TorchBackend


class FlashAttnBackend(Backend):
    name = "flash_attn"

    def __init__(self) -> None:
        self._torch = TorchBackend()

    def available(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return False
        return True

    def _func(self):  # noqa: ANN202
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError(
                "backend 'flash_attn' needs the flash-attn package "
                "(pip install 'stream-cqsa[flash]', a CUDA source build)"
            ) from e
        return flash_attn_func

    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
            # FA2 takes half types and head dims up to 256 only
            return self._torch.block_forward(q, k, v, causal=causal, scale=scale)
        out, lse, _ = self._func()(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            softmax_scale=scale,
            causal=causal,
            return_attn_probs=True,
        )
        out = out.transpose(1, 2)
        return out, normalize_empty_rows(out, lse.float())

    def block_backward(self, dout, q, k, v, out, lse, *, causal, scale):  # noqa: ANN001
        return self._torch.block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
