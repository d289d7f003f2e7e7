"""Stores at s3:// URLs, against a real S3 server: moto's, started here on loopback.

Every run over the object store must give the bits the same run gives on
local disk: create and run, kill and resume, corrupt and repair, and a
distributed run whose worker processes reach the server themselves. The
lock must hold there as it does on a filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from streamcqsa.errors import CorruptChunkError, StoreBusyError, StoreError
from streamcqsa.pipeline import repair, run, run_backward, verify
from streamcqsa.storage import create, create_random
from streamcqsa.storage import open as open_run
from streamcqsa.storage.location import Location
from streamcqsa.storage.lock import LOCK_NAME, StoreLock

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

SCRIPT = Path(__file__).parents[1] / "scripts" / "run_remote.py"
SHAPE = dict(
    seq_len=512, heads=4, kv_heads=2, head_dim=16, dtype="float32", is_causal=True, chunk_tokens=128
)
FWD, BWD = ("out", "lse"), ("dq", "dk", "dv")


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    try:
        yield SimpleNamespace(endpoint=endpoint, options=options, fs=s3fs.S3FileSystem(**options))
    finally:
        server.stop()


@pytest.fixture
def url(s3):
    """A store URL in a fresh bucket."""
    bucket = f"scqsa-{secrets.token_hex(6)}"
    s3.fs.mkdir(bucket)
    return f"s3://{bucket}/runs/a.zarr"


def _arrays(path, names, options=None):  # noqa: ANN001, ANN202
    g = zarr.open_group(path, mode="r", storage_options=options)
    return {n: g[n][:] for n in names}


def _same(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def _dout() -> np.ndarray:
    shape = (1, SHAPE["heads"], SHAPE["seq_len"], SHAPE["head_dim"])
    return np.random.default_rng(7).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    """The same passes on local disk: the bits every object-store run must give."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    create_random(path, seed=3, **SHAPE)
    run(path, itr=2, unit_depth=1, progress=False)
    fwd = _arrays(path, FWD)
    run_backward(path, _dout(), unit_depth=1, progress=False)
    return SimpleNamespace(path=path, fwd=fwd, bwd=_arrays(path, BWD))


def test_create_run_and_backward_match_local_disk(s3, url, local_ref):
    so = s3.options
    create_random(url, seed=3, storage_options=so, **SHAPE)
    stats = run(url, itr=2, unit_depth=1, progress=False, storage_options=so)
    assert stats["units_run"] > 1 and stats["disk"]["more_bytes"] >= 0
    _same(local_ref.fwd, _arrays(url, FWD, so))
    assert verify(url, storage_options=so)["ok"]
    run_backward(url, _dout(), unit_depth=1, progress=False, storage_options=so)
    _same(local_ref.bwd, _arrays(url, BWD, so))
    r = open_run(url, storage_options=so)
    assert r.meta["bwd"]["status"] == "done" and r.lock_owner() is None
    assert np.array_equal(np.asarray(r.out), local_ref.fwd["out"])
    assert not s3.fs.exists(f"{url[5:]}/{LOCK_NAME}")


def test_overwrite_keeps_the_old_store_until_the_new_one_is_whole(s3, url):
    so = s3.options
    g = np.random.default_rng(0)
    q, k, v = (g.standard_normal((1, 2, 128, 8)).astype(np.float32) for _ in range(3))
    create(url, q, k, v, chunk_tokens=32, storage_options=so)
    with pytest.raises(StoreError, match="pass overwrite=True"):
        create(url, q, k, v, storage_options=so)
    bad = q.copy()
    bad[0, 1, 100, 3] = np.nan
    with pytest.raises(ValueError, match="nothing was written"):
        create(url, bad, k, v, overwrite=True, storage_options=so)
    _same({"q": q, "k": k, "v": v}, _arrays(url, ("q", "k", "v"), so))
    q2 = q * 2
    create(url, q2, k, v, chunk_tokens=64, overwrite=True, storage_options=so)
    got = zarr.open_group(url, mode="r", storage_options=so)
    assert got["q"].chunks[2] == 64 and np.array_equal(got["q"][:], q2)
    names = {p.rsplit("/", 1)[-1] for p in s3.fs.ls(url[5:], refresh=True)}
    assert names == {"q", "k", "v", "zarr.json"}  # no build prefix, no lock left


