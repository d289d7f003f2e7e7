"""Run one task: its gathered q, k, v and its blocks in, its partial out.

This is the only place that loops over a task's blocks. The in-memory
``streamcqsa.attention`` and the store pipeline both call it, so both compute
bit-identical partials.

On the CPU the kernels run single-threaded, on as many threads at once as
the caller's width (``kernels.threads``): see ``_execute``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch
from torch import Tensor

from streamcqsa.cqs.blocks import BlockList
from streamcqsa.kernels import threads
from streamcqsa.kernels.backend import Backend, get_backend
from streamcqsa.kernels.merge import merge_partials
from streamcqsa.kernels.tokens import Tokens, rows
from streamcqsa.kernels.workspace import Workspace

Local = Tensor | Tokens  # a task's local tokens, copied or viewed (``kernels.tokens``)


@dataclass
class WorkCounter:
    """Score entries computed (summed over batch and heads) and kernel calls.

    Tasks may run on several threads at once (``threads.run_tasks``), so
    adding takes a lock."""

    entries: int = 0
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, entries: int, calls: int = 1) -> None:
        with self._lock:
            self.entries += entries
            self.calls += calls

    def __getstate__(self) -> dict:  # a lock does not pickle or copy: a new one on arrival
        return {"entries": self.entries, "calls": self.calls}

    def __setstate__(self, state: dict) -> None:
        self.entries, self.calls = state["entries"], state["calls"]
        self._lock = threading.Lock()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulators (fp64 only for fp64 inputs, which want fp64 results)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(blocks: BlockList, q: Local, is_causal: bool | None) -> None:
    if is_causal is not None and bool(is_causal) != blocks.is_causal:
        raise ValueError(
            f"blocks were planned with is_causal={blocks.is_causal}, called with {is_causal}"
        )
    if q.shape[2] != blocks.length:
        raise ValueError(f"task has {blocks.length} tokens but q has {q.shape[2]}")


Piece = tuple[slice, slice, slice]  # (batch entries, q heads, kv heads)
Range = tuple[int, int]


@dataclass(frozen=True)
class Call:
    """One kernel call: rows [q_start, q_stop) against the concatenated key
    ``ranges`` (a single range holding the top-left triangle if ``causal``).
    ``fresh``: no earlier call of the task reaches these rows."""

    q_start: int
    q_stop: int
    ranges: tuple[Range, ...]
    causal: bool
    fresh: bool


@lru_cache(maxsize=4096)
def calls(blocks: BlockList, regroup: bool = True) -> tuple[Call, ...]:
    """The kernel calls that compute exactly ``blocks``' pairs, in apply order.

    With ``regroup`` the rectangles are recut by rows: each run of rows that
    attends one set of key ranges becomes a single call over those ranges,
    concatenated. Every row then gets at most one rectangle call and one
    triangle, so a task merges only where a triangle shares rows with
    rectangles, and no call computes a pair twice. Without it (devices whose
    memory is budgeted per block), one call per block.
    """
    if not regroup:
        raw = [(b.q_start, b.q_stop, ((b.k_start, b.k_stop),), b.causal) for b in blocks.blocks]
    else:
        rects = [b for b in blocks.blocks if not b.causal]
        cuts = sorted({x for b in rects for x in (b.q_start, b.q_stop)})
        raw = []
        for a, z in zip(cuts, cuts[1:], strict=False):
            ranges = _joined(
                (b.k_start, b.k_stop) for b in rects if b.q_start <= a and z <= b.q_stop
            )
            if not ranges:
                continue
            if raw and raw[-1][1] == a and raw[-1][2] == ranges:
                raw[-1] = (raw[-1][0], z, ranges, False)
            else:
                raw.append((a, z, ranges, False))
        raw += [
            (b.q_start, b.q_stop, ((b.k_start, b.k_stop),), True) for b in blocks.blocks if b.causal
        ]
        raw.sort(key=lambda c: (c[0], c[3], c[1]))
    out: list[Call] = []
    touched: list[Range] = []
    for a, z, ranges, causal in raw:
        fresh = all(z <= c or d <= a for c, d in touched)
        out.append(Call(a, z, ranges, causal, fresh))
        touched.append((a, z))
    return tuple(out)


def _joined(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sorted ranges, touching ones joined."""
    out: list[Range] = []
    for a, z in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], z)
        else:
            out.append((a, z))
    return tuple(out)


