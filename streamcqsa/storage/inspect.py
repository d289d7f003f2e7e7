"""``storage.open``: a read-mostly view of a run store for notebooks and scripts.

Arrays come back as dask arrays (nothing is loaded until asked), bf16 is
decoded on the fly, and the tree of tasks with its progress can be listed or
rendered as HTML.
"""

from __future__ import annotations

import html
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import torch

from streamcqsa.cqs.divide import Node
from streamcqsa.storage.layout import Problem
from streamcqsa.storage.location import Location
from streamcqsa.storage.lock import LOCK_NAME
from streamcqsa.storage.runarrays import RunArrays
from streamcqsa.storage.store import open_group
from streamcqsa.storage.units import BWD, FWD, Layout, Unit

ARRAYS = ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv")  # the logical arrays


@dataclass(frozen=True)
class TaskStatus:
    name: str
    path: tuple[int, ...]
    kind: str  # "unit" (its subtree ran in one unit), "in-unit" (below one), "above" (above)
    tokens: int
    units_done: int
    units: int

    @property
    def done(self) -> bool:
        return self.units_done == self.units


@dataclass(frozen=True)
class Partial:
    """One node's stored partial for one batch entry: token positions + values."""

    positions: np.ndarray  # global token index of each row
    out: np.ndarray  # [H, rows, D] fp32
    lse: np.ndarray  # [H, rows] fp32


