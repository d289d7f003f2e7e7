"""``repair``: find chunks that are corrupt or missing and unmark what made them.

Outputs and intermediates are recomputable. A done marker vouches for every
chunk its unit wrote, so a chunk that fails its checksum, or is absent where
a done unit wrote it (zarr would read it as zeros), is damage.

The unit of repair is a (batch, head group): its units fold into one
accumulator in a fixed order, and a finished pass has dropped that
accumulator, so an output chunk cannot be recomputed alone. Damage anywhere
in a group (its outputs, its accumulator chunks, its kept partials, or a
marker that no longer reads as done after the accumulator is gone) unmarks
every unit of the group and drops its accumulator chunks; the next run
recomputes that group, bit-identically, and leaves the others as they are.

A bad input chunk cannot be recomputed and is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.core.sync import sync

from streamcqsa.storage.integrity import all_chunks, chunk_key, scan, stored_chunks
from streamcqsa.storage.layout import INPUTS
from streamcqsa.storage.location import Location
from streamcqsa.storage.lock import StoreLock
from streamcqsa.storage.runarrays import RunArrays
from streamcqsa.storage.store import StoreError, open_group, update_meta
from streamcqsa.storage.units import BWD, FWD, Layout, partial_names


def repair(store_path: Any, *, storage_options: dict | None = None) -> dict:
    """Check every chunk a pass vouches for; unmark the groups whose results
    are corrupt or missing.

    The report lists damaged chunks as (array, chunk): ``report[kind]`` all of
    them, ``report[kind + "_missing"]`` the absent ones, and
    ``report[kind + "_units_reset"]`` counts the units to run again.
    """
    store_path = Location.of(store_path, storage_options)
    group, problem, meta = open_group(store_path)
    report: dict[str, Any] = {"inputs": [], "inputs_missing": []}
    with StoreLock(store_path):
        _check_inputs(group, meta, report)
        for kind in (FWD, BWD):
            report[kind], report[f"{kind}_missing"] = [], []
            report[f"{kind}_units_reset"] = 0
            entry = meta.get(kind)
            if not entry:
                continue
            layout = Layout.from_meta(entry["plan"], problem)
            arrays = RunArrays(group, layout, kind)
            keep = entry.get("keep_partials", (entry.get("stats") or {}).get("keep_partials"))
            bad = _damage(arrays, keep is True, report[kind], report[f"{kind}_missing"])
            if not bad:
                continue
            marker = arrays.array(arrays.marker_path)
            per = len(layout.group_units)
            for b, g in sorted(bad):
                first = (b * layout.groups + g) * per
                marker[first : first + per] = 0
                if arrays.acc.path in group:
                    for c in range(layout.chunks):
                        _delete(arrays.acc.array, (b, g, c, 0))
            report[f"{kind}_units_reset"] = per * len(bad)
            entry = dict(entry)
            entry["status"] = "needs repair run"
            meta = update_meta(group, **{kind: entry})
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


def _delete(arr: Any, coord: tuple[int, ...]) -> None:
    sync(arr.store.delete(chunk_key(arr, coord)))


def _damage(arrays: RunArrays, keep: bool, found: list, missing: list) -> set[tuple[int, int]]:
    """The (batch, group) pairs with damage; appends the damaged chunks."""
    lay, group = arrays.layout, arrays.group
    bad: set[tuple[int, int]] = set()

    def chunks_of(path: str) -> set[tuple[int, ...]]:
        return set(stored_chunks(group[path])) if path in group else set()

    # markers first: a corrupt one reads as "not done" once deleted
    marker = group[arrays.marker_path] if arrays.marker_path in group else None
    if marker is not None:
        for c in scan(marker):
            _delete(marker, c)
            found.append((arrays.marker_path, c))
        done = arrays.done()
    else:
        done = np.zeros(lay.total_units, dtype=bool)
    acc_there = arrays.acc.path in group
    if not lay.direct and not acc_there:
        # the accumulator is gone (a finished pass): a group with any unit
        # left to run cannot fold again
        per = len(lay.group_units)
        for i in np.flatnonzero(~done):
            bg = int(i) // per
            bad.add(divmod(bg, lay.groups))
    # corrupt chunks of outputs, accumulator and kept partials
    paths = list(partial_names(arrays.kind))
    if acc_there:
        paths.append(arrays.acc.path)
    if keep:
        paths += [
            arrays.partial_path(d, n) for d in lay.depth_rows for n in partial_names(arrays.kind)
        ]
    for path in paths:
        if path in group:
            for c in scan(group[path]):
                found.append((path, c))
                bad.add(_group_of(lay, path, c))
    # chunks a done unit vouches for that are absent
    have: dict[str, set] = {}
    for i in np.flatnonzero(done):
        u = lay.unit_at(int(i))
        for path, c in arrays.unit_chunks(u, keep):
            if path not in have:
                have[path] = chunks_of(path)
            if c not in have[path]:
                missing.append((path, c))
                bad.add((u.b, u.g))
    # accumulator chunks that done tasks folded into, not yet cast by a final
    if acc_there and not lay.direct:
        have_acc = chunks_of(arrays.acc.path)
        for b in range(lay.problem.batch):
            for g in range(lay.groups):
                missing_here = _acc_missing(arrays, done, have_acc, b, g)
                missing += missing_here
                if missing_here:
                    bad.add((b, g))
    found += [m for m in missing if m not in found]
    return bad


def _acc_missing(arrays: RunArrays, done: np.ndarray, have: set, b: int, g: int) -> list:
    from streamcqsa.storage.units import Unit

    lay = arrays.layout
    fold = lay.fold
    done_tasks = {
        i for i, path in enumerate(fold.units) if done[lay.index(Unit("task", b, g, path))]
    }
    out = []
    for c in range(lay.chunks):
        if done[lay.index(Unit("final", b, g, (), c))]:
            continue  # cast and dropped
        if (b, g, c, 0) not in have and done_tasks.intersection(fold.touchers(c)):
            out.append((arrays.acc.path, (b, g, c, 0)))
    return out


def _group_of(layout: Layout, path: str, c: tuple[int, ...]) -> tuple[int, int]:
    """(batch, group) of a chunk of an output, the accumulator or a kept partial."""
    if path.startswith("partials/"):
        return c[0], c[1]  # accumulator and kept partial chunks span one group
    per_group = layout.head_group * (1 if path in ("dk", "dv") else layout.problem.group_ratio)
    return c[0], c[1] // per_group  # output chunks hold one head


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


__all__ = ["repair"]
