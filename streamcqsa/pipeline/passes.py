"""One pass over one store: its state in the store, from checks to "done".

``Pass`` opens the store once and owns the pass's state there: it chooses
the layout, takes the store's lock, decides whether earlier work is reused
(same plan) or discarded, writes a new ``dout``, checks the disk the pass
will need, marks the pass running, builds and executes the graph, and marks
it done with its statistics. Running again is resuming: units marked done
are left out of the graph, temporary files of killed writes are removed
first, and folds happen in a fixed order, so the result is bit-identical to
an uninterrupted pass.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

import numpy as np
import zarr

from streamcqsa.errors import DiskFullError, InputsChangedError, PlanMismatchError
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.device import Device
from streamcqsa.pipeline import choose
from streamcqsa.pipeline.args import check_writable, is_distributed, resolve_device, same_dout
from streamcqsa.pipeline.context import Context, leaf_width
from streamcqsa.pipeline.execute import execute
from streamcqsa.pipeline.graph import build_graph
from streamcqsa.pipeline.guardrail import Guardrail
from streamcqsa.pipeline.stats import RunStats, disk_needs
from streamcqsa.storage.layout import INPUTS, Problem, torch_dtype
from streamcqsa.storage.location import Location
from streamcqsa.storage.lock import StoreLock
from streamcqsa.storage.runarrays import RunArrays
from streamcqsa.storage.store import ATTR, fingerprint, open_group, update_meta
from streamcqsa.storage.units import BWD, FWD, Layout

log = logging.getLogger("streamcqsa.pipeline")


def clean_orphans(path: Any) -> int:
    """Remove ``*.partial`` temp files that killed writers leave behind.

    Passes never write q, k or v (only a finished ``create`` makes a usable
    store), so their chunk trees, most of a big store's files, are not walked.
    """
    loc = Location.of(path)
    if loc.local is None:  # objects appear whole: a killed PUT leaves nothing
        return 0
    n = 0
    for entry in loc.local.iterdir():
        if entry.name in INPUTS and entry.is_dir():
            continue
        found = entry.rglob("*.partial") if entry.is_dir() else [entry]
        for f in found:
            if f.name.endswith(".partial"):
                f.unlink(missing_ok=True)
                n += 1
    return n


class Pass:
    """A forward or backward pass, prepared from checked arguments (see
    ``pipeline.api``); ``run()`` executes it and returns its ``RunStats``."""

    def __init__(
        self,
        store_path: Any,
        kind: str,
        *,
        itr: int | str,
        quorum: Any,
        args: dict,
        guard: dict,
        dout: Any = None,
        dout_digest: str | None = None,
    ) -> None:
        self.path, self.kind = Location.of(store_path), kind
        self.itr, self.quorum = itr, quorum
        self.a = args
        self.guard = dict(guard)
        self.dout, self.dout_digest = dout, dout_digest

    def __repr__(self) -> str:
        return f"Pass({self.kind}, store={self.path!r}, itr={self.itr!r})"

    # -- preparation ---------------------------------------------------------------
    def _threads(self) -> int | None:
        """Torch threads per compute slot: one in a distributed worker (its
        process runs other tasks beside), else the default share of cores."""
        return 1 if is_distributed(self.a["scheduler"]) else None

    def _layout(self, problem: Problem, meta: dict) -> Layout:
        a, guard = self.a, self.guard
        device = a["device"]
        itr, head_group = self.itr, a["head_group"]
        if itr == "auto":
            itr, head_group, guard = choose.auto_plan(problem, device, head_group, guard)
            self.guard = guard
        task_bytes = a["task_bytes"]
        if task_bytes is None:
            task_bytes = choose.default_task_bytes(device, guard["n_cap"])
        unit_depth = a["unit_depth"]
        if unit_depth == "auto" and not a["restart"]:
            unit_depth, head_group = choose.resume_units(
                meta.get(self.kind), problem, itr, self.quorum, head_group
            )
        width = leaf_width(device, self._threads(), guard["n_cap"], guard.get("budget_bytes"))
        return choose.layout(
            problem, itr, self.quorum, head_group, task_bytes, unit_depth, self.kind, device, width
        )

    def run(self) -> RunStats:
        t0 = time.perf_counter()
        self.a["device"] = resolve_device(self.a["device"])
        dev = Device.of(self.a["device"])
        if self.guard.get("n_cap") is None:
            self.guard["n_cap"] = dev.default_n_cap
        Guardrail(device=dev, n_cap=self.guard["n_cap"])  # validates n_cap before any work
        group, problem, meta = open_group(self.path)
        check_writable(self.path)
        layout = self._layout(problem, meta)
        with StoreLock(self.path):
            meta = dict(zarr.open_group(group.store, mode="r").attrs[ATTR])  # as of the lock
            return self._locked(group, problem, meta, layout, t0)

    def _check_plan(self, meta: dict, layout: Layout) -> bool:
        """True if the store's pass state may be reused with this layout."""
        prev = meta.get(self.kind)
        if not prev:
            return False
        same = dict(prev.get("plan") or {}) == layout.describe()
        restart = self.a["restart"]
        if same and not (restart and self.kind == BWD):
            return True
        if not restart:
            state = "finished" if prev.get("status") == "done" else "unfinished"
            raise PlanMismatchError(
                f"the store holds an {state} {self.kind} pass with plan {prev.get('plan')}; "
                f"this run asks for {layout.describe()}. Pass restart=True to start over."
            )
        return False

    def _check_inputs(self, group: zarr.Group, meta: dict) -> None:
        if not self.a["check_inputs"]:
            return
        want = meta.get("fingerprint") if self.kind == FWD else meta[FWD].get("fingerprint")
        if fingerprint(group) != want:
            what = "since the store was created" if self.kind == FWD else "since the forward ran"
            raise InputsChangedError(
                f"inputs changed {what} (fingerprint mismatch); "
                "recreate the store or rerun the forward"
            )

    def _check_disk(self, arrays: RunArrays, new_dout: bool) -> dict:
        """The disk this pass needs at its peak; refuse to start without it."""
        needs = disk_needs(arrays, self.a["keep_partials"], new_dout, self.a["workers"], self.path)
        free = self.path.free_bytes()
        if free is None:  # an object store or a store object: no limit we can read
            return needs
        if needs["more_bytes"] > free:
            raise DiskFullError(
                errno.ENOSPC,
                f"this {self.kind} pass needs {needs['more_bytes'] / 2**30:.2f} GiB more on "
                f"disk at its peak (outputs {needs['outputs_bytes'] / 2**30:.2f} GiB, "
                f"accumulator {needs['accumulator_bytes'] / 2**30:.2f} GiB, kept partials "
                f"{needs['kept_bytes'] / 2**30:.2f} GiB), but only {free / 2**30:.2f} GiB "
                f"is free at {self.path}; nothing was written",
            )
        return needs

    def _compute_dtype(self, meta: dict, problem: Problem, reuse: bool) -> str:
        """The kernels' dtype, once per pass: a resumed pass keeps the one its
        finished units used (a CPU's rule depends on the CPU), and a store of
        inputs that may hold NaN/Inf computes as the dense rule asks."""
        prev = (meta.get(self.kind) or {}).get("compute_dtype")
        if reuse and prev:
            return prev
        dev = Device.of(self.a["device"])
        dt = get_backend(self.a["backend"], dev.device).compute_dtype(
            torch_dtype(problem.dtype), dev.device
        )
        if meta.get("allow_nonfinite"):
            dt = dev.nonfinite_dtype(dt)
        return str(dt).removeprefix("torch.")

    # -- the pass, under the store's lock -------------------------------------------
    def _locked(
        self, group: zarr.Group, problem: Problem, meta: dict, layout: Layout, t0: float
    ) -> RunStats:
        a, kind = self.a, self.kind
        arrays = RunArrays(group, layout, kind)
        reuse = self._check_plan(meta, layout)
        self._check_inputs(group, meta)
        new_dout = self.dout is not None and not same_dout(meta, self.dout_digest or "")
        needs = self._check_disk(arrays, new_dout)
        if kind == FWD and not reuse and meta.get(BWD):
            meta = update_meta(group, **{BWD: None})
        restarted = bool(meta.get(kind)) and not reuse
        if new_dout:  # only now: every check above has passed
            restarted = self._replace_dout(group, problem, meta, arrays) or restarted
            meta = update_meta(group)
            reuse = False
        removed = clean_orphans(self.path)
        if not reuse:
            _reset(arrays)
        arrays.create(a["keep_partials"])
        done = arrays.done()
        entry = {
            "plan": layout.describe(),
            "status": "running",
            "keep_partials": a["keep_partials"],
            "compute_dtype": self._compute_dtype(meta, problem, reuse),
        }
        if kind == FWD:
            entry["fingerprint"] = meta.get("fingerprint")
        meta = update_meta(group, **{kind: entry})
        distributed = is_distributed(a["scheduler"])
        ctx = Context(
            store=self.path,
            layout=layout,
            kind=kind,
            backend=a["backend"],
            compute_dtype=entry["compute_dtype"],
            device=a["device"],
            threads=self._threads(),
            distributed=distributed,
            n_cap=self.guard["n_cap"],
            budget_bytes=self.guard.get("budget_bytes"),
            overlap_io=self.guard.get("overlap_io"),
            keep_partials=a["keep_partials"],
        )
        if not self.path.named:
            ctx.use_arrays(arrays)  # in-memory stores are shared, never reopened
        skip = set(np.flatnonzero(done).tolist())
        graph = build_graph(ctx, skip=skip)
        t_exec = time.perf_counter()
        try:
            execute(
                graph,
                ctx=ctx,
                scheduler=a["scheduler"],
                workers=a["workers"],
                progress=a["progress"],
                desc=f"stream-cqsa {'forward' if kind == FWD else 'backward'}",
            )
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            kept = int(arrays.done().sum()) if _can_read(arrays) else "unknown"
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing the store ({e}); the run stopped. Work already "
                f"marked done is kept ({kept} of {layout.total_units} units); free space and "
                "run again to resume",
            ) from e
        arrays.acc.remove()  # the outputs are in; kept partials (if any) stay
        stats = RunStats(
            kind=kind,
            plan=layout.describe(),
            units_run=len(graph["units"]),
            units_skipped=len(skip),
            units=layout.total_units,
            restarted=restarted,
            orphans_removed=removed,
            partial_disk_bytes=needs["accumulator_bytes"] + needs["kept_bytes"],
            disk=needs,
            keep_partials=a["keep_partials"],
            seconds=time.perf_counter() - t0,
            work_entries=layout.plan.entries * problem.batch * problem.heads,
            guardrail=ctx.runtime.guard_stats(),
            # this process's steps (a distributed run's workers time their own)
            stages=ctx.stages.summary(time.perf_counter() - t_exec),
            dout=None
            if kind == FWD
            else "new"
            if new_dout
            else "same"
            if self.dout is not None
            else "stored",
        )
        entry = dict(meta[kind])
        entry.update(status="done", stats=stats.to_dict())
        update_meta(group, **{kind: entry})
        return stats

    def _replace_dout(self, group: Any, problem: Problem, meta: dict, arrays: RunArrays) -> bool:
        """Store a new dout; True if a backward (finished or not) is discarded."""
        discarded = bool(meta.get(BWD))
        if discarded:
            state = "finished" if meta[BWD].get("status") == "done" else "unfinished"
            log.warning(
                "%s: dout differs from the one stored; the %s backward is discarded and "
                "starts over",
                self.path,
                state,
            )
        # forget the old backward first, and record dout as complete only once
        # it is fully written: a kill in between leaves no usable dout behind
        update_meta(group, dout=None, **{BWD: None})
        _reset(arrays)
        _write_dout(group, problem, self.dout, self.dout_digest or "")
        return discarded