def test_the_lock_holds_on_object_storage(s3, url):
    so = s3.options
    create_random(url, seq_len=64, heads=1, head_dim=8, dtype="float32", storage_options=so)
    loc = Location.of(url, so)
    with StoreLock(loc):
        with pytest.raises(StoreBusyError, match=f"pid {os.getpid()}.*remove {url}/{LOCK_NAME}"):
            StoreLock(loc).__enter__()
        with pytest.raises(StoreBusyError):
            run(url, itr=1, progress=False, storage_options=so)
    # of many simultaneous contenders exactly one gets it
    won, barrier = [], threading.Barrier(6)

    def contend() -> None:
        lock = StoreLock(loc)
        barrier.wait()
        try:
            lock.__enter__()
        except StoreBusyError:
            return
        won.append(lock)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].__exit__(None, None, None)
    key = f"{url[5:]}/{LOCK_NAME}"
    # a dead process's lock on this host is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    s3.fs.pipe_file(key, json.dumps({"pid": dead.pid, "host": socket.gethostname()}).encode())
    with StoreLock(loc) as lock:
        assert lock.taken_over["pid"] == dead.pid
    assert not s3.fs.exists(key)
    # another host's lock is never judged stale
    s3.fs.pipe_file(key, json.dumps({"pid": 1, "host": "elsewhere.invalid"}).encode())
    with pytest.raises(StoreBusyError, match=f"host elsewhere.invalid.*remove {url}/{LOCK_NAME}"):
        run(url, itr=1, progress=False, storage_options=so)
    s3.fs.rm(key)


