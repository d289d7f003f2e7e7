"""``run`` and ``run_backward``: exact attention and its gradients over a run store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from streamcqsa.cqs.divide import check_quorum
from streamcqsa.errors import StoreError
from streamcqsa.pipeline.args import check_args, dout_digest, same_dout
from streamcqsa.pipeline.passes import Pass
from streamcqsa.pipeline.stats import RunStats
from streamcqsa.storage.location import Location
from streamcqsa.storage.store import open_group
from streamcqsa.storage.units import BWD, FWD
from streamcqsa.validate import as_itr, as_quorum


def _check_overlap(overlap_io: Any) -> None:
    if overlap_io is not None and not isinstance(overlap_io, bool):
        raise TypeError(f"overlap_io must be True, False or None, got {overlap_io!r}")


def run(
    store_path: Any,
    itr: int | str = 3,
    *,
    quorum: int | Sequence[int] = 3,
    backend: str = "auto",
    device: str = "auto",
    scheduler: Any = None,
    workers: int = 2,
    keep_partials: bool = False,
    progress: bool = True,
    restart: bool = False,
    head_group: int | None = None,
    task_bytes: int | None = None,
    unit_depth: int | str | None = "auto",
    check_inputs: bool = True,
    n_cap: int | None = None,
    device_memory: int | None = None,
    overlap_io: bool | None = None,
    storage_options: dict | None = None,
) -> RunStats:
    """Exact CQS attention over a run store; writes ``out`` and ``lse``.

    Resumes a pass that was interrupted (same plan); refuses a different plan
    over unfinished work unless ``restart``. Refuses to start when the disk
    the pass needs at its peak (``stats["disk"]``) is not free.
    ``device="auto"`` uses CUDA when available. ``n_cap`` units may be
    resident on the device at once (default 1 on CPU, where one unit uses
    every core, and 2 on a GPU); the guardrail lowers it on out-of-memory
    (CUDA OOM, or ``device_memory`` bytes exceeded) and finally runs a task
    block by block.

    Units: the task tree is cut at ``unit_depth``; each node there is one
    unit that runs its subtree in memory (leaf by leaf on the device) and
    folds its partial into the pass's accumulator, one fp32 copy of the
    outputs, which is all the pass stores besides them. ``"auto"`` takes the
    shallowest depth whose units fit ``task_bytes`` of host memory (each
    level deeper folds every token k times more); ``None`` or ``itr`` makes
    every leaf a unit (finest resume). ``task_bytes`` defaults to 1/16 of
    the host's memory (256 MiB to 4 GiB), and on a GPU to 40% of the
    device's memory per resident unit: there
    units live on the device (a forward's inputs arrive through staging
    slots; a backward's are read whole on the host, then copied).
    ``keep_partials=True`` also stores every unit's partial, to inspect
    (``storage.open(path).partial(...)``); that costs k^unit_depth times the
    accumulator's disk.

    ``overlap_io``: each unit reads its inputs ahead of its leaves and writes
    finished chunks during its compute, on threads of its own. ``None``
    (default) does so on a GPU or when the compute leaves a core free; pass
    ``True`` for slow storage, where reads wait rather than copy.

    ``store_path`` is a directory, a URL (``s3://bucket/prefix``, opened with
    ``storage_options`` as zarr and fsspec take them) or a zarr store object.
    """
    store_path = Location.of(store_path, storage_options)
    _check_overlap(overlap_io)
    if not (isinstance(itr, str) and itr == "auto"):
        try:
            itr = as_itr(itr)
        except (TypeError, ValueError):
            raise ValueError(f"itr must be a non-negative int or 'auto', got {itr!r}") from None
    quorum = as_quorum(quorum)
    if itr != "auto":
        check_quorum(quorum, itr)
    a = check_args(store_path, locals())
    guard = {
        "n_cap": a["n_cap"],
        "budget_bytes": a["device_memory"],
        "overlap_io": overlap_io,
    }
    return Pass(store_path, FWD, itr=itr, quorum=quorum, args=a, guard=guard).run()


def run_backward(
    store_path: Any,
    dout: Any = None,
    *,
    backend: str = "auto",
    device: str = "auto",
    scheduler: Any = None,
    workers: int = 2,
    keep_partials: bool = False,
    progress: bool = True,
    restart: bool = False,
    task_bytes: int | None = None,
    unit_depth: int | str | None = "auto",
    check_inputs: bool = True,
    n_cap: int | None = None,
    device_memory: int | None = None,
    overlap_io: bool | None = None,
    storage_options: dict | None = None,
) -> RunStats:
    """Exact dq, dk, dv into the store, from ``dout`` and the stored forward.

    ``dout`` (numpy, torch or dask, [B,H,L,D], the store's dtype) is checked
    in full (shape, dtype, every value finite) before anything is written.
    The store keeps a digest of its dout: the same dout again (the same
    array, or the same seed) resumes an unfinished backward and leaves a
    finished one as it is; a different dout replaces the stored one and the
    backward starts over (logged, and ``stats["restarted"]``). Without
    ``dout`` the store must already hold a complete one. Uses the forward's
    plan and head group; ``unit_depth``, ``task_bytes``, ``keep_partials``
    and ``overlap_io`` (a unit's inputs read ahead of its leaves) work as in
    ``run``, and so do URLs with ``storage_options``.
    """
    store_path = Location.of(store_path, storage_options)
    _check_overlap(overlap_io)
    a = check_args(store_path, {**locals(), "head_group": None})
    _, problem, meta = open_group(store_path)
    fwd = meta.get(FWD)
    if not fwd or fwd.get("status") != "done":
        raise StoreError("run_backward needs a finished forward pass: call run() first")
    digest = None
    if dout is not None:
        if isinstance(dout, torch.Tensor):
            dout = dout.detach()
        digest = dout_digest(problem, dout)
        # a new dout makes earlier backward results stale
        a["restart"] = a["restart"] or not same_dout(meta, digest)
    elif (meta.get("dout") or {}).get("status") != "complete":
        raise StoreError(
            "no complete dout in the store (none given yet, or its write was interrupted): "
            "pass dout=... (same shape as q)"
        )
    plan = fwd["plan"]
    a["head_group"] = plan["head_group"]
    guard = {"n_cap": a["n_cap"], "budget_bytes": a["device_memory"], "overlap_io": overlap_io}
    p = Pass(
        store_path,
        BWD,
        itr=plan["itr"],
        quorum=plan["quorums"],
        args=a,
        guard=guard,
        dout=dout,
        dout_digest=digest,
    )
    return p.run()


__all__ = ["run", "run_backward"]
