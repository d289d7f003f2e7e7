"""The same passes under every Dask scheduler give the same bits.

``scheduler`` (tests/conftest.py) runs each test under the threaded default,
the synchronous scheduler and a distributed LocalCluster of two worker
processes; each must store exactly the outputs and gradients of a threaded
reference run and leave the caller's torch thread count as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from streamcqsa.pipeline import run, run_backward
from streamcqsa.storage import create_random

STORE = dict(
    seq_len=600,
    heads=2,
    kv_heads=1,
    head_dim=16,
    dtype="bfloat16",
    chunk_tokens=64,
    is_causal=True,
    seed=3,
)
NAMES = ("out", "lse", "dq", "dk", "dv")


def _dout() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 2, 600, 16, generator=g).bfloat16()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("sched") / "ref.zarr"
    create_random(path, **STORE)
    run(path, itr=2, progress=False, head_group=1)
    run_backward(path, _dout(), progress=False)
    g = zarr.open_group(path, mode="r")
    return {n: g[n][:] for n in NAMES}


def test_every_scheduler_stores_the_same_bits(make_store, scheduler, reference):
    path = make_store(**STORE)
    caller = torch.get_num_threads()
    torch.set_num_threads(3)  # not what any compute slot uses, so a leak would show
    try:
        run(path, itr=2, progress=False, head_group=1, scheduler=scheduler)
        run_backward(path, _dout(), progress=False, scheduler=scheduler)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(caller)
    if not isinstance(scheduler, str):  # a distributed Client: both workers were there
        assert len(scheduler.scheduler_info()["workers"]) == 2
    g = zarr.open_group(path, mode="r")
    for name in NAMES:
        assert np.array_equal(g[name][:], reference[name]), name


def test_distributed_needs_a_path():
    store = zarr.storage.MemoryStore()
    create_random(store, seq_len=64, heads=1, head_dim=8, dtype="float32")
    with pytest.raises(ValueError, match="shared filesystem"):
        run(store, itr=1, scheduler="tcp://127.0.0.1:1")


def test_cuda_pass_refuses_a_cluster_without_gpu_workers():
    """A CUDA pass's steps need a worker with GPU=1: without one they would
    wait forever, so the pass refuses before submitting anything."""
    from streamcqsa.pipeline.execute import _check_resources

    class Client:
        def __init__(self, resources):  # noqa: ANN001
            self.info = {"workers": {f"w{i}": {"resources": r} for i, r in enumerate(resources)}}

        def scheduler_info(self):  # noqa: ANN202
            return self.info

    with pytest.raises(ValueError, match="no worker .* declares it"):
        _check_resources(Client([{}, {"CPU": 4}]), {"GPU": 1})
    _check_resources(Client([{}, {"GPU": 1}]), {"GPU": 1})
    _check_resources(Client([{}]), None)  # a CPU pass needs no resource


def test_a_real_cluster_is_checked_for_gpu_workers():
    """The same check against a live scheduler: workers that declare GPU
    (as the cluster recipes in docs/clusters.md start them) pass, others not."""
    distributed = pytest.importorskip("distributed")
    from streamcqsa.pipeline.execute import _check_resources

    for declared, ok in (({"GPU": 2}, True), (None, False)):
        with (
            distributed.LocalCluster(
                n_workers=1,
                threads_per_worker=2,
                processes=False,
                resources=declared,
                dashboard_address=None,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            if ok:
                _check_resources(client, {"GPU": 1})
            else:
                with pytest.raises(ValueError, match="declares it"):
                    _check_resources(client, {"GPU": 1})