def _launch(s3, url: str, kind: str, *extra: str) -> tuple[int, dict | None]:  # noqa: ANN001
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    p = subprocess.run(
        [sys.executable, str(SCRIPT), url, s3.endpoint, kind, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    assert p.returncode in (0, -9), p.stderr[-3000:]
    return p.returncode, out


def test_kill_and_resume_is_bit_identical(s3, url, local_ref):
    so = s3.options
    scratch = url.replace("/a.zarr", "/count.zarr")
    for u in (url, scratch):
        create_random(u, seed=3, storage_options=so, **SHAPE)
    rc, full = _launch(s3, scratch, "fwd")  # how many writes a whole pass makes
    assert rc == 0
    for at, mode in ((full["writes"] // 2, "before"), (3, "after")):
        rc, _ = _launch(s3, url, "fwd", "--kill-at-write", str(at), "--kill-mode", mode)
        assert rc == -9, f"the launch was to kill itself at write {at}"
        assert open_run(url, storage_options=so).meta["fwd"]["status"] == "running"
    rc, final = _launch(s3, url, "fwd")
    assert rc == 0 and final["writes"] < full["writes"], (final, full)
    _same(local_ref.fwd, _arrays(url, FWD, so))


def _flip(fs, key: str) -> None:  # noqa: ANN001
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0x40
    fs.pipe_file(key, bytes(data))


def test_corrupt_chunk_is_named_and_repaired(s3, url, local_ref):
    so = s3.options
    create_random(url, seed=3, storage_options=so, **SHAPE)
    run(url, itr=2, unit_depth=1, progress=False, storage_options=so)
    _flip(s3.fs, f"{url[5:]}/out/c/0/1/3/0")
    with pytest.raises(CorruptChunkError, match=r"array 'out' chunk \(0, 1, 3, 0\)"):
        verify(url, rows=512, storage_options=so)
    report = repair(url, storage_options=so)
    assert [name for name, _ in report["fwd"]] == ["out"] and report["fwd_units_reset"] > 0
    stats = run(url, itr=2, unit_depth=1, progress=False, storage_options=so)
    assert stats["units_run"] == report["fwd_units_reset"]
    _same(local_ref.fwd, _arrays(url, FWD, so))


def test_distributed_run_over_the_object_store(s3, url, local_ref, local_cluster):
    so = s3.options
    create_random(url, seed=3, storage_options=so, **SHAPE)
    run(url, itr=2, unit_depth=1, scheduler=local_cluster, progress=False, storage_options=so)
    _same(local_ref.fwd, _arrays(url, FWD, so))


def test_urls_are_checked_before_anything_is_written(s3, url, tmp_path):
    with pytest.raises(StoreError, match="no run store at s3://"):
        run(url, itr=1, progress=False, storage_options=s3.options)
    with pytest.raises(ValueError, match="unknown storage protocol 'nosuch'"):
        run("nosuch://bucket/x", itr=1)
    with pytest.raises(ValueError, match="storage_options apply to URLs"):
        run(tmp_path / "x.zarr", itr=1, storage_options={"anon": True})
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        open_run(url, storage_options="anon")


def test_the_cli_takes_urls_and_storage_options(s3, url, capsys):
    from streamcqsa.cli import main

    opts = [f"--storage-option=endpoint_url={s3.endpoint}", "--storage-option=key=testing"]
    opts.append("--storage-option=secret=testing")
    assert main(["init", url, "--seq-len", "256", "--heads", "2", "--head-dim", "8", *opts]) == 0
    assert main(["run", url, "--itr", "1", "--no-progress", *opts]) == 0
    assert main(["verify", url, *opts]) == 0
    assert main(["status", url, "--json", *opts]) == 0
    assert '"fwd"' in capsys.readouterr().out
    assert main(["status", url]) == 2  # without its endpoint and keys it is not reachable
    assert f"cannot reach {url}" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:  # a missing backend is named, not a traceback
        assert main(["status", "gs://bucket/run.zarr"]) == 2
        assert "need gcsfs: pip install gcsfs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", url, "--storage-option", "novalue"])
    assert e.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_a_new_store_holds_its_lock_while_it_is_written(s3, url):
    """zarr's mode "w" would clear the prefix, the lock included, while the
    create still writes: another process could then take the store."""
    so, seen = s3.options, []

    class Probe(np.ndarray):
        def __getitem__(self, idx):  # noqa: ANN001, ANN204
            if not seen:
                try:
                    StoreLock(Location.of(url, so)).__enter__()
                    seen.append("taken")
                except StoreBusyError:
                    seen.append("busy")
            return np.asarray(self)[idx]

    q = np.random.default_rng(0).standard_normal((1, 1, 64, 8)).astype(np.float32)
    create(url, q.view(Probe), q, q, storage_options=so)
    assert seen == ["busy"]


def test_a_swap_cut_short_is_finished_by_the_next_create(s3, url, monkeypatch):
    so = s3.options
    g = np.random.default_rng(1)
    q, k, v = (g.standard_normal((1, 1, 64, 8)).astype(np.float32) for _ in range(3))
    create(url, q, k, v, chunk_tokens=16, storage_options=so)
    fs = Location.of(url, so).filesystem()[0]
    calls, real = [0], fs.copy

    def flaky(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("injected: the store failed mid-swap")
        return real(*a, **kw)

    monkeypatch.setattr(fs, "copy", flaky)
    with pytest.raises(StoreError, match="cut short.*overwrite=True to finish"):
        create(url, q + 1, k, v, overwrite=True, storage_options=so)
    with pytest.raises(StoreError):
        open_run(url, storage_options=so)  # no run store meanwhile, and it says so
    with pytest.raises(StoreError, match="pass overwrite=True"):
        create(url, q, k, v, storage_options=so)
    monkeypatch.undo()
    create(url, q + 2, k, v, overwrite=True, storage_options=so)
    _same({"q": q + 2, "k": k, "v": v}, _arrays(url, ("q", "k", "v"), so))
    names = {p.rsplit("/", 1)[-1] for p in s3.fs.ls(url[5:], refresh=True)}
    assert names == {"q", "k", "v", "zarr.json"}


def test_memory_urls_work_in_one_process(local_ref):
    url = f"memory://scqsa-{secrets.token_hex(4)}/a.zarr"
    create_random(url, seed=3, **SHAPE)
    run(url, itr=2, unit_depth=1, progress=False)
    _same(local_ref.fwd, _arrays(url, FWD))


def test_backends_without_conditional_writes_cannot_lock():
    from streamcqsa.storage.objectlock import _check_backend

    class GCS:
        protocol = ("gs", "gcs")

    with pytest.raises(StoreError, match="no atomic create-if-absent"):
        _check_backend(GCS(), "gs://b/x")


def test_store_arguments_resolve_once(tmp_path, monkeypatch):
    assert Location.of("S3://b/p/").url == "s3://b/p"
    assert Location.of(f"file://{tmp_path}/x").local == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    assert Location.of("rel.zarr").local == tmp_path / "rel.zarr"  # workers may run elsewhere
    for bad in ("s3://", "simplecache::s3://b/p"):
        with pytest.raises(ValueError):
            Location.of(bad)
    from streamcqsa.cli.options import _storage_option

    assert _storage_option("secret=12345678") == ("secret", "12345678")
    assert _storage_option("anon=true") == ("anon", True)
    assert _storage_option('client_kwargs={"a": 1}') == ("client_kwargs", {"a": 1})
