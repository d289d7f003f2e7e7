"""Run a subtree of the plan in memory: leaves through a runner, partials folded up.

The engine runs the whole tree on the full sequence; a pipeline unit runs the
subtree below one stored node on the tokens it gathered for that node. Both
make the same leaf calls and the same folds in the same order, so both give
the same bits, whichever node the work is cut at.

On the CPU, in a thread scope of width 2 or more, the leaves under a node run
at once (``threads.run_tasks``, each single-threaded inside): one hand-over
per node instead of one per leaf, and a thread the OS sets aside holds up
one leaf, not a share of each. Their partials are folded afterwards in the
same order as one by one, so the bits are the same. A forward fold then
runs beside the next node's leaves rather than with a thread idle. The
forward keeps all of a node's children until its fold anyway, so this holds
them only one batch of leaves longer; the
backward, which adds each child as it comes, keeps at most two per thread
(``threads.run_in_order``). A ``before`` hook then runs on those threads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from streamcqsa.cqs.divide import Node, Plan
from streamcqsa.kernels import schedule, threads
from streamcqsa.kernels.fold import Path, fold, merge_combine, merge_fold
from streamcqsa.kernels.runner import accumulator_dtype
from streamcqsa.kernels.schedule import leaf_groups
from streamcqsa.kernels.tokens import leaf_tokens
from streamcqsa.kernels.workspace import Workspace

# (leaf, q, k, v, fill_empty=, workspace=) -> (out, lse);
# (leaf, q, k, v, dout, out, lse, workspace=) -> (dq, dk, dv)
LeafRun = Callable[..., tuple[Tensor, ...]]


# a fold or add waiting for the next batch of leaves: (its node, the nodes
# whose own queued work must run first, the work)
Queued = tuple[Path, set[Path], Callable[[], None]]


def _take_ready(queue: list[Queued]) -> list[Callable[[], None]]:
    """Remove and return the queued work whose predecessors have run (are no
    longer queued); the rest stays, in order."""
    queued = {path for path, _, _ in queue}
    ready = [run for _, needs, run in queue if not needs & queued]
    queue[:] = [q for q in queue if q[1] & queued]
    return ready


def forward_tree(
    plan: Plan,
    node: Node,
    qkv: tuple[Tensor, Tensor, Tensor],
    leaf: LeafRun,
    dtype: torch.dtype,
    *,
    base: Node | None = None,
    on_rows: Callable[[int, int, Tensor, Tensor], None] | None = None,
    before: Callable[[Node], None] | None = None,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of ``node`` [B,H,rows,...]; ``qkv`` hold ``base``'s tokens
    (default: ``node``'s), and leaves see them cast to ``dtype`` (only the
    rows and keys their blocks read are copied, and none that a view serves).

    With ``on_rows(a, z, out, lse)`` each of ``node``'s merge ranges is folded
    as soon as its last child is done and reported final, so a caller can
    write finished rows while later children still compute (the same folds,
    so the same bits). ``before(leaf)`` runs before each leaf reads its
    tokens (a pipeline unit waits there for the rows still being read).

    ``leaf`` is called as ``leaf(node, q, k, v, fill_empty=, workspace=)``:
    the partials below ``node`` are lent from a ``Workspace`` and taken back
    after their parent's fold. ``node``'s own partial leaves this call, so
    it is allocated plainly, or lent from ``workspace`` when the caller
    gives one (and releases it when done)."""
    base = node if base is None else base
    ws = Workspace() if workspace is None else workspace
    return _Forward(plan, qkv, leaf, dtype, base, before, ws, workspace is not None).node(
        node, on_rows
    )


