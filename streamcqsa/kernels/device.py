"""Every CPU/GPU difference the kernels layer knows, behind one object.

Resolve the caller's device once, where a run starts, with ``Device.of`` and
pass the object down. A bare "cuda" is pinned there to the current device
index: the current CUDA device is a per-thread setting (0 in a fresh worker
thread), so a "cuda" resolved later, elsewhere, could name another device.

The rules it holds:

- CPU kernels compute the half types in fp32 (as fast as the half kernels
  there, and more exact); CUDA kernels compute every dtype as stored.
- float64 runs on the CPU only: torch's fused CUDA attention kernels take
  fp16, bf16 and fp32.
- Out-of-memory is ``DeviceOOM`` anywhere, ``torch.cuda.OutOfMemoryError``
  on CUDA, and a failed host allocation on CPU.
- Freeing caches hands back the CUDA caching allocator's free blocks on
  CUDA and the free pooled host buffers (``kernels.workspace``) on CPU.
- Timing uses CUDA events on the device's current stream (reading the
  figure waits for that stream, nothing else) and ``perf_counter`` on CPU.
- A side stream (copies beside compute) is a CUDA stream; on CPU there is
  nothing to overlap, so it is a no-op context whose ``stream`` is None.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from streamcqsa.errors import DeviceOOM
from streamcqsa.kernels.workspace import empty_cache as _free_host_pool

_HALF = (torch.float16, torch.bfloat16)
_CPU_ALLOC_FAILED = "DefaultCPUAllocator: can't allocate memory"


@dataclass(frozen=True)
class Device:
    """One resolved device: "cpu" or "cuda:N" (always with its index)."""

    device: torch.device

    @classmethod
    def of(cls, spec: str | torch.device | Device = "auto") -> Device:
        """Resolve "auto", "cpu", "cuda", "cuda:N" (or a torch.device).

        ValueError for anything else, for CUDA when torch sees none, and for
        an index past the devices torch sees."""
        if isinstance(spec, Device):
            return spec
        if not isinstance(spec, str | torch.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(spec)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}"
            ) from e
        if dev.type == "cpu":
            return cls(torch.device("cpu"))
        if dev.type != "cuda":
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} asked for, but torch sees no CUDA device")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise ValueError(f"device {str(dev)!r}: torch sees {count} CUDA device(s)")
        return cls(torch.device("cuda", index))

    def __str__(self) -> str:
        return str(self.device)

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype kernels compute a stored dtype in."""
        return torch.float32 if not self.is_cuda and dtype in _HALF else dtype

    @property
    def allows_float64(self) -> bool:
        return not self.is_cuda

    def is_oom(self, e: BaseException) -> bool:
        """Whether ``e`` says this device ran out of memory."""
        if isinstance(e, DeviceOOM):
            return True
        if self.is_cuda:
            return isinstance(e, torch.cuda.OutOfMemoryError)
        return isinstance(e, MemoryError) or (
            isinstance(e, RuntimeError) and _CPU_ALLOC_FAILED in str(e)
        )

    def empty_cache(self) -> None:
        """Hand memory cached for reuse back (see the module's rules)."""
        if self.is_cuda:
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()
        else:
            _free_host_pool()

    def synchronize(self) -> None:
        """Wait for all work queued on this device (CPU work is never queued)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def timer(self) -> Timer:
        """``with dev.timer() as t: ...`` then ``t.seconds``."""
        return Timer(self.device if self.is_cuda else None)

    def side_stream(self) -> Any:
        """A context that runs its body on a new stream; its ``stream`` attribute
        is that stream (None on CPU, where the context does nothing)."""
        if self.is_cuda:
            return torch.cuda.stream(torch.cuda.Stream(self.device))
        return _NoStream()


class _NoStream(contextlib.nullcontext):
    stream = None


class Timer:
    """Seconds its with-block took: CUDA events on ``cuda`` (a device), else
    ``perf_counter``. The CUDA figure is read only when asked for."""

    def __init__(self, cuda: torch.device | None = None) -> None:
        self._cuda = cuda
        self._done = False

    def __enter__(self) -> Timer:
        if self._cuda is not None:
            stream = torch.cuda.current_stream(self._cuda)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record(stream)
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda is not None:
            self._end.record(torch.cuda.current_stream(self._cuda))
        else:
            self._elapsed = time.perf_counter() - self._t0
        self._done = True

    @property
    def seconds(self) -> float:
        if not self._done:
            raise RuntimeError("the timer's with-block has not ended")
        if self._cuda is not None:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._elapsed
