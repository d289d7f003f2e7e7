"""The GPU unit path's bookkeeping, run on the CPU.

On CUDA a forward unit above the leaves lives on the device: read-ahead
through staging slots and a copy stream, folds where the leaves ran, the
output cast to its dtype there, write-back from a stream of its own, at most
``n_cap`` such units at once. ``Device``'s streams and events queue nothing
on a CPU, so the same code runs here when the CPU device is told to hold its
units (``folds_on_device``): the bits must be a plain CPU pass's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from streamcqsa.kernels.device import Device
from streamcqsa.pipeline import run
from streamcqsa.storage import create_random


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("devunits")
    for dtype in ("bfloat16", "float32"):
        create_random(
            base / dtype,
            seq_len=1500,
            heads=4,
            kv_heads=2,
            head_dim=16,
            dtype=dtype,
            chunk_tokens=128,
            is_causal=True,
            seed=3,
        )
    return base


@pytest.mark.parametrize(
    ("dtype", "itr", "unit_depth", "overlap"),
    [("bfloat16", 3, 1, True), ("bfloat16", 2, 0, True), ("float32", 2, 0, False)],
)
def test_device_units_on_cpu_keep_the_bits(
    stores, tmp_path, monkeypatch, dtype, itr, unit_depth, overlap
):
    plain, held = tmp_path / "plain", tmp_path / "held"
    shutil.copytree(stores / dtype, plain)
    shutil.copytree(stores / dtype, held)
    run(plain, itr=itr, progress=False, unit_depth=unit_depth, head_group=1)
    # the CPU device holds its units as a GPU does
    monkeypatch.setattr(Device, "folds_on_device", property(lambda self: True))
    stats = run(
        held, itr=itr, progress=False, unit_depth=unit_depth, head_group=1, overlap_io=overlap
    )
    st = stats["stages"]
    assert "d2h" in st and "h2d" in st, st  # the device unit's stages (times: not asserted)
    a, b = zarr.open_group(plain, mode="r"), zarr.open_group(held, mode="r")
    for name in ("out", "lse"):
        assert np.array_equal(a[name][:], b[name][:]), name


@pytest.mark.parametrize(("fails", "events"), [(1, ["unit oom"]), (2, ["unit oom", "host unit"])])
def test_unit_allocation_oom_lowers_n_cap_then_holds_the_unit_on_the_host(
    stores, tmp_path, monkeypatch, fails, events
):
    """Out-of-memory in a device unit's own buffers (outside its leaves,
    which the leaf guardrail covers): n_cap drops and the unit reruns; alone
    on the device and still out of memory, it is held on the host. Either
    way the pass finishes with exact, verified outputs."""
    from streamcqsa.errors import DeviceOOM
    from streamcqsa.pipeline import unit as unit_mod
    from streamcqsa.pipeline import verify

    path = tmp_path / "s"
    shutil.copytree(stores / "bfloat16", path)
    left = [fails]
    real = unit_mod.ReadAhead

    def tight(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        if left[0] > 0:
            left[0] -= 1
            raise DeviceOOM("injected: no room for the unit's buffers")
        return real(*a, **kw)

    monkeypatch.setattr(unit_mod, "ReadAhead", tight)
    monkeypatch.setattr(Device, "folds_on_device", property(lambda self: True))
    stats = run(path, itr=2, progress=False, unit_depth=0, head_group=2, n_cap=2, overlap_io=True)
    got = [e["event"] for e in stats["guardrail"]["events"]]
    assert got == events and stats["guardrail"]["n_cap"] == 1
    report = verify(path)
    assert report["ok"], report


@pytest.mark.parametrize(
    ("itr", "unit_depth", "held", "overlap"),
    [(2, 0, True, False), (3, 1, True, False), (2, 0, True, True), (3, 1, False, True)],
    ids=["staged-d0", "staged-d1", "readahead-held", "readahead-host"],
)
def test_backward_units_keep_the_bits(
    stores, tmp_path, monkeypatch, itr, unit_depth, held, overlap
):
    """A backward unit held on the device (inputs copied there, leaf
    gradients summed there, the unit's gradients copied back), or one whose
    inputs are read ahead piece by piece while its first leaves compute:
    the bits of a plain backward on the host, whose sums are the same
    elementwise adds."""
    import torch

    from streamcqsa.pipeline import run_backward

    plain, other = tmp_path / "plain", tmp_path / "other"
    shutil.copytree(stores / "bfloat16", plain)
    shutil.copytree(stores / "bfloat16", other)
    dout = torch.randn(1, 4, 1500, 16, generator=torch.Generator().manual_seed(9)).bfloat16()
    for path in (plain, other):
        run(path, itr=itr, progress=False, unit_depth=unit_depth, head_group=1)
    run_backward(plain, dout, progress=False, unit_depth=unit_depth, overlap_io=False)
    if held:
        monkeypatch.setattr(Device, "folds_on_device", property(lambda self: True))
    from streamcqsa.pipeline import readahead
    from streamcqsa.pipeline import unit as unit_mod

    real, rows = unit_mod.read_runs, []

    def counted(arrays, name, b, heads, runs, *a):  # noqa: ANN001, ANN002, ANN202
        rows.append(sum(n for _, n in runs))
        return real(arrays, name, b, heads, runs, *a)

    monkeypatch.setattr(unit_mod, "read_runs", counted)
    waits = []
    wait = readahead.ReadAhead.wait
    monkeypatch.setattr(
        readahead.ReadAhead, "wait", lambda self, leaf: (waits.append(leaf), wait(self, leaf))
    )
    stats = run_backward(other, dout, progress=False, unit_depth=unit_depth, overlap_io=overlap)
    if held:
        assert {"h2d", "d2h"} <= stats["stages"].keys(), stats["stages"]  # on the "device"
    if overlap:  # each leaf waited only for its own pieces
        assert waits and not rows
    else:  # staged to the device a store chunk at a time: host memory bounded by a chunk
        assert rows and max(rows) <= 128 and not waits, rows
    a, b = zarr.open_group(plain, mode="r"), zarr.open_group(other, mode="r")
    for name in ("dq", "dk", "dv"):
        assert np.array_equal(a[name][:], b[name][:]), name
