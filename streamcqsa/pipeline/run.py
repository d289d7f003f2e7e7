"""``run`` and ``run_backward``: plan, check the store, build the graph, execute.

Running again is resuming: units marked done are left out of the graph,
orphan temporary files from killed writes are removed first, and the merge
order is fixed, so the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from dask.callbacks import Callback

from streamcqsa.cqs.budget import unit_device_bytes, unit_host_bytes
from streamcqsa.cqs.divide import Node, Plan, check_quorum, divide
from streamcqsa.kernels.backend import get_backend
from streamcqsa.pipeline import worker
from streamcqsa.pipeline.graph import build_graph
from streamcqsa.pipeline.guardrail import Guardrail
from streamcqsa.pipeline.steps import Context, compute_threads
from streamcqsa.storage.layout import INPUTS, Problem, dtype_name, to_stored, torch_dtype
from streamcqsa.storage.lock import StoreLock
from streamcqsa.storage.partials import BWD, FWD, Layout, RunArrays
from streamcqsa.storage.store import StoreError, fingerprint, open_group, update_meta
from streamcqsa.validate import as_flag, as_int, as_itr, as_quorum

log = logging.getLogger(__name__)


def clean_orphans(path: Any) -> int:
    """Remove ``*.partial`` temp files that killed writers leave behind.

    Passes never write q, k or v (only a finished ``create`` makes a usable
    store), so their chunk trees, most of a big store's files, are not walked.
    """
    if not isinstance(path, (str, os.PathLike)):
        return 0
    n = 0
    for entry in Path(path).iterdir():
        if entry.name in INPUTS and entry.is_dir():
            continue
        found = entry.rglob("*.partial") if entry.is_dir() else [entry]
        for f in found:
            if f.name.endswith(".partial"):
                f.unlink(missing_ok=True)
                n += 1
    return n


def _auto_plan(
    store_path: Any, device: str, head_group: int | None, guard: dict
) -> tuple[int, int | None, dict]:
    """itr, head group and n_cap from the device and host memory budgets."""
    import psutil

    from streamcqsa.cqs.budget import Budget, choose

    _, p, _ = open_group(store_path)
    dev_mem = guard.get("budget_bytes")
    if dev_mem is None:
        dev_mem = (
            int(torch.cuda.get_device_properties(device).total_memory * 0.8)
            if device.startswith("cuda")
            else 1 << 30
        )
    host = int(psutil.virtual_memory().available * 0.5)
    est = choose(
        seq_len=p.seq_len,
        heads=p.heads,
        kv_heads=p.kv_heads,
        head_dim=p.head_dim,
        budget=Budget(dev_mem, host),
        # CPU kernels compute half types in fp32: size the tasks for that
        dtype=p.dtype if device.startswith("cuda") else "float32",
        store_dtype=p.dtype,
        is_causal=p.is_causal,
        batch=p.batch,
        n_cap=guard.get("n_cap", 2),
        chunk_tokens=p.chunk_tokens,
    )
    return est.itr, head_group or est.head_group, {**guard, "n_cap": est.n_cap}


def _guard_stats(ctx: Context) -> dict:
    from streamcqsa.pipeline.steps import _GUARDRAILS

    g = _GUARDRAILS.pop(ctx.run_id, None)  # this process's; workers keep their own
    if g is None:
        return {"n_cap": ctx.n_cap, "events": []}
    return {"n_cap": g.n_cap, "events": list(g.events)}


def resolve_device(device: str) -> str:
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA devices")
    return device


def _int_arg(name: str, value: Any, minimum: int, *, none: bool = False) -> int | None:
    return None if value is None and none else as_int(name, value, minimum=minimum)


def _is_client(scheduler: Any) -> bool:
    return not isinstance(scheduler, (str, bytes, Mapping)) and callable(
        getattr(scheduler, "get", None)
    )


def _is_distributed(scheduler: Any) -> bool:
    return _is_client(scheduler) or (isinstance(scheduler, str) and "://" in scheduler)


def _check_args(store_path: Any, args: dict) -> dict:
    """Every argument of a pass, checked (numpy ints made ints) before the store
    is touched: a bad one must fail with nothing written, not leave a pass
    marked running that the next run refuses to resume."""
    out = dict(args)
    out["device"] = resolve_device(args["device"])
    get_backend(args["backend"], out["device"])  # unknown or unavailable here
    out["workers"] = _int_arg("workers", args["workers"], 1)
    for name in ("task_bytes", "device_memory", "n_cap", "head_group"):
        out[name] = _int_arg(name, args.get(name), 1, none=True)
    depth = args["unit_depth"]
    if not (isinstance(depth, str) and depth == "auto"):
        try:
            out["unit_depth"] = _int_arg("unit_depth", depth, 0, none=True)
        except (TypeError, ValueError):
            raise ValueError(
                f"unit_depth must be 'auto', None or an int >= 0, got {depth!r}"
            ) from None
    for name in ("keep_partials", "progress", "restart", "check_inputs"):
        out[name] = as_flag(name, args[name])
    sched = args["scheduler"]
    named = isinstance(sched, str) and sched in ("threads", "sync", "synchronous")
    if not (sched is None or named or _is_distributed(sched)):
        raise ValueError(
            "scheduler must be None, 'threads', 'sync', a scheduler address "
            f"('tcp://host:port') or a dask.distributed Client, got {sched!r}"
        )
    if _is_distributed(sched) and not isinstance(store_path, (str, os.PathLike)):
        raise ValueError("a distributed run needs a store path on a shared filesystem")
    if args.get("inject_oom") is not None and not callable(args["inject_oom"]):
        raise TypeError(f"inject_oom must be callable or None, got {args['inject_oom']!r}")
    return out


def _can_read(arrays: RunArrays) -> bool:
    try:
        arrays.done()
    except Exception:  # noqa: BLE001 - best effort, for the message only
        return False
    return True


def check_writable(path: Any) -> None:
    """A read-only store fails before any work starts (root ignores mode bits,
    so they are checked too)."""
    if not isinstance(path, (str, os.PathLike)):
        return
    p = Path(path)
    if not os.access(p, os.W_OK) or not (p.stat().st_mode & stat.S_IWUSR):
        raise StoreError(f"store {p} is read-only; a run needs to write into it")


def choose_head_group(problem: Problem, task_tokens: int, budget_bytes: int) -> int:
    """Largest divisor of kv_heads whose leaf working set fits the budget.

    Splitting heads adds no work, so it is the first lever for memory.
    """
    r = problem.group_ratio
    per_kv_head = task_tokens * problem.head_dim * 4 * (2 + 3 * r) * 2  # inputs, out, temps
    best = 1
    for hg in range(1, problem.kv_heads + 1):
        if problem.kv_heads % hg == 0 and hg * per_kv_head <= budget_bytes:
            best = hg
    return best


def default_task_bytes(device: str, n_cap: int, kind: str) -> int:
    """Memory one unit may take: 256 MiB of host memory, or on a GPU (forward,
    where a unit lives on the device) 40% of what this process may still
    allocate there, per resident unit."""
    if device.startswith("cuda") and kind == FWD:
        dev = torch.device(device)
        if dev.index is None:  # the memory queries below need an index
            dev = torch.device("cuda", torch.cuda.current_device())
        allowed = torch.cuda.get_device_properties(dev).total_memory
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if fraction is not None:  # a cap set by set_per_process_memory_fraction
            allowed = int(allowed * fraction(dev))
        used = torch.cuda.memory_allocated(dev)  # the caller's own tensors stay
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - used
        return int(0.4 * max(0, min(allowed - used, free)) / max(1, n_cap))
    return 256 << 20


def choose_units(
    plan: Plan,
    problem: Problem,
    head_group: int | None,
    budget_bytes: int,
    kind: str,
    device_itemsize: int | None = None,
) -> tuple[int, int]:
    """(unit_depth, head_group): the shallowest stored level whose task units fit
    the budget, with the largest head group that fits there.

    Every stored level costs a write and a read of fp32 partials, while a task
    unit folds its subtree in memory for free, so shallow units are fastest;
    head groups add no work or I/O, so they are split first to get there.
    Splitting heads further only to have more units to overlap I/O with was
    measured slower on CPU (kernels over fewer heads parallelise worse); with
    slow storage, pass a smaller ``head_group``. With ``device_itemsize`` the
    budget is device memory and non-leaf units are sized as they live on a GPU.
    """
    groups = (
        [head_group]
        if head_group is not None
        else sorted(d for d in range(1, problem.kv_heads + 1) if problem.kv_heads % d == 0)[::-1]
    )

    def need(n: Node, hg: int) -> int:
        shape = {"group_ratio": problem.group_ratio, "head_group": hg, "head_dim": problem.head_dim}
        if device_itemsize is not None and not n.is_leaf:
            return unit_device_bytes(plan, n, itemsize=device_itemsize, **shape)
        return unit_host_bytes(plan, n, kind=kind, **shape)

    for depth in range(plan.itr + 1):
        tasks = [n for n in plan.nodes if n.depth == depth or (n.is_leaf and n.depth < depth)]
        fits = [hg for hg in groups if max(need(n, hg) for n in tasks) <= budget_bytes]
        if fits:
            return depth, fits[0]
    if head_group is None:
        head_group = choose_head_group(problem, max(t.length for t in plan.tasks), budget_bytes)
    return plan.itr, head_group


def _resume_units(
    entry: dict | None, problem: Problem, itr: int, quorum: Any, head_group: int | None
) -> tuple[int | str | None, int | None]:
    """An automatic choice is made once per pass: a pass already in the store
    with the same depth and quorums keeps its units and head group, even if
    the budget (or its default) has changed since."""
    plan = (entry or {}).get("plan")
    if not plan:
        return "auto", head_group
    built = divide(problem.seq_len, itr, quorum, is_causal=problem.is_causal)  # may be capped
    if plan.get("itr") != built.itr or list(plan.get("quorums", ())) != list(built.quorums):
        return "auto", head_group
    if head_group is not None and head_group != plan.get("head_group"):
        return "auto", head_group
    return plan.get("unit_depth", itr), plan.get("head_group")


def _layout(
    problem: Problem,
    itr: int,
    quorum: int | Sequence[int],
    head_group: int | None,
    task_bytes: int,
    unit_depth: int | str | None,
    kind: str,
    device: str = "cpu",
) -> Layout:
    plan = divide(problem.seq_len, itr, quorum, is_causal=problem.is_causal)
    if head_group is not None and (
        isinstance(head_group, bool)
        or not isinstance(head_group, int)
        or head_group < 1
        or problem.kv_heads % head_group
    ):
        raise ValueError(f"head_group {head_group} must divide kv_heads {problem.kv_heads}")
    if unit_depth == "auto":
        on_gpu = device.startswith("cuda") and kind == FWD  # forward units live there
        itemsize = torch.empty((), dtype=torch_dtype(problem.dtype)).element_size()
        unit_depth, head_group = choose_units(
            plan, problem, head_group, task_bytes, kind, itemsize if on_gpu else None
        )
    elif unit_depth is not None and (
        isinstance(unit_depth, bool) or not isinstance(unit_depth, int) or unit_depth < 0
    ):
        raise ValueError(f"unit_depth must be 'auto', None or an int >= 0, got {unit_depth!r}")
    if head_group is None:
        longest = max(t.length for t in plan.tasks)
        head_group = choose_head_group(problem, longest, task_bytes)
    return Layout(plan=plan, problem=problem, head_group=head_group, unit_depth=unit_depth)


class _Progress(Callback):
    """tqdm over leaf tasks and merge steps: done count, throughput and ETA.

    A task unit may run a whole subtree, so its leaves are counted as they
    finish (from the compute slots); merge units count when Dask ends them.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        super().__init__()
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="task")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def _posttask(self, key, result, dsk, state, worker_id):  # noqa: ANN001
        if isinstance(key, tuple) and str(key[0]).endswith("-merge"):
            self.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _steps(units: list, plan: Plan) -> int:
    """What the progress bar counts: every leaf of each task unit, every merge."""
    return sum(
        plan.leaf_count(plan.by_path[key[3]]) if str(key[0]).endswith("-task") else 1
        for key in units
    )


