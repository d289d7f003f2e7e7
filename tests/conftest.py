"""Shared test setup: gpu skips, one torch thread, a store factory, the schedulers.

- ``gpu`` tests skip themselves without CUDA.
- Hypothesis has no per-example deadline and no too-slow health check: both
  time examples, and a loaded machine would fail them without a defect.
- The test process computes with one torch (OpenMP) thread: the suite checks
  results, never speed, and on a shared 2-core machine a second OpenMP
  thread makes every parallel region wait for a core that another process
  holds. Passes still size their own compute slots (the machine's cores);
  a test comparing the in-memory engine's bits with a pass's uses
  ``default_threads``, as a float sum's order can follow the thread count.
- ``make_store(**overrides)`` returns a fresh copy of a small random store;
  each distinct set of arguments is created once per session.
- ``scheduler`` runs a test once per Dask scheduler a pass accepts: the
  threaded default, the synchronous one, and a distributed LocalCluster of
  two worker processes (started once per session, only if a test asks).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

SMALL_STORE = dict(
    seq_len=700,
    heads=4,
    kv_heads=2,
    head_dim=16,
    dtype="float32",
    chunk_tokens=64,
    is_causal=True,
    seed=0,
)

settings.register_profile("streamcqsa", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("streamcqsa")
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice: the machine's cores
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def default_threads() -> Iterator[None]:
    """Torch's default thread count for this test (then one thread again)."""
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _store_cache(tmp_path_factory) -> dict[str, Path]:
    return {}


@pytest.fixture
def make_store(tmp_path, tmp_path_factory, _store_cache) -> Callable[..., Path]:
    """``make_store(name="s", **create_random_args) -> Path`` of a fresh copy.

    Arguments default to SMALL_STORE (700 causal tokens, 4 query and 2
    key/value heads of 16, float32, 64-token chunks)."""
    from streamcqsa.storage import create_random

    def make(name: str = "s", **overrides: Any) -> Path:
        args = {**SMALL_STORE, **overrides}
        key = json.dumps(args, sort_keys=True)
        if key not in _store_cache:
            base = tmp_path_factory.mktemp("store") / "base.zarr"
            create_random(base, **args)
            _store_cache[key] = base
        path = tmp_path / name
        shutil.copytree(_store_cache[key], path)
        return path

    return make


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[Any]:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(params=["threads", "sync", "distributed"])
def scheduler(request) -> Any:
    """The ``scheduler=`` argument of run / run_backward, one per executor."""
    if request.param == "distributed":
        return request.getfixturevalue("local_cluster")
    return request.param
