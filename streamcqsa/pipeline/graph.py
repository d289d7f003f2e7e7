"""The Dask graph of a pass, once per (batch, head group).

Keys are tuples. Where a group has one unit it is a single step
(``unit.run_direct``). Otherwise, per unit: a compute step (its partial), one
fold piece per shard it reaches (``cqs.folds``), each after the previous
piece into that shard, and a step that marks it done; then one final step
per chunk of rows, after the last piece into its shard. A compute waits for
the unit ``window`` places earlier to be done, so at most ``window``
partials are held in memory however far the compute runs ahead of the
folds. Units marked done are left out, with their pieces.
"""

from __future__ import annotations

from typing import Any

from streamcqsa.pipeline.context import Context
from streamcqsa.pipeline.fold import finish_task, run_final, run_piece
from streamcqsa.pipeline.unit import run_compute, run_direct
from streamcqsa.storage.units import Unit


def _barrier(*_deps: Any) -> int:
    return 0


def window(ctx: Context) -> int:
    """Units between a compute and the fold it waits for: enough to keep
    n_cap slots busy while the previous units fold."""
    return max(2, ctx.n_cap + 1)


def build_graph(ctx: Context, *, skip: set[int] | frozenset[int] = frozenset()) -> dict:
    """The pass's graph: ``dsk``, ``finals`` (one key per group), ``units``
    (the keys of units that will run) and ``leaves`` (leaf tasks they run)."""
    lay = ctx.layout
    k = ctx.kind
    ctx_key = (f"{k}-context",)
    dsk: dict = {ctx_key: ctx}  # one copy, shipped once per worker by distributed
    units: list = []
    finals: list = []
    leaves = 0
    for b in range(lay.problem.batch):
        for g in range(lay.groups):
            keys: list = []
            todo = [
                i
                for i, path in enumerate(lay.fold.units)
                if lay.index(Unit("task", b, g, path)) not in skip
            ]
            leaves += sum(lay.plan.leaf_count(lay.plan.by_path[lay.fold.units[i]]) for i in todo)
            if lay.direct:
                for i in todo:
                    u = Unit("task", b, g, lay.fold.units[i])
                    key = (f"{k}-task", b, g, u.node, 0)
                    dsk[key] = (run_direct, ctx_key, u)
                    keys.append(key)
                    units.append(key)
            else:
                keys += _fold_steps(ctx, ctx_key, dsk, b, g, todo, skip, units)
            bkey = (f"{k}-group", b, g)
            dsk[bkey] = (_barrier, *keys)
            finals.append(bkey)
    return {"dsk": dsk, "finals": finals, "units": units, "leaves": leaves}


def _fold_steps(
    ctx: Context, ctx_key: tuple, dsk: dict, b: int, g: int, todo: list[int], skip, units: list
) -> list:
    lay, k = ctx.layout, ctx.kind
    fold = lay.fold
    last: dict[int, tuple] = {}  # shard -> key of the latest piece into it
    done: list[tuple] = []
    w = window(ctx)
    for n, i in enumerate(todo):
        u = Unit("task", b, g, fold.units[i])
        throttle = [done[n - w]] if n >= w else []
        ckey = (f"{k}-compute", b, g, u.node)
        dsk[ckey] = (run_compute, ctx_key, u, *throttle)
        pieces = []
        for j in fold.pieces_of[i]:
            s = fold.pieces[j].shard
            pkey = (f"{k}-fold", b, g, j)
            dsk[pkey] = (run_piece, ctx_key, u, j, ckey, *([last[s]] if s in last else []))
            last[s] = pkey
            pieces.append(pkey)
        dkey = (f"{k}-task", b, g, u.node, 0)
        dsk[dkey] = (finish_task, ctx_key, u, *pieces)
        done.append(dkey)
        units.append(dkey)
    finals = []
    for c in range(lay.chunks):
        u = Unit("final", b, g, (), c)
        if lay.index(u) in skip:
            continue
        s = c // fold.shard_chunks
        fkey = (f"{k}-final", b, g, c)
        dsk[fkey] = (run_final, ctx_key, u, *([last[s]] if s in last else []))
        finals.append(fkey)
        units.append(fkey)
    return done + finals


__all__ = ["build_graph", "window"]
