"""The command line's commands end to end: help, init/run/verify/backward/status,
estimate and plan, run in-process through ``streamcqsa.cli.main`` (a
subprocess only for ``python -m streamcqsa.cli``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamcqsa.cli import main


def test_every_option_says_what_it_does():
    import argparse

    from streamcqsa.cli.parser import parser

    subs = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [
        f"{name} {opt.option_strings or opt.dest}"
        for name, sub in subs.choices.items()
        for opt in sub._actions
        if not opt.help
    ]
    assert not silent, silent
    assert len(subs.choices) == 9


def test_help_and_roundtrip(tmp_path, capsys):
    res = subprocess.run(
        [sys.executable, "-m", "streamcqsa.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "usage" in res.stdout
    for sub in ("init", "run", "backward", "status", "verify", "demo"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out
    path = str(tmp_path / "s")
    assert (
        main(
            [
                "init",
                path,
                "--seq-len",
                "300",
                "--heads",
                "2",
                "--head-dim",
                "16",
                "--dtype",
                "float32",
                "--causal",
            ]
        )
        == 0
    )
    assert main(["run", path, "--itr", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["verify", path, "--rows", "20"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["backward", path, "--random-dout", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bwd"]["status"] == "done"
    assert main(["run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_estimate_json(capsys):
    rc = main(
        [
            "estimate",
            "--seq-len",
            "200000",
            "--heads",
            "2",
            "--head-dim",
            "32",
            "--dtype",
            "float32",
            "--causal",
            "--device-memory",
            "64MiB",
            "--host-memory",
            "1GiB",
            "--device",
            "cpu",
            "--quick",
            "--no-pipeline-fit",
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plan"]["itr"] >= 1 and rep["plan"]["fits"]
    assert rep["passes"]["bwd"]["kernel_device_hours"] > rep["passes"]["fwd"]["kernel_device_hours"]
    assert rep["calibration"]["pipeline"] is None


def test_plan_refuses_a_bad_quorum(capsys) -> None:
    assert main(["plan", "--seq-len", "1000", "--quorum", "7"]) == 2
    assert "nearest valid quorum sizes: 6 or 8" in capsys.readouterr().err
