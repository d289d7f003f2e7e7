"""A chunk that a done marker vouches for must exist: a missing one is a named
error on every read path (never zarr's fill value), ``repair`` finds it and
resets exactly the units that own it, and the rerun is bit-identical."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, MemoryStore, WrapperStore

from streamcqsa.errors import MissingChunkError, StoreError
from streamcqsa.pipeline import repair, run, run_backward
from streamcqsa.storage import chunkio, create_random
from streamcqsa.storage.integrity import checked_read
from streamcqsa.storage.store import array_kwargs

SHAPE = dict(
    seq_len=700,
    heads=4,
    kv_heads=2,
    head_dim=16,
    dtype="float32",
    chunk_tokens=64,
    is_causal=True,
)
# every forward leaf a unit, its partial kept after the pass
FWD = dict(itr=1, progress=False, head_group=1, unit_depth=None, keep_partials=True)
BWD = dict(progress=False, unit_depth=1)
DOUT = np.random.default_rng(7).standard_normal((1, 4, 700, 16)).astype(np.float32)
OUTPUTS = ("out", "lse", "dq", "dk", "dv")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One undamaged store after its forward and backward."""
    path = tmp_path_factory.mktemp("ref") / "s"
    create_random(path, **SHAPE)
    run(path, **FWD)
    run_backward(path, DOUT, **BWD)
    return path


