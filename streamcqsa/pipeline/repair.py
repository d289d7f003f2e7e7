"""``repair``: find chunks that are corrupt or missing and unmark what made them.

Outputs and partials are recomputable. A done marker vouches for every chunk
its unit wrote, so a chunk that fails its checksum, or is absent where a
done unit wrote it (zarr would read it as zeros), is damage: its unit is
unmarked, with every merge above it, so the next run recomputes only those
units, bit-identically.

A done unit's partial is needed while a unit that reads it (a merge of its
parent node) is still to run, and always when the pass keeps its partials.
A pass that deletes them does so once the parent node is complete, so there
an absent partial is expected; if repair sends that parent back to run, the
deleted children are needed again and are recomputed too (and so on down).

A bad input chunk cannot be recomputed and is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamcqsa.storage.integrity import all_chunks, scan, stored_chunks
from streamcqsa.storage.layout import INPUTS
from streamcqsa.storage.lock import StoreLock
from streamcqsa.storage.partials import BWD, FWD, Layout, RunArrays, Unit, partial_names
from streamcqsa.storage.store import StoreError, open_group, update_meta


def repair(store_path: Any) -> dict:
    """Check every chunk a pass vouches for; unmark the units whose results
    are corrupt or missing.

    The report lists damaged chunks as (array, chunk): ``report[kind]`` all of
    them, ``report[kind + "_missing"]`` the absent ones, and
    ``report[kind + "_units_reset"]`` counts the units to run again.
    """
    group, problem, meta = open_group(store_path)
    report: dict[str, Any] = {"inputs": [], "inputs_missing": []}
    with StoreLock(store_path):
        _check_inputs(group, meta, report)
        for kind in (FWD, BWD):
            report[kind], report[f"{kind}_missing"] = [], []
            entry = meta.get(kind)
            if not entry:
                continue
            layout = Layout.from_meta(entry["plan"], problem)
            arrays = RunArrays(group, layout, kind)
            units: set[Unit] = set()
            for name in partial_names(kind):
                if name in group:
                    for c in scan(group[name]):
                        report[kind].append((name, c))
                        units.add(_output_unit(layout, name, c))
                for depth in layout.depth_rows:
                    path = arrays.partial_path(depth, name)
                    if path in group:
                        for c in scan(group[path]):
                            report[kind].append((path, c))
                            units.add(_partial_unit(layout, depth, c))
            marker = group[arrays.marker_path] if arrays.marker_path in group else None
            bad_markers = scan(marker) if marker is not None else []
            if marker is not None:
                from zarr.core.sync import sync

                for (i,) in bad_markers:  # a corrupt marker reads as "not done"
                    sync(marker.store.delete(f"{marker.path}/c/{i}"))
                    report[kind].append((arrays.marker_path, (i,)))
                done = arrays.done()
            else:
                done = np.zeros(layout.total_units, dtype=bool)
            stats = entry.get("stats") or {}
            keep = entry.get("keep_partials", stats.get("keep_partials"))
            full = _to_rerun(arrays, done, units, keep is True, report[f"{kind}_missing"])
            report[kind] += report[f"{kind}_missing"]
            if marker is not None:
                for u in full:
                    marker[layout.index(u)] = 0
            if full or bad_markers:
                entry = dict(entry)
                entry["status"] = "needs repair run"
                meta = update_meta(group, **{kind: entry})
            report[f"{kind}_units_reset"] = len(full)
    if report["inputs"]:
        gone = set(report["inputs_missing"])
        names = ", ".join(
            f"{n} chunk {c} ({'missing' if (n, c) in gone else 'corrupt'})"
            for n, c in report["inputs"]
        )
        raise StoreError(
            f"input chunks are corrupt or missing and cannot be recomputed: {names}; "
            "recreate the store from its source"
        )
    return report


def _check_inputs(group: Any, meta: dict, report: dict) -> None:
    """Corrupt chunks of q, k, v and dout; absent ones of those that must be
    whole (q, k, v always, dout once its write completed)."""
    dout_whole = (meta.get("dout") or {}).get("status") == "complete"
    for name in (*INPUTS, "dout"):
        if name not in group:
            continue
        arr = group[name]
        report["inputs"] += [(name, c) for c in scan(arr)]
        if name != "dout" or dout_whole:
            have = set(stored_chunks(arr))
            gone = [(name, c) for c in all_chunks(arr) if c not in have]
            report["inputs"] += gone
            report["inputs_missing"] += gone


def _to_rerun(
    arrays: RunArrays, done: np.ndarray, units: set[Unit], keep: bool, missing: list
) -> set[Unit]:
    """``units`` and every merge above them, plus each done unit with a chunk
    missing where it is needed (module docstring) and the merges above it,
    until nothing changes. Appends the missing chunks that are damage (not
    partials deleted after their parent finished) to ``missing``."""
    lay, group = arrays.layout, arrays.group
    stored: dict[str, set[tuple[int, ...]]] = {}

    def has(path: str, c: tuple[int, ...]) -> bool:
        if path not in stored:
            stored[path] = set(stored_chunks(group[path])) if path in group else set()
        return c in stored[path]

    def node_of(u: Unit) -> tuple:
        return (u.b, u.g, u.node)

    def parent_of(u: Unit) -> tuple:
        return (u.b, u.g, u.node[:-1])

    todo = [lay.unit_at(i) for i in np.flatnonzero(~done)]
    pending = {node_of(u) for u in todo}  # nodes with units left to run before this repair
    running = set(pending)  # nodes with units to run after it
    finished = [lay.unit_at(i) for i in np.flatnonzero(done)]
    out: set[Unit] = set()
    new = set(units)
    while True:
        stack = list(new)
        while stack:  # each unit, and every merge above it
            u = stack.pop()
            if u in out:
                continue
            out.add(u)
            running.add(node_of(u))
            for i in range(len(u.node)):
                stack.extend(lay.units_of(u.node[:i], u.b, u.g))
        new = set()
        for u in finished:
            if u in out:
                continue
            read_again = not u.node or parent_of(u) in running
            if not (keep or read_again):
                continue  # nothing reads it again; a pass without partials deleted it
            gone = [(path, c) for path, c in arrays.unit_chunks(u) if not has(path, c)]
            if gone:
                new.add(u)
                if keep or not u.node or parent_of(u) in pending:
                    missing += gone  # damage, not a partial deleted after its parent
        if not new:
            return out


def _group_of(layout: Layout, name: str, head: int, per_chunk: int) -> int:
    heads = head * per_chunk
    per_group = layout.head_group * (1 if name in ("dk", "dv") else layout.problem.group_ratio)
    return heads // per_group


def _output_unit(layout: Layout, name: str, c: tuple[int, ...]) -> Unit:
    root = layout.plan.root
    g = _group_of(layout, name, c[1], 1)
    if layout.is_task(root):
        return Unit("task", c[0], g, root.path)
    return Unit("merge", c[0], g, root.path, c[2])


def _partial_unit(layout: Layout, depth: int, c: tuple[int, ...]) -> Unit:
    row = c[2] * layout.chunk
    node = None
    for path, off in layout.regions.items():
        n = layout.plan.by_path[path]
        if len(path) == depth and off <= row < off + layout.pieces(n) * layout.chunk:
            node = n
            break
    if node is None:
        raise StoreError(f"chunk {c} of depth {depth} lies in no node's region")
    g = c[1]  # partial chunks span exactly one head group
    if layout.is_task(node):
        return Unit("task", c[0], g, node.path)
    return Unit("merge", c[0], g, node.path, (row - layout.regions[node.path]) // layout.chunk)


__all__ = ["repair"]