class _Forward:
    """One ``forward_tree`` call: the recursion and the buffers it reuses."""

    def __init__(
        self,
        plan: Plan,
        qkv: tuple[Tensor, Tensor, Tensor],
        leaf: LeafRun,
        dtype: torch.dtype,
        base: Node,
        before: Callable[[Node], None] | None,
        ws: Workspace,
        lend_base: bool,
    ) -> None:
        self.plan, self.qkv, self.leaf, self.dtype = plan, qkv, leaf, dtype
        self.base, self.before, self.ws, self.lend_base = base, before, ws, lend_base
        self.folds: list[Queued] = []  # waiting for the next batch of leaves

    def node(
        self, node: Node, on_rows: Callable[[int, int, Tensor, Tensor], None] | None = None
    ) -> tuple[Tensor, Tensor]:
        if node.is_leaf:
            return self._leaf(node)
        if on_rows is not None:
            return self._streamed(node, on_rows)
        got: list[tuple[Tensor, Tensor]] = []
        self._collect(node, got.append)
        while self.folds:  # those not yet run beside later leaves
            self._batch([], [])
        return got[0]

    def _leaf(self, node: Node) -> tuple[Tensor, Tensor]:
        if self.before is not None:
            self.before(node)
        runs = self.plan.local_runs(node, self.base)
        used, crossing = self.plan.used_ranges(node), self.plan.crossing_ranges(node)
        q, k, v = self.qkv
        top = node is self.base
        return self.leaf(  # type: ignore[return-value]
            node,
            leaf_tokens(q, runs, self.dtype, used[0], crossing[0]),
            leaf_tokens(k, runs, self.dtype, used[1], crossing[1]),
            leaf_tokens(v, runs, self.dtype, used[1], crossing[1]),
            fill_empty=top,  # only a partial that leaves this call is read whole
            workspace=self.ws if self.lend_base or not top else None,
        )

    def _collect(self, node: Node, deliver: Callable[[tuple[Tensor, Tensor]], None]) -> None:
        """Run the leaves below ``node`` and queue the folds above them; its
        own fold ``deliver``s its partial when it runs.

        Where leaves run at once, a queued fold runs beside the next leaves
        (``_batch``) instead of with one thread idle. Each fold still reads
        the same partials in the same order, so the bits are unchanged; a
        node's children are held one batch of leaves longer."""
        q = self.qkv[0]
        parts: dict[Path, tuple[Tensor, Tensor]] = {}
        needs: set[Path] = set()  # children whose own folds come first
        kids = [self.plan.by_path[c] for c in node.children]
        for group in leaf_groups(kids, q.device, q.shape[0] * q.shape[1]):
            if not group[0].is_leaf:
                needs.add(group[0].path)
                self._collect(group[0], functools.partial(parts.__setitem__, group[0].path))
                continue
            got = self._batch(
                [functools.partial(self._leaf, c) for c in group],
                [c.blocks.entries if c.blocks else 0 for c in group],
            )
            parts.update((c.path, part) for c, part in zip(group, got, strict=True))

        def run() -> None:
            out = self._partial(node)
            merge_fold(self.plan.merge_sources(node), parts, out)
            for part in parts.values():
                self.ws.release(*part)
            deliver(out)

        if not schedule.DEFER_FOLDS or threads.tasks_width(q.device) < 2:
            run()  # one by one: nothing to run beside
        else:
            self.folds.append((node.path, needs, run))

    def _batch(self, fns: list[Callable[[], Any]], costs: list[int]) -> list[Any]:
        """``fns``' results, run at once with every queued fold whose
        children's folds have run."""
        ready = _take_ready(self.folds)
        got = threads.run_tasks([*ready, *fns], [schedule.FOLD_COST] * len(ready) + costs)
        return got[len(ready) :]

    def _partial(self, node: Node) -> tuple[Tensor, Tensor]:
        """Uninitialised (out, lse) accumulators for ``node``'s rows."""
        q = self.qkv[0]
        shape = (*q.shape[:2], node.length, q.shape[3])
        acc = accumulator_dtype(self.dtype)
        new = self.ws.empty if self.lend_base or node is not self.base else torch.empty
        return (
            new(shape, dtype=acc, device=q.device),
            new(shape[:-1], dtype=acc, device=q.device),
        )

    def _streamed(
        self, node: Node, on_rows: Callable[[int, int, Tensor, Tensor], None]
    ) -> tuple[Tensor, Tensor]:
        out = self._partial(node)
        sources = self.plan.merge_sources(node)
        waiting = [{path for path, _ in src.sources} for src in sources]
        uses = {c: sum(c in w for w in waiting) for c in node.children}
        parts: dict[Path, tuple[Tensor, Tensor]] = {}

        def drop(path: Path) -> None:  # free a child once nothing reads it
            self.ws.release(*parts.pop(path))

        def ready(done: Path | None) -> None:
            for i, src in enumerate(sources):
                if done is not None:
                    if done not in waiting[i]:
                        continue
                    waiting[i].discard(done)
                elif src.sources:
                    continue
                if waiting[i]:
                    continue
                fold((src,), parts, out, merge_combine, (0.0, -math.inf))
                on_rows(src.start, src.start + src.length, *out)
                for path, _ in src.sources:
                    uses[path] -= 1
                    if not uses[path]:
                        drop(path)

        def arrive(path: Path, part: tuple[Tensor, Tensor]) -> None:
            parts[path] = part
            if not uses[path]:
                drop(path)
            ready(path)

        ready(None)  # rows no child reaches
        q, prev = self.qkv[0], None  # the child whose arrival comes first
        kids = [self.plan.by_path[c] for c in node.children]
        for group in leaf_groups(kids, q.device, q.shape[0] * q.shape[1]):
            c = group[0]
            if not c.is_leaf:  # arrives when its fold runs, which may be queued
                self._collect(c, functools.partial(arrive, c.path))
                if self.folds and self.folds[-1][0] == c.path:
                    self.folds[-1][1].update(prev or ())  # arrivals one at a time
                    prev = {c.path}
                continue
            got = self._batch(
                [functools.partial(self._leaf, c) for c in group],
                [c.blocks.entries if c.blocks else 0 for c in group],
            )
            for c, part in zip(group, got, strict=True):  # after the batch: no fold runs
                arrive(c.path, part)
        while self.folds:
            self._batch([], [])
        return out


