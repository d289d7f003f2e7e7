"""Kill and resume: SIGKILL a pass at random moments, resume it, get the same bits.

For each case a store is created once and copied before anything runs, so the
reference (an uninterrupted forward, then backward, in one copy) and the
killed runs start from identical inputs. A pass is launched as a subprocess
(tests/scripts/run_pass.py), SIGKILLed after a random delay, and the same
command is launched again, which resumes; after the last kill the command runs
to completion. The outputs must be bit-identical (np.array_equal on the raw
stored arrays, bf16 as its uint16 bit patterns) to the reference, and no
``*.partial`` temp files of killed writes may be left behind.

Kill times come from a fixed-seed RNG and are spread over the whole pass.
The script prints ``ready`` after its imports, just before the pass starts.
Each kill draws a target in its own equal slice of (0.05, 0.95) of the
pass's units (so the kills walk through the pass); if an earlier kill overshot it, the
target becomes one unit past the progress so far. The parent polls the
progress markers until the target is reached and kills after a further
uniform(0, 2) unit times, so the kill falls anywhere inside a unit (reads,
kernel, chunk writes, marker write). With at most one unit left, the kill
comes uniform(0.05, 0.95) times the pass's fixed cost after ``ready``
(opening the store, the input fingerprint, markers, metadata writes).
Drawing delays as fractions of a whole run's duration instead leaves nothing
to kill after one late draw, as resumed runs get shorter. The fixed cost and
the unit time are measured on the reference (a rerun with every unit done,
and the full run less that, over the unit count).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamcqsa.pipeline import run, run_backward
from streamcqsa.storage import StoreError, create_random
from streamcqsa.storage import open as open_run

SCRIPT = Path(__file__).parent / "scripts" / "run_pass.py"
ITR = 2
DOUT_SEED = 1234
SHAPE = dict(seq_len=2048, heads=4, kv_heads=2, head_dim=32, is_causal=True, chunk_tokens=128)
FWD_ARRAYS = ("out", "lse")
BWD_ARRAYS = ("dq", "dk", "dv")

# (dtype, keep_partials, unit_depth, overlap_io): fp32 stores every leaf's partial; the
# bf16 case runs depth-1 subtrees as units (in-memory folds, then stored
# merges) and deletes partials as parents finish, so a kill can also land
# between a node's merge and that cleanup. The last case runs its forward
# units with read-ahead and write-back threads (a kill can land while a unit
# has written some of its chunks and not yet been marked done).
CASES = [("float32", True, None, False), ("bfloat16", False, 1, False), ("float32", True, 1, True)]


def _load_script():
    spec = importlib.util.spec_from_file_location("run_pass", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Reference:
    dtype: str
    keep_partials: bool
    unit_depth: int | None
    overlap_io: bool
    base: Path  # freshly created store, never run
    fwd_base: Path  # the reference store right after its forward (backward not run)
    ref: Path  # forward and backward run uninterrupted
    t_full: dict[str, float] = field(default_factory=dict)  # whole pass, seconds
    t_fixed: dict[str, float] = field(default_factory=dict)  # pass with every unit done
    units: int = 0  # units per pass (forward and backward share the plan)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@pytest.fixture(
    scope="module", params=CASES, ids=[f"{d}-keep{k}-u{u}-io{o}" for d, k, u, o in CASES]
)
def reference(request, tmp_path_factory) -> Reference:
    dtype, keep, depth, overlap = request.param
    root = tmp_path_factory.mktemp(f"resume-{dtype}")
    base, ref, fwd_base = root / "base.zarr", root / "ref.zarr", root / "fwd_base.zarr"
    create_random(base, dtype=dtype, seed=7, **SHAPE)
    shutil.copytree(base, ref)
    r = Reference(dtype, keep, depth, overlap, base, fwd_base, ref)

    io = True if overlap else None
    stats = run(ref, itr=ITR, keep_partials=keep, progress=False, unit_depth=depth, overlap_io=io)
    assert stats["units_skipped"] == 0
    r.t_full["fwd"] = stats["seconds"]
    stats = run(ref, itr=ITR, keep_partials=keep, progress=False, unit_depth=depth, overlap_io=io)
    assert stats["units_run"] == 0, "rerunning a finished forward must do nothing"
    r.t_fixed["fwd"] = stats["seconds"]
    shutil.copytree(ref, fwd_base)

    dout = _load_script().make_dout(open_run(ref).problem, DOUT_SEED)
    stats = run_backward(ref, dout, keep_partials=keep, progress=False, unit_depth=depth)
    assert stats["units_skipped"] == 0
    r.t_full["bwd"] = stats["seconds"]
    stats = run_backward(ref, keep_partials=keep, progress=False, unit_depth=depth)
    assert stats["units_run"] == 0, "rerunning a finished backward must do nothing"
    r.t_fixed["bwd"] = stats["seconds"]

    g = zarr.open_group(ref, mode="r")
    r.arrays = {n: g[n][:] for n in (*FWD_ARRAYS, *BWD_ARRAYS, "dout")}
    r.units = g["progress/fwd"].size
    assert g["progress/bwd"].size == r.units
    print(
        f"\n[{dtype}] reference: fwd {r.t_full['fwd']:.2f} s (fixed {r.t_fixed['fwd']:.2f} s), "
        f"bwd {r.t_full['bwd']:.2f} s (fixed {r.t_fixed['bwd']:.2f} s)"
    )
    return r


def _command(path: Path, kind: str, r: Reference) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), str(path), kind, "--itr", str(ITR)]
    cmd += ["--dout-seed", str(DOUT_SEED), "--unit-depth", str(r.unit_depth)]
    cmd += ["--overlap-io"] if r.overlap_io and kind == "fwd" else []
    return cmd + ([] if r.keep_partials else ["--drop-partials"])


def _marker_dir(path: Path, kind: str) -> Path:
    return path / "progress" / kind / "c"  # one chunk file per done unit


def _units_done(path: Path, kind: str) -> int:
    """Units marked done: cheap enough to poll (a directory listing)."""
    try:
        return sum(1 for f in os.scandir(_marker_dir(path, kind)) if f.name.isdigit())
    except FileNotFoundError:
        return 0


def _orphans(path: Path) -> list[Path]:
    return sorted(path.rglob("*.partial"))


def _kill_and_resume(
    path: Path, kind: str, r: Reference, kills: int, seed: int, log: Path
) -> tuple[list[dict], dict]:
    """Launch-kill ``kills`` times, then launch once more to completion.

    Returns a record per kill and the final launch's stats."""
    rng = np.random.default_rng(seed)
    total = r.units
    t_fixed = r.t_fixed[kind]
    t_unit = max(r.t_full[kind] - t_fixed, 0.0) / total
    # one target per equal slice of (0.05, 0.95): kills spread over the pass, as
    # its last units (small merges) go by faster than any kill can follow
    targets = 0.05 + 0.9 * (np.arange(kills) + rng.uniform(0.0, 1.0, kills)) / kills
    cmd = _command(path, kind, r)
    records: list[dict] = []
    for i, frac in enumerate(targets):
        before = _units_done(path, kind)
        target = int(np.ceil(frac * total))
        if before >= target and before < total - 1:
            target = before + 1  # an earlier kill overshot: still land this one mid-run
        phase = "fixed" if target <= before else "units"
        with open(log, "a") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                line = proc.stdout.readline()
                assert line.strip() == "ready", f"launch {i} failed to start: {log.read_text()}"
                t0 = time.perf_counter()
                if phase == "fixed":
                    time.sleep(float(rng.uniform(0.05, 0.95)) * t_fixed)
                else:
                    deadline = t0 + 120.0
                    while proc.poll() is None and _units_done(path, kind) < target:
                        assert time.perf_counter() < deadline, "pass made no progress"
                        time.sleep(0.001)
                    time.sleep(float(rng.uniform(0.0, 2.0)) * t_unit)
                delay = time.perf_counter() - t0
                alive = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
                rc = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
        if not alive:  # finished before the kill: it must have finished cleanly
            assert rc == 0, f"launch {i} failed (rc {rc}): {log.read_text()}"
        records.append(
            dict(
                kill=i,
                phase=phase,
                target=target,
                delay_s=round(delay, 3),
                alive=alive,
                done_before=before,
                done_after=_units_done(path, kind),
                orphans=len(_orphans(path)),
            )
        )
    # Kills rarely land inside a chunk write (it is short), so also plant the
    # temp file such a kill leaves (zarr writes "<chunk>.<hex>.partial", then
    # renames) to check the final launch removes every one.
    marker_dir = _marker_dir(path, kind)
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / "0.0123456789abcdef.partial").write_bytes(b"\x01")
    orphans_before = len(_orphans(path))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"final launch failed: {out.stderr}"
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    stats["orphans_before_final"] = orphans_before
    return records, stats


