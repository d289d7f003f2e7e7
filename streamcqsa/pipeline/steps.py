"""The resumable steps of a pass: run a task unit, merge one chunk row of a node.

A task unit reads its node's tokens, runs the node's subtree in memory with
the same leaf runner and fold code as the in-memory engine (each leaf through
the device guardrail), and writes the node's partial. Each step writes whole
chunks, then marks itself done. A step that finds its marker set does
nothing, so any step can be re-run after a crash.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zarr

from streamcqsa.cqs.divide import Node
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.fold import sum_partials
from streamcqsa.kernels.merge import merge_partials
from streamcqsa.kernels.runner import WorkCounter
from streamcqsa.kernels.runner import backward as task_backward
from streamcqsa.kernels.runner import forward as task_forward
from streamcqsa.kernels.tree import backward_tree, forward_tree
from streamcqsa.kernels.workspace import Workspace
from streamcqsa.pipeline.guardrail import Guardrail, block_bytes, task_bytes
from streamcqsa.pipeline.readahead import ReadAhead
from streamcqsa.pipeline.worker import device_units, executor, leaf_done
from streamcqsa.pipeline.writeback import ChunkWriter
from streamcqsa.storage.partials import FWD, Layout, RunArrays, Unit, partial_names, read_runs
from streamcqsa.storage.store import open_group


class StageTimes:
    """Seconds spent per stage, summed over the tasks of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.tasks = 0

    def __getstate__(self) -> dict:  # each process times its own tasks
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __dask_tokenize__(self) -> str:
        return "stream-cqsa-stage-times"

    def add(self, **stages: float) -> None:
        with self._lock:
            for k, v in stages.items():
                self.seconds[k] = self.seconds.get(k, 0.0) + v

    def summary(self, wall: float) -> dict:
        out = {k: round(v, 4) for k, v in sorted(self.seconds.items())}
        out["device_busy_fraction"] = (
            round(self.seconds.get("compute", 0.0) / wall, 4) if wall else 0
        )
        return out


@dataclass
class Context:
    """What every step needs; picklable (the store is reopened per process)."""

    store: Any
    layout: Layout
    kind: str
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None  # torch threads per compute slot (default: cores / n_cap)
    distributed: bool = False  # units run in other processes (each with its own pool)
    n_cap: int = 2  # tasks resident per device (the guardrail lowers it on OOM)
    budget_bytes: int | None = None  # device memory budget the guardrail enforces
    inject_oom: Any = None  # test hook: (task name, n_cap) -> bool
    overlap_io: bool | None = None  # read ahead / write back (None: see overlaps_io)
    run_id: str = ""
    stages: StageTimes = field(default_factory=lambda: StageTimes())
    counter: WorkCounter = field(default_factory=WorkCounter)
    _arrays: RunArrays | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None
        state["stages"] = StageTimes()  # workers keep their own
        return state

    @property
    def arrays(self) -> RunArrays:
        if self._arrays is None:
            group, _, _ = (
                open_group(self.store)
                if not isinstance(self.store, zarr.Group)
                else (self.store, None, None)
            )
            self._arrays = RunArrays(group, self.layout, self.kind)
        return self._arrays


_GUARDRAILS: dict[str, Guardrail] = {}
_GUARD_LOCK = threading.Lock()


def guardrail_for(ctx: Context) -> Guardrail:
    """One guardrail per run and process (it is shared state of the device)."""
    with _GUARD_LOCK:
        if ctx.run_id not in _GUARDRAILS:
            _GUARDRAILS[ctx.run_id] = Guardrail(
                n_cap=ctx.n_cap, budget_bytes=ctx.budget_bytes, inject=ctx.inject_oom
            )
        return _GUARDRAILS[ctx.run_id]


def run_unit(ctx: Context, unit: Unit, *_deps: Any) -> int:
    """Run one unit unless it is already done; returns 1 if it did work.

    This (Dask) thread reads and writes; compute goes to the pass's compute
    slots (``pipeline.worker``). On CPU this thread's own torch ops (dtype
    casts of I/O) run single threaded, so they start no second OpenMP team.
    """
    arrays = ctx.arrays
    if arrays.is_done(unit):
        return 0
    cpu = not ctx.device.startswith("cuda")
    if cpu and torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # per thread under OpenMP: the slots keep their own
    if unit.kind == "task":
        (_task_forward if ctx.kind == FWD else _task_backward)(ctx, unit)
    else:
        t0 = time.perf_counter()
        _merge_piece(ctx, unit)
        ctx.stages.add(merge=time.perf_counter() - t0)
    arrays.mark(unit)
    return 1


