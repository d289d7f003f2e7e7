"""The arrays of one pass in a store: outputs, markers, accumulator, kept partials.

Every write covers whole chunks (padding the last), and no two units ever
write the same chunk except through the accumulator, whose chunks carry the
fold order (``storage.accumulator``). Head groups are a chunk axis, so
(batch, head group) units never share chunks either.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr

from streamcqsa.kernels.nonfinite import poison_masked_rows
from streamcqsa.storage import chunkio
from streamcqsa.storage.accumulator import Accumulator
from streamcqsa.storage.integrity import checked_read
from streamcqsa.storage.layout import ATTR, Problem, stored_dtype, to_stored, to_torch, torch_dtype
from streamcqsa.storage.store import array_kwargs
from streamcqsa.storage.units import Layout, Unit, partial_names


class RunArrays:
    """Opens and creates the arrays of one pass (forward or backward)."""

    def __init__(self, group: zarr.Group, layout: Layout, kind: str) -> None:
        self.group = group
        self.layout = layout
        self.kind = kind
        self._open: dict[str, Any] = {}

    @cached_property
    def acc(self) -> Accumulator:
        return Accumulator(self.group, self.layout.problem, self.layout.head_group, self.kind)

    @cached_property
    def v_nonfinite_last(self) -> torch.Tensor | None:
        """[B, Hkv, D]: V's last non-finite token per column, recorded by a
        causal ``create(..., allow_nonfinite=True)``; None when V is finite."""
        last = dict(self.group.attrs[ATTR]).get("v_nonfinite_last")
        return None if last is None else torch.tensor(last, dtype=torch.int64)

    def array(self, path: str) -> Any:
        """Open an array once (opening reads its metadata from the store)."""
        if path not in self._open:
            self._open[path] = self.group[path]
        return self._open[path]

    # -- creation (driver only) ------------------------------------------------
    def create(self, keep_partials: bool = False) -> None:
        """Create any missing output, marker, accumulator and (if kept)
        partial arrays (metadata only)."""
        p, lay = self.layout.problem, self.layout
        for name in partial_names(self.kind):
            heads = p.kv_heads if name in ("dk", "dv") else p.heads
            shape: tuple[int, ...] = (p.batch, heads, p.seq_len, p.head_dim)
            chunks: tuple[int, ...] = (1, 1, lay.chunk, p.head_dim)
            dtype = stored_dtype(p.dtype)
            if name == "lse":
                shape, chunks, dtype = shape[:3], chunks[:3], "float32"
            self._ensure(name, shape, chunks, dtype)
        self._ensure(self.marker_path, (lay.total_units,), (1,), "uint8")
        if not lay.direct:
            self.acc.create()
        if keep_partials:
            hq = lay.head_group * p.group_ratio
            for depth, rows in lay.depth_rows.items():
                for name in partial_names(self.kind):
                    heads = p.kv_heads if name in ("dk", "dv") else p.heads
                    hg = lay.head_group if name in ("dk", "dv") else hq
                    shape = (p.batch, heads, rows, p.head_dim)
                    chunks = (1, hg, lay.chunk, p.head_dim)
                    if name == "lse":
                        shape, chunks = shape[:3], chunks[:3]
                    self._ensure(self.partial_path(depth, name), shape, chunks, "float32")

    def _ensure(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str):
        try:
            arr = self.group[path]
            if tuple(arr.shape) == shape and tuple(arr.chunks) == chunks:
                return
        except KeyError:
            pass
        self.group.create_array(path, shape=shape, **array_kwargs(dtype, chunks))
        self._open.pop(path, None)

    @property
    def marker_path(self) -> str:
        return f"progress/{self.kind}"

    def partial_path(self, depth: int, name: str) -> str:
        return f"partials/{self.kind}/d{depth}/{name}"

    def drop_partials(self) -> None:
        """Delete the pass's accumulator and kept partials (all of them)."""
        try:
            del self.group[f"partials/{self.kind}"]
        except KeyError:
            pass
        self._open = {k: v for k, v in self._open.items() if not k.startswith("partials/")}
        self.__dict__.pop("acc", None)

    # -- markers ---------------------------------------------------------------
    def done(self) -> np.ndarray:
        """Which units are marked done (a marker never written reads as not done)."""
        arr = self.array(self.marker_path)
        return np.asarray(checked_read(arr, (slice(None),), missing_ok=True)).astype(bool)

    def is_done(self, unit: Unit) -> bool:
        return bool(self.array(self.marker_path)[self.layout.index(unit)])

    def mark(self, unit: Unit) -> None:
        self.array(self.marker_path)[self.layout.index(unit)] = 1

    def heads(self, name: str, g: int) -> slice:
        return self.layout.kv_heads(g) if name in ("k", "v", "dk", "dv") else self.layout.q_heads(g)

    # -- outputs ---------------------------------------------------------------
    def write_output(self, name: str, b: int, g: int, a: int, t: torch.Tensor) -> None:
        """Rows [a, a + rows) of output ``name`` for group g, from fp32 (or
        already cast) t [1, Hg, rows, ...]; whole chunks but for the end."""
        if name == "out" and self.v_nonfinite_last is not None:
            last = self.v_nonfinite_last[b : b + 1, self.layout.kv_heads(g)]
            t = poison_masked_rows(t.clone(), last, start=a)  # as SDPA: 0 * inf = NaN
        data = t if name == "lse" else to_stored(t, self.layout.problem.dtype)
        if isinstance(data, torch.Tensor):
            data = data.numpy()
        sel = (slice(b, b + 1), self.heads(name, g), slice(a, a + t.shape[2]))
        chunkio.write(self.array(name), sel, data)

    def output_chunks(self, b: int, g: int, chunks: range | list[int]) -> list[tuple[str, tuple]]:
        """(array, chunk) of the outputs of group g over the given chunk rows."""
        out = []
        for name in partial_names(self.kind):
            tail = () if name == "lse" else (0,)
            hs = self.heads(name, g)
            out += [(name, (b, h, c, *tail)) for h in range(hs.start, hs.stop) for c in chunks]
        return out

    # -- kept partials -----------------------------------------------------------
    def write_kept(self, node: tuple[int, ...], name: str, b: int, g: int, t: torch.Tensor) -> None:
        """A unit's partial ``name`` [1, Hg, rows, ...] into its kept region."""
        arr = self.array(self.partial_path(len(node), name))
        off = self.layout.regions[node]
        data = t.numpy()
        rows = data.shape[2]
        pad = -rows % self.layout.chunk  # pad to whole chunks: never a partial write
        if pad:
            width = [(0, 0)] * data.ndim
            width[2] = (0, pad)
            data = np.pad(data, width)
            rows += pad
        chunkio.write(arr, (slice(b, b + 1), self.heads(name, g), slice(off, off + rows)), data)

    def read_kept(self, node: tuple[int, ...], name: str, b: int, g: int, a: int, z: int):
        """Rows [a, z) of a unit's kept partial ``name`` (node-local), fp32 torch."""
        arr = self.array(self.partial_path(len(node), name))
        off = self.layout.regions[node]
        data = chunkio.read(arr, (slice(b, b + 1), self.heads(name, g), slice(off + a, off + z)))
        return torch.from_numpy(np.ascontiguousarray(data))

    def kept_chunks(self, node: tuple[int, ...], b: int, g: int) -> list[tuple[str, tuple]]:
        lay = self.layout
        first = lay.regions[node] // lay.chunk
        pieces = range(first, first + lay.pieces(lay.plan.by_path[node]))
        out = []
        for name in partial_names(self.kind):
            tail = () if name == "lse" else (0,)
            out += [(self.partial_path(len(node), name), (b, g, j, *tail)) for j in pieces]
        return out

    def unit_chunks(self, unit: Unit, keep_partials: bool = False) -> list[tuple[str, tuple]]:
        """(array path, chunk) of every chunk a unit's done marker vouches for.
        Accumulator chunks are not listed: a finished pass deletes them."""
        lay = self.layout
        if unit.kind == "final":
            return self.output_chunks(unit.b, unit.g, [unit.piece])
        out = []
        if lay.direct:
            out += self.output_chunks(unit.b, unit.g, range(lay.chunks))
        if keep_partials and unit.node:
            out += self.kept_chunks(unit.node, unit.b, unit.g)
        return out


def read_runs(
    arrays: RunArrays,
    name: str,
    b: int,
    heads: slice,
    runs,
    problem: Problem,
    alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gather token runs of an input/output array into one torch tensor.

    With ``alloc(shape, dtype)`` the runs are read straight into the tensor it
    gives (a pooled buffer), with no concatenation.
    """
    arr = arrays.array(name)
    if alloc is None:
        parts = [chunkio.read(arr, (slice(b, b + 1), heads, slice(a, a + n))) for a, n in runs]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
        if name == "lse":
            return torch.from_numpy(np.ascontiguousarray(data))
        return to_torch(data, problem.dtype)
    h = len(range(*heads.indices(arr.shape[1])))
    shape = (1, h, sum(n for _, n in runs), *arr.shape[3:])
    dtype = torch.float32 if name == "lse" else torch_dtype(problem.dtype)
    t = alloc(shape, dtype)
    raw = t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()
    off = 0
    for a, n in runs:
        chunkio.read(arr, (slice(b, b + 1), heads, slice(a, a + n)), out=raw[:, :, off : off + n])
        off += n
    return t


__all__ = ["RunArrays", "read_runs"]
