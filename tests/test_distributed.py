"""The same graph on a Dask distributed LocalCluster: bit-identical results."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from streamcqsa.pipeline import run, run_backward
from streamcqsa.storage import create_random

distributed = pytest.importorskip("distributed")


def test_local_cluster_two_processes_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    create_random(
        a,
        seq_len=1200,
        heads=4,
        kv_heads=2,
        head_dim=16,
        dtype="bfloat16",
        chunk_tokens=128,
        is_causal=True,
        seed=3,
    )
    shutil.copytree(a, b)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(1, 4, 1200, 16, generator=g).bfloat16()
    run(a, itr=2, progress=False, head_group=1)
    run_backward(a, dout, progress=False)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        run(b, itr=2, scheduler=client, head_group=1)
        run_backward(b, dout, scheduler=client)
        assert len(client.scheduler_info()["workers"]) == 2
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert np.array_equal(ga[name][:], gb[name][:]), name


def test_distributed_needs_a_path(tmp_path):
    store = zarr.storage.MemoryStore()
    create_random(store, seq_len=64, heads=1, head_dim=8, dtype="float32")
    with pytest.raises(ValueError, match="shared filesystem"):
        run(store, itr=1, scheduler="tcp://127.0.0.1:1")
