"""What every step of a pass needs, shipped once per worker process.

A ``Context`` is plain data (the store, the layout, the device and its
limits) and pickles as such; the store's arrays and the pass's ``Runtime``
are opened or built on first use in each process, never pickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import zarr

from streamcqsa.kernels import threads
from streamcqsa.kernels.device import Device
from streamcqsa.kernels.runner import WorkCounter
from streamcqsa.pipeline.runtime import Runtime, StageTimes
from streamcqsa.storage.layout import torch_dtype
from streamcqsa.storage.runarrays import RunArrays
from streamcqsa.storage.store import open_group
from streamcqsa.storage.units import Layout


def slot_threads(threads: int | None, n_cap: int) -> int:
    """Torch threads per compute slot: ``threads``, else the cores shared by
    ``n_cap`` slots."""
    return threads or max(1, (os.cpu_count() or 1) // max(1, n_cap))


def _at_once(dev: Device, budget_bytes: int | None) -> bool:
    # on a CPU with no memory budget a slot's threads are its own, so its
    # leaves need no device slot each; under a budget the guardrail admits
    # leaves one at a time, each on the whole width
    return not dev.is_cuda and budget_bytes is None


def leaf_width(device: str, threads: int | None, n_cap: int, budget_bytes: int | None) -> int:
    """Leaves a unit may run at once: its slot's threads where its leaves run
    at once, else 1. The unit model counts what that holds
    (``cqs.footprint.tree_rows``)."""
    if not _at_once(Device.of(device), budget_bytes):
        return 1
    return slot_threads(threads, n_cap)


@dataclass
class Context:
    store: Any
    layout: Layout
    kind: str
    backend: str = "auto"
    compute_dtype: str = "float32"  # the kernels' dtype, decided once by ``passes.Pass``
    device: str = "cpu"
    threads: int | None = None  # torch threads per compute slot (default: cores / n_cap)
    distributed: bool = False  # steps run in other processes (each with its own runtime)
    n_cap: int = 2  # units resident per device (the guardrail lowers it on OOM)
    budget_bytes: int | None = None  # device memory budget the guardrail enforces
    overlap_io: bool | None = None  # read ahead / write back (None: see ``unit.overlaps_io``)
    keep_partials: bool = False  # also store each unit's partial, for inspection
    _arrays: RunArrays | None = field(default=None, repr=False, compare=False)
    _runtime: Runtime | None = field(default=None, repr=False, compare=False)
    _dev: Device | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # rebuilt in the receiving process
        state["_arrays"] = state["_runtime"] = state["_dev"] = None
        return state

    def __dask_tokenize__(self) -> str:
        return f"stream-cqsa-context-{id(self)}"

    @property
    def arrays(self) -> RunArrays:
        if self._arrays is None:
            if isinstance(self.store, zarr.Group):
                group = self.store
            else:
                group, _, _ = open_group(self.store)
            self._arrays = RunArrays(group, self.layout, self.kind)
        return self._arrays

    def use_arrays(self, arrays: RunArrays) -> None:
        """Share the driver's open arrays (an in-memory store is never reopened)."""
        self._arrays = arrays

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = Runtime(
                device=self.device,
                n_cap=self.n_cap,
                budget_bytes=self.budget_bytes,
                distributed=self.distributed,
            )
        return self._runtime

    @property
    def stages(self) -> StageTimes:
        return self.runtime.stages

    @property
    def counter(self) -> WorkCounter:
        return self.runtime.counter

    @property
    def dev(self) -> Device:
        """The pass's device: every CPU/GPU difference asks it."""
        if self._dev is None:
            self._dev = Device.of(self.device)
        return self._dev

    @property
    def torch_device(self) -> torch.device:
        return self.dev.device

    def kernel_dtype(self) -> torch.dtype:
        """The dtype the pass's kernels compute in: decided once per pass and
        kept by a resumed one, so every unit of a pass rounds alike."""
        return torch_dtype(self.compute_dtype)

    @property
    def leaves_at_once(self) -> bool:
        """Whether a unit runs its leaves at once on its slot's threads, as the
        in-memory engine does (fewer, wider kernel calls; the same bits):
        ``leaf_width``'s rule, and not under an injected OOM."""
        return _at_once(self.dev, self.budget_bytes) and self.runtime.guardrail.inject is None

    def compute_threads(self) -> int:
        return slot_threads(self.threads, self.n_cap)

    def compute(self, fn: Any) -> Any:
        """Run ``fn`` on one of the pass's compute slots, inside a kernel
        thread scope of the slot's width on the CPU (``kernels.threads``)."""
        device = self.torch_device

        def scoped() -> Any:
            # leaves one by one: the guardrail admits n_cap leaves at a time
            with threads.computing(device, tasks=self.leaves_at_once):
                return fn()

        return self.runtime.compute(scoped, self.compute_threads())


__all__ = ["Context", "leaf_width", "slot_threads"]
