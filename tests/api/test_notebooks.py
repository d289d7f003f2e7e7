"""Every notebook in notebooks/ runs top to bottom without error (nbclient).

The notebooks assert what they show (verify within tolerance, the
log-sum-exp merge of the partials, a bit-identical resume), so a wrong
result fails here too. The kernel runs this interpreter (``sys.executable``)
through a kernel spec written for the test, so a ``python3`` kernel spec of
another installation can never be picked up; matplotlib uses Agg and the
notebooks run at their small default sizes (``STREAMCQSA_NB_SMALL=1``).

Notebooks are kept in git executed, with their pictures, so that a reader
on the web sees them: each is valid nbformat, under 1 MB, every code cell ran,
and none holds an error output. That is checked too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
KERNEL = "streamcqsa-test"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernel spec that starts ipykernel in this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "stream-cqsa tests",
                "language": "python",
                "env": {"MPLBACKEND": "Agg", "STREAMCQSA_NB_SMALL": "1"},
            }
        )
    )
    return root


def test_notebooks_found():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_inspect_partials.ipynb", "03_resume.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_executed(path):
    assert path.stat().st_size < 2**20, f"{path.name}: over 1 MB"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), (
        f"{path.name}: commit notebooks executed (every code cell run)"
    )
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        f"{path.name}: no picture"
    )


def _runs(path: Path) -> object:
    """The quickstart runs in the fast suite; the others, slower, with ``slow``."""
    slow = () if path.stem.startswith("01_") else pytest.mark.slow
    return pytest.param(path, id=path.stem, marks=slow)


@pytest.mark.parametrize("path", [_runs(p) for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_dir, tmp_path):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    )
    client = NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError naming the cell on any error
    finally:
        if km.has_kernel:  # nbclient leaves a kernel it did not create running
            km.shutdown_kernel(now=True)
    print(f"\n{path.name}: {time.perf_counter() - t0:.1f} s")
    # the kernel really was this interpreter
    assert km.kernel_spec is not None and km.kernel_spec.argv[0] == sys.executable
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "error"
    ]
    assert not errors