def _execute(
    dsk: dict,
    finals: list,
    steps: int,
    *,
    ctx: Context,
    scheduler: Any,
    workers: int,
    progress: bool,
    desc: str,
    gpu: bool = False,
) -> None:
    """Threads (default), synchronous, or Dask distributed (a Client or an address).

    With threads, Dask runs the graph on a helper thread and this thread
    serves the compute slots (``pipeline.worker``) until the graph is done.
    """
    resources = {"GPU": 1} if gpu else None
    if _is_client(scheduler):  # a distributed Client
        scheduler.get(dsk, finals, resources=resources)
        return
    if isinstance(scheduler, str) and "://" in scheduler:
        from distributed import Client

        with Client(scheduler) as client:
            client.get(dsk, finals, resources=resources)
        return
    if scheduler not in (None, "threads", "sync", "synchronous"):
        raise ValueError(f"unknown scheduler {scheduler!r}")
    bar = _Progress(steps, desc, progress)
    worker.on_progress(ctx.run_id, bar.update)
    try:
        with bar:
            if scheduler in ("sync", "synchronous"):
                worker.register(ctx.run_id, worker.Inline())
                before = torch.get_num_threads()  # run_unit sets its I/O thread's
                try:
                    dask.get(dsk, finals)
                finally:
                    torch.set_num_threads(before)
            else:
                _threaded(dsk, finals, ctx, workers)
    finally:
        worker.unregister(ctx.run_id)
        bar.close()