def backward_tree(
    plan: Plan,
    node: Node,
    xs: tuple[Tensor, ...],
    leaf: LeafRun,
    dtype: torch.dtype,
    *,
    base: Node | None = None,
    before: Callable[[Node], None] | None = None,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Partial (dq, dk, dv) of ``node``; ``xs`` = (q, k, v, dout, out, lse) of ``base``.

    Buffers as in ``forward_tree``: ``leaf(node, *xs, workspace=)``, and
    ``node``'s own gradients are lent from ``workspace`` only if one is given.
    ``before(leaf)`` runs before each leaf reads its tokens, as there."""
    base = node if base is None else base
    ws = Workspace() if workspace is None else workspace
    return _Backward(plan, xs, leaf, dtype, base, ws, workspace is not None, before).node(node)


class _Backward:
    """One ``backward_tree`` call.

    Gradient partials add, so each child is added into its parent's rows
    as soon as it is done and then freed: the same adds in the same order
    as ``sum_partials`` over all children (first source copied, the rest
    added in child order), so the same bits, holding one child at a time.

    Where leaves run at once, a node's add into its parent is queued and
    runs beside the next leaves (as a forward fold does), after the adds it
    must follow: its own children's, and its previous sibling's."""

    def __init__(
        self,
        plan: Plan,
        xs: tuple[Tensor, ...],
        leaf: LeafRun,
        dtype: torch.dtype,
        base: Node,
        ws: Workspace,
        lend_base: bool,
        before: Callable[[Node], None] | None,
    ) -> None:
        self.plan, self.xs, self.leaf, self.dtype = plan, xs, leaf, dtype
        self.base, self.ws, self.lend_base, self.before = base, ws, lend_base, before
        self.adds: list[Queued] = []  # waiting for the next batch of leaves

    def node(self, node: Node) -> tuple[Tensor, Tensor, Tensor]:
        if node.is_leaf:
            return self._leaf(node)
        got: list[tuple[Tensor, ...]] = []
        self._collect(node, got.append)
        while self.adds:
            self._batch([], lambda i, part: None)
        return got[0]  # type: ignore[return-value]

    def _lend(self, node: Node) -> Workspace | None:
        return self.ws if self.lend_base or node is not self.base else None

    def _leaf(self, node: Node) -> tuple[Tensor, Tensor, Tensor]:
        if self.before is not None:
            self.before(node)
        runs = self.plan.local_runs(node, self.base)
        (rows, keys) = self.plan.used_ranges(node)
        (xrows, xkeys) = self.plan.crossing_ranges(node)
        q, k, v, dout, out, lse = self.xs
        dt = self.dtype
        return self.leaf(  # type: ignore[return-value]
            node,
            leaf_tokens(q, runs, dt, rows, xrows),
            leaf_tokens(k, runs, dt, keys, xkeys),
            leaf_tokens(v, runs, dt, keys, xkeys),
            leaf_tokens(dout, runs, dt, rows, xrows),
            leaf_tokens(out, runs, dt, rows, xrows),
            leaf_tokens(lse, runs, None, rows, xrows),
            workspace=self._lend(node),
        )

    def _collect(self, node: Node, deliver: Callable[[tuple[Tensor, ...]], None]) -> None:
        """Add up ``node``'s children and queue ``deliver(grads)``."""
        acc = accumulator_dtype(self.dtype)
        lend = self._lend(node)
        new = torch.empty if lend is None else lend.empty
        grads = tuple(
            new((*t.shape[:2], node.length, t.shape[3]), dtype=acc, device=t.device)
            for t in self.xs[:3]
        )
        pieces: dict[Path, list[tuple[int, int, int, bool]]] = {}
        for src in self.plan.merge_sources(node, skip_empty=False):
            if not src.sources:  # rows no child holds
                for g in grads:
                    g[:, :, src.start : src.start + src.length].zero_()
            for j, (path, off) in enumerate(src.sources):
                pieces.setdefault(path, []).append((src.start, off, src.length, j == 0))

        def add(path: Path, part: tuple[Tensor, ...]) -> None:
            for start, off, n, first in pieces.get(path, ()):
                for g, p in zip(grads, part, strict=True):
                    dst, piece = g[:, :, start : start + n], p[:, :, off : off + n]
                    if first:
                        dst.copy_(piece)
                    else:
                        dst += piece
            self.ws.release(*part)

        q = self.xs[0]
        defer = schedule.DEFER_FOLDS and threads.tasks_width(q.device) > 1
        needs: set[Path] = set()  # the child whose add into grads comes first
        for group in leaf_groups(
            [self.plan.by_path[c] for c in node.children], q.device, q.shape[0] * q.shape[1]
        ):
            c = group[0]
            if not c.is_leaf:
                self._collect(c, functools.partial(add, c.path))
                if defer:  # after its earlier siblings' adds
                    self.adds[-1][1].update(needs)
                    needs = {c.path}
                continue
            while needs & {path for path, _, _ in self.adds}:  # its add has not run
                self._batch([], lambda i, part: None)  # leaves add into grads next
            needs = set()
            self._batch(
                [functools.partial(self._leaf, c) for c in group],
                lambda i, part, group=group: add(group[i].path, part),
            )
        if defer:
            self.adds.append((node.path, needs, functools.partial(deliver, grads)))
        else:
            deliver(grads)

    def _batch(self, fns: list[Callable[[], Any]], consume: Callable[[int, Any], None]) -> None:
        """``fns`` run at once, ``consume``d in order, beside every queued add
        whose predecessors have run."""
        threads.run_in_order(fns, consume, side=_take_ready(self.adds))