def _can_read(arrays: RunArrays) -> bool:
    try:
        arrays.done()
    except Exception:  # noqa: BLE001 - best effort, for the message only
        return False
    return True


def _reset(arrays: RunArrays) -> None:
    """Forget a pass's progress and intermediates (its outputs are rewritten)."""
    try:
        del arrays.group[arrays.marker_path]
    except KeyError:
        pass
    arrays.drop_partials()


def _write_dout(group: Any, problem: Problem, dout: Any, digest: str) -> dict:
    """Write a dout already checked by ``args.dout_digest``; record it (with
    its digest) as complete only once every chunk is in."""
    import torch

    from streamcqsa.storage.layout import stored_dtype
    from streamcqsa.storage.store import array_kwargs, write_chunked

    if isinstance(dout, torch.Tensor):
        dout = dout.detach().cpu()
    arr = group.create_array(
        "dout",
        shape=(problem.batch, problem.heads, problem.seq_len, problem.head_dim),
        **array_kwargs(stored_dtype(problem.dtype), (1, 1, problem.chunk_tokens, problem.head_dim)),
    )
    write_chunked(arr, "dout", dout, problem, check_finite=False)
    return update_meta(group, dout={"status": "complete", "digest": digest})


__all__ = ["Pass", "clean_orphans"]