def _copy(ref, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(ref, dst)
    return dst


def _same(a, b, names):
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in names:
        assert np.array_equal(ga[name][:], gb[name][:]), name


def _units(path, kind="fwd"):
    return zarr.open_group(path, mode="r")[f"progress/{kind}"].shape[0]


def test_missing_lse_chunk_is_named_and_repaired(ref, tmp_path):
    bad = _copy(ref, tmp_path)
    os.remove(bad / "lse" / "c" / "0" / "1" / "3")
    lse = zarr.open_group(bad, mode="r")["lse"]
    with pytest.raises(MissingChunkError, match=r"array 'lse' chunk \(0, 1, 3\) is missing"):
        checked_read(lse, (0, slice(None), slice(None)))
    with pytest.raises(MissingChunkError, match=r"array 'lse' chunk \(0, 1, 3\)"):
        chunkio.read(lse, (slice(0, 1), slice(0, 2), slice(0, 700)))
    # the backward reads lse: it stops on the missing chunk, not on zeros
    with pytest.raises(MissingChunkError, match=r"array 'lse' chunk \(0, 1, 3\)"):
        run_backward(bad, DOUT, **BWD, restart=True)
    report = repair(bad)
    assert report["fwd_missing"] == [("lse", (0, 1, 3))]
    assert ("lse", (0, 1, 3)) in report["fwd"]
    assert 0 < report["fwd_units_reset"] <= _units(bad) / 2  # only the owners
    stats = run(bad, **FWD)
    assert stats["units_run"] == report["fwd_units_reset"]
    _same(ref, bad, ("out", "lse"))
    run_backward(bad, **BWD)  # resumes the backward that stopped
    _same(ref, bad, OUTPUTS)


def test_missing_out_chunk_is_named_and_repaired(ref, tmp_path):
    bad = _copy(ref, tmp_path)
    os.remove(bad / "out" / "c" / "0" / "2" / "5" / "0")
    out = zarr.open_group(bad, mode="r")["out"]
    with pytest.raises(MissingChunkError, match=r"array 'out' chunk \(0, 2, 5, 0\)"):
        chunkio.read(out, (slice(0, 1), slice(None), slice(300, 400)))
    with pytest.raises(MissingChunkError, match=r"array 'out' chunk \(0, 2, 5, 0\)"):
        checked_read(out, (0, slice(None), 350, slice(None)))
    report = repair(bad)
    assert report["fwd_missing"] == [("out", (0, 2, 5, 0))]
    assert report["bwd_missing"] == [] and report["bwd_units_reset"] == 0
    assert 0 < report["fwd_units_reset"] <= _units(bad) / 2
    stats = run(bad, **FWD)
    assert stats["units_run"] == report["fwd_units_reset"]
    _same(ref, bad, OUTPUTS)


def test_missing_kept_partial_and_gradient_are_repaired(ref, tmp_path):
    bad = _copy(ref, tmp_path)
    leaf = sorted(glob.glob(f"{bad}/partials/fwd/d1/lse/c/0/1/*"))[2]
    os.remove(leaf)
    os.remove(bad / "dk" / "c" / "0" / "1" / "2" / "0")
    arr = zarr.open_group(bad, mode="r")["partials/fwd/d1/lse"]
    j = int(os.path.basename(leaf))
    with pytest.raises(MissingChunkError, match=rf"'partials/fwd/d1/lse' chunk \(0, 1, {j}\)"):
        chunkio.read(arr, (slice(0, 1), slice(2, 4), slice(j * 64, j * 64 + 64)))
    report = repair(bad)
    assert report["fwd_missing"] == [("partials/fwd/d1/lse", (0, 1, j))]
    assert report["bwd_missing"] == [("dk", (0, 1, 2, 0))]
    assert 0 < report["fwd_units_reset"] <= _units(bad) / 2
    assert 0 < report["bwd_units_reset"] <= _units(bad, "bwd") / 2
    assert run(bad, **FWD)["units_run"] == report["fwd_units_reset"]
    assert run_backward(bad, **BWD)["units_run"] == report["bwd_units_reset"]
    assert os.path.exists(leaf)
    _same(ref, bad, (*OUTPUTS, "partials/fwd/d1/lse", "partials/fwd/d1/out"))


def test_missing_out_chunk_of_pass_without_partials(ref, tmp_path):
    """The pass deleted its partials: the root piece's whole subtree reruns,
    and the deleted partials are not reported as damage."""
    path = tmp_path / "s"
    create_random(path, **SHAPE)
    run(path, **{**FWD, "keep_partials": False})
    os.remove(path / "out" / "c" / "0" / "3" / "8" / "0")
    with pytest.raises(MissingChunkError, match=r"array 'out' chunk \(0, 3, 8, 0\)"):
        checked_read(zarr.open_group(path, mode="r")["out"], (0, 3, slice(None)))
    report = repair(path)
    assert report["fwd_missing"] == [("out", (0, 3, 8, 0))]
    assert 0 < report["fwd_units_reset"] <= _units(path) / 2  # head group 1 only
    assert run(path, **{**FWD, "keep_partials": False})["units_run"] == report["fwd_units_reset"]
    _same(ref, path, ("out", "lse"))
    left = [f for f in (path / "partials").rglob("*") if f.is_file() and "/c/" in f.as_posix()]
    assert left == []  # the partials are deleted again


class _Killed(RuntimeError):
    pass


class _KillAtFinal(WrapperStore):
    """Fails the first write of an output: the run stops once every unit is
    folded into the accumulator, before any is cast to the outputs."""

    async def set(self, key, value):  # noqa: ANN001
        if key.startswith("out/c/"):
            raise _Killed("killed")
        return await self._store.set(key, value)


def test_missing_accumulator_chunk_of_killed_run_is_repaired(ref, tmp_path):
    path = tmp_path / "s"
    create_random(path, **SHAPE)
    with pytest.raises(_Killed):
        run(_KillAtFinal(LocalStore(path)), **FWD, scheduler="sync")
    acc = sorted(glob.glob(f"{path}/partials/fwd/acc/c/*/*/*/*"))
    assert acc  # folded units, nothing cast yet
    os.remove(acc[0])
    # the resume would fold into the identity in place of the units' rows
    with pytest.raises(MissingChunkError, match=r"array 'partials/fwd/acc' chunk"):
        run(path, **FWD)
    report = repair(path)
    assert {name for name, _ in report["fwd_missing"]} == {"partials/fwd/acc"}
    assert 0 < report["fwd_units_reset"] <= _units(path) / 2  # one (b, g) only
    run(path, **FWD)
    _same(ref, path, ("out", "lse", "partials/fwd/d1/out", "partials/fwd/d1/lse"))


def test_missing_input_chunk_is_reported(ref, tmp_path):
    bad = _copy(ref, tmp_path)
    os.remove(bad / "k" / "c" / "0" / "1" / "4" / "0")
    k = zarr.open_group(bad, mode="r")["k"]
    with pytest.raises(MissingChunkError, match=r"array 'k' chunk \(0, 1, 4, 0\)"):
        chunkio.read(k, (slice(0, 1), slice(None), slice(0, 700)))
    with pytest.raises(StoreError, match=r"k chunk \(0, 1, 4, 0\) \(missing\)"):
        repair(bad)


def test_chunkio_missing_chunk_off_local_files():
    """A store that is not local files (the path through ``store.get``), and
    the one read that may see unwritten chunks: progress markers."""
    group = zarr.open_group(MemoryStore(), mode="w")
    arr = group.create_array("x", shape=(2, 10, 4), **array_kwargs("float32", (1, 5, 4)))
    data = np.random.default_rng(0).standard_normal((2, 10, 4)).astype(np.float32)
    chunkio.write(arr, (slice(0, 2), slice(0, 10)), data)
    chunkio.write(arr, (slice(0, 1), slice(5, 10)), np.zeros((1, 5, 4), np.float32))
    assert np.array_equal(chunkio.read(arr, (slice(0, 1), slice(5, 10)))[0], np.zeros((5, 4)))
    from zarr.core.sync import sync

    sync(arr.store.delete("x/c/1/1/0"))
    with pytest.raises(MissingChunkError, match=r"array 'x' chunk \(1, 1, 0\)"):
        chunkio.read(arr, (slice(1, 2), slice(0, 10)))
    with pytest.raises(MissingChunkError, match=r"array 'x' chunk \(1, 1, 0\)"):
        checked_read(arr, (1, slice(3, 7)))
    assert np.array_equal(checked_read(arr, (1, slice(0, 5))), data[1, :5])
    got = chunkio.read(arr, (slice(1, 2), slice(0, 10)), missing_ok=True)
    assert np.array_equal(got[0, :5], data[1, :5]) and not got[0, 5:].any()
    marks = group.create_array("m", shape=(6,), **array_kwargs("uint8", (1,)))
    marks[2] = 1
    assert checked_read(marks, (slice(None),), missing_ok=True).tolist() == [0, 0, 1, 0, 0, 0]
