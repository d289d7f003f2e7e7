"""The benchmark suite runs end to end (``bench/run.py --quick`` at toy sizes).

The smoke run is marked ``slow``: it runs every bench section, so it stays out
of ``make test`` (``pytest -m slow tests/test_bench.py`` runs it). The check
that the kernel floor times the engine's own calls is small and runs always.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_suite_smoke(tmp_path):
    """``bench/run.py --quick`` at toy sizes: every section yields its rows, one
    table, JSON that parses (the numbers themselves mean nothing this small)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "suite.py"
    spec = importlib.util.spec_from_file_location("bench_suite", path)
    suite = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(suite)  # type: ignore[union-attr]
    suite.main(
        [
            "--quick",
            "--seq-len",
            "1024",
            "--dense-seq-len",
            "512",
            "--heads",
            "2",
            "--delay",
            "0.002",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "suite-quick.json").read_text())
    sections = {r["section"] for r in data["rows"]}
    assert sections >= {
        "engine vs SDPA",
        "pipeline vs SDPA",
        "kernel floor (one thread)",
        "block-sparse vs dense leaves",
        "I/O overlap",
        "estimate model",
    }
    pipe = [r for r in data["rows"] if r["section"] == "pipeline vs SDPA"]
    assert sorted({r["itr"] for r in pipe}) == [1, 2, 3]
    floor = [r for r in data["rows"] if r["section"] == "kernel floor (one thread)"]
    assert len(floor) == 2 * 2 * 3 and all(r["ratio"] > 0 for r in floor)  # dtypes, causal, itr
    dense = [r for r in data["rows"] if r["section"] == "block-sparse vs dense leaves"]
    assert all(r["base_work"] > r["work"] for r in dense)
    md = (tmp_path / "suite-quick.md").read_text()
    assert md.count("\n| ") >= len(data["rows"]) and "GPU" in md


def test_kernel_floor_times_the_engines_own_calls(monkeypatch):
    """The floor must time exactly the kernel calls the engine makes for the
    plan: the same shapes and causal flags, as many of each (random inputs,
    a causal plan whose triangles are split, itr 2)."""
    import sys
    from collections import Counter

    import torch

    import streamcqsa
    from streamcqsa.cqs import divide
    from streamcqsa.kernels import threads, torch_ops

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import floor

    seen: Counter = Counter()
    op = torch_ops._cpu_op

    def counted(q, k, v, causal, scale):  # noqa: ANN001, ANN202
        seen[(tuple(q.shape), tuple(k.shape), causal)] += 1
        return op(q, k, v, causal, scale)

    monkeypatch.setattr(torch_ops, "_cpu_op", counted)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 2048, 32, generator=g) for _ in range(3))
    with threads.scope(1):
        streamcqsa.attention(q, k, v, itr=2, is_causal=True)
        engine, seen = seen, Counter()
        floor.kernels_alone(divide(2048, 2, 3, is_causal=True), q, k, v)
    assert engine and seen == engine
    assert any(c for (_, _, c) in engine) and any(not c for (_, _, c) in engine)
