"""A task's local token sequence, copied only where a kernel block needs a copy.

A leaf task's tokens are a few global runs. A block whose rows (or keys) lie
inside one run can read a view of the source tensor; only blocks that cross
a run boundary need those rows gathered into one contiguous buffer. Kernels
compute the same bits from a view as from a copy (they read rows through
strides), and every executor makes the same choice from the same plan, so
skipping the copies changes no result. At itr=3 this skips about two thirds
of the gather traffic.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import Tensor

Run = tuple[int, int]  # (start, length) in the source tensor, in local order
Range = tuple[int, int]  # local (start, stop)


def gather_runs(
    x: Tensor,
    runs: Sequence[Run],
    dtype: torch.dtype | None = None,
    keep: Sequence[Range] | None = None,
) -> Tensor:
    """Token runs of x [B, H, L, ...] as one tensor, cast once (a view if one run).

    With ``keep`` (sorted local (start, stop) ranges) only those rows are
    copied; the rest stay uninitialised, for rows no kernel block reads.
    """
    total = sum(n for _, n in runs)
    if len(runs) == 1 and (dtype is None or dtype == x.dtype) and x.stride(-1) == 1:
        a, n = runs[0]
        return x[:, :, a : a + n]  # a view costs nothing, kept rows or not
    dst = torch.empty((*x.shape[:2], total, *x.shape[3:]), dtype=dtype or x.dtype, device=x.device)
    pos = 0
    for a, n in runs:
        for lo, hi in ((pos, pos + n),) if keep is None else keep:
            lo, hi = max(lo, pos), min(hi, pos + n)
            if lo < hi:
                dst[:, :, lo:hi] = x[:, :, a + lo - pos : a + hi - pos]
        pos += n
    return dst


class Tokens:
    """Local rows [B, H, L, ...] over a source tensor: views inside a run,
    the gathered buffer across runs (only ``crossing`` ranges are filled)."""

    def __init__(
        self, x: Tensor, runs: Sequence[Run], used: Sequence[Range], crossing: Sequence[Range]
    ) -> None:
        self._x = x
        self._runs = tuple(runs)
        self._used = tuple(used)
        self._starts = [0]
        for _, n in self._runs:
            self._starts.append(self._starts[-1] + n)
        self._crossing = tuple(crossing)
        self._buffer = gather_runs(x, self._runs, None, crossing) if crossing else None
        self.shape = torch.Size((*x.shape[:2], self._starts[-1], *x.shape[3:]))
        self.dtype = x.dtype
        self.device = x.device

    def rows(self, a: int, z: int) -> Tensor:
        """Rows [a, z): a view inside one run or a gathered range, else a copy
        of the runs' pieces (a kernel call may join ranges blocks kept apart)."""
        i = bisect.bisect_right(self._starts, a) - 1
        if z <= self._starts[i + 1]:
            src = self._runs[i][0] + a - self._starts[i]
            return self._x[:, :, src : src + z - a]
        if self._buffer is not None and any(c <= a and z <= d for c, d in self._crossing):
            return self._buffer[:, :, a:z]
        pieces = []
        while a < z:
            stop = min(z, self._starts[i + 1])
            pieces.append(self.rows(a, stop))
            a, i = stop, i + 1
        return torch.cat(pieces, dim=2)

    def to(self, device: torch.device | str) -> Tensor | Tokens:
        """Itself on its own device; elsewhere one copy of just the used rows
        (moving the whole source for one task would move far more)."""
        want = torch.device(device)
        here = self.device
        if want.type == here.type and want.index in (None, here.index):
            return self
        return gather_runs(self._x, self._runs, None, self._used).to(device)


def leaf_tokens(
    x: Tensor,
    runs: Sequence[Run],
    dtype: torch.dtype | None,
    used: Sequence[Range],
    crossing: Sequence[Range],
) -> Tensor | Tokens:
    """The cheapest local form of x's runs: a view, a ``Tokens``, or (when a
    cast is needed anyway) one gathered tensor holding the ``used`` rows."""
    same = dtype is None or dtype == x.dtype
    if len(runs) == 1 or not same or x.stride(-1) != 1:
        return gather_runs(x, runs, dtype, used)
    return Tokens(x, runs, used, crossing)


def rows(x: Tensor | Tokens, a: int, z: int) -> Tensor:
    """Local rows [a, z) of a tensor or a ``Tokens``."""
    if isinstance(x, Tokens):
        return x.rows(a, z)
    return x[:, :, a:z]
