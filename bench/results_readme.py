"""Write bench/results/README.md: how each result file there was produced.

For every file group present it states the command, the machine, the date and
the commit, taken from the files' own metadata where they record it, and
otherwise from git (the commit that last changed the file, and its date).
``python bench/run.py --readme`` rewrites it alone; ``make bench`` rewrites it
after the suite.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def git_commit() -> str | None:
    """HEAD's short hash, with "+changes" when the tree has uncommitted edits."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def _git(*args: str) -> str:
    res = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    return res.stdout.strip()


def _last_change(path: Path) -> tuple[str, str]:
    """(short hash, date) of the commit that last changed ``path``; ("not
    committed", "") for a file git does not have yet."""
    try:
        out = _git("log", "-1", "--format=%h %ad", "--date=short", "--", str(path))
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if not out:
        return "not committed", ""
    commit, date = out.split()
    return commit, date


def _load(name: str) -> dict[str, Any]:
    try:
        return json.loads((RESULTS / name).read_text())
    except (OSError, ValueError):
        return {}


def _suite() -> list[str] | None:
    data = _load("suite.json")
    if not data:
        return None
    meta = data.get("meta", {})
    commit, committed = _last_change(RESULTS / "suite.json")
    measured = meta.get("commit") or f"{commit} (the commit that recorded the files)"
    return [
        "| `suite.md`, `suite.json` | the CPU suite: engine and pipeline vs torch SDPA, "
        "the kernel floor, block-sparse vs dense leaves, I/O overlap, the estimate model "
        f"| `{meta.get('command', 'make bench')}` (`python bench/run.py`, "
        f"{meta.get('wall_s', 0):.0f} s) | {meta.get('machine', '?')}, "
        f"{meta.get('threads', '?')} torch threads, torch {meta.get('torch', '?')}"
        f"{', ' + meta['gpu'] if meta.get('gpu') else ', no GPU'} "
        f"| {meta.get('date', committed)} | {measured} |"
    ]


def _memory() -> list[str] | None:
    data = _load("memory.json")
    if not data:
        return None
    commit, date = _last_change(RESULTS / "memory.json")
    m = data.get("machine", {})
    return [
        "| `memory.json` | peak RSS growth of create, input check and forward on two "
        "stores 4x apart (the larger over 1 GiB of inputs) "
        "| `.venv/bin/python -m pytest -m slow tests/pipeline/test_memory.py` "
        f"| {m.get('cpus', '?')} CPUs, Python {m.get('python', '?')} "
        f"| {date or '?'} (commit date) | {commit} (the commit that recorded the file) |"
    ]


def _gpu() -> list[str] | None:
    data = _load("gpu.json")
    if not data:
        return None
    commit, date = _last_change(RESULTS / "gpu.json")
    smi = RESULTS / "gpu-nvidia-smi.txt"
    if smi.exists():  # nvidia-smi's first line is the time it ran
        first = smi.read_text().splitlines()[:1]
        date = f"{first[0].strip()} (nvidia-smi)" if first else date
    names = ", ".join(
        f"`{n}`"
        for n in ("gpu.md", "gpu.json", "gpu-bench.log", "gpu-tests.log", "gpu-nvidia-smi.txt")
        if (RESULTS / n).exists()
    )
    return [
        f"| {names} | the gpu-marked tests, then engine and pipeline vs torch SDPA (flash) "
        "at 0.5M-2M tokens, one section per call under its own time limit "
        "| `bash bench/gpu_check.sh` on the GPU machine (writes `nvidia-smi.txt`, "
        "committed here as `gpu-nvidia-smi.txt`) "
        f"| {data.get('gpu', '?')}, torch {data.get('torch', '?')}, CUDA {data.get('cuda', '?')} "
        f"| {date} | {commit} (the commit that recorded the files) |"
    ]


def _disk() -> list[str] | None:
    data = _load("disk.json")
    if not data:
        return None
    commit, date = _last_change(RESULTS / "disk.json")
    return [
        "| `disk.md`, `disk.json` | peak disk of a forward and a backward pass, sampled "
        "while they run, against the pass's own prediction "
        "| `python bench/disk.py --seq-len L [--task-bytes N]` (one row per L and unit budget) "
        "| the machine of `suite.json` "
        f"| {date or '?'} (commit date) | {commit} (the commit that recorded the files) |"
    ]


def _objectstore() -> list[str] | None:
    data = _load("objectstore.json")
    if not data:
        return None
    commit, date = _last_change(RESULTS / "objectstore.json")
    meta = data.get("meta", {})
    return [
        "| `objectstore.md`, `objectstore.json` | the pipeline over an S3 store (moto's "
        "server on loopback) ÷ the same on local disk "
        f"| `python bench/objectstore.py` ({meta.get('wall_s', 0):.0f} s) "
        f"| {meta.get('machine', '?')} | {meta.get('date', date)} "
        f"| {commit} (the commit that recorded the files) |"
    ]


def markdown() -> str:
    parts = (_suite(), _memory(), _disk(), _objectstore(), _gpu())
    rows = [r for part in parts if part for r in part]
    return "\n".join(
        [
            "# Benchmark results",
            "",
            "The figures the README and docs/gpu.md quote come from the files here. "
            "This page is generated by `python bench/run.py --readme` (and rewritten by "
            "`make bench`); edit `bench/results_readme.py`, not this file.",
            "",
            "| files | what | command | machine | date | commit |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Notes:",
            "",
            "- *commit*: the suite records the commit it ran at in `suite.json` "
            '(`meta.commit`; "+changes" when the tree had uncommitted edits). Files '
            "that do not record it show the commit that last changed them, the one "
            "the figures were committed with.",
            "- The figures are only as recent as that commit. Code changed since "
            "(see `git log -- streamcqsa`) is not measured here until the command is "
            "run again.",
            "- `suite-quick.*` (`python bench/run.py --quick`) and `overlap.*` "
            "(`python bench/overlap.py`) are smoke or working outputs and are not kept "
            "in git.",
            "- The GPU check runs on a machine with a time limit: a section that hit "
            "its limit is a row saying so (`not finished`), never a made-up figure.",
            "",
        ]
    )


def write() -> Path:
    path = RESULTS / "README.md"
    path.write_text(markdown())
    return path


if __name__ == "__main__":
    print(f"wrote {write()}")
