"""The contract every attention backend meets, and the registry of backends.

A backend computes *one block*: queries against a contiguous key range,
either full or as a top-left causal triangle. It returns the block's output
and natural-log lse (fp32, empty rows as -inf) and, for backward, the
partial gradients given the *global* out and lse of those rows. Masking
never reaches a backend: masked blocks are simply never requested.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Backend(ABC):
    """One device's block kernels."""

    name: str = "abstract"

    def available(self, device: torch.device) -> bool:
        return True

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """Dtype the gathered q/k/v are cast to once per task."""
        return dtype

    @abstractmethod
    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        """(out, lse fp32) for q [B,H,m,D] against k, v [B,Hkv,n,D]."""

    @abstractmethod
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
        """(dq, dk, dv) of this block, from the rows' global out and lse."""


_REGISTRY: dict[str, str] = {
    "torch": "streamcqsa.kernels.torch_ops:TorchBackend",
    "flex": "streamcqsa.kernels.flex:FlexBackend",
    "flash_attn": "streamcqsa.kernels.flash:FlashAttnBackend",
}

BACKENDS = tuple(_REGISTRY)


def get_backend(name: str | Backend, device: torch.device | str = "cpu") -> Backend:
    """Resolve a backend by name; ``"auto"`` picks the best one for the device."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            flash = _load("flash_attn")
            if flash.available(device):
                return flash
        return _load("torch")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from {('auto',) + BACKENDS}")
    backend = _load(name)
    if not backend.available(device):
        raise ValueError(f"backend {name!r} is not available on {device}")
    return backend


_CACHE: dict[str, Backend] = {}


def _load(name: str) -> Backend:
    if name not in _CACHE:
        module, cls = _REGISTRY[name].split(":")
        _CACHE[name] = getattr(importlib.import_module(module), cls)()
    return _CACHE[name]
