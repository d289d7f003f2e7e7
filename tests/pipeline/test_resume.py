"""Kill and resume: SIGKILL a pass at chosen store writes, resume it, get the same bits.

Kills are placed by progress, never by time. A launch counts its store writes
(tests/scripts/run_pass.py wraps the storage layer's file writers) and kills
itself at its N-th one, before the write, after it, or with the write torn
(its temp file half written). N is drawn by a fixed-seed RNG below the count
of writes the launch has left: what an uninterrupted launch from the same
state writes, measured on a copy of the store by the same counter (for the
first launch, the reference run's count; its kill comes in the second half).
So every kill lands mid-run, however fast or slow the machine is, and leaves
at least one write undone.

After the kills one launch runs to completion. Then the outputs must be
bit-identical (np.array_equal on the raw stored arrays, bf16 as its uint16
bit patterns) to an uninterrupted reference run from the same inputs, the
pass must say done, no ``*.partial`` temp file may be left (a torn kill
leaves one), and the final launch must have resumed: it writes less than a
run from scratch.

Launches are forked from one serving process that has imported the package
(``run_pass.py serve``), so a launch costs a fork, not an interpreter start.
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamcqsa.storage import StoreError, create_random
from streamcqsa.storage import open as open_run

SCRIPT = Path(__file__).parents[1] / "scripts" / "run_pass.py"
LIVENESS_S = 600  # only a hung launch gets near this
ITR = 2
DOUT_SEED = 1234
SHAPE = dict(seq_len=2048, heads=4, kv_heads=2, head_dim=32, is_causal=True, chunk_tokens=128)
OUTPUTS = {"fwd": ("out", "lse"), "bwd": ("dq", "dk", "dv")}
KILL_MODES = ("before", "after", "torn")


@dataclass(frozen=True)
class Case:
    """How the pass is run: partials kept or dropped as parents finish, unit depth
    (None: every leaf a unit), forward read-ahead and write-back threads."""

    dtype: str
    keep_partials: bool
    unit_depth: int | None
    overlap_io: bool

    @property
    def id(self) -> str:
        keep = "keep" if self.keep_partials else "drop"
        return f"{self.dtype}-{keep}-u{self.unit_depth}" + ("-io" if self.overlap_io else "")

    def argv(self, path: Path, kind: str) -> list[str]:
        argv = [str(path), kind, "--itr", str(ITR), "--dout-seed", str(DOUT_SEED)]
        argv += ["--unit-depth", str(self.unit_depth)]
        argv += ["--overlap-io"] if self.overlap_io and kind == "fwd" else []
        return argv + ([] if self.keep_partials else ["--drop-partials"])


LEAVES = Case("float32", True, None, False)
SUBTREES_BF16 = Case("bfloat16", False, 1, False)
OVERLAPPED = Case("float32", True, 1, True)


class Launcher:
    """Client of ``run_pass.py serve``: one forked launch per call."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self._log = log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self._reply() == "ready"

    def _reply(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], LIVENESS_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            pytest.fail(f"launch server hung or died: {self.log_path.read_text()[-2000:]}")
        return line.strip()

    def launch(self, argv: list[str]) -> tuple[int, dict | None]:
        """Exit status (negative: killed by that signal) and, if it finished, its stats."""
        result = self.log_path.with_suffix(".result.json")
        result.unlink(missing_ok=True)
        self.proc.stdin.write(json.dumps([*argv, "--result", str(result)]) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self._reply())["rc"]
        return rc, (json.loads(result.read_text()) if rc == 0 else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=LIVENESS_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Launcher:
    server = Launcher(tmp_path_factory.mktemp("launcher") / "launches.log")
    yield server
    server.close()


@dataclass
class Reference:
    case: Case
    base: Path  # freshly created store, never run
    fwd_base: Path  # the reference store right after its forward
    writes: dict[str, int] = field(default_factory=dict)  # an uninterrupted pass's writes
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _finish(launcher: Launcher, path: Path, kind: str, case: Case) -> dict:
    rc, stats = launcher.launch(case.argv(path, kind))
    assert rc == 0, f"uninterrupted {kind} launch failed (rc {rc}): see {launcher.log_path}"
    return stats


@pytest.fixture(scope="module")
def reference(request, launcher, tmp_path_factory) -> Reference:
    """Uninterrupted forward, then backward, from a fresh store (also kept)."""
    case: Case = request.param
    root = tmp_path_factory.mktemp(f"resume-{case.id}")
    r = Reference(case, root / "base.zarr", root / "fwd_base.zarr")
    ref = root / "ref.zarr"
    create_random(r.base, dtype=case.dtype, seed=7, **SHAPE)
    shutil.copytree(r.base, ref)
    r.writes["fwd"] = _finish(launcher, ref, "fwd", case)["writes"]
    shutil.copytree(ref, r.fwd_base)
    r.writes["bwd"] = _finish(launcher, ref, "bwd", case)["writes"]
    assert min(r.writes.values()) > 0, "the write counter saw no store writes"
    g = zarr.open_group(ref, mode="r")
    r.arrays = {n: g[n][:] for n in (*OUTPUTS["fwd"], *OUTPUTS["bwd"], "dout")}
    return r


def _orphans(path: Path) -> list[Path]:
    return sorted(path.rglob("*.partial"))


def _writes_left(launcher: Launcher, path: Path, kind: str, case: Case, scratch: Path) -> int:
    """What an uninterrupted launch from this state writes (run on a copy)."""
    shutil.copytree(path, scratch)
    try:
        return _finish(launcher, scratch, kind, case)["writes"]
    finally:
        shutil.rmtree(scratch)


def _kill_and_resume(
    launcher: Launcher, path: Path, kind: str, r: Reference, kills: int, seed: int, tmp: Path
) -> tuple[list[dict], dict]:
    """Launch and kill ``kills`` times, then launch once more to completion."""
    rng = np.random.default_rng(seed)
    modes = rng.permutation(np.resize(KILL_MODES, kills))
    records: list[dict] = []
    left = r.writes[kind]  # the first launch starts from the reference's own state
    for i, mode in enumerate(modes):
        if i:
            left = _writes_left(launcher, path, kind, r.case, tmp / f"dry-{i}")
        # never the last write; the first kill in the second half, so that the
        # final launch always has finished work to resume
        at = int(rng.integers(left // 2 if i == 0 else 1, max(left - 1, 1) + 1))
        rc, _ = launcher.launch([*r.case.argv(path, kind), "--kill-at-write", str(at),
                                 "--kill-mode", str(mode)])  # fmt: skip
        assert rc == -signal.SIGKILL, (
            f"launch {i} was to kill itself at write {at} of {left} ({mode}) but exited "
            f"with {rc}: see {launcher.log_path}"
        )
        records.append(dict(kill=i, mode=str(mode), at=at, left=left, orphans=len(_orphans(path))))
    return records, _finish(launcher, path, kind, r.case)


def _check(path: Path, kind: str, r: Reference, records: list[dict], final: dict) -> None:
    print(f"\n[{r.case.id} {kind}] a run from scratch writes {r.writes[kind]}; kills:")
    for x in records:
        print(f"  {x}")
    print(f"  final launch: {final['writes']} writes")
    assert final["writes"] < r.writes[kind], "the final launch did not resume earlier work"
    assert any(x["orphans"] for x in records), "no torn write was left to clean up"
    assert not _orphans(path), f"orphan temp files left: {_orphans(path)[:5]}"
    assert open_run(path).meta[kind]["status"] == "done"
    g = zarr.open_group(path, mode="r")
    for name in OUTPUTS[kind]:
        got, want = g[name][:], r.arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), f"{name} differs from the uninterrupted run"
    if kind == "bwd":
        assert np.array_equal(g["dout"][:], r.arrays["dout"])


def _kill_test(launcher, reference, tmp_path, kind: str, kills: int, seed: int) -> None:  # noqa: ANN001
    path = tmp_path / "killed.zarr"
    shutil.copytree(reference.base if kind == "fwd" else reference.fwd_base, path)
    records, final = _kill_and_resume(launcher, path, kind, reference, kills, seed, tmp_path)
    _check(path, kind, reference, records, final)


def _cases(fast: Case) -> list:
    """Every case; those but ``fast`` run only with the slow tests."""
    slow = pytest.mark.slow
    return [
        pytest.param(c, id=c.id, marks=() if c == fast else slow)
        for c in (LEAVES, SUBTREES_BF16, OVERLAPPED)
    ]


@pytest.mark.parametrize("reference", _cases(fast=OVERLAPPED), indirect=True)
def test_forward_kill_resume(launcher, reference, tmp_path):
    _kill_test(launcher, reference, tmp_path, "fwd", kills=3, seed=2024)


@pytest.mark.parametrize("reference", _cases(fast=SUBTREES_BF16), indirect=True)
def test_backward_kill_resume(launcher, reference, tmp_path):
    _kill_test(launcher, reference, tmp_path, "bwd", kills=3, seed=2025)


@pytest.mark.slow
@pytest.mark.parametrize("reference", _cases(fast=None), indirect=True)
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_kill_resume_many(launcher, reference, tmp_path, kind):
    _kill_test(launcher, reference, tmp_path, kind, kills=16, seed=7 if kind == "fwd" else 8)


@pytest.mark.parametrize("reference", [pytest.param(OVERLAPPED, id=OVERLAPPED.id)], indirect=True)
@pytest.mark.parametrize("previous", [False, True], ids=["first-backward", "over-finished"])
def test_backward_killed_while_writing_dout(launcher, reference, tmp_path, previous):
    """A kill while a new dout is written must not let a plain resume finish silently.

    The uninterrupted run with that dout is the reference; a resume without
    dout may raise StoreError (dout incomplete: pass it again) but must not
    report a finished backward whose gradients differ from the reference.
    """
    from streamcqsa.pipeline import run_backward

    case = reference.case
    path = tmp_path / "killed.zarr"
    shutil.copytree(reference.fwd_base, path)
    if previous:  # a finished backward with another dout is already in the store
        argv = [*case.argv(path, "bwd"), "--dout-seed", str(DOUT_SEED + 1)]
        assert launcher.launch(argv)[0] == 0
    blocks = SHAPE["seq_len"] // SHAPE["chunk_tokens"]
    argv = [*case.argv(path, "bwd"), "--force-dout", "--kill-self-at-dout-block", str(blocks // 2)]
    rc, _ = launcher.launch(argv)
    assert rc == -signal.SIGKILL, f"not killed while writing dout (rc {rc})"

    try:
        run_backward(path, keep_partials=case.keep_partials, progress=False)
    except StoreError:
        return  # refusing to resume with an incomplete dout is correct
    g = zarr.open_group(path, mode="r")
    for name in OUTPUTS["bwd"]:
        assert np.array_equal(g[name][:], reference.arrays[name]), (
            f"resumed backward reported done with {name} != the uninterrupted run's"
        )
