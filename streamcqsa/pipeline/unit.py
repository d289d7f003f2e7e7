"""A task unit's compute: read its node's tokens, run the subtree in memory.

The subtree runs with the same leaf runner and tree folds as the in-memory
engine (``kernels.tree``). Where the unit is its (batch, head group)'s only
one, it writes the outputs itself and is marked done (``run_direct``);
otherwise it returns its partial, which ``pipeline.fold`` folds into the
pass's accumulator (``run_compute``). A unit may also keep its partial in
the store for inspection.

This (Dask) thread reads and writes; compute goes to the pass's compute
slots. On CPU this thread's own torch ops (dtype casts of I/O) run single
threaded, so they start no second OpenMP team.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from streamcqsa.kernels.device import Device
from streamcqsa.kernels.tree import backward_tree, forward_tree
from streamcqsa.kernels.workspace import Workspace
from streamcqsa.pipeline.context import Context
from streamcqsa.pipeline.leaves import Leaves
from streamcqsa.pipeline.readahead import ReadAhead
from streamcqsa.pipeline.writeback import ChunkWriter
from streamcqsa.storage.layout import torch_dtype
from streamcqsa.storage.runarrays import read_runs
from streamcqsa.storage.units import FWD, Unit, partial_names

Partial = tuple[torch.Tensor, ...]


def overlaps_io(ctx: Context) -> bool:
    """Whether a unit reads ahead and writes back on threads of its own.

    ``Device.overlaps_io`` decides, unless the pass says."""
    if ctx.overlap_io is not None:
        return ctx.overlap_io
    return ctx.dev.overlaps_io(ctx.compute_threads() * max(1, ctx.n_cap), os.cpu_count() or 1)


def run_direct(ctx: Context, unit: Unit, *_deps: Any) -> int:
    """The only unit of its (batch, head group): compute, write the outputs,
    mark done. Returns 1 if it did work (0: already done)."""
    arrays = ctx.arrays
    if arrays.is_done(unit):
        return 0
    ctx.dev.enter_io_thread()
    if ctx.kind == FWD:
        _forward(ctx, unit, direct=True)
    else:
        _write_backward(ctx, unit, _backward(ctx, unit))
    arrays.mark(unit)
    return 1


def run_compute(ctx: Context, unit: Unit, *_deps: Any) -> Partial:
    """A unit's partial (CPU, fp32) for the fold; kept in the store if asked."""
    ctx.dev.enter_io_thread()
    part = _forward(ctx, unit, direct=False) if ctx.kind == FWD else _backward(ctx, unit)
    if ctx.keep_partials:
        t = time.perf_counter()
        for name, x in zip(partial_names(ctx.kind), part, strict=True):
            ctx.arrays.write_kept(unit.node, name, unit.b, unit.g, x)
        ctx.stages.add(write=time.perf_counter() - t)
    return part


def _forward(ctx: Context, unit: Unit, *, direct: bool) -> Partial | None:
    return _where_it_fits(ctx, unit, functools.partial(_forward_unit, ctx, unit, direct=direct))


def _where_it_fits(ctx: Context, unit: Unit, run: Callable[..., Any]) -> Any:
    """``run(on_device=...)``: a unit above the leaves is held on the device
    where its folds run there (``Device.folds_on_device``), else on the host."""
    node = ctx.layout.plan.by_path[unit.node]
    if ctx.dev.folds_on_device and not node.is_leaf:
        guard = ctx.runtime.guardrail
        name = f"unit {unit.node}[b{unit.b},g{unit.g}]"
        while True:  # a retry rewrites the same chunks with the same bits
            try:
                with guard.unit(name) as cap:  # at most n_cap units hold device buffers
                    return run(on_device=True)
            except BaseException as e:
                if not ctx.dev.is_oom(e) or getattr(e, "final", False):
                    raise
                if cap == 1:
                    break
        # alone on the device it still ran out: held on the host, its leaves
        # go to the device one by one (through the guardrail, divided if need
        # be); its forward folds then run on the host and round as the host's do
        guard.events.append({"task": name, "event": "host unit", "n_cap": guard.n_cap})
    return run(on_device=False)