def _check(path: Path, kind: str, r: Reference, records: list[dict], final: dict) -> None:
    names = FWD_ARRAYS if kind == "fwd" else BWD_ARRAYS
    mid_run = [x for x in records if x["alive"] and x["done_after"] < r.units]
    done = [x["done_after"] for x in records]
    print(f"\n[{r.dtype} {kind}] kills:")
    for x in records:
        print(f"  {x}")
    print(
        f"  final launch: {final['units_run']} units run, {final['units_skipped']} skipped, "
        f"{final['orphans_removed']} orphans removed; {len(mid_run)} kills mid-run"
    )

    assert len(mid_run) >= 3, f"only {len(mid_run)} kills landed mid-run: {records}"
    assert final["units_skipped"] > 0, "the final launch did not resume earlier work"
    assert final["orphans_removed"] == final["orphans_before_final"] >= 1
    if kind == "fwd":  # forward progress is never lost between launches
        assert done == sorted(done), f"progress went backwards: {done}"

    g = zarr.open_group(path, mode="r")
    assert np.count_nonzero(g[f"progress/{kind}"][:]) == g[f"progress/{kind}"].size
    assert open_run(path).meta[kind]["status"] == "done"
    for name in names:
        got, want = g[name][:], r.arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), f"{name} differs from the uninterrupted run"
    if kind == "bwd":
        assert np.array_equal(g["dout"][:], r.arrays["dout"])
    leftover = _orphans(path)
    assert not leftover, f"orphan temp files left: {leftover[:5]}"