def compute_threads(ctx: Context) -> int:
    """Torch threads per compute slot: the cores shared by n_cap slots."""
    return ctx.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.n_cap))


def overlaps_io(ctx: Context) -> bool:
    """Whether a unit reads ahead and writes back on threads of its own.

    Only where those threads do not take cores from the compute: on a GPU,
    or when the compute slots leave a core free. On a CPU whose cores all
    compute, reads and writes from the page cache are memcpy work, and a
    thread doing them beside the kernels slowed them by 4% on 2 cores, more
    than the overlap saved.
    """
    if ctx.overlap_io is not None:
        return ctx.overlap_io
    if ctx.device.startswith("cuda"):
        return True
    return (os.cpu_count() or 1) > compute_threads(ctx) * max(1, ctx.n_cap)


def _compute(ctx: Context, fn: Any) -> Any:
    """Run ``fn`` on one of the pass's compute slots (see ``pipeline.worker``)."""
    pool = executor(ctx.run_id, ctx.device, ctx.n_cap, distributed=ctx.distributed)
    return pool.call(fn, compute_threads(ctx))


def _device(ctx: Context) -> torch.device:
    return torch.device(ctx.device)


class _Leaves:
    """Runs a unit's leaves through the device guardrail (whole, or block by
    block) and times them apart from slot waits and the unit's folds."""

    def __init__(self, ctx: Context, unit: Unit, dt: torch.dtype, on_device: bool = False) -> None:
        self.ctx, self.unit = ctx, unit
        self.on_device = on_device  # partials stay on the device for the unit's folds
        self.dev = _device(ctx)
        self.be = get_backend(ctx.backend, self.dev)
        self.size = torch.empty((), dtype=dt).element_size()
        self.compute = 0.0  # inside kernels (and their transfers)
        self.guarded = 0.0  # the same plus waiting for a device slot
        self._events: list[tuple[Any, Any]] = []  # on-device leaves: kernel spans

    def device_seconds(self) -> float | None:
        """Device time of the on-device leaves' kernels (async: host timers
        would only see the launches); None when leaves ran synchronously."""
        if not self._events:
            return None
        self._events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self._events) / 1e3

    def _guarded(self, leaf: Node, fn: Any, tensors: tuple[torch.Tensor, ...]) -> Any:
        lay = self.ctx.layout
        p = lay.problem
        hg = lay.head_group
        shape = (leaf.blocks, hg * p.group_ratio, hg, p.head_dim, self.size)
        name = f"{leaf.name}[b{self.unit.b},g{self.unit.g}]"

        def timed(f: Any) -> Any:
            t = time.perf_counter()
            span = None
            if self.on_device:
                span = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                span[0].record(torch.cuda.current_stream(self.dev))
            try:
                return f()
            finally:
                if span is not None:
                    span[1].record(torch.cuda.current_stream(self.dev))
                    self._events.append(span)
                self.compute += time.perf_counter() - t

        def run_whole() -> Any:
            return timed(lambda: fn(*(t.to(self.dev) for t in tensors)))

        def run_divided() -> Any:
            return timed(lambda: fn(*tensors, block_device=self.dev))

        t0 = time.perf_counter()
        try:
            result = guardrail_for(self.ctx).run(
                name, (task_bytes(*shape), run_whole), (block_bytes(*shape), run_divided)
            )
        finally:
            self.guarded += time.perf_counter() - t0
        leaf_done(self.ctx.run_id)
        return result

    def add_stages(
        self, read: float, wait: float, tree: float, write: float, **extra: float
    ) -> None:
        """Leaf kernels, waits for a unit or device slot, and the in-memory folds
        (on a device: kernel time from events, folds and launches the rest)."""
        dev = self.device_seconds()
        compute = self.compute if dev is None else dev
        self.ctx.stages.add(
            read=read,
            compute=compute,
            queue=wait + self.guarded - self.compute,
            fold=max(0.0, tree - self.guarded) if dev is None else max(0.0, tree - dev),
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
            return tuple(g.cpu() for g in grads)

        return self._guarded(leaf, fn, xs)


def _task_forward(ctx: Context, unit: Unit) -> None:
    node = ctx.layout.plan.by_path[unit.node]
    # on a GPU a unit's folds run on the device, as the engine's do (exp and
    # log round differently there); at most n_cap units hold device buffers
    if ctx.device.startswith("cuda") and not node.is_leaf:
        with device_units(ctx.run_id, ctx.n_cap):
            _forward_unit(ctx, unit, node, on_device=True)
    else:
        _forward_unit(ctx, unit, node, on_device=False)


def _forward_unit(ctx: Context, unit: Unit, node: Node, *, on_device: bool) -> None:
    lay, arrays = ctx.layout, ctx.arrays
    p = lay.problem
    dev = _device(ctx)
    dt = get_backend(ctx.backend, dev).compute_dtype(_dtype(p), dev)
    t0 = time.perf_counter()
    qh, kh = lay.q_heads(unit.g), lay.kv_heads(unit.g)
    stream = overlaps_io(ctx) and not node.is_leaf
    reader = writer = None
    d2h = [0.0]

    final = _dtype(p) if on_device and len(unit.node) == 0 else None

    def write(a: int, z: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        t = time.perf_counter()
        o = out[:, :, a:z]
        if final is not None:  # the final output's dtype, cast on the device: half the copy
            o = o.to(final)
        o, s = o.cpu(), lse[:, :, a:z].cpu()  # no-ops on CPU
        d2h[0] += time.perf_counter() - t
        arrays.write_rows(unit.node, "out", unit.b, unit.g, a, o)
        arrays.write_rows(unit.node, "lse", unit.b, unit.g, a, s)

    ws = Workspace()  # host buffers: kept mapped from one unit to the next
    ok = False
    try:
        if stream:  # the first leaves start while the rest is read
            heads = {"q": qh, "k": kh, "v": kh}
            reader = ReadAhead(
                lay.plan,
                node,
                [(arrays.array(n), heads[n]) for n in ("q", "k", "v")],
                unit.b,
                p.dtype,
                lay.chunk,
                device=dev if on_device else None,
            )
            qkv = reader.tensors
            writer = ChunkWriter(write, node.length, lay.chunk)
        else:
            alloc = None if on_device else functools.partial(ws.empty, device="cpu")
            qkv = tuple(
                read_runs(arrays, n, unit.b, qh if n == "q" else kh, node.runs, p, alloc)
                for n in ("q", "k", "v")
            )
            if on_device:
                qkv = tuple(t.to(dev) for t in qkv)
        t1 = time.perf_counter()
        leaves = _Leaves(ctx, unit, dt, on_device=on_device)
        ts = 0.0

        def compute(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            nonlocal ts
            ts = time.perf_counter()
            return forward_tree(  # type: ignore[return-value]
                lay.plan,
                node,
                xs,  # type: ignore[arg-type]
                leaves.forward,
                dt,
                on_rows=writer.rows if writer is not None else _keep if on_device else None,
                before=None if reader is None else reader.wait,
                workspace=ws,
            )

        out, lse = _compute(ctx, functools.partial(compute, qkv))
        ws.release(*qkv)
        del qkv
        read_s, waited, h2d = t1 - t0, 0.0, 0.0
        if reader is not None:
            reader.finish()
            read_s, waited, h2d = reader.read_s, reader.waited_s, reader.h2d_s
            ts += waited  # time spent waiting for rows is read time, not fold time
        t2 = time.perf_counter()
        if writer is None:
            write(0, node.length, out, lse)
        else:
            writer.finish()  # most chunks were written during the compute
        ws.release(out, lse)
        ok = True
    finally:
        if not ok:
            if reader is not None:
                reader.finish(failed=True)
            if writer is not None:
                writer.finish(failed=True)
    extra = {"h2d": h2d, "d2h": d2h[0]} if on_device else {}
    leaves.add_stages(read_s, ts - t1 - waited, t2 - ts, time.perf_counter() - t2, **extra)


def _task_backward(ctx: Context, unit: Unit) -> None:
    lay, arrays = ctx.layout, ctx.arrays
    p = lay.problem
    node = lay.plan.by_path[unit.node]
    dt = get_backend(ctx.backend, _device(ctx)).compute_dtype(_dtype(p), _device(ctx))
    qh, kh = lay.q_heads(unit.g), lay.kv_heads(unit.g)
    t0 = time.perf_counter()
    ws = Workspace()
    alloc = functools.partial(ws.empty, device="cpu")
    xs = tuple(
        read_runs(arrays, n, unit.b, kh if n in ("k", "v") else qh, node.runs, p, alloc)
        for n in ("q", "k", "v", "dout", "out", "lse")
    )
    t1 = time.perf_counter()
    leaves = _Leaves(ctx, unit, dt)
    ts = 0.0

    def compute(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        nonlocal ts
        ts = time.perf_counter()
        return backward_tree(lay.plan, node, xs, leaves.backward, dt, workspace=ws)

    grads = _compute(ctx, functools.partial(compute, xs))
    ws.release(*xs)
    del xs
    t2 = time.perf_counter()
    for name, t in zip(("dq", "dk", "dv"), grads, strict=True):
        arrays.write_rows(unit.node, name, unit.b, unit.g, 0, t)
    ws.release(*grads)
    leaves.add_stages(t1 - t0, ts - t1, t2 - ts, time.perf_counter() - t2)


def _keep(*_: Any) -> None:
    """Rows reported final with nobody writing them early: still lets a
    unit's fold free each child as soon as it is folded (device memory)."""


_LOCAL = threading.local()


def _side_stream(dev: torch.device) -> Any:
    """This thread's own CUDA stream (tensors made and used on it alone)."""
    streams = getattr(_LOCAL, "streams", None)
    if streams is None:
        streams = _LOCAL.streams = {}
    if dev not in streams:
        streams[dev] = torch.cuda.Stream(dev)
    return streams[dev]


def _dtype(p: Any) -> torch.dtype:
    from streamcqsa.storage.layout import torch_dtype

    return torch_dtype(p.dtype)


def _merge_piece(ctx: Context, unit: Unit) -> None:
    """Fold the children's rows for one chunk row [jC, (j+1)C) of a node.

    Reads and writes stay on this (Dask) thread; on CPU the arithmetic goes
    to a compute slot like every other computation of the pass.
    """
    lay, arrays = ctx.layout, ctx.arrays
    node = lay.plan.by_path[unit.node]
    a0 = unit.piece * lay.chunk
    z0 = min(a0 + lay.chunk, node.length)
    names = partial_names(ctx.kind)
    fwd = ctx.kind == FWD
    jobs = []  # (rows [a, z) of the piece, the children's partials there, in order)
    for src in lay.plan.merge_sources(node, skip_empty=fwd):
        a, z = max(a0, src.start), min(z0, src.start + src.length)
        if a >= z or not src.sources:
            continue
        pieces = []
        for child, off in src.sources:
            ca = off + (a - src.start)
            pieces.append(
                tuple(arrays.read_rows(child, n, unit.b, unit.g, ca, ca + (z - a)) for n in names)
            )
        jobs.append((a, z, pieces))

    # merges run where the engine's folds run: exp and log round differently
    # on a GPU, and the pipeline must give the engine's bits
    dev = _device(ctx) if ctx.device.startswith("cuda") else torch.device("cpu")

    def combine(jobs: list) -> dict[str, torch.Tensor]:
        dst = {}
        for name in names:
            heads = arrays.heads(name, unit.g)
            shape: tuple[int, ...] = (1, heads.stop - heads.start, z0 - a0)
            if name != "lse":
                shape += (lay.problem.head_dim,)
            fill = -math.inf if name == "lse" else 0.0
            dst[name] = torch.full(shape, fill, dtype=torch.float32, device=dev)
        for a, z, pieces in jobs:
            out = tuple(dst[n][:, :, a - a0 : z - a0] for n in names)
            pieces = [tuple(t.to(dev) for t in pc) for pc in pieces]
            if fwd:
                merge_partials([(pc[0], pc[1]) for pc in pieces], out=out)  # type: ignore[arg-type]
            else:
                sum_partials(pieces, out=out)
        return {n: t.cpu() for n, t in dst.items()}

    work = functools.partial(combine, jobs)
    del jobs
    if dev.type == "cpu":
        dst = _compute(ctx, work)
    else:  # a side stream of this thread's own: no wait behind the units' kernels
        with torch.cuda.stream(_side_stream(dev)):
            dst = work()
    del work
    for name in names:
        arrays.write_rows(unit.node, name, unit.b, unit.g, a0, dst[name])


def clean_node(ctx: Context, node: tuple[int, ...], b: int, g: int, *_deps: Any) -> None:
    """Delete a node's children's partials once the node is complete."""
    arrays = ctx.arrays
    for child in ctx.layout.plan.by_path[node].children:
        arrays.delete_node(child, b, g)