def _threaded(dsk: dict, finals: list, ctx: Context, workers: int) -> None:
    slots = worker.ComputeSlots(ctx.n_cap, compute_threads(ctx))
    worker.register(ctx.run_id, slots)
    done = threading.Event()
    failure: list[BaseException] = []
    # the pass's own I/O threads: after a failure or Ctrl-C they are waited for
    # (Dask returns at the first error), so none outlives the store lock
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamcqsa-io")

    def graph() -> None:
        try:
            dask.threaded.get(dsk, finals, num_workers=workers, pool=pool)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            failure.append(e)
        finally:
            done.set()
            slots.wake()

    runner = threading.Thread(target=graph, name="streamcqsa-graph", daemon=True)
    runner.start()
    try:
        slots.serve(done)
    finally:
        slots.close()  # units still waiting for compute fail with Cancelled
        runner.join()
        worker.unregister(ctx.run_id)
        pool.shutdown(wait=True)
    if failure:
        raise failure[0]


def _check_plan(meta: dict, kind: str, layout: Layout, restart: bool, arrays: RunArrays) -> bool:
    """True if the store's pass state may be reused with this layout."""
    prev = meta.get(kind)
    if not prev:
        return False
    plan = dict(prev.get("plan") or {})
    plan.setdefault("unit_depth", plan.get("itr"))  # stores from before task units
    same = plan == layout.describe()
    if same and not (restart and kind == BWD):
        return True
    if not restart:
        state = "finished" if prev.get("status") == "done" else "unfinished"
        raise StoreError(
            f"the store holds an {state} {kind} pass with plan {prev.get('plan')}; "
            f"this run asks for {layout.describe()}. Pass restart=True to start over."
        )
    return False


