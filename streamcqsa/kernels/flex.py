"""FlexAttention as a block backend (forward); backward uses PyTorch's ops.

Each call is one full block or one causal triangle, so nothing masked is
computed beyond the triangle's upper half. FlexAttention has no backward on
CPU, and a block's backward only needs the global out and lse, so backward
goes through the torch backend.

Uncompiled, FlexAttention runs an unfused path that materialises each
block's whole score matrix (and ``create_block_mask`` its whole mask). On
CUDA that defeats the point of a fused kernel and can exhaust the device,
so there the backend runs only compiled: ``FlexBackend(compile=True)``
wraps ``flex_attention`` and the mask builder in ``torch.compile`` (which
needs Triton, and compiles per block shape). The registry's ``"flex"`` is
the uncompiled one, for the CPU, where it is a reference for the other
backends; on CUDA it refuses with a ValueError saying so.

The lse is asked for with ``return_aux=AuxRequest(lse=True)`` where torch
has it; older torch (before ``AuxRequest``) takes ``return_lse=True``. Both
give natural-log lse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from streamcqsa.kernels.backend import Backend
from streamcqsa.kernels.torch_ops import TorchBackend

_UNCOMPILED_ON_CUDA = (
    "backend 'flex' on CUDA runs only compiled: uncompiled FlexAttention materialises "
    "every block's full score matrix. Use FlexBackend(compile=True) "
    "(streamcqsa.kernels.flex; needs Triton), or backend='torch'"
)


def _causal(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's mask_mod signature
    return q_idx >= kv_idx


def _lse_request() -> dict[str, Any]:
    """The keyword that makes flex_attention return its lse in this torch."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


class FlexBackend(Backend):
    name = "flex"

    def __init__(self, compile: bool = False) -> None:
        self.compile = bool(compile)
        self._torch = TorchBackend()
        self._masks: dict[tuple[int, str], object] = {}
        self._fns: tuple[Any, Any] | None = None

    def available(self, device: torch.device) -> bool:
        return self.unavailable_reason(device) is None

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        """Why this backend cannot run on ``device`` (None: it can)."""
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return "this torch has no torch.nn.attention.flex_attention"
        if torch.device(device).type == "cuda" and not self.compile:
            return _UNCOMPILED_ON_CUDA
        return None

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return self._torch.compute_dtype(dtype, device)

    def _functions(self, device: torch.device) -> tuple[Any, Any]:
        """(flex_attention, create_block_mask), compiled when asked for."""
        reason = self.unavailable_reason(device)
        if reason is not None:
            raise ValueError(reason)
        if self._fns is None:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            if self.compile:
                flex_attention = torch.compile(flex_attention)
            self._fns = (flex_attention, create_block_mask)
        return self._fns

    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        flex_attention, create_block_mask = self._functions(q.device)
        mask = None
        if causal:
            key = (q.shape[2], str(q.device))
            if key not in self._masks:
                n = q.shape[2]
                self._masks[key] = create_block_mask(
                    _causal, None, None, n, n, device=str(q.device), _compile=self.compile
                )
            mask = self._masks[key]
        out, aux = flex_attention(
            q,
            k,
            v,
            block_mask=mask,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
            **_lse_request(),
        )
        lse = aux if isinstance(aux, Tensor) else aux.lse
        return out, lse if lse.dtype == torch.float64 else lse.float()

    def block_backward(self, dout, q, k, v, out, lse, *, causal, scale):  # noqa: ANN001
        return self._torch.block_backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
