"""The command line: one-line errors naming its flags, Ctrl-C, status, dtypes.

Commands run in-process through ``streamcqsa.cli.main``; a subprocess only
where the process itself is the subject (``python -m streamcqsa``, SIGINT).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import streamcqsa
from streamcqsa.cli import main
from streamcqsa.errors import DeviceOOM, StoreError
from streamcqsa.pipeline import guardrail, run, run_backward
from streamcqsa.storage import create_random
from streamcqsa.storage import open as open_run
from streamcqsa.storage.lock import LOCK_NAME

SMALL = ["--seq-len", "256", "--heads", "2", "--head-dim", "16", "--chunk-tokens", "64"]


def _store(path: Path, dtype: str = "float32") -> Path:
    create_random(
        path, seq_len=256, heads=2, head_dim=16, dtype=dtype, is_causal=True, chunk_tokens=64
    )
    return path


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_version_and_python_m():
    res = subprocess.run(
        [sys.executable, "-m", "streamcqsa", "--version"], capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.strip() == f"streamcqsa {streamcqsa.__version__}"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StoreError("store busy"), 2),
        (DeviceOOM("device full"), 1),
        (PermissionError(13, "Permission denied", "/ro/s.zarr"), 1),
    ],
)
def test_library_and_os_errors_are_one_line(tmp_path, capsys, monkeypatch, error, code):
    """A read-only target directory (simulated: tests may run as root, which
    ignores mode bits) and the library's own errors print a message, no traceback."""

    def fail(*a, **k):
        raise error

    monkeypatch.setattr("streamcqsa.storage.create_random", fail)
    assert main(["init", str(tmp_path / "s"), *SMALL]) == code
    err = capsys.readouterr().err
    _no_traceback(err)
    assert err.startswith("streamcqsa init: error: ") and str(error) in err


