"""Large host buffers, kept mapped between the partials and units that use them.

A subtree's partials and a unit's inputs are MiB-sized and short-lived.
glibc hands blocks that large back to the kernel on free, so every new one
pays first-touch page faults again: 20-25k faults, 4-8% of an itr=2-3 run on
CPU. PyTorch's CUDA caching allocator solves this on the device; this is the
same idea for the host buffers we own, and only those: a ``Workspace`` lends
views of pooled buffers and takes them back when the caller says nothing
reads them any more. A loan is at most 1/4 larger than asked and free
buffers are capped (``set_cache_limit``), so host memory stays within 5/4
of the plan's working set plus a constant. CUDA tensors are left
to PyTorch, whose allocator also orders reuse across streams.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

MIN_BYTES = 1 << 20  # smaller blocks stay on malloc's heap, which keeps them mapped
_SLACK = 8  # new buffers get 1/8 spare, so the next, slightly longer request fits
_WASTE = 4  # a loan may be up to 1/4 larger than asked, no more


class _HostPool:
    """Free flat byte buffers, oldest first, at most ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.poison = False  # tests: fill given-back buffers with NaN, to expose late reads
        self._free: list[Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Tensor:
        """The smallest free buffer of ``nbytes`` to 5/4 of that, else a new one."""
        with self._lock:
            most = nbytes + nbytes // _WASTE
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= most]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes + nbytes // _SLACK, dtype=torch.uint8)

    def give(self, buf: Tensor) -> None:
        if self.poison:
            buf.fill_(0xFF)  # all-ones bytes: NaN in every float dtype
        with self._lock:
            self._free.append(buf)
            self._trim()

    def _trim(self) -> None:
        total = sum(b.numel() for b in self._free)
        while self._free and total > self.limit:
            total -= self._free.pop(0).numel()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.limit = limit
            self._trim()


_POOL = _HostPool(256 << 20)


def set_cache_limit(nbytes: int) -> None:
    """Most bytes of free host buffers kept for reuse (0 keeps none)."""
    if nbytes < 0:
        raise ValueError(f"cache limit must be >= 0 bytes, got {nbytes}")
    _POOL.set_limit(int(nbytes))


def empty_cache() -> None:
    """Hand every free pooled host buffer back to the allocator."""
    _POOL.clear()


def cached_bytes() -> int:
    """Bytes of free host buffers the pool holds now."""
    return _POOL.free_bytes


class Workspace:
    """Lends pooled host buffers to one call and takes back what it releases.

    Buffers never released (a result that leaves the call) are ordinary
    tensors; the pool forgets them.
    """

    def __init__(self) -> None:
        self._lent: dict[int, tuple[Tensor, torch.Size, torch.dtype]] = {}

    def empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor, pooled when it is a large CPU one."""
        nbytes = math.prod(shape) * dtype.itemsize
        if torch.device(device).type != "cpu" or nbytes < max(MIN_BYTES, 1):
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        buf = _POOL.take(nbytes)
        t = buf[:nbytes].view(dtype).view(tuple(shape))
        self._lent[t.data_ptr()] = (buf, t.shape, t.dtype)
        return t

    def release(self, *tensors: Tensor) -> None:
        """Return buffers lent by ``empty``; nothing may read them after this.

        Only a tensor shaped as lent gives its buffer back: a slice that
        happens to start at the same address does not."""
        for t in tensors:
            if t.device.type != "cpu" or not t.numel():
                continue
            loan = self._lent.get(t.data_ptr())
            if loan is not None and loan[1:] == (t.shape, t.dtype) and t.is_contiguous():
                del self._lent[t.data_ptr()]
                _POOL.give(loan[0])