def _forward_unit(ctx: Context, unit: Unit, *, direct: bool, on_device: bool) -> Partial | None:
    lay, arrays = ctx.layout, ctx.arrays
    p = lay.problem
    node = lay.plan.by_path[unit.node]
    dev = ctx.torch_device
    dt = ctx.kernel_dtype()
    t0 = time.perf_counter()
    qh, kh = lay.q_heads(unit.g), lay.kv_heads(unit.g)
    stream = overlaps_io(ctx) and not node.is_leaf
    reader = writer = None
    d2h = [0.0]
    final = torch_dtype(p.dtype) if on_device else None
    unit_dev = ctx.dev if on_device else Device.of("cpu")  # where its rows are computed

    def write(a: int, z: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        t = time.perf_counter()
        o = out[:, :, a:z]
        if final is not None:  # the output's dtype, cast on the device: half the copy
            o = o.to(final)
        o, s = o.cpu(), lse[:, :, a:z].cpu()  # no-ops on CPU
        d2h[0] += time.perf_counter() - t
        arrays.write_output("out", unit.b, unit.g, a, o)
        arrays.write_output("lse", unit.b, unit.g, a, s)

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
                stream=ctx.runtime.stream("h2d") if on_device else None,
            )
            qkv = reader.tensors
            if direct:
                writer = ChunkWriter(
                    write,
                    node.length,
                    lay.chunk,
                    unit_dev,
                    ctx.runtime.stream("d2h") if on_device else None,
                )
        else:
            alloc = None if on_device else functools.partial(ws.empty, device="cpu")
            qkv = tuple(
                read_runs(arrays, n, unit.b, qh if n == "q" else kh, node.runs, p, alloc)
                for n in ("q", "k", "v")
            )
            if on_device:
                qkv = tuple(t.to(dev) for t in qkv)
        t1 = time.perf_counter()
        leaves = Leaves(ctx, unit, dt, on_device=on_device)
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
                workspace=ws if direct else None,  # a fold's partial outlives the unit
            )

        out, lse = ctx.compute(functools.partial(compute, qkv))
        ws.release(*qkv)
        del qkv
        read_s, waited, h2d = t1 - t0, 0.0, 0.0
        if reader is not None:
            reader.finish()
            read_s, waited, h2d = reader.read_s, reader.waited_s, reader.h2d_s
            ts += waited  # time spent waiting for rows is read time, not fold time
        t2 = time.perf_counter()
        result: Partial | None = None
        if not direct:
            t = time.perf_counter()
            result = (out.cpu(), lse.cpu())  # the fold reads it (no-op on CPU)
            d2h[0] += time.perf_counter() - t
        elif writer is None:
            write(0, node.length, out, lse)
        else:
            writer.finish()  # most chunks were written during the compute
        if direct:
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
    return result


def _keep(*_: Any) -> None:
    """Rows reported final with nobody writing them early: still lets a
    unit's fold free each child as soon as it is folded (device memory)."""


def _backward(ctx: Context, unit: Unit) -> Partial:
    return _where_it_fits(ctx, unit, functools.partial(_backward_unit, ctx, unit))