def _keys(x: Local, ranges: tuple[Range, ...], bs: slice, kh: slice) -> Tensor:
    """Key rows of ``ranges``, concatenated (a view if one range)."""
    if len(ranges) == 1:
        return rows(x, *ranges[0])[bs, kh]
    return torch.cat([rows(x, a, z)[bs, kh] for a, z in ranges], dim=2)


def _to(x: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``x.to(device, dtype)`` without a call when nothing changes: on the CPU
    every torch call lets another kernel thread take Python's lock."""
    if x.device == device and (dtype is None or x.dtype == dtype):
        return x
    return x.to(device, dtype)


def _execute(
    q: Local,
    k: Local,
    dev: torch.device,
    todo: tuple[Call, ...],
    init: Callable[[Piece], None],
    kernel: Callable[[Call, Piece], tuple[Tensor, ...]],
    apply: Callable[[Call, Piece, tuple[Tensor, ...]], None],
) -> None:
    """Run every call of the task for every head: ``init`` a piece's rows,
    then ``apply`` each call's ``kernel`` result to them, in call order.

    On a CPU the (batch, kv-head) units are dealt into cells
    (``kernels.threads``), each run on a thread of its own with
    single-threaded kernels. With fewer units than threads, the calls'
    kernels run at once instead and their results are applied in order
    afterwards. Either way each piece sees the same kernel calls and the
    same applications in the same order, so the bits do not depend on the
    thread count. Elsewhere (a GPU) all heads go in one call.
    """
    if dev.type != "cpu" or q.device.type != "cpu":
        piece = (slice(None), slice(None), slice(None))
        init(piece)
        for c in todo:
            apply(c, piece, kernel(c, piece))
        return
    r = q.shape[1] // k.shape[1]
    with threads.scope() as w:
        cells = [
            [(bs, slice(h.start * r, h.stop * r), h) for bs, h in cell]
            for cell in threads.cells(q.shape[0], k.shape[1], w)
        ]

        def lane(pieces: list[Piece]) -> None:
            for piece in pieces:
                init(piece)
                for c in todo:
                    apply(c, piece, kernel(c, piece))

        if len(cells) >= w or len(todo) < 2:
            threads.run_cells([partial(lane, cell) for cell in cells], 1)
            return
        items = [(piece, c) for cell in cells for piece in cell for c in todo]
        sizes = [(c.q_stop - c.q_start) * sum(z - a for a, z in c.ranges) for _, c in items]

        def compute(group: list[int]) -> dict[int, tuple[Tensor, ...]]:
            return {i: kernel(items[i][1], items[i][0]) for i in group}

        done: dict[int, tuple[Tensor, ...]] = {}
        for part in threads.run_cells([partial(compute, g) for g in threads.deal(sizes, w)], 1):
            done.update(part)
        i = 0
        for cell in cells:
            for piece in cell:
                init(piece)
                for c in todo:
                    apply(c, piece, done.pop(i))
                    i += 1


def forward(
    q: Local,
    k: Local,
    v: Local,
    blocks: BlockList,
    is_causal: bool | None = None,
    scale: float | None = None,
    *,
    backend: str | Backend = "auto",
    counter: WorkCounter | None = None,
    block_device: torch.device | None = None,
    fill_empty: bool = True,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Partial (out fp32 [B,H,L,D], lse fp32 [B,H,L]) of one task.

    With ``block_device`` the task stays where it is and each block's rows
    and keys visit that device alone (the guardrail's divided mode): the same
    kernel calls, merged in the same order, so the same bits.

    Rows with no block stay empty (out 0, lse -inf); with ``fill_empty=False``
    they are left unwritten, for a partial that is folded in memory, where
    the fold never reads a child's empty rows (``Plan.merge_sources``).
    Blocks that reach rows already written merge into them, in block order.
    With ``workspace`` the partial's buffers are lent from it.
    """
    _check(blocks, q, is_causal)
    dev = q.device if block_device is None else torch.device(block_device)
    be = get_backend(backend, dev)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = accumulator_dtype(q.dtype)
    new = torch.empty if workspace is None else workspace.empty
    out = new(q.shape, dtype=acc, device=q.device)
    lse = new(q.shape[:-1], dtype=acc, device=q.device)
    todo = calls(blocks, dev.type == "cpu")
    fresh = all(c.fresh for c in todo)

    def init(piece: Piece) -> None:
        bs, qh, _ = piece
        if fresh:
            for a, z in blocks.empty_rows if fill_empty else ():
                out[bs, qh, a:z] = 0.0
                lse[bs, qh, a:z] = float("-inf")
        else:  # some block merges over rows partly untouched: start from the identity
            out[bs, qh].zero_()
            lse[bs, qh].fill_(float("-inf"))

    def kernel(c: Call, piece: Piece) -> tuple[Tensor, ...]:
        bs, qh, kh = piece
        o, s = be.block_forward(
            _to(rows(q, c.q_start, c.q_stop)[bs, qh], dev),
            _to(_keys(k, c.ranges, bs, kh), dev),
            _to(_keys(v, c.ranges, bs, kh), dev),
            causal=c.causal,
            scale=scale,
        )
        return _to(o, out.device), _to(s, out.device)

    def apply(c: Call, piece: Piece, res: tuple[Tensor, ...]) -> None:
        bs, qh, _ = piece
        o, s = res
        dst = (out[bs, qh, c.q_start : c.q_stop], lse[bs, qh, c.q_start : c.q_stop])
        if c.fresh:  # merging into the identity would give these same bits
            dst[0].copy_(o)
            dst[1].copy_(s)
        else:
            merge_partials([dst, (o.to(acc), s.to(acc))], out=dst)

    _execute(q, k, dev, todo, init, kernel, apply)
    if counter is not None:
        counter.add(blocks.entries * q.shape[0] * q.shape[1], len(todo))
    return out, lse


def backward(
    q: Local,
    k: Local,
    v: Local,
    dout: Local,
    out: Local,
    lse: Local,
    blocks: BlockList,
    is_causal: bool | None = None,
    scale: float | None = None,
    *,
    backend: str | Backend = "auto",
    counter: WorkCounter | None = None,
    block_device: torch.device | None = None,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Partial (dq, dk, dv) fp32 of one task, from the *global* out and lse rows.

    Per block: P = exp(S * scale - lse), so every block's gradients are exact
    partials of the full gradient and simply add up. With ``workspace`` the
    gradients' buffers are lent from it.
    """
    _check(blocks, q, is_causal)
    dev = q.device if block_device is None else torch.device(block_device)
    be = get_backend(backend, dev)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    acc = accumulator_dtype(q.dtype)
    new = torch.empty if workspace is None else workspace.empty
    dq = new(q.shape, dtype=acc, device=q.device)
    dk = new(k.shape, dtype=acc, device=q.device)
    dv = new(v.shape, dtype=acc, device=q.device)

    todo = calls(blocks, dev.type == "cpu")

    def init(piece: Piece) -> None:
        bs, qh, kh = piece
        dq[bs, qh].zero_()
        dk[bs, kh].zero_()
        dv[bs, kh].zero_()

    def kernel(c: Call, piece: Piece) -> tuple[Tensor, ...]:
        bs, qh, kh = piece
        a, z = c.q_start, c.q_stop
        grads = be.block_backward(
            _to(rows(dout, a, z)[bs, qh], dev, q.dtype),
            _to(rows(q, a, z)[bs, qh], dev),
            _to(_keys(k, c.ranges, bs, kh), dev),
            _to(_keys(v, c.ranges, bs, kh), dev),
            _to(rows(out, a, z)[bs, qh], dev, q.dtype),
            _to(rows(lse, a, z)[bs, qh], dev),
            causal=c.causal,
            scale=scale,
        )
        return tuple(_to(g, dq.device) for g in grads)

    def apply(c: Call, piece: Piece, res: tuple[Tensor, ...]) -> None:
        bs, qh, kh = piece
        dq[bs, qh, c.q_start : c.q_stop] += res[0]
        at = 0
        for a, z in c.ranges:  # the concatenated keys' gradients, back to their rows
            dk[bs, kh, a:z] += res[1][:, :, at : at + z - a]
            dv[bs, kh, a:z] += res[2][:, :, at : at + z - a]
            at += z - a

    _execute(q, k, dev, todo, init, kernel, apply)
    if counter is not None:
        counter.add(2 * blocks.entries * q.shape[0] * q.shape[1], len(todo))
    return dq, dk, dv