class Run:
    """A run store opened for reading: arrays, tasks, partials, status.

    ``run.out``, ``run["out"]`` and ``run.arrays["out"]`` are the same lazy
    dask array; likewise q, k, v, lse, dout, dq, dk and dv once stored."""

    def __init__(self, path: Any, storage_options: dict | None = None) -> None:
        self.path = Location.of(path, storage_options)
        self.group, self.problem, self.meta = open_group(self.path, mode="r")

    def refresh(self) -> Run:
        self.group, self.problem, self.meta = open_group(self.path, mode="r")
        return self

    # -- arrays --------------------------------------------------------------
    def array(self, name: str) -> da.Array:
        """A stored array (``"out"``, or a path such as ``"partials/fwd/acc"``) as
        a dask array in its logical dtype: bf16, stored as its uint16 bit
        pattern, comes back as float32 (numpy has no bfloat16). Nothing is read
        until it is computed. KeyError, naming what is stored, if absent."""
        try:
            stored = self.group[name]
        except KeyError:
            have = ", ".join(n for n in ARRAYS if n in self.group)
            raise KeyError(f"no array {name!r} in this store yet (it has: {have})") from None
        arr = da.from_zarr(stored)
        if self.problem.dtype == "bfloat16" and arr.dtype == np.uint16:
            arr = arr.map_blocks(_bf16_to_f32, dtype=np.float32)
        return arr

    def __getitem__(self, name: str) -> da.Array:
        """``run["out"]``: the same as ``run.array("out")``."""
        return self.array(name)

    @property
    def arrays(self) -> dict[str, da.Array]:
        """Every stored one of q, k, v, out, lse, dout, dq, dk, dv, by name."""
        return {n: self.array(n) for n in ARRAYS if n in self.group}

    q = property(lambda self: self._attr("q"), doc="Queries [B, H, L, D] (dask).")
    k = property(lambda self: self._attr("k"), doc="Keys [B, Hkv, L, D] (dask).")
    v = property(lambda self: self._attr("v"), doc="Values [B, Hkv, L, D] (dask).")
    out = property(lambda self: self._attr("out"), doc="Attention output [B, H, L, D] (dask).")
    lse = property(lambda self: self._attr("lse"), doc="Log-sum-exp [B, H, L], fp32 (dask).")
    dout = property(lambda self: self._attr("dout"), doc="Stored dout [B, H, L, D] (dask).")
    dq = property(lambda self: self._attr("dq"), doc="Gradient of q [B, H, L, D] (dask).")
    dk = property(lambda self: self._attr("dk"), doc="Gradient of k [B, Hkv, L, D] (dask).")
    dv = property(lambda self: self._attr("dv"), doc="Gradient of v [B, Hkv, L, D] (dask).")

    def _attr(self, name: str) -> da.Array:
        """An array attribute; AttributeError (so ``hasattr`` is False) if absent."""
        try:
            return self.array(name)
        except KeyError as e:
            raise AttributeError(e.args[0]) from None

    # -- plan and tasks ----------------------------------------------------------
    def layout(self, kind: str = FWD) -> Layout | None:
        entry = self.meta.get(kind)
        if not entry:
            return None
        return Layout.from_meta(entry["plan"], self.problem)

    def tasks(self, kind: str = FWD) -> list[TaskStatus]:
        lay = self.layout(kind)
        if lay is None:
            return []
        arrays = RunArrays(self.group, lay, kind)
        try:
            done = arrays.done()
        except KeyError:
            done = np.zeros(lay.total_units, dtype=bool)
        out = []
        top = lay.depth
        units_below: dict[tuple[int, ...], list[Unit]] = {}
        for n in lay.unit_nodes:
            for d in range(n.depth + 1):
                units_below.setdefault(n.path[:d], []).append(Unit("task", 0, 0, n.path))
        for node in lay.plan.nodes:
            if lay.is_task(node):
                units, kind = [Unit("task", 0, 0, node.path)], "unit"
            elif node.depth > top or node.path[: node.depth] not in units_below:
                units, kind = [Unit("task", 0, 0, node.path[:top])], "in-unit"
            else:  # above the units: done when every unit under it is
                units, kind = units_below[node.path], "above"
            idx = [
                lay.index(Unit(u.kind, b, g, u.node, u.piece))
                for u in units
                for b in range(self.problem.batch)
                for g in range(lay.groups)
            ]
            out.append(
                TaskStatus(node.name, node.path, kind, node.length, int(done[idx].sum()), len(idx))
            )
        return out

    def node(self, path: tuple[int, ...] | str, kind: str = FWD) -> Node:
        """A plan node by name (``"r"``, ``"r.0.2"``) or path (``()``, ``(0, 2)``);
        ValueError naming valid ones for anything else."""
        lay = self.layout(kind)
        if lay is None:
            raise ValueError(f"no {kind} pass in this store yet")
        by_path = lay.plan.by_path
        key: tuple[int, ...] | None = None
        if isinstance(path, str):
            parts = path.split(".")
            if parts[0] == "r" and all(x.isdigit() for x in parts[1:]):
                key = tuple(int(x) for x in parts[1:])
        elif isinstance(path, (tuple, list)) and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in path
        ):
            key = tuple(int(x) for x in path)
        if key is None or key not in by_path:
            names = [n.name for n in sorted(lay.plan.nodes, key=lambda n: (n.depth, n.path))]
            shown = ", ".join(repr(n) for n in names[:6])
            raise ValueError(
                f"no node {path!r} in the {kind} plan; nodes are named 'r' (the root) and "
                f"'r.i.j...' (child i, then j), or given as paths like () and (i, j): "
                f"{shown}{', ...' if len(names) > 6 else ''} ({len(names)} nodes)"
            )
        return by_path[key]

    def partial(self, task: TaskStatus | tuple[int, ...] | str, *, batch: int = 0) -> Partial:
        """A node's forward partial: its tokens' global positions, out and lse."""
        path = task.path if isinstance(task, TaskStatus) else task
        node = self.node(path)
        positions = np.concatenate([np.arange(a, a + n) for a, n in node.runs])
        if node.depth == 0:
            out = np.asarray(self.array("out")[batch])
            lse = np.asarray(self.group["lse"][batch])
            return Partial(positions, out.astype(np.float32), lse)
        lay = self.layout()
        assert lay is not None
        entry = self.meta.get(FWD) or {}
        if not entry.get("keep_partials"):
            raise ValueError(
                f"{node.name}: this forward kept no partials; run it with keep_partials=True "
                "to inspect nodes other than the root"
            )
        if node.depth > lay.depth:
            unit = lay.plan.by_path[node.path[: lay.depth]]
            raise ValueError(
                f"{node.name} ran inside unit {unit.name}, whose partial is what was kept "
                f"(unit_depth={lay.depth}); run with unit_depth=None to keep every leaf's"
            )
        arrays = RunArrays(self.group, lay, FWD)
        g_all = range(lay.groups)
        parts = [_fold_kept(arrays, node, batch, g) for g in g_all]
        out = np.concatenate([o.numpy()[0] for o, _ in parts], axis=0)
        lse = np.concatenate([x.numpy()[0] for _, x in parts], axis=0)
        return Partial(positions, out, lse)

    def status(self) -> dict[str, Any]:
        p = self.problem
        res: dict[str, Any] = {
            "shape": f"B={p.batch} H={p.heads} Hkv={p.kv_heads} L={p.seq_len} D={p.head_dim}",
            "dtype": p.dtype,
            "is_causal": p.is_causal,
        }
        for kind in (FWD, BWD):
            entry = self.meta.get(kind)
            if not entry:
                res[kind] = "not started"
                continue
            res[kind] = {"status": entry.get("status"), **self._units(kind)}
            res[kind]["plan"] = entry.get("plan")
            if entry.get("status") == "running":
                owner = self.lock_owner()
                if owner is None:
                    res[kind]["status"] = "interrupted"
                    res[kind]["hint"] = "interrupted; rerun to resume"
                else:
                    res[kind]["owner"] = owner
        return res

    def _units(self, kind: str) -> dict[str, int]:
        """Done and total units as ``run`` counts them: one per progress marker."""
        lay = self.layout(kind)
        assert lay is not None
        try:
            done = int(RunArrays(self.group, lay, kind).done().sum())
        except KeyError:
            done = 0
        return {"units_done": done, "units": lay.total_units}

    def lock_owner(self) -> dict | None:
        """Who holds the store's lock: {"pid", "host", ...}, or None when no live
        run does (no lock file, or one left by a dead process on this host).

        A pass marked running with no live owner was interrupted (killed, or
        stopped by an error or Ctrl-C) and resumes when run again. An owner on
        another host cannot be checked from here and counts as live.
        """
        if not self.path.named:
            return {"pid": os.getpid(), "host": socket.gethostname()}  # in memory: this process
        try:
            raw = self.path.read_bytes(LOCK_NAME)
            if raw is None:
                return None
            owner = json.loads(raw)
        except (OSError, ValueError):
            return {"pid": None, "host": None}  # being written: a run is starting
        if not isinstance(owner, dict):
            return {"pid": None, "host": None}
        pid = owner.get("pid")
        if owner.get("host") == socket.gethostname() and isinstance(pid, int):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass  # alive, another user's
        return {k: owner.get(k) for k in ("pid", "host", "since")}

    def _repr_html_(self) -> str:
        s = self.status()
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in s.items()
        )
        bars = ""
        for kind in (FWD, BWD):
            if isinstance(s.get(kind), dict) and s[kind]["units"]:
                frac = s[kind]["units_done"] / s[kind]["units"]
                bars += (
                    f"<div>{kind}: <progress value='{frac:.3f}' max='1'></progress> "
                    f"{s[kind]['units_done']}/{s[kind]['units']}</div>"
                )
        return (
            f"<b>stream-cqsa run store</b> {html.escape(str(self.path))}<table>{rows}</table>{bars}"
        )

    def __repr__(self) -> str:
        """From the metadata only: a store has one progress marker per unit, and
        a repr must not read them all."""
        p = self.problem
        passes = ", ".join(
            f"{kind}={(self.meta.get(kind) or {}).get('status', 'not started')}"
            for kind in (FWD, BWD)
        )
        shape = f"B={p.batch} H={p.heads} Hkv={p.kv_heads} L={p.seq_len} D={p.head_dim}"
        return f"Run({str(self.path)!r}, {shape} {p.dtype}, {passes})"


def _fold_kept(arrays: RunArrays, node: Node, b: int, g: int) -> tuple[torch.Tensor, ...]:
    """A node's forward partial for one head group: read where a unit kept
    it, else folded from its children's, as the tree folds them in memory."""

    from streamcqsa.kernels.fold import merge_fold

    lay = arrays.layout
    if lay.is_task(node):
        return tuple(arrays.read_kept(node.path, n, b, g, 0, node.length) for n in ("out", "lse"))
    kids = {c: _fold_kept(arrays, lay.plan.by_path[c], b, g) for c in node.children}
    hq = lay.head_group * lay.problem.group_ratio
    out = (
        torch.empty(1, hq, node.length, lay.problem.head_dim),
        torch.empty(1, hq, node.length),
    )
    return merge_fold(lay.plan.merge_sources(node), kids, out)


def _bf16_to_f32(block: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(block)).view(torch.bfloat16).float().numpy()


def open(path: Any, *, storage_options: dict | None = None) -> Run:  # noqa: A001 - zarr.open
    """Open a run store for inspection (a directory, a URL with
    ``storage_options`` as in zarr, or a store object)."""
    return Run(path, storage_options)


__all__ = ["Partial", "Problem", "Run", "TaskStatus", "open"]