def _forward(reference: Reference, tmp_path: Path, kills: int, seed: int) -> None:
    path = tmp_path / "killed.zarr"
    shutil.copytree(reference.base, path)
    records, final = _kill_and_resume(path, "fwd", reference, kills, seed, tmp_path / "err.log")
    _check(path, "fwd", reference, records, final)


def _backward(reference: Reference, tmp_path: Path, kills: int, seed: int) -> None:
    path = tmp_path / "killed.zarr"
    shutil.copytree(reference.fwd_base, path)
    assert "dout" not in zarr.open_group(path, mode="r")
    records, final = _kill_and_resume(path, "bwd", reference, kills, seed, tmp_path / "err.log")
    _check(path, "bwd", reference, records, final)


def test_forward_kill_resume(reference, tmp_path):
    _forward(reference, tmp_path, kills=5, seed=2024)


def test_backward_kill_resume(reference, tmp_path):
    _backward(reference, tmp_path, kills=5, seed=2025)


@pytest.mark.slow
def test_forward_kill_resume_many(reference, tmp_path):
    _forward(reference, tmp_path, kills=24, seed=7)


@pytest.mark.slow
def test_backward_kill_resume_many(reference, tmp_path):
    _backward(reference, tmp_path, kills=24, seed=8)


@pytest.mark.parametrize("previous", [False, True], ids=["first-backward", "over-finished"])
def test_backward_killed_while_writing_dout(reference, tmp_path, previous):
    """A kill while a new dout is written must not let a plain resume finish silently.

    The uninterrupted run with that dout is the reference; a resume without
    dout may raise StoreError (dout incomplete: pass it again) but must not
    report a finished backward whose gradients differ from the reference.
    """
    if reference.dtype != "float32":
        pytest.skip("one dtype is enough to show the store state")
    path = tmp_path / "killed.zarr"
    shutil.copytree(reference.fwd_base, path)
    if previous:  # a finished backward with another dout is already in the store
        other = _load_script().make_dout(open_run(path).problem, DOUT_SEED + 1)
        run_backward(path, other, keep_partials=reference.keep_partials, progress=False)
    blocks = SHAPE["seq_len"] // SHAPE["chunk_tokens"]
    cmd = _command(path, "bwd", reference)
    cmd += ["--force-dout", "--kill-self-at-dout-block", str(blocks // 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"not killed while writing dout (rc {proc.returncode}): {proc.stderr}")

    try:
        run_backward(path, keep_partials=reference.keep_partials, progress=False)
    except StoreError:
        return  # refusing to resume with an incomplete dout is correct
    g = zarr.open_group(path, mode="r")
    for name in BWD_ARRAYS:
        assert np.array_equal(g[name][:], reference.arrays[name]), (
            f"resumed backward reported done with {name} != the uninterrupted run's"
        )
