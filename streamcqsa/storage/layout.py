"""Names, dtypes and chunking of a run store: the on-disk contract.

A run store is one Zarr v3 group. Its attrs hold the problem (shapes, dtype,
causal flag, scale, input fingerprint) under ``stream_cqsa``; arrays hold
inputs, outputs, gradients, per-depth partials and completion markers.
Everything a reader needs to interpret the arrays lives here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

FORMAT = "stream-cqsa"
FORMAT_VERSION = 1
ATTR = "stream_cqsa"

INPUTS = ("q", "k", "v")
GRADS = ("dq", "dk", "dv")

# zarr has no bfloat16: it is stored as its uint16 bit pattern.
_STORED = {
    "float32": ("float32", torch.float32),
    "float16": ("float16", torch.float16),
    "bfloat16": ("uint16", torch.bfloat16),
}
DTYPES = tuple(_STORED)


def dtype_name(dtype: object) -> str:
    """Canonical name for a torch/numpy dtype or name; TypeError if unsupported."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[arg-type]
        except TypeError as e:
            raise TypeError(f"unsupported dtype {dtype!r}; use one of {DTYPES}") from e
    if name not in _STORED:
        raise TypeError(f"unsupported dtype {dtype!r}; use one of {DTYPES}")
    return name


def stored_dtype(name: str) -> str:
    return _STORED[name][0]


def torch_dtype(name: str) -> torch.dtype:
    return _STORED[name][1]


def to_torch(array: np.ndarray, name: str) -> torch.Tensor:
    """Stored numpy data (uint16 for bf16) as a torch tensor of the logical dtype."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. a memory-mapped .npy: torch wants writable memory
        array = array.copy()
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def to_stored(t: torch.Tensor, name: str) -> np.ndarray:
    """A torch tensor as the numpy array a store keeps (uint16 for bf16)."""
    t = t.detach().to("cpu", torch_dtype(name)).contiguous()
    return (t.view(torch.uint16) if name == "bfloat16" else t).numpy()


@dataclass(frozen=True)
class Problem:
    """What a store holds: enough to rebuild any plan over it."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    dtype: str
    is_causal: bool
    scale: float
    chunk_tokens: int

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def group_ratio(self) -> int:
        return self.heads // self.kv_heads


def default_chunk_tokens(seq_len: int) -> int:
    """Store chunk along L: small enough that a task's runs read little beyond
    what they need, large enough that a billion tokens stay ~15k chunks/head."""
    c = 2048
    while c < 65536 and c * 512 < seq_len:
        c *= 2
    return c
