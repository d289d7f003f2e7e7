"""The README's examples run as written, and its results table quotes real files.

- Every ```python block runs, in order and in one namespace (a later block may
  use names an earlier one defined), in a fresh temporary directory.
- Every line of a ```bash or ```console block that starts with ``streamcqsa``
  runs through the ``streamcqsa`` command of this interpreter's environment,
  in order, in another temporary directory, and must exit 0 (``make`` lines
  are not run: they build the environment this test runs in).
- Each figure of the results table appears in the result file its row names.
- The README stays short and its relative links point at files that exist.

The examples use small sizes (the README says so), so this takes seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", TEXT, flags=re.S | re.M)


def _cli_lines() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang not in ("bash", "console", "sh", "shell"):
            continue
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("streamcqsa"):
                out.append(line)
    return out


def _streamcqsa() -> list[str]:
    """The environment's ``streamcqsa`` script, or ``python -m streamcqsa``."""
    script = Path(sys.executable).with_name("streamcqsa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamcqsa"]


def test_readme_has_examples():
    assert sum(lang == "python" for lang, _ in BLOCKS) >= 2
    assert len(_cli_lines()) >= 3


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    blocks = [body for lang, body in BLOCKS if lang == "python"]
    for i, body in enumerate(blocks):
        first = body.strip().splitlines()[0]
        try:
            exec(compile(body, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README python block {i + 1} ({first!r}) failed: {e!r}")


def test_cli_lines_run(tmp_path):
    env = dict(os.environ)
    # the checkout under test, whatever the environment has installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for line in _cli_lines():
        argv = shlex.split(line, comments=True)
        res = subprocess.run(
            [*_streamcqsa(), *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,  # liveness only
        )
        assert res.returncode == 0, f"{line}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"


def test_results_table_quotes_the_result_files():
    """Every number in a row of the Results table is in that row's file (a row
    reading "same" uses the file named above it)."""
    section = TEXT.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("|") and not r.startswith("|---")]
    assert len(rows) > 2
    source = None
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        link = re.search(r"\]\(([^)]+)\)", cells[0])
        if link:
            source = (ROOT / link.group(1)).read_text()
        assert source is not None, f"no result file named for: {row}"
        for number in cells[2:]:
            assert number in source, f"{number} (in: {row}) is not in the named result file"


def test_readme_is_short_and_its_links_exist():
    assert len(TEXT.splitlines()) <= 150
    for target in re.findall(r"\]\(([^)#]+)\)", TEXT):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing {target}"
