"""A pass's one stored intermediate: fp32 accumulators over the whole sequence.

Each unit's partial is folded into these in unit order (``cqs.folds``), and
the outputs are cast from them at the end, so a pass needs one fp32 copy of
its outputs on disk, whatever its depth.

Layout: one array ``partials/{kind}/acc`` of shape [B, G, C, R·W + 1] (G head
groups, C store chunks of R rows along L, W floats per row), one zarr chunk
per (batch, head group, store chunk). A chunk holds R rows of the group's
forward partial (out for each query head, then lse for each) or of its
gradients (dq per query head, dk and dv per kv head), row after row, then
one *counter*: the index of the last unit folded into it. A chunk is written
whole and atomically, data and counter together, so a fold interrupted
anywhere is redone exactly: a unit skips the chunks whose counter already
shows it. One counter per chunk, not per row, keeps the accumulator within
twice a half-precision pass's outputs.

In memory a chunk is that flat vector (``read``, ``identity``); ``views``
gives its rows as the partial's tensors.

An absent chunk is one no unit has reached yet (the merge identity: out 0,
lse -inf, gradients 0, counter -1); once a unit has folded into it, it must
exist, and the caller checks that against the fold plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zarr

from streamcqsa.errors import MissingChunkError
from streamcqsa.storage import chunkio
from streamcqsa.storage.layout import Problem
from streamcqsa.storage.store import array_kwargs

FWD, BWD = "fwd", "bwd"


class Accumulator:
    """The accumulator array of one pass of one store."""

    def __init__(self, group: zarr.Group, problem: Problem, head_group: int, kind: str) -> None:
        self.group, self.problem, self.kind = group, problem, kind
        self.hk = head_group
        self.hq = head_group * problem.group_ratio
        self.groups = problem.kv_heads // head_group
        self.chunk = problem.chunk_tokens
        self._arr: Any = None

    @property
    def path(self) -> str:
        return f"partials/{self.kind}/acc"

    @property
    def width(self) -> int:
        """Floats per row: the group's partial."""
        d = self.problem.head_dim
        if self.kind == FWD:
            return self.hq * (d + 1)
        return (self.hq + 2 * self.hk) * d

    @property
    def chunks(self) -> int:
        return -(-self.problem.seq_len // self.chunk)

    @property
    def length(self) -> int:
        """Floats per chunk: its rows, then the counter."""
        return self.chunk * self.width + 1

    def create(self) -> None:
        """Create the (empty) array unless it exists with this shape."""
        p = self.problem
        shape = (p.batch, self.groups, self.chunks, self.length)
        chunks = (1, 1, 1, self.length)
        try:
            arr = self.group[self.path]
            if tuple(arr.shape) == shape and tuple(arr.chunks) == chunks:
                self._arr = arr
                return
        except KeyError:
            pass
        self._arr = self.group.create_array(
            self.path, shape=shape, **array_kwargs("float32", chunks)
        )

    @property
    def array(self) -> Any:
        if self._arr is None:
            self._arr = self.group[self.path]
        return self._arr

    def rows(self, c: int) -> int:
        return min(self.chunk, self.problem.seq_len - c * self.chunk)

    @staticmethod
    def _sel(b: int, g: int, c: int) -> tuple[slice, ...]:
        return (slice(b, b + 1), slice(g, g + 1), slice(c, c + 1), slice(None))

    def read(self, b: int, g: int, c: int) -> np.ndarray | None:
        """Chunk ``c`` of (batch b, group g), flat float32; None if absent."""
        try:
            data = chunkio.read(self.array, self._sel(b, g, c))
        except MissingChunkError:
            return None
        return np.ascontiguousarray(data.reshape(self.length))

    def identity(self, c: int) -> np.ndarray:
        """The value of a chunk no unit has reached."""
        data = np.zeros(self.length, dtype=np.float32)
        if self.kind == FWD:
            d = self.problem.head_dim
            rows = data[:-1].reshape(self.chunk, self.width)
            rows[:, self.hq * d : self.hq * (d + 1)] = -np.inf
        data[-1] = -1
        return data

    def write(self, b: int, g: int, c: int, data: np.ndarray) -> None:
        """Write chunk ``c`` whole (flat, as ``read`` gives it)."""
        chunkio.write(self.array, self._sel(b, g, c), data.reshape(1, 1, 1, self.length))

    def delete(self, b: int, g: int, c: int) -> None:
        from zarr.core.sync import sync

        from streamcqsa.storage.integrity import chunk_key

        sync(self.array.store.delete(chunk_key(self.array, (b, g, c, 0))))

    def remove(self) -> None:
        """Drop the whole array (the pass is done)."""
        try:
            del self.group[self.path]
        except KeyError:
            pass
        self._arr = None

    @staticmethod
    def counter(data: np.ndarray) -> int:
        return int(data[-1])

    @staticmethod
    def set_counter(data: np.ndarray, unit: int) -> None:
        data[-1] = unit

    def views(self, chunk: torch.Tensor, c: int) -> tuple[torch.Tensor, ...]:
        """Chunk ``c`` (flat) as the partial's tensors over its rows, [1, heads,
        rows, ...] views: (out, lse) forward, (dq, dk, dv) backward."""
        rows, d = self.rows(c), self.problem.head_dim
        data = chunk[: rows * self.width].view(rows, self.width)
        hq, hk = self.hq, self.hk
        if self.kind == FWD:
            out = data[:, : hq * d].view(rows, hq, d).permute(1, 0, 2).unsqueeze(0)
            lse = data[:, hq * d : hq * (d + 1)].t().unsqueeze(0)
            return out, lse
        dq = data[:, : hq * d].view(rows, hq, d).permute(1, 0, 2).unsqueeze(0)
        dk = data[:, hq * d : (hq + hk) * d].view(rows, hk, d).permute(1, 0, 2).unsqueeze(0)
        dv = data[:, (hq + hk) * d : (hq + 2 * hk) * d].view(rows, hk, d)
        return dq, dk, dv.permute(1, 0, 2).unsqueeze(0)


__all__ = ["Accumulator"]
