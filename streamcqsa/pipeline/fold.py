"""Fold units' partials into the accumulator, and cast it to the outputs.

``run_piece`` folds one piece of a unit (its rows in one shard, see
``cqs.folds``) chunk by chunk: read the chunk, skip it if its counter shows
the unit already folded there or its final is done (a resumed piece), fold the unit's rows in
with the rule of ``kernels.flat``, write the chunk back with the counter.
The graph runs the pieces into a shard in unit order, so a chunk absorbs
its units in order. ``finish_task`` marks a unit done once all its pieces
are in. ``run_final`` casts one chunk of rows to the outputs, marks it done
and drops that accumulator chunk.

On a GPU the fold arithmetic runs on the device, where the engine's runs
(exp and log round differently there); it is tiny next to a unit's compute.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from streamcqsa.errors import MissingChunkError
from streamcqsa.kernels.flat import fold_backward, fold_forward
from streamcqsa.pipeline.context import Context
from streamcqsa.storage.accumulator import Accumulator
from streamcqsa.storage.units import FWD, Unit, partial_names


def _chunk(ctx: Context, acc: Accumulator, unit: Unit, c: int, before: int) -> Any:
    """Chunk ``c`` of the unit's group; the identity if no unit before
    ``before`` folded into it, else it must be there."""
    data = acc.read(unit.b, unit.g, c)
    if data is not None:
        return data
    earlier = [i for i in ctx.layout.fold.touchers(c) if i < before]
    if earlier:
        raise MissingChunkError(
            acc.path,
            (unit.b, unit.g, c, 0),
            f" (unit {earlier[-1]} folded into it)",
        )
    return acc.identity(c)


def run_piece(ctx: Context, unit: Unit, j: int, part: tuple[torch.Tensor, ...], *_deps: Any) -> int:
    """Fold piece ``j`` of the pass's fold plan (a piece of ``unit``)."""
    t0 = time.perf_counter()
    lay = ctx.layout
    fold = lay.fold
    piece = fold.pieces[j]
    i = piece.unit
    acc = ctx.arrays.acc
    rule = fold_forward if ctx.kind == FWD else fold_backward
    where = ctx.dev.fold_device
    wrote = 0
    for c in fold.chunks_of_piece(piece):
        if ctx.arrays.is_done(Unit("final", unit.b, unit.g, (), c)):
            # cast and dropped already: a final needs only this shard's pieces,
            # so it may end before a piece of this unit elsewhere, and the
            # unit (not yet marked) reruns every piece after an interruption
            continue
        data = _chunk(ctx, acc, unit, c, i)
        if Accumulator.counter(data) >= i:
            continue  # folded before an interruption
        t = torch.from_numpy(data).to(where)  # the same memory on the host
        views = acc.views(t, c)
        base = c * lay.chunk
        for a, n, off in fold.chunk_runs(i, c):
            rows = slice(a - base, a - base + n)
            local = slice(off, off + n)
            rule(
                tuple(v[:, :, rows] for v in views),
                tuple(x[:, :, local].to(t.device) for x in part),
            )
        data = t.cpu().numpy()  # a view of ``data`` itself on the host
        Accumulator.set_counter(data, i)
        acc.write(unit.b, unit.g, c, data)
        wrote += 1
    ctx.stages.add(accumulate=time.perf_counter() - t0)
    return wrote


def finish_task(ctx: Context, unit: Unit, *_pieces: Any) -> int:
    """Every piece of the unit is folded: mark it done."""
    ctx.arrays.mark(unit)
    return 1


def run_final(ctx: Context, unit: Unit, *_deps: Any) -> int:
    """Cast accumulator chunk ``unit.piece`` to the outputs; mark; drop it."""
    arrays = ctx.arrays
    if arrays.is_done(unit):
        return 0
    t0 = time.perf_counter()
    acc = arrays.acc
    c = unit.piece
    data = _chunk(ctx, acc, unit, c, len(ctx.layout.fold.units))
    views = acc.views(torch.from_numpy(data), c)
    for name, x in zip(partial_names(ctx.kind), views, strict=True):
        arrays.write_output(name, unit.b, unit.g, c * ctx.layout.chunk, x.contiguous())
    arrays.mark(unit)
    try:
        acc.delete(unit.b, unit.g, c)
    except FileNotFoundError:  # already gone: a resumed final
        pass
    ctx.stages.add(write=time.perf_counter() - t0)
    ctx.runtime.leaf_done()
    return 1


__all__ = ["finish_task", "run_final", "run_piece"]
