"""The Dask graph of a pass: the stored task tree, once per (batch, head group).

Keys are tuples. A task unit depends on nothing; a merge unit of a node
depends on a barrier of each child (which depends on all of that child's
units), so edges stay linear in the number of units. With
``keep_partials=False`` the node's barrier also deletes its children's
partials, after every chunk row of the node is written.
"""

from __future__ import annotations

from typing import Any

from streamcqsa.pipeline.steps import Context, clean_node, run_unit
from streamcqsa.storage.partials import Unit


def _barrier(*_deps: Any) -> int:
    return 0


def unit_key(ctx: Context, u: Unit) -> tuple:
    return (f"{ctx.kind}-{u.kind}", u.b, u.g, u.node, u.piece)


def build_graph(
    ctx: Context, *, keep_partials: bool = True, skip: set[int] | frozenset[int] = frozenset()
) -> tuple[dict, list, list]:
    """(graph, final keys, unit keys). Units whose index is in ``skip`` are done
    already and left out (their barriers stay, with no dependencies)."""
    lay = ctx.layout
    plan = lay.plan
    ctx_key = (f"{ctx.kind}-context",)
    dsk: dict = {ctx_key: ctx}  # one copy, shipped once per worker by distributed
    unit_keys: list = []
    finals: list = []
    for b in range(lay.problem.batch):
        for g in range(lay.groups):
            barrier: dict[tuple[int, ...], tuple] = {}
            for node in plan.nodes:
                if not lay.is_stored(node):
                    continue  # computed inside its task unit
                merge = not lay.is_task(node)
                deps = [barrier[c] for c in node.children] if merge else []
                keys = []
                for u in lay.units_of(node.path, b, g):
                    if lay.index(u) in skip:
                        continue
                    key = unit_key(ctx, u)
                    dsk[key] = (run_unit, ctx_key, u, *deps)
                    keys.append(key)
                    unit_keys.append(key)
                bkey = (f"{ctx.kind}-node", b, g, node.path)
                if not keep_partials and merge:
                    dsk[bkey] = (clean_node, ctx_key, node.path, b, g, *keys)
                else:
                    dsk[bkey] = (_barrier, *keys)
                barrier[node.path] = bkey
            finals.append(barrier[plan.root.path])
    return dsk, finals, unit_keys
