"""A unit's leaves, each through the device guardrail, timed apart from waits.

The leaf runner ``kernels.tree`` calls for every leaf of a unit's subtree:
the same kernel calls as the in-memory engine's, whole or (after the
guardrail ran out of device memory) block by block, so the same bits.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from streamcqsa.cqs.plan import Node
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.runner import backward as task_backward
from streamcqsa.kernels.runner import forward as task_forward
from streamcqsa.kernels.timing import Timer
from streamcqsa.kernels.workspace import Workspace
from streamcqsa.pipeline.context import Context
from streamcqsa.pipeline.guardrail import block_bytes, task_bytes
from streamcqsa.storage.units import Unit


class Leaves:
    """Runs a unit's leaves (``forward``/``backward`` are ``kernels.tree``
    leaf runners) and adds the unit's stage times."""

    def __init__(self, ctx: Context, unit: Unit, dt: torch.dtype, on_device: bool = False) -> None:
        self.ctx, self.unit = ctx, unit
        self.on_device = on_device  # partials stay on the device for the unit's folds
        self.dev = ctx.torch_device
        self.be = get_backend(ctx.backend, self.dev)
        self.size = torch.empty((), dtype=dt).element_size()
        # (start, end) of each leaf's kernels (and transfers), and of the same
        # plus its wait for a device slot; leaves may run at once, so a stage
        # is the time covered by its intervals, not their sum
        self._kernel: list[tuple[float, float]] = []
        self._held: list[tuple[float, float]] = []
        self._spans: list[Timer] = []  # on-device leaves: kernel spans

    def device_seconds(self) -> float | None:
        """Device time of the on-device leaves' kernels (async: host timers
        would only see the launches); None when leaves ran on the host."""
        if not self._spans:
            return None
        return sum(span.seconds for span in self._spans)

    def _guarded(self, leaf: Node, fn: Any, tensors: tuple[torch.Tensor, ...]) -> Any:
        lay = self.ctx.layout
        p = lay.problem
        hg = lay.head_group
        shape = (leaf.blocks, hg * p.group_ratio, hg, p.head_dim, self.size)
        name = f"{leaf.name}[b{self.unit.b},g{self.unit.g}]"

        def timed(f: Any) -> Any:
            t = time.perf_counter()
            try:
                if not self.on_device:
                    return f()
                with self.ctx.dev.timer() as span:  # the kernels' device time
                    self._spans.append(span)
                    return f()
            finally:
                self._kernel.append((t, time.perf_counter()))  # list.append: thread-safe

        def run_whole() -> Any:
            return timed(lambda: fn(*(t.to(self.dev) for t in tensors)))

        def run_divided() -> Any:
            return timed(lambda: fn(*tensors, block_device=self.dev))

        t0 = time.perf_counter()
        try:
            result = self.ctx.runtime.guardrail.run(
                name,
                (task_bytes(*shape), run_whole),
                (block_bytes(*shape), run_divided),
                gate=not self.ctx.leaves_at_once,
            )
        finally:
            self._held.append((t0, time.perf_counter()))
        self.ctx.runtime.leaf_done()
        return result

    def add_stages(
        self, read: float, wait: float, tree: float, write: float, **extra: float
    ) -> None:
        """Leaf kernels, waits for a unit or device slot, and the in-memory folds
        (on a device: kernel time from events, folds and launches the rest)."""
        dev = self.device_seconds()
        kernel, held = _covered(self._kernel), _covered(self._held)
        compute = kernel if dev is None else dev
        self.ctx.stages.add(
            read=read,
            compute=compute,
            queue=wait + held - kernel,
            fold=max(0.0, tree - held) if dev is None else max(0.0, tree - dev),
            write=write,
            **extra,
        )

    def forward(
        self,
        leaf: Node,
        *qkv: torch.Tensor,
        fill_empty: bool = True,
        workspace: Workspace | None = None,
    ) -> tuple[torch.Tensor, ...]:
        p = self.ctx.layout.problem

        def fn(q, k, v, block_device=None):  # noqa: ANN001, ANN202
            out, lse = task_forward(
                q,
                k,
                v,
                leaf.blocks,
                scale=p.scale,
                backend=self.be,
                counter=self.ctx.counter,
                block_device=block_device,
                fill_empty=fill_empty,
                workspace=workspace,
            )
            if self.on_device:
                return out, lse
            return out.cpu(), lse.cpu()

        return self._guarded(leaf, fn, qkv)

    def backward(
        self, leaf: Node, *xs: torch.Tensor, workspace: Workspace | None = None
    ) -> tuple[torch.Tensor, ...]:
        p = self.ctx.layout.problem

        def fn(q, k, v, dout, out, lse, block_device=None):  # noqa: ANN001, ANN202
            grads = task_backward(
                q,
                k,
                v,
                dout,
                out,
                lse,
                leaf.blocks,
                scale=p.scale,
                backend=self.be,
                counter=self.ctx.counter,
                block_device=block_device,
                workspace=workspace,
            )
            return grads if self.on_device else tuple(g.cpu() for g in grads)

        return self._guarded(leaf, fn, xs)


__all__ = ["Leaves"]


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals."""
    total, end = 0.0, float("-inf")
    for a, z in sorted(spans):
        if z > end:
            total += z - max(a, end)
            end = z
    return total
