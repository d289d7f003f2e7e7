"""Every CPU/GPU difference the kernels layer knows, behind one object.

Resolve the caller's device once, where a run starts, with ``Device.of`` and
pass the object down. A bare "cuda" is pinned there to the current device
index: the current CUDA device is a per-thread setting (0 in a fresh worker
thread), so a "cuda" resolved later, elsewhere, could name another device.

The rules it holds:

- CUDA kernels compute every dtype as stored. CPU kernels compute a half
  type as stored where the CPU multiplies it in hardware (bf16 with AMX
  tiles, fp16 with AMX-FP16: there torch's CPU flash kernel is several times
  faster than in fp32, as SDPA itself runs), else in fp32 (there the half
  kernels are no faster, and fp32 is more exact). Either way the error stays
  that of SDPA in the stored dtype: scores, softmax sums and lse are fp32 in
  every kernel, and the partials fold in fp32.
- float64 runs on the CPU only: torch's fused CUDA attention kernels take
  fp16, bf16 and fp32.
- Out-of-memory is ``DeviceOOM`` anywhere, ``torch.cuda.OutOfMemoryError``
  on CUDA, and a failed host allocation on CPU.
- Freeing caches hands back the CUDA caching allocator's free blocks on
  CUDA and the free pooled host buffers (``kernels.workspace``) on CPU.
- Timing uses CUDA events on the device's current stream (reading the
  figure waits for that stream, nothing else) and ``perf_counter`` on CPU.
- Streams and events: on CUDA, copies and writes run on streams of their
  own, ordered by events, and each compute slot computes on a stream of its
  own (``run_on``), so units resident at once overlap, and a Dask thread's
  copy of one unit's result waits for that unit only. On CPU nothing is
  queued, so ``stream()`` is None, ``using(None)`` does nothing, an event
  is complete when recorded (it keeps its host time, for spans) and waiting
  on it returns at once. Code written against these calls runs the same
  bookkeeping on both, synchronously on CPU.
- Host staging buffers are pinned on CUDA (asynchronous copies need it) and
  plain on CPU.
- Where the folds of a unit living on the device run (its subtree's folds,
  and its partial's fold into the pass's accumulator): on a GPU, on the GPU,
  since exp and log round differently there and the engine folds there too;
  on a CPU, on the host. Forward and backward units alike.
- Read-ahead and write-back threads pay off on a GPU (the device computes
  while the host reads); on a CPU only where the compute leaves a core free,
  since their memcpy work would otherwise slow the kernels more than the
  overlap saves. Their own torch ops run single-threaded on CPU, so they
  start no second OpenMP team beside the compute's.
- Memory budgets: a unit living on a GPU may take 40% of what this process
  may still allocate there, per resident unit; elsewhere a unit takes
  ``host_unit_bytes()``: 1/16 of the host's memory (its cgroup limit where
  lower), at least ``HOST_UNIT_MIN`` and at most ``HOST_UNIT_MAX``. A unit
  one level deeper reads the inputs and folds every token k times more, so
  units as large as memory comfortably allows keep a pass's I/O down; the
  share leaves room for the units the I/O threads hold beside the one
  computing. It follows the machine, not the moment (free memory moves),
  so a machine plans a store the same way each time. The automatic plan
  sizes tasks for 80% of a GPU's memory, or ``HOST_TASK_BYTES`` on CPU.
- Dask steps on a GPU need a worker started with the resource ``GPU=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from streamcqsa.errors import DeviceOOM
from streamcqsa.kernels.timing import HostEvent, Timer
from streamcqsa.kernels.workspace import empty_cache as _free_host_pool

_HALF_NAMES = ("float16", "bfloat16")
_CPU_ALLOC_FAILED = "DefaultCPUAllocator: can't allocate memory"
HOST_UNIT_MIN = 256 << 20  # bounds of a unit's host memory where it does not live on a GPU
HOST_UNIT_MAX = 4 << 30
HOST_TASK_BYTES = 1 << 30  # the automatic plan's task budget on CPU


def host_memory_bytes() -> int | None:
    """Physical memory this process may use: the machine's, or its cgroup's
    limit where lower; None where neither can be read."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):  # absent, or "max"
            continue
        total = limit if total is None else min(total, limit)
        break
    return total if total and total > 0 else None