def test_plan_refuses_nonpositive_numbers(capsys):
    for flag, value in [("--throughput", "0"), ("--throughput", "nan"), ("--seq-len", "0")]:
        with pytest.raises(SystemExit) as e:
            main(["plan", "--seq-len", "4096", flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: must be" in capsys.readouterr().err


def test_messages_name_flags_not_keywords(tmp_path, capsys):
    path = str(_store(tmp_path / "s"))
    assert main(["backward", path, "--no-progress"]) == 2  # no forward yet
    err = capsys.readouterr().err
    assert "run `streamcqsa run` first" in err and "run()" not in err
    assert main(["run", path, "--itr", "2", "--no-progress"]) == 0
    assert main(["run", path, "--itr", "1", "--no-progress"]) == 2  # another plan
    err = capsys.readouterr().err
    assert "Pass --restart to start over" in err and "restart=True" not in err
    assert main(["backward", path, "--no-progress"]) == 2  # no dout yet
    err = capsys.readouterr().err
    assert "pass --dout FILE or --random-dout SEED" in err and "dout=" not in err
    assert main(["init", path, *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    q = np.ones((1, 2, 64, 8), np.float32)
    q[0, 1, 5, 0] = np.nan
    files = []
    for name in "qkv":
        np.save(tmp_path / f"{name}.npy", q)
        files.append(str(tmp_path / f"{name}.npy"))
    assert main(["init", str(tmp_path / "n"), "--from-npy", *files]) == 2
    err = capsys.readouterr().err
    assert "--allow-nonfinite" in err and "allow_nonfinite" not in err
    assert main(["init", str(tmp_path / "n"), "--from-npy", *files, "--allow-nonfinite"]) == 0


def test_init_from_npy_honours_dtype(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal((1, 2, 96, 8), dtype=np.float32) for n in "qkv"}
    files = []
    for name, x in arrays.items():
        np.save(tmp_path / f"{name}.npy", x)
        files.append(str(tmp_path / f"{name}.npy"))
    for dtype in ("float16", "bfloat16"):
        path = tmp_path / f"{dtype}.zarr"
        assert main(["init", str(path), "--from-npy", *files, "--dtype", dtype]) == 0
        assert open_run(path).problem.dtype == dtype
        got = open_run(path).group["q"][:]
        want = torch.from_numpy(arrays["q"]).to(getattr(torch, dtype))
        if dtype == "bfloat16":
            want = want.view(torch.uint16)
        np.testing.assert_array_equal(got, want.numpy())
    path = tmp_path / "own.zarr"  # no --dtype: the files' own
    assert main(["init", str(path), "--from-npy", *files]) == 0
    assert open_run(path).problem.dtype == "float32"
    bits = tmp_path / "bits.npy"
    np.save(bits, np.zeros((1, 2, 96, 8), np.uint16))
    assert main(["init", str(tmp_path / "x"), "--from-npy", str(bits), *files[1:]]) == 2
    assert "differ in dtype (['float32', 'uint16']); pass --dtype" in capsys.readouterr().err
    mixed = ["--from-npy", str(bits), *files[1:], "--dtype", "float32"]
    assert main(["init", str(tmp_path / "x"), *mixed]) == 2
    assert "is uint16 (bfloat16 bit patterns), not float32" in capsys.readouterr().err


def test_bf16_store_takes_a_float32_dout_file(tmp_path, capsys):
    path = _store(tmp_path / "s", "bfloat16")
    run(path, itr=1, progress=False)
    x = np.random.default_rng(1).standard_normal((1, 2, 256, 16), dtype=np.float32)
    np.save(tmp_path / "dout.npy", x)
    assert main(["backward", str(path), "--dout", str(tmp_path / "dout.npy"), "--no-progress"]) == 0
    stored = zarr.open_group(path, mode="r")["dout"][:]
    np.testing.assert_array_equal(stored, torch.from_numpy(x).bfloat16().view(torch.uint16).numpy())
    again = run_backward(path, torch.from_numpy(x).bfloat16(), progress=False)
    assert again["dout"] == "same" and again["units_run"] == 0  # the same dout, by digest
    np.save(tmp_path / "bits.npy", stored)  # uint16: bfloat16 bit patterns
    assert main(["backward", str(path), "--dout", str(tmp_path / "bits.npy"), "--no-progress"]) == 0
    assert "same dout as stored" in capsys.readouterr().out


def test_status_counts_units_as_run_does(tmp_path, capsys):
    path = str(_store(tmp_path / "s"))
    assert main(["run", path, "--itr", "2", "--no-progress"]) == 0  # 'auto' units: few, big
    m = re.search(r"fwd: done, (\d+)/(\d+) units \((\d+) run now", capsys.readouterr().out)
    assert m and m[1] == m[2] == m[3]
    assert main(["status", path]) == 0
    assert f"fwd: done, {m[1]}/{m[1]} units done" in capsys.readouterr().out
    assert main(["status", path, "--json"]) == 0
    fwd = json.loads(capsys.readouterr().out)["fwd"]
    assert fwd["units_done"] == fwd["units"] == int(m[1])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_status_says_interrupted_when_no_live_run_holds_the_store(tmp_path, capsys, monkeypatch):
    path = _store(tmp_path / "s")
    calls = 0

    def interrupt(task, n_cap):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(guardrail, "INJECT_OOM", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(path, itr=2, progress=False, unit_depth=None)
    lock = path / LOCK_NAME
    for owner in (None, {"pid": _dead_pid(), "host": os.uname().nodename}):
        if owner is not None:  # a SIGKILLed run leaves its lock file behind
            lock.write_text(json.dumps(owner))
        assert main(["status", str(path)]) == 0
        out = capsys.readouterr().out
        assert re.search(r"fwd: interrupted, \d+/\d+ units done; interrupted; rerun to resume", out)
        assert open_run(path).status()["fwd"]["status"] == "interrupted"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    assert main(["status", str(path)]) == 0  # a live owner: still running
    assert f"fwd: running (pid {os.getpid()} on " in capsys.readouterr().out
    lock.unlink()
    assert main(["run", str(path), "--itr", "2", "--unit-depth", "leaves", "--no-progress"]) == 0


CHILD = textwrap.dedent(
    """
    import signal, sys
    import streamcqsa.pipeline as pipeline
    from streamcqsa.cli import main
    from streamcqsa.pipeline import guardrail

    original = pipeline.run

    def stalling_run(*args, **kwargs):
        calls = 0

        def stall(task, n_cap):  # runs on the main thread: the compute slot
            nonlocal calls
            calls += 1
            if calls == 3:
                print("stalled", flush=True)
                signal.pause()  # until the parent's SIGINT
            return False

        guardrail.INJECT_OOM = stall
        return original(*args, **kwargs)

    pipeline.run = stalling_run
    sys.exit(main(sys.argv[1:]))
    """
)


def test_ctrl_c_during_run_exits_130_and_resumes(tmp_path, capsys):
    path, ref = _store(tmp_path / "s"), _store(tmp_path / "ref")
    run(ref, itr=2, progress=False, unit_depth=None)
    args = ["run", str(path), "--itr", "2", "--unit-depth", "leaves", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until the run is inside a unit
        assert line.strip() == "stalled", proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # liveness only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip() == "streamcqsa run: interrupted; rerun to resume"
    assert main(["status", str(path)]) == 0
    assert "interrupted; rerun to resume" in capsys.readouterr().out
    assert main(args) == 0  # resumes: no --restart
    assert re.search(r"\((\d+) run now, [1-9]\d* done before\)", capsys.readouterr().out)
    g, r = zarr.open_group(path, mode="r"), zarr.open_group(ref, mode="r")
    for name in ("out", "lse"):
        assert np.array_equal(g[name][:], r[name][:])