def _reset(arrays: RunArrays) -> None:
    group = arrays.group
    for path in (arrays.marker_path, f"partials/{arrays.kind}"):
        try:
            del group[path]
        except KeyError:
            pass


def run(
    store_path: Any,
    itr: int | str = 3,
    *,
    quorum: int | Sequence[int] = 3,
    backend: str = "auto",
    device: str = "auto",
    scheduler: Any = None,
    workers: int = 2,
    keep_partials: bool = True,
    progress: bool = True,
    restart: bool = False,
    head_group: int | None = None,
    task_bytes: int | None = None,
    unit_depth: int | str | None = "auto",
    check_inputs: bool = True,
    n_cap: int | None = None,
    device_memory: int | None = None,
    inject_oom: Any = None,
    overlap_io: bool | None = None,
) -> dict:
    """Exact CQS attention over a run store; writes ``out`` and ``lse``.

    Resumes a pass that was interrupted (same plan); refuses a different plan
    over unfinished work unless ``restart``. Returns run statistics, including
    the disk the partials need. ``device="auto"`` uses CUDA when available.
    ``n_cap`` tasks may be resident on the device at once (default 1 on CPU,
    where one task uses every core, and 2 on a GPU); the guardrail lowers
    it on out-of-memory (CUDA OOM, or ``device_memory`` bytes exceeded) and
    finally runs a task block by block; ``inject_oom(task, n_cap)`` is a test hook.

    Resumable units: the task tree is stored down to ``unit_depth``; each node
    there is one unit that runs its subtree in memory (leaf by leaf on the
    device) and writes only its own partial. ``"auto"`` takes the shallowest
    depth whose units fit ``task_bytes`` of host memory (fewest partials to
    write and read back); ``None`` or ``itr`` stores every leaf's partial (finest
    resume, and every partial to inspect). ``task_bytes`` defaults to 256 MiB,
    and on a GPU to 40% of the device's memory per resident unit: there a
    forward unit lives on the device and the host holds only staging slots.

    ``overlap_io``: each unit reads its inputs ahead of its leaves and writes
    finished chunks during its compute, on threads of its own. ``None``
    (default) does so on a GPU or when the compute leaves a core free; pass
    ``True`` for slow storage, where reads wait rather than copy.
    """
    if overlap_io is not None and not isinstance(overlap_io, bool):
        raise TypeError(f"overlap_io must be True, False or None, got {overlap_io!r}")
    if not (isinstance(itr, str) and itr == "auto"):
        try:
            itr = as_itr(itr)
        except (TypeError, ValueError):
            raise ValueError(f"itr must be a non-negative int or 'auto', got {itr!r}") from None
    quorum = as_quorum(quorum)
    if itr != "auto":
        check_quorum(quorum, itr)
    a = _check_args(store_path, locals())
    guard = {
        "n_cap": a["n_cap"],
        "budget_bytes": a["device_memory"],
        "inject_oom": inject_oom,
        "overlap_io": overlap_io,
    }
    return _run_pass(store_path, FWD, itr=itr, quorum=quorum, guard=guard, **_pass_args(a))