def host_unit_bytes() -> int:
    """A unit's host memory where it does not live on a GPU (the module's rules)."""
    total = host_memory_bytes()
    if total is None:
        return HOST_UNIT_MIN
    return max(HOST_UNIT_MIN, min(HOST_UNIT_MAX, total // 16))


def default_n_cap(device_type: str) -> int:
    """Units resident on a device at once unless the caller says: two on a
    GPU (one's copies overlap the other's kernels), one on a CPU (one unit's
    kernels already take every core)."""
    return 2 if device_type == "cuda" else 1


@functools.cache
def cpu_native_half_types() -> frozenset[str]:
    """The half types this CPU multiplies in hardware (see the module's rules)."""

    def has(name: str) -> bool:
        probe = getattr(torch.cpu, name, None)  # private probes: absent in some torch
        try:
            return bool(probe()) if probe is not None else False
        except RuntimeError:
            return False

    native = set()
    if has("_is_amx_tile_supported"):
        native.add("bfloat16")
    if has("_is_amx_fp16_supported"):
        native.add("float16")
    return frozenset(native)


def compute_dtype_name(device_type: str, dtype: str) -> str:
    """The dtype (by name) kernels on a device type compute a stored dtype in:
    the rule of ``Device.compute_dtype`` (a CPU is this one)."""
    if device_type == "cuda" or dtype not in _HALF_NAMES:
        return dtype
    return dtype if dtype in cpu_native_half_types() else "float32"


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
        return getattr(torch, compute_dtype_name(self.type, str(dtype).removeprefix("torch.")))

    def nonfinite_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The compute dtype for inputs that may hold NaN/Inf: the CPU's
        hardware half kernels do not spread them as the dense float64 rule
        does, so there half types are computed in fp32."""
        half = str(dtype).removeprefix("torch.") in _HALF_NAMES
        return torch.float32 if half and not self.is_cuda else dtype

    @property
    def default_n_cap(self) -> int:
        return default_n_cap(self.type)

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

    def reset_peak(self) -> None:
        """Start counting ``peak_bytes`` afresh."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        """Peak bytes allocated on the device since ``reset_peak``; None on CPU
        (the host's allocations are the process's, not the device's)."""
        return torch.cuda.max_memory_allocated(self.device) if self.is_cuda else None

    def timer(self) -> Timer:
        """``with dev.timer() as t: ...`` then ``t.seconds``."""
        return Timer(self.device if self.is_cuda else None)

    # -- streams and events (see the module's rules) -----------------------------
    def stream(self) -> Any:
        """A new stream on this device; None on CPU."""
        return torch.cuda.Stream(self.device) if self.is_cuda else None

    def using(self, stream: Any) -> Any:
        """A context whose body queues its work on ``stream`` (None: as is)."""
        return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)

    def record(self, stream: Any = None, *, timing: bool = False) -> Any:
        """An event marking the work queued so far on ``stream`` (default: the
        current stream). Host waits on it block rather than spin."""
        if not self.is_cuda:
            return HostEvent()
        ev = torch.cuda.Event(enable_timing=timing, blocking=True)
        ev.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return ev

    def wait(self, event: Any, stream: Any = None) -> None:
        """Work queued later on ``stream`` (default: current) waits for ``event``
        on the device; the host does not wait."""
        if self.is_cuda:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(
                event
            )

    def current_stream(self) -> Any:
        """The calling thread's current stream on this device; None on CPU."""
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    def run_on(self, stream: Any, caller: Any, fn: Callable[[], Any]) -> Any:
        """``fn()`` with its work queued on ``stream``, handed over from and
        back to ``caller`` (a stream of the thread that asked for it), as if
        it had run there: ``stream`` first waits for the work ``caller``
        queued before (the inputs), ``caller`` then waits for ``fn``'s work
        (the results), and the tensors returned, allocated on ``stream``, are
        marked in use on ``caller`` so the allocator does not hand their
        memory to ``stream`` again while ``caller`` may still read them.
        With no stream (a CPU) it is ``fn()``."""
        if stream is None or caller is None:
            return fn()
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                out = fn()
        finally:
            caller.wait_stream(stream)
        for t in _tensors(out):
            if t.device == self.device:
                t.record_stream(caller)
        return out

    def adopt(self, stream: Any, tensors: Any) -> None:
        """Buffers allocated on the current stream become safe to fill on
        ``stream``: it first waits for work queued before they were handed out
        (their memory may have been freed by such work), and the allocator
        learns they are in use there."""
        if stream is None:
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in tensors:
            t.record_stream(stream)

    @property
    def pins_host(self) -> bool:
        """Whether host staging buffers are pinned."""
        return self.is_cuda

    # -- where work runs, and how much memory it may take ---------------------------
    @property
    def folds_on_device(self) -> bool:
        """Whether the folds of a unit living on this device run on it (else on
        the host)."""
        return self.is_cuda

    @property
    def fold_device(self) -> torch.device:
        """Where a unit's folds run."""
        return self.device if self.folds_on_device else torch.device("cpu")

    def overlaps_io(self, compute_cores: int, cores: int) -> bool:
        """Whether units read ahead and write back on threads of their own,
        given the cores the compute slots take out of the machine's."""
        return self.is_cuda or cores > compute_cores

    def enter_io_thread(self) -> None:
        """Set up the calling thread to read and write (not compute)."""
        if not self.is_cuda and torch.get_num_threads() != 1:
            torch.set_num_threads(1)  # per thread under OpenMP: the slots keep their own

    @property
    def dask_resources(self) -> dict[str, int] | None:
        """Resources a Dask step on this device needs from its worker."""
        return {"GPU": 1} if self.is_cuda else None

    def plan_bytes(self) -> int:
        """Task memory the automatic plan sizes for."""
        if self.is_cuda:
            return int(torch.cuda.get_device_properties(self.device).total_memory * 0.8)
        return HOST_TASK_BYTES

    def unit_bytes(self, n_cap: int) -> int:
        """Memory one unit living on this device may take (``n_cap`` resident)."""
        if not self.is_cuda:
            return host_unit_bytes()
        dev = self.device
        allowed = torch.cuda.get_device_properties(dev).total_memory
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a cap set by set_per_process_memory_fraction
            allowed = int(allowed * fraction(dev))
        used = torch.cuda.memory_allocated(dev)  # the caller's own tensors stay
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - used
        return int(0.4 * max(0, min(allowed - used, free)) / max(1, n_cap))


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors in a result: a tensor, or tuples and lists of them."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple | list):
        return [t for item in x for t in _tensors(item)]
    return []