def _backward_unit(ctx: Context, unit: Unit, *, on_device: bool) -> Partial:
    """A backward unit: its inputs read ahead piece by piece while its first
    leaves compute (where units overlap I/O, as the forward's), else read
    whole on the host or staged a store chunk at a time to the device
    (``_staged``); its gradients summed where it is held, returned on the
    host. Gradient sums are elementwise adds, so the bits do not depend on
    where."""
    lay, arrays = ctx.layout, ctx.arrays
    p = lay.problem
    node = lay.plan.by_path[unit.node]
    dt = ctx.kernel_dtype()
    qh, kh = lay.q_heads(unit.g), lay.kv_heads(unit.g)
    t0 = time.perf_counter()
    ws = Workspace()
    alloc = functools.partial(ws.empty, device="cpu")
    names = ("q", "k", "v", "dout", "out", "lse")
    heads = [kh if n in ("k", "v") else qh for n in names]
    h2d = d2h = waited = 0.0
    reader = None
    if overlaps_io(ctx) and not node.is_leaf:
        reader = ReadAhead(
            lay.plan,
            node,
            [(arrays.array(n), h) for n, h in zip(names, heads, strict=True)],
            unit.b,
            [p.dtype] * 5 + ["float32"],  # lse is stored in fp32
            lay.chunk,
            device=ctx.torch_device if on_device else None,
            stream=ctx.runtime.stream("h2d") if on_device else None,
        )
        xs = reader.tensors
    elif on_device:
        staged = [
            _staged(ctx, n, unit.b, h, node.runs, ws) for n, h in zip(names, heads, strict=True)
        ]
        xs = tuple(x for x, _ in staged)
        h2d = sum(t for _, t in staged)
    else:
        xs = tuple(
            read_runs(arrays, n, unit.b, h, node.runs, p, alloc)
            for n, h in zip(names, heads, strict=True)
        )
    t1 = time.perf_counter()
    leaves = Leaves(ctx, unit, dt, on_device=on_device)
    ts = 0.0

    def compute(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        nonlocal ts
        ts = time.perf_counter()
        before = None if reader is None else reader.wait
        return backward_tree(lay.plan, node, xs, leaves.backward, dt, before=before)

    try:
        grads = ctx.compute(functools.partial(compute, xs))
    except BaseException:
        if reader is not None:
            reader.finish(failed=True)
        raise
    read_s = t1 - t0 - h2d
    if reader is not None:
        reader.finish()
        read_s, waited, h2d = reader.read_s, reader.waited_s, reader.h2d_s
        ts += waited  # time spent waiting for rows is read time, not compute
    elif not on_device:
        ws.release(*xs)
    del xs
    t2 = time.perf_counter()
    if on_device:
        grads = tuple(g.cpu() for g in grads)  # the fold and the writes read them
        d2h = time.perf_counter() - t2
    extra = {"h2d": h2d, "d2h": d2h} if on_device else {}
    leaves.add_stages(read_s, ts - t1 - waited, t2 - ts, 0.0, **extra)
    return grads


def _staged(
    ctx: Context, name: str, b: int, heads: slice, runs: Any, ws: Workspace
) -> tuple[torch.Tensor, float]:
    """Runs of one array read into a tensor on the device through one store
    chunk of host memory at a time (pinned where the device pins), so a
    unit sized for the device never needs its size in host memory. Returns
    the tensor and the seconds spent copying."""
    lay = ctx.layout
    rows = lay.chunk
    pieces = [(a + i, min(rows, n - i)) for a, n in runs for i in range(0, n, rows)]
    total = sum(n for _, n in runs)
    pin = ctx.dev.pins_host

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if pin:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return ws.empty(shape, dtype, device="cpu")

    out: torch.Tensor | None = None
    off, copy_s = 0, 0.0
    for a, n in pieces:
        host = read_runs(ctx.arrays, name, b, heads, [(a, n)], lay.problem, alloc)
        t = time.perf_counter()
        if out is None:
            shape = (*host.shape[:2], total, *host.shape[3:])
            out = torch.empty(shape, dtype=host.dtype, device=ctx.torch_device)
        # pinned: asynchronous, and torch's host allocator keeps the piece
        # until its copy is done; pageable: the copy is done on return
        out[:, :, off : off + n].copy_(host, non_blocking=pin)
        copy_s += time.perf_counter() - t
        if not pin:
            ws.release(host)
        off += n
    assert out is not None
    return out, copy_s


def _write_backward(ctx: Context, unit: Unit, grads: Partial) -> None:
    t = time.perf_counter()
    for name, x in zip(("dq", "dk", "dv"), grads, strict=True):
        ctx.arrays.write_output(name, unit.b, unit.g, 0, x)
    ctx.stages.add(write=time.perf_counter() - t)


__all__ = ["overlaps_io", "run_compute", "run_direct"]
