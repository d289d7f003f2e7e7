"""Bad arguments to ``run`` and ``run_backward`` fail before the store is touched.

Each bad argument must raise a named error and leave every file of the store
(metadata, arrays, markers) byte for byte as it was, so the next good run
starts (or resumes) without ``restart``. Numpy integers are ordinary ints.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streamcqsa.pipeline import run, run_backward
from streamcqsa.storage import create_random
from streamcqsa.storage import open as open_run

SHAPE = dict(seq_len=256, heads=2, kv_heads=2, head_dim=16, dtype="float32", chunk_tokens=64)

# (argument, value, error type, message pattern): every argument both passes take
COMMON = [
    ("workers", 0, ValueError, "workers must be >= 1"),
    ("workers", -1, ValueError, "workers must be >= 1"),
    ("workers", 1.5, TypeError, "workers must be an int"),
    ("scheduler", "bogus", ValueError, "scheduler must be None, 'threads', 'sync'"),
    ("scheduler", {"get": 1}, ValueError, "scheduler must be"),
    ("device", "gpu", ValueError, "device must be 'auto', 'cpu' or 'cuda"),
    ("device", "cpu-fast", ValueError, "device must be"),
    ("backend", "bogus", ValueError, "unknown backend"),
    ("task_bytes", 0, ValueError, "task_bytes must be >= 1"),
    ("task_bytes", -1, ValueError, "task_bytes must be >= 1"),
    ("unit_depth", -1, ValueError, "unit_depth must be 'auto', None or an int >= 0"),
    ("unit_depth", "deep", ValueError, "unit_depth must be 'auto'"),
    ("n_cap", 0, ValueError, "n_cap must be >= 1"),
    ("device_memory", 0, ValueError, "device_memory must be >= 1"),
    ("keep_partials", "no", TypeError, "keep_partials must be a bool"),
    ("progress", "yes", TypeError, "progress must be a bool"),
    ("restart", 1, TypeError, "restart must be a bool"),
    ("check_inputs", None, TypeError, "check_inputs must be a bool"),
    ("overlap_io", "yes", TypeError, "overlap_io must be True, False or None"),
]
FORWARD_ONLY = [
    ("itr", -1, ValueError, "itr must be a non-negative int or 'auto'"),
    ("itr", 2.0, ValueError, "itr must be a non-negative int or 'auto'"),
    ("itr", "deep", ValueError, "itr must be"),
    ("quorum", 7, ValueError, "7"),
    ("quorum", "3", TypeError, "quorum must be an int"),
    ("head_group", 0, ValueError, "head_group must be >= 1"),
    ("head_group", 3, ValueError, "head_group 3 must divide kv_heads 2"),
]


def _tree_digest(path: Path) -> dict[str, str]:
    """Every file under the store (metadata, chunks, markers, lock) by content."""
    return {
        f.relative_to(path).as_posix(): hashlib.blake2b(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("args")
    fresh, forward = root / "fresh.zarr", root / "forward.zarr"
    create_random(fresh, seed=3, is_causal=True, **SHAPE)
    shutil.copytree(fresh, forward)
    run(forward, itr=2, progress=False, unit_depth=None)
    return {"fresh": fresh, "forward": forward}


def _dout(seed: int = 0) -> np.ndarray:
    shape = (1, SHAPE["heads"], SHAPE["seq_len"], SHAPE["head_dim"])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("state", ["fresh", "forward"])
def test_bad_run_arguments_touch_nothing(stores, tmp_path, state):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores[state], path)
    before = _tree_digest(path)
    for name, value, error, pattern in COMMON + FORWARD_ONLY:
        kwargs = {"itr": 2, "progress": False, name: value}
        with pytest.raises(error, match=pattern):
            run(path, **kwargs)
        assert _tree_digest(path) == before, f"run({name}={value!r}) changed the store"
    stats = run(path, itr=2, progress=False, unit_depth=None)  # no restart needed
    assert stats["units_run"] + stats["units_skipped"] == stats["units"]
    assert open_run(path).meta["fwd"]["status"] == "done"


def test_bad_backward_arguments_touch_nothing(stores, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["forward"], path)
    run_backward(path, _dout(1), progress=False)  # a finished backward to keep
    finished = open_run(path).group["dq"][:]
    before = _tree_digest(path)
    nan = _dout(2)
    nan[0, 1, 200, 3] = np.nan
    bad_dout = [
        ("dout", nan, ValueError, r"dout has NaN/Inf at 1 token\(s\) in positions \[200, 200\]"),
        ("dout", _dout(2)[:, :, :100], ValueError, "dout must have shape"),
        ("dout", _dout(2).astype(np.float16), TypeError, "dout dtype float16 differs"),
        ("dout", _dout(2).tolist(), TypeError, "dout must be an array"),
    ]
    for name, value, error, pattern in COMMON + bad_dout:
        kwargs = {"progress": False, name: value}
        if name != "dout":
            kwargs["dout"] = _dout(2)  # a new dout would discard the finished backward
        with pytest.raises(error, match=pattern):
            run_backward(path, **kwargs)
        assert _tree_digest(path) == before, f"run_backward({name}=...) changed the store"
    assert run_backward(path, progress=False)["units_run"] == 0  # still finished
    np.testing.assert_array_equal(open_run(path).group["dq"][:], finished)
    stats = run_backward(path, _dout(2), progress=False)
    assert stats["dout"] == "new" and stats["restarted"]


def test_numpy_integers_are_ints(stores, tmp_path):
    path, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    shutil.copytree(stores["fresh"], path)
    shutil.copytree(stores["fresh"], ref)
    run(ref, itr=2, progress=False, unit_depth=1)
    run(
        path,
        itr=np.int64(2),
        quorum=np.int32(3),
        workers=np.int64(2),
        unit_depth=np.int64(1),
        task_bytes=np.int64(1 << 28),
        keep_partials=np.bool_(True),
        progress=False,
    )
    got, want = open_run(path).group["out"][:], open_run(ref).group["out"][:]
    assert torch.equal(torch.from_numpy(got), torch.from_numpy(want))