def _pass_args(a: dict) -> dict:
    names = ("backend", "device", "scheduler", "workers", "keep_partials", "progress")
    names += ("restart", "head_group", "task_bytes", "unit_depth", "check_inputs")
    return {n: a[n] for n in names}


def run_backward(
    store_path: Any,
    dout: Any = None,
    *,
    backend: str = "auto",
    device: str = "auto",
    scheduler: Any = None,
    workers: int = 2,
    keep_partials: bool = True,
    progress: bool = True,
    restart: bool = False,
    task_bytes: int | None = None,
    unit_depth: int | str | None = "auto",
    check_inputs: bool = True,
    n_cap: int | None = None,
    device_memory: int | None = None,
    inject_oom: Any = None,
) -> dict:
    """Exact dq, dk, dv into the store, from ``dout`` and the stored forward.

    ``dout`` (numpy, torch or dask, [B,H,L,D], the store's dtype) is checked
    in full (shape, dtype, every value finite) before anything is written.
    The store keeps a digest of its dout: the same dout again (the same
    array, or the same seed) resumes an unfinished backward and leaves a
    finished one as it is; a different dout replaces the stored one and the
    backward starts over (logged, and ``stats["restarted"]``). Without
    ``dout`` the store must already hold a complete one. Uses the forward's
    plan and head group, so the partial gradients fold up the same tree;
    ``unit_depth`` and ``task_bytes`` work as in ``run``.
    """
    a = _check_args(store_path, {**locals(), "head_group": None})
    group, problem, meta = open_group(store_path)
    fwd = meta.get(FWD)
    if not fwd or fwd.get("status") != "done":
        raise StoreError("run_backward needs a finished forward pass: call run() first")
    digest = None
    if dout is not None:
        if isinstance(dout, torch.Tensor):
            dout = dout.detach()
        digest = _dout_digest(problem, dout)
        # a new dout makes earlier backward results stale
        a["restart"] = a["restart"] or not _same_dout(meta, digest)
    elif (meta.get("dout") or {}).get("status") != "complete":
        raise StoreError(
            "no complete dout in the store (none given yet, or its write was interrupted): "
            "pass dout=... (same shape as q)"
        )
    plan = fwd["plan"]
    a["head_group"] = plan["head_group"]
    guard = {"n_cap": a["n_cap"], "budget_bytes": a["device_memory"], "inject_oom": inject_oom}
    return _run_pass(
        store_path,
        BWD,
        itr=plan["itr"],
        quorum=plan["quorums"],
        dout=dout,
        dout_digest=digest,
        guard=guard,
        **_pass_args(a),
    )


def _same_dout(meta: dict, digest: str) -> bool:
    stored = meta.get("dout") or {}
    return stored.get("status") == "complete" and stored.get("digest") == digest


