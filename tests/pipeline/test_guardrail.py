"""The OOM guardrail: n_cap shrinks on OOM, then tasks run block by block;
either way the stored results are bit-identical."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import zarr

from streamcqsa.kernels.device import Device
from streamcqsa.pipeline import guardrail, run, run_backward
from streamcqsa.pipeline.guardrail import DeviceOOM, Guardrail
from streamcqsa.storage import create_random

NAMES = ("out", "lse", "dq", "dk", "dv")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("guard")
    create_random(
        base / "src",
        seq_len=1500,
        heads=4,
        kv_heads=2,
        head_dim=16,
        dtype="bfloat16",
        chunk_tokens=128,
        is_causal=True,
        seed=7,
    )
    ref = base / "ref"
    shutil.copytree(base / "src", ref)
    dout = np.random.default_rng(2).standard_normal((1, 4, 1500, 16)).astype(np.float32)
    import torch

    dout = torch.from_numpy(dout).bfloat16()
    run(ref, itr=2, progress=False, head_group=1)
    run_backward(ref, dout, progress=False)
    return base, ref, dout


def _same(a, b):
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for n in NAMES:
        assert np.array_equal(ga[n][:], gb[n][:]), n


def test_injected_oom_lowers_n_cap_then_divides(stores, tmp_path, monkeypatch):
    base, ref, dout = stores
    path = tmp_path / "s"
    shutil.copytree(base / "src", path)
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def inject(task: str, n_cap: int) -> bool:
        with lock:
            seen.append((task, n_cap))
            # the first tasks OOM at every n_cap: first n_cap 3 -> 2 -> 1, then divide
            return task.startswith(("r.0.0[", "r.3.5["))

    monkeypatch.setattr(guardrail, "INJECT_OOM", inject)
    fwd = run(path, itr=2, progress=False, head_group=1, n_cap=3)
    events = fwd["guardrail"]["events"]
    assert [e["n_cap"] for e in events if e["event"] == "oom"][:2] == [2, 1]
    assert fwd["guardrail"]["n_cap"] == 1
    divided = {e["task"] for e in events if e["event"] == "divide"}
    assert any(t.startswith("r.0.0[") for t in divided)
    bwd = run_backward(path, dout, progress=False, n_cap=2)
    assert any(e["event"] == "divide" for e in bwd["guardrail"]["events"])
    _same(ref, path)


def test_memory_budget_forces_block_by_block(stores, tmp_path):
    base, ref, dout = stores
    path = tmp_path / "s"
    shutil.copytree(base / "src", path)
    # too small for any whole task, large enough for every single block
    stats = run(path, itr=2, progress=False, head_group=1, n_cap=2, device_memory=110_000)
    kinds = {e["event"] for e in stats["guardrail"]["events"]}
    assert kinds == {"oom", "divide"}
    run_backward(path, dout, progress=False, device_memory=300_000)
    _same(ref, path)


def test_budget_too_small_for_one_block_is_a_clear_error(stores, tmp_path):
    base, _, _ = stores
    path = tmp_path / "s"
    shutil.copytree(base / "src", path)
    with pytest.raises(DeviceOOM, match="even one block"):
        run(path, itr=2, progress=False, head_group=1, device_memory=1000)


def test_n_cap_validation():
    with pytest.raises(ValueError, match="n_cap"):
        Guardrail(device=Device.of("cpu"), n_cap=0)


def test_device_budget_queries_name_a_device_index(monkeypatch):
    """torch 2.11's get_per_process_memory_fraction refuses a bare "cuda" (no
    index), which stopped every GPU pipeline run before its first unit: the
    device sizing must resolve "cuda" to the current device's index."""
    import torch

    from streamcqsa.pipeline.choose import default_task_bytes

    seen = []

    def needs_index(dev):  # noqa: ANN001, ANN202
        d = torch.device(dev)
        if d.index is None:
            raise ValueError(f"Expected a torch.device with a specified index, got {dev}")
        seen.append(d)
        return 1.0

    def props(dev):  # noqa: ANN001, ANN202
        return type("P", (), {"total_memory": 80 << 30})()

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", needs_index)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (80 << 30, 80 << 30))
    got = default_task_bytes("cuda", 2)
    assert seen == [torch.device("cuda", 0)]
    assert got == int(0.4 * (80 << 30) / 2)


def test_host_allocation_failure_is_out_of_memory_on_cpu():
    """On CPU a failed host allocation is the device's out-of-memory: the task
    is requeued with one resident fewer, then divided; other errors pass."""
    g = Guardrail(device=Device.of("cpu"), n_cap=2)
    tries = []

    def whole():  # noqa: ANN202
        tries.append(1)
        raise MemoryError("no room")

    assert g.run("t", (1, whole), (1, lambda: "divided")) == "divided"
    assert len(tries) == 2
    assert [e["event"] for e in g.events] == ["oom", "divide"] and g.n_cap == 1

    def broken():  # noqa: ANN202
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        g.run("u", (1, broken), (1, lambda: "divided"))


def _record_at_once(monkeypatch) -> list:  # noqa: ANN001
    from streamcqsa.pipeline.context import Context

    seen, orig = [], Context.leaves_at_once.fget

    def record(self):  # noqa: ANN001, ANN202
        seen.append(orig(self))
        return seen[-1]

    monkeypatch.setattr(Context, "leaves_at_once", property(record))
    return seen


def test_cpu_leaves_at_once_fall_back_to_blocks_on_a_failed_allocation(
    stores, tmp_path, monkeypatch
):
    """With no memory budget a CPU unit runs its leaves at once, as the
    engine does; a leaf whose allocation fails (a real failure, not the
    injected OOM, which makes leaves go one at a time) reruns block by
    block, and the stored bits are the plain pass's."""
    from streamcqsa.pipeline import leaves as leaves_mod

    base, ref, dout = stores
    path = tmp_path / "s"
    shutil.copytree(base / "src", path)
    real, failed, lock = leaves_mod.task_forward, [], threading.Lock()

    def tight(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        with lock:
            fail = kw.get("block_device") is None and len(failed) < 2
            if fail:
                failed.append(1)
        if fail:
            raise MemoryError("injected: the host could not allocate")
        return real(*a, **kw)

    monkeypatch.setattr(leaves_mod, "task_forward", tight)
    seen = _record_at_once(monkeypatch)
    stats = run(path, itr=2, progress=False, head_group=1)
    events = [e["event"] for e in stats["guardrail"]["events"]]
    assert events == ["divide", "divide"], events
    assert seen and all(seen), "the leaves did not run at once"
    ga, gb = zarr.open_group(ref, mode="r"), zarr.open_group(path, mode="r")
    for n in ("out", "lse"):
        assert np.array_equal(ga[n][:], gb[n][:]), n


def test_leaves_go_one_at_a_time_under_a_memory_budget(stores, tmp_path, monkeypatch):
    base, ref, dout = stores
    path = tmp_path / "s"
    shutil.copytree(base / "src", path)
    seen = _record_at_once(monkeypatch)
    run(path, itr=2, progress=False, head_group=1, device_memory=1 << 30)
    assert seen and not any(seen)
    _same_fwd = zarr.open_group(ref, mode="r"), zarr.open_group(path, mode="r")
    for n in ("out", "lse"):
        assert np.array_equal(_same_fwd[0][n][:], _same_fwd[1][n][:]), n
