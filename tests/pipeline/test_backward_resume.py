"""The backward resumes when given the same dout again, and says when it starts over.

The store keeps a digest of its dout. Giving the same dout again (the same
array, a new object with the same values, or the CLI's same seed) resumes an
interrupted backward bit for bit and leaves a finished one as it is; a
different dout starts over and says so (log line, ``stats["restarted"]``).
A NaN dout is refused before anything, finished gradients included, is lost.

Interruptions are deterministic: the guardrail's test hook raises after a
fixed number of leaf tasks, on the synchronous scheduler.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from streamcqsa.cli import main
from streamcqsa.pipeline import guardrail, run, run_backward
from streamcqsa.storage import create_random
from streamcqsa.storage import open as open_run

SHAPE = dict(seq_len=384, heads=2, kv_heads=1, head_dim=16, dtype="float32", chunk_tokens=64)
GRADS = ("dq", "dk", "dv")


class Interrupted(RuntimeError):
    """Stands in for a kill part way through a pass."""


def _stop_after(n: int):
    calls = 0

    def hook(task: str, n_cap: int) -> bool:
        nonlocal calls
        calls += 1
        if calls > n:
            raise Interrupted(f"stopped at leaf task {calls}")
        return False

    return hook


def _dout(seed: int) -> np.ndarray:
    """The dout ``streamcqsa backward --random-dout SEED`` makes for a float32 store."""
    shape = (1, SHAPE["heads"], SHAPE["seq_len"], SHAPE["head_dim"])
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _grads(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(path, mode="r")
    return {n: g[n][:] for n in GRADS}


@pytest.fixture(scope="module")
def forward(tmp_path_factory) -> Path:
    """A store with a finished forward, every leaf its own unit."""
    path = tmp_path_factory.mktemp("bwd") / "fwd.zarr"
    create_random(path, seed=5, is_causal=True, **SHAPE)
    run(path, itr=2, progress=False, unit_depth=None)
    return path


@pytest.fixture(scope="module")
def reference(forward, tmp_path_factory) -> dict[str, np.ndarray]:
    """Gradients of an uninterrupted backward with dout seed 0."""
    path = tmp_path_factory.mktemp("bwd-ref") / "ref.zarr"
    shutil.copytree(forward, path)
    run_backward(path, _dout(0), progress=False, unit_depth=None)
    return _grads(path)


def _interrupted(forward: Path, tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "s.zarr"
    shutil.copytree(forward, path)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        mp.setattr(guardrail, "INJECT_OOM", _stop_after(20))
        run_backward(
            path, _dout(0), progress=False, unit_depth=None, scheduler="sync",
        )  # fmt: skip
    done = open_run(path).status()["bwd"]
    assert 0 < done["units_done"] < done["units"]
    return path, done["units_done"]


def test_same_dout_resumes_bit_identical_then_does_nothing(forward, reference, tmp_path):
    path, done = _interrupted(forward, tmp_path)
    stats = run_backward(path, _dout(0).copy(), progress=False, unit_depth=None)  # same values
    assert stats["units_skipped"] == done, "the same dout did not resume"
    assert stats["dout"] == "same" and not stats["restarted"]
    assert stats["units_run"] == stats["units"] - done
    for name, want in reference.items():
        assert np.array_equal(_grads(path)[name], want), f"{name} differs after the resume"

    again = run_backward(path, torch.from_numpy(_dout(0)), progress=False)  # finished: kept
    assert again["units_run"] == 0, "the same dout discarded the finished backward"
    assert again["units_skipped"] == again["units"]
    assert again["dout"] == "same" and not again["restarted"]
    for name, want in reference.items():
        assert np.array_equal(_grads(path)[name], want)


def test_other_dout_starts_over_and_says_so(forward, reference, tmp_path, caplog):
    path, _ = _interrupted(forward, tmp_path)
    with caplog.at_level(logging.WARNING, logger="streamcqsa"):
        stats = run_backward(path, _dout(1), progress=False, unit_depth=None)
    assert stats["units_skipped"] == 0
    assert "dout differs from the one stored; the unfinished backward is discarded" in caplog.text
    ref1 = tmp_path / "ref1.zarr"  # the same dout on a store that never saw another
    shutil.copytree(forward, ref1)
    run_backward(ref1, _dout(1), progress=False, unit_depth=None)
    for name, want in _grads(ref1).items():
        assert np.array_equal(_grads(path)[name], want)
        assert not np.array_equal(want, reference[name])
    assert stats["dout"] == "new" and stats["restarted"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamcqsa"):
        stats = run_backward(path, _dout(0), progress=False)  # over a finished backward
    assert stats["restarted"] and "the finished backward is discarded" in caplog.text


def test_nan_dout_keeps_the_finished_backward(forward, reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(forward, path)
    run_backward(path, _dout(0), progress=False, unit_depth=None)
    meta = open_run(path).meta
    bad = _dout(0)
    bad[0, 1, 300, 2] = np.inf
    with pytest.raises(ValueError, match=r"dout has NaN/Inf .*\[300, 300\]") as e:
        run_backward(path, bad, progress=False)
    assert "allow_nonfinite" not in str(e.value)  # run_backward has no such option
    assert open_run(path).meta == meta
    assert run_backward(path, progress=False)["units_run"] == 0  # still finished
    for name, want in reference.items():
        assert np.array_equal(_grads(path)[name], want)


def test_cli_same_seed_resumes(forward, reference, tmp_path, capsys):
    """`streamcqsa backward --random-dout 0` again resumes; a finished one is kept."""
    path, done = _interrupted(forward, tmp_path)  # interrupted with seed 0's dout
    assert main(["backward", str(path), "--random-dout", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"bwd: done, (\d+)/\1 units \((\d+) run now, (\d+) done before\)", out)
    assert m and int(m[3]) == done and "same dout as stored" in out, out
    assert main(["backward", str(path), "--random-dout", "0", "--no-progress"]) == 0
    assert "(0 run now," in capsys.readouterr().out
    for name, want in reference.items():
        assert np.array_equal(_grads(path)[name], want)