def _dout_digest(problem: Problem, dout: Any) -> str:
    """Check dout in full (shape, dtype, finite) and digest its stored bytes.

    Reads one chunk row at a time, so a dout of any size is checked before a
    byte of it is written, and the digest (kept in the store's metadata) is
    the same for the same values from numpy, torch or dask.
    """
    shape = (problem.batch, problem.heads, problem.seq_len, problem.head_dim)
    if not hasattr(dout, "shape") or not hasattr(dout, "dtype"):
        raise TypeError(f"dout must be an array (numpy, torch or dask), got {type(dout).__name__}")
    if tuple(dout.shape) != shape:
        raise ValueError(f"dout must have shape {shape} (that of q), got {tuple(dout.shape)}")
    try:
        same_dtype = dtype_name(dout.dtype) == problem.dtype
    except TypeError:
        same_dtype = False
    if not same_dtype:
        raise TypeError(f"dout dtype {dout.dtype} differs from the store's {problem.dtype}")
    h = hashlib.blake2b(repr((shape, problem.dtype)).encode(), digest_size=16)
    c = problem.chunk_tokens
    for b in range(problem.batch):
        for a in range(0, problem.seq_len, c):
            block = dout[b : b + 1, :, a : a + c, :]
            if hasattr(block, "compute"):
                block = block.compute()
            if not isinstance(block, torch.Tensor):
                block = torch.from_numpy(np.array(block, dtype=problem.dtype))  # a copy
            bad = ~torch.isfinite(block.cpu())
            if bad.any():
                tokens = bad.any(dim=3).any(dim=1).flatten().nonzero().flatten() + a
                raise ValueError(
                    f"dout has NaN/Inf at {len(tokens)} token(s) in positions "
                    f"[{int(tokens[0])}, {int(tokens[-1])}] of batch {b}; the backward needs "
                    "a finite dout (dout is not stored; the store is unchanged)"
                )
            h.update(np.ascontiguousarray(to_stored(block, problem.dtype)))
    return h.hexdigest()


def _write_dout(group: Any, problem: Problem, dout: Any, digest: str) -> dict:
    """Write a dout already checked by ``_dout_digest``; record it (with its
    digest) as complete only once every chunk is in."""
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


def _run_pass(
    store_path: Any,
    kind: str,
    *,
    itr: int,
    quorum: Any,
    backend: str,
    device: str,
    scheduler: Any,
    workers: int,
    keep_partials: bool,
    progress: bool,
    restart: bool,
    head_group: int | None,
    task_bytes: int,
    unit_depth: int | str | None,
    check_inputs: bool,
    dout: Any = None,
    dout_digest: str | None = None,
    guard: dict | None = None,
) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(device)
    guard = dict(guard or {})
    if guard.get("n_cap") is None:
        guard["n_cap"] = 2 if device.startswith("cuda") else 1
    Guardrail(n_cap=guard["n_cap"])  # validates n_cap before any work
    if itr == "auto":
        itr, head_group, guard = _auto_plan(store_path, device, head_group, guard or {})
    if task_bytes is None:
        task_bytes = default_task_bytes(device, guard["n_cap"], kind)
    if isinstance(itr, bool) or not isinstance(itr, int) or itr < 0:
        raise ValueError(f"itr must be a non-negative int or 'auto', got {itr!r}")
    group, problem, meta = open_group(store_path)
    check_writable(store_path)
    if unit_depth == "auto" and not restart:
        unit_depth, head_group = _resume_units(meta.get(kind), problem, itr, quorum, head_group)
    layout = _layout(problem, itr, quorum, head_group, task_bytes, unit_depth, kind, device)
    with StoreLock(store_path):
        group, problem, meta = open_group(store_path)  # state as of holding the lock
        return _locked_pass(
            store_path,
            group,
            problem,
            meta,
            layout,
            kind,
            t0=t0,
            backend=backend,
            device=device,
            dout=dout,
            dout_digest=dout_digest,
            guard=guard or {},
            scheduler=scheduler,
            workers=workers,
            keep_partials=keep_partials,
            progress=progress,
            restart=restart,
            check_inputs=check_inputs,
        )


