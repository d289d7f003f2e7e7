"""Run a pass's graph: threads (default), synchronous, or Dask distributed.

With threads, Dask runs the graph on a helper thread and the calling thread
serves the pass's compute slots (``pipeline.worker``) until the graph is
done, so I/O steps overlap compute without a second OpenMP team. Distributed
runs send the graph to a Client; each worker process computes on its own
device pool, and the steps carry ``resources={"GPU": 1}`` on a GPU.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import torch
from dask.callbacks import Callback

from streamcqsa.pipeline import worker
from streamcqsa.pipeline.context import Context

COUNTED = ("-final",)  # steps the bar counts besides leaves (both report through the runtime)


class Progress(Callback):
    """tqdm over leaf tasks and final steps: done count, throughput and ETA
    (steps report through the pass's runtime as they finish)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        super().__init__()
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="task")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_resources(client: Any, resources: dict | None) -> None:
    """Refuse a GPU pass on a cluster none of whose workers declares the GPU
    resource: its steps would wait for such a worker forever."""
    if not resources:
        return
    workers = client.scheduler_info().get("workers", {})
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise ValueError(
            "a CUDA pass runs each step on a worker with the resource GPU=1, and no worker "
            f"of this cluster ({len(workers)} workers) declares it; start the workers with "
            "`--resources GPU=1` (one per GPU, e.g. CUDA_VISIBLE_DEVICES=N), or use "
            "dask-cuda's LocalCUDACluster(resources={'GPU': 1})"
        )


def execute(
    graph: dict,
    *,
    ctx: Context,
    scheduler: Any,
    workers: int,
    progress: bool,
    desc: str,
) -> None:
    dsk, finals = graph["dsk"], graph["finals"]
    resources = ctx.dev.dask_resources
    if scheduler is not None and hasattr(scheduler, "get"):  # a distributed Client
        _check_resources(scheduler, resources)
        scheduler.get(dsk, finals, resources=resources)
        return
    if isinstance(scheduler, str) and "://" in scheduler:
        from distributed import Client

        with Client(scheduler) as client:
            _check_resources(client, resources)
            client.get(dsk, finals, resources=resources)
        return
    total = graph["leaves"] + sum(1 for key in graph["units"] if key[0].endswith(COUNTED))
    bar = Progress(total, desc, progress)
    try:
        with bar:
            if scheduler in ("sync", "synchronous"):
                ctx.runtime.attach(worker.Inline(), bar.update)
                before = torch.get_num_threads()  # I/O steps set their thread's
                try:
                    dask.get(dsk, finals)
                finally:
                    torch.set_num_threads(before)
            else:
                _threaded(dsk, finals, ctx, workers, bar)
    finally:
        ctx.runtime.detach()
        bar.close()


def _threaded(dsk: dict, finals: list, ctx: Context, workers: int, bar: Progress) -> None:
    slots = worker.ComputeSlots(ctx.n_cap, ctx.compute_threads())
    ctx.runtime.attach(slots, bar.update)
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
        ctx.runtime.detach()
        runner.join()
        pool.shutdown(wait=True)
    if failure:
        raise failure[0]


__all__ = ["Progress", "execute"]
