"""``repair``: find chunks that fail their checksum and unmark what made them.

Outputs and partials are recomputable: the unit that wrote a bad chunk is
unmarked, with every merge above it (and, when the pass deleted its
partials, everything below it), so the next run recomputes only those units,
bit-identically. A bad input chunk cannot be recomputed and is reported.
"""

from __future__ import annotations

from typing import Any

from streamcqsa.storage.integrity import scan
from streamcqsa.storage.layout import INPUTS
from streamcqsa.storage.lock import StoreLock
from streamcqsa.storage.partials import BWD, FWD, Layout, RunArrays, Unit, partial_names
from streamcqsa.storage.store import StoreError, open_group, update_meta


def repair(store_path: Any) -> dict:
    """Scan every stored chunk; unmark the units whose results are corrupt."""
    group, problem, meta = open_group(store_path)
    report: dict[str, Any] = {"inputs": [], FWD: [], BWD: []}
    with StoreLock(store_path):
        for name in (*INPUTS, "dout"):
            if name in group:
                report["inputs"] += [(name, c) for c in scan(group[name])]
        for kind in (FWD, BWD):
            entry = meta.get(kind)
            if not entry:
                continue
            layout = Layout.from_meta(entry["plan"], problem)
            arrays = RunArrays(group, layout, kind)
            units: set[Unit] = set()
            bad_markers = scan(group[arrays.marker_path]) if arrays.marker_path in group else []
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
            stats = entry.get("stats") or {}
            full = _with_dependents(layout, units, below=not stats.get("keep_partials", True))
            marker = group[arrays.marker_path] if arrays.marker_path in group else None
            if marker is not None:
                from zarr.core.sync import sync

                for (i,) in bad_markers:  # a corrupt marker reads as "not done"
                    sync(marker.store.delete(f"{marker.path}/c/{i}"))
                    report[kind].append((arrays.marker_path, (i,)))
                for u in full:
                    marker[layout.index(u)] = 0
            if full or bad_markers:
                entry = dict(entry)
                entry["status"] = "needs repair run"
                meta = update_meta(group, **{kind: entry})
            report[f"{kind}_units_reset"] = len(full)
    if report["inputs"]:
        names = ", ".join(f"{n} chunk {c}" for n, c in report["inputs"])
        raise StoreError(
            f"input chunks are corrupt and cannot be recomputed: {names}; "
            "recreate the store from its source"
        )
    return report


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


def _with_dependents(layout: Layout, units: set[Unit], *, below: bool) -> set[Unit]:
    """Add every merge above each unit; with ``below`` also its whole subtree."""
    out = set(units)
    for u in units:
        for i in range(len(u.node)):
            out.update(layout.units_of(u.node[:i], u.b, u.g))
        if below:
            stack = [u.node]
            while stack:
                path = stack.pop()
                out.update(layout.units_of(path, u.b, u.g))
                stack.extend(layout.plan.by_path[path].children)
    return out


__all__ = ["repair"]