def _locked_pass(
    store_path: Any,
    group: Any,
    problem: Problem,
    meta: dict,
    layout: Layout,
    kind: str,
    *,
    t0: float,
    backend: str,
    device: str,
    dout: Any,
    dout_digest: str | None,
    guard: dict,
    scheduler: Any,
    workers: int,
    keep_partials: bool,
    progress: bool,
    restart: bool,
    check_inputs: bool,
) -> dict:
    arrays = RunArrays(group, layout, kind)
    reuse = _check_plan(meta, kind, layout, restart, arrays)
    if check_inputs:
        fp = fingerprint(group)
        want = meta.get("fingerprint") if kind == FWD else meta[FWD].get("fingerprint")
        if fp != want:
            what = "since the store was created" if kind == FWD else "since the forward ran"
            raise StoreError(
                f"inputs changed {what} (fingerprint mismatch); "
                "recreate the store or rerun the forward"
            )
    if kind == FWD and not reuse and meta.get(BWD):
        meta = update_meta(group, **{BWD: None})
    restarted = bool(meta.get(kind)) and not reuse
    new_dout = dout is not None and not _same_dout(meta, dout_digest or "")
    if new_dout:  # only now: every check above has passed
        if meta.get(BWD):
            state = "finished" if meta[BWD].get("status") == "done" else "unfinished"
            log.warning(
                "%s: dout differs from the one stored; the %s backward is discarded and "
                "starts over",
                store_path,
                state,
            )
            restarted = True
        # forget the old backward first, and record dout as complete only once
        # it is fully written: a kill in between leaves no usable dout behind
        meta = update_meta(group, dout=None, **{BWD: None})
        _reset(arrays)
        meta = _write_dout(group, problem, dout, dout_digest or "")
        reuse = False
    removed = clean_orphans(store_path)
    if not reuse:
        _reset(arrays)
    arrays.create()
    done = arrays.done()
    if kind == FWD:
        meta = update_meta(
            group,
            **{
                FWD: {
                    "plan": layout.describe(),
                    "status": "running",
                    "keep_partials": keep_partials,
                    "fingerprint": meta.get("fingerprint"),
                }
            },
        )
    else:
        entry = {"plan": layout.describe(), "status": "running", "keep_partials": keep_partials}
        meta = update_meta(group, **{BWD: entry})
    distributed = _is_distributed(scheduler)  # a memory store was refused by _check_args
    ctx = Context(
        store=str(store_path) if distributed else store_path,
        layout=layout,
        kind=kind,
        backend=backend,
        device=device,
        threads=1 if distributed else None,
        distributed=distributed,
        run_id=uuid.uuid4().hex,
        **guard,
    )
    if not isinstance(store_path, (str, os.PathLike)):
        ctx._arrays = arrays  # in-memory stores are shared, never reopened
    skip = set(np.flatnonzero(done).tolist())
    dsk, finals, units = build_graph(ctx, keep_partials=keep_partials, skip=skip)
    t_exec = time.perf_counter()
    try:
        _execute(
            dsk,
            finals,
            _steps(units, layout.plan),
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            desc=f"stream-cqsa {'forward' if kind == FWD else 'backward'}",
            gpu=device.startswith("cuda"),
            ctx=ctx,
        )
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        kept = int(arrays.done().sum()) if _can_read(arrays) else "unknown"
        raise StoreError(
            f"disk full while writing the store ({e}); the run stopped. Work already marked "
            f"done is kept ({kept} of {layout.total_units} units); free space and run "
            "again to resume"
        ) from e
    stats = {
        "pass": kind,
        "plan": layout.describe(),
        "units_run": len(units),
        "units_skipped": len(skip),
        "units": layout.total_units,  # the unit `status` counts too (progress markers)
        "restarted": restarted,  # earlier work of this pass was discarded
        "orphans_removed": removed,
        "partial_disk_bytes": layout.partial_bytes(kind),
        "keep_partials": keep_partials,
        "seconds": time.perf_counter() - t0,
        "work_entries": layout.plan.entries * problem.batch * problem.heads,
        "guardrail": _guard_stats(ctx),
        # this process's tasks (a distributed run's workers time their own)
        "stages": ctx.stages.summary(time.perf_counter() - t_exec),
    }
    if kind == BWD:  # "new": written now; "same": the stored one was given again
        stats["dout"] = "new" if new_dout else "same" if dout is not None else "stored"
    entry = dict(meta[kind])
    entry.update(status="done", stats=stats)
    update_meta(group, **{kind: entry})
    return stats


__all__ = ["run", "run_backward", "clean_orphans", "INPUTS"]
