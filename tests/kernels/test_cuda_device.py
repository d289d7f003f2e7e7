"""``kernels.device.Device``: the CPU/GPU differences, checked on CPU (the
CUDA branches against stand-ins for ``torch.cuda``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streamcqsa.errors import DeviceOOM
from streamcqsa.kernels import device as device_mod
from streamcqsa.kernels import timing, workspace
from streamcqsa.kernels.device import Device
from streamcqsa.kernels.torch_ops import TorchBackend


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as seen on a machine with 4 GPUs, current device 2; records calls."""
    state = SimpleNamespace(current=2, calls=[])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    return state


def test_resolves_and_pins_cuda_once(fake_cuda):
    assert Device.of("auto").device == torch.device("cuda", 2)
    dev = Device.of("cuda")
    fake_cuda.current = 3  # another thread's, or a later, current device
    assert dev.device == torch.device("cuda", 2) and str(dev) == "cuda:2"
    assert Device.of("cuda:1").device == torch.device("cuda", 1)
    assert Device.of(torch.device("cuda")).device == torch.device("cuda", 3)
    assert Device.of(dev) is dev
    with pytest.raises(ValueError, match="torch sees 4 CUDA device"):
        Device.of("cuda:4")


def test_resolves_cpu_and_refuses_the_rest(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Device.of("auto").device == torch.device("cpu")
    assert Device.of("cpu") == Device.of(torch.device("cpu", 0)) == Device.of()
    with pytest.raises(ValueError, match="no CUDA device"):
        Device.of("cuda")
    for bad in ("gpu", "meta", "cuda:x", 3, None):
        with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
            Device.of(bad)


def test_dtype_rules(fake_cuda, monkeypatch):
    """Half types: as stored on CUDA, and on a CPU that multiplies them in
    hardware; else in fp32. Inputs that may hold NaN/Inf: fp32 on a CPU."""
    cpu, cuda = Device.of("cpu"), Device.of("cuda")
    half = (torch.float16, torch.bfloat16)
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: frozenset())
    assert [cpu.compute_dtype(d) for d in half] == [torch.float32, torch.float32]
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: frozenset({"bfloat16"}))
    assert [cpu.compute_dtype(d) for d in half] == [torch.float32, torch.bfloat16]
    assert cpu.nonfinite_dtype(torch.bfloat16) == torch.float32
    assert cuda.nonfinite_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: frozenset())
    assert [cuda.compute_dtype(d) for d in half] == list(half)
    for d in (torch.float32, torch.float64):
        assert cpu.compute_dtype(d) == cuda.compute_dtype(d) == d
    assert cpu.allows_float64 and not cuda.allows_float64
    # the torch backend takes its rule from here
    assert TorchBackend().compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert TorchBackend().compute_dtype(torch.bfloat16, torch.device("cuda", 1)) == torch.bfloat16


def test_is_oom(fake_cuda):
    cpu, cuda = Device.of("cpu"), Device.of("cuda")
    try:
        torch.empty(1 << 62, dtype=torch.uint8)  # fails at once: no memory is touched
    except RuntimeError as e:
        host = e
    assert cpu.is_oom(host) and cpu.is_oom(MemoryError()) and cpu.is_oom(DeviceOOM("x"))
    assert cuda.is_oom(torch.cuda.OutOfMemoryError("x")) and cuda.is_oom(DeviceOOM("x"))
    assert not cuda.is_oom(MemoryError()) and not cuda.is_oom(host)
    assert not cpu.is_oom(RuntimeError("shape mismatch")) and not cpu.is_oom(ValueError())


def test_empty_cache_and_synchronize(monkeypatch, fake_cuda):
    ws = workspace.Workspace()
    ws.release(ws.empty((1 << 21,), torch.uint8, torch.device("cpu")))
    assert workspace.cached_bytes() > 0
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: fake_cuda.calls.append(("sync", a)))
    Device.of("cpu").empty_cache()
    Device.of("cpu").synchronize()
    assert workspace.cached_bytes() == 0 and fake_cuda.calls == []

    class Guard:
        def __init__(self, dev):  # noqa: ANN001
            fake_cuda.calls.append(("device", dev))

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: fake_cuda.calls.append(("empty",)))
    Device.of("cuda:1").empty_cache()
    Device.of("cuda:1").synchronize()
    one = torch.device("cuda", 1)
    assert fake_cuda.calls == [("device", one), ("empty",), ("sync", (one,))]


def test_cpu_timer_and_stream(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = Device.of("cpu").timer()
    with timer as t:
        with pytest.raises(RuntimeError, match="not ended"):
            t.seconds  # noqa: B018
    assert t.seconds == 2.5


def test_cuda_timer_and_stream(monkeypatch, fake_cuda):
    class Event:
        def __init__(self, enable_timing=False, blocking=False):  # noqa: ANN001
            assert enable_timing and blocking  # a host reading the figure sleeps
            self.on = None

        def record(self, stream):  # noqa: ANN001
            self.on = stream

        def synchronize(self):
            fake_cuda.calls.append(("wait", self.on))

        def elapsed_time(self, end):  # noqa: ANN001
            return 1500.0  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev: f"stream of {dev}")
    with Device.of("cuda:1").timer() as t:
        pass
    assert t.seconds == 1.5
    assert fake_cuda.calls == [("wait", "stream of cuda:1")]  # waits on that stream alone


def test_cpu_streams_and_events_queue_nothing(monkeypatch):
    """On CPU the stream calls that order copies on a GPU do nothing, and an
    event is complete once recorded (its host time makes spans readable)."""
    cpu = Device.of("cpu")
    assert cpu.stream() is None and not cpu.pins_host
    clock = iter([1.0, 1.25])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    a, b = cpu.record(), cpu.record(None, timing=True)
    a.synchronize()
    assert a.query() and a.elapsed_time(b) == 250.0
    cpu.wait(a)
    cpu.adopt(None, [torch.zeros(1)])
    with cpu.using(None):
        pass


def test_cuda_events_order_streams(monkeypatch, fake_cuda):
    """record/wait/using/adopt make the CUDA calls the read-ahead and the
    write-back relied on: blocking events on the named (else current) stream,
    the current stream waiting on the device, a fresh stream per ``stream()``."""

    class Event:
        def __init__(self, enable_timing=False, blocking=False):  # noqa: ANN001
            self.timing, self.blocking, self.on = enable_timing, blocking, None

        def record(self, stream):  # noqa: ANN001
            self.on = stream

    class Stream:
        def __init__(self, dev):  # noqa: ANN001
            self.dev = dev

        def wait_event(self, ev):  # noqa: ANN001
            fake_cuda.calls.append(("wait_event", self, ev.on))

        def wait_stream(self, other):  # noqa: ANN001
            fake_cuda.calls.append(("wait_stream", self, other))

    current = Stream("current")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: ("on", s))
    cuda = Device.of("cuda:1")
    side = cuda.stream()
    assert side.dev == torch.device("cuda", 1) and cuda.stream() is not side and cuda.pins_host
    ev = cuda.record(side, timing=True)
    assert (ev.on, ev.timing, ev.blocking) == (side, True, True)
    assert cuda.record().on is current
    cuda.wait(ev)
    assert fake_cuda.calls == [("wait_event", current, side)]
    assert cuda.using(side) == ("on", side)

    class Buffer:
        def record_stream(self, s):  # noqa: ANN001
            fake_cuda.calls.append(("in use on", s))

    fake_cuda.calls.clear()
    cuda.adopt(side, [Buffer()])
    assert fake_cuda.calls == [("wait_stream", side, current), ("in use on", side)]


def test_a_compute_slot_stream_is_handed_over_from_and_back_to_the_caller(monkeypatch, fake_cuda):
    """``run_on``: the slot's stream waits for the caller's work (the inputs),
    the body queues on the slot's stream, the caller waits for it (even when
    the body fails), and results are marked in use on the caller's stream.
    On CPU it is the plain call."""
    calls = fake_cuda.calls

    class Stream:
        def __init__(self, name):  # noqa: ANN001
            self.name = name

        def wait_stream(self, other):  # noqa: ANN001
            calls.append((self.name, "waits for", other.name))

        def __repr__(self):
            return self.name

    class On:
        def __init__(self, s):  # noqa: ANN001
            self.s = s

        def __enter__(self):
            calls.append(("enter", self.s.name))

        def __exit__(self, *exc):  # noqa: ANN002
            calls.append(("exit", self.s.name))

    class Result:
        device = torch.device("cuda", 1)

        def record_stream(self, s):  # noqa: ANN001
            calls.append(("result in use on", s.name))

    monkeypatch.setattr(torch.cuda, "stream", On)
    monkeypatch.setattr(device_mod, "_tensors", lambda out: list(out))
    slot, caller = Stream("slot"), Stream("caller")
    cuda = Device.of("cuda:1")
    out = cuda.run_on(slot, caller, lambda: calls.append(("body",)) or (Result(),))
    assert len(out) == 1
    assert calls == [
        ("slot", "waits for", "caller"),
        ("enter", "slot"),
        ("body",),
        ("exit", "slot"),
        ("caller", "waits for", "slot"),
        ("result in use on", "caller"),
    ]
    calls.clear()

    def fails():  # noqa: ANN202
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        cuda.run_on(slot, caller, fails)
    assert calls[-1] == ("caller", "waits for", "slot")
    assert Device.of("cpu").run_on(None, None, lambda: 7) == 7
    assert Device.of("cpu").current_stream() is None


def test_a_host_unit_takes_a_sixteenth_of_the_host_within_bounds(monkeypatch):
    gib = 1 << 30
    for total, want in [
        (None, device_mod.HOST_UNIT_MIN),  # unknown: the floor
        (2 * gib, device_mod.HOST_UNIT_MIN),
        (24 * gib, 24 * gib // 16),
        (1 << 40, device_mod.HOST_UNIT_MAX),
    ]:
        monkeypatch.setattr(device_mod, "host_memory_bytes", lambda t=total: t)
        assert device_mod.host_unit_bytes() == want
        assert Device.of("cpu").unit_bytes(1) == want
    monkeypatch.undo()
    total = device_mod.host_memory_bytes()
    assert total is None or total > 0


def test_rules_by_device_type(monkeypatch, fake_cuda):
    cpu, cuda = Device.of("cpu"), Device.of("cuda")
    assert (cpu.default_n_cap, cuda.default_n_cap) == (1, 2)
    assert device_mod.default_n_cap("cuda") == 2
    monkeypatch.setattr(device_mod, "cpu_native_half_types", lambda: frozenset())
    assert device_mod.compute_dtype_name("cpu", "bfloat16") == "float32"
    assert device_mod.compute_dtype_name("cuda", "bfloat16") == "bfloat16"
    assert device_mod.compute_dtype_name("cpu", "float64") == "float64"
    assert cpu.fold_device == torch.device("cpu") and cuda.fold_device == cuda.device
    assert cuda.overlaps_io(compute_cores=16, cores=16)
    assert not cpu.overlaps_io(compute_cores=2, cores=2) and cpu.overlaps_io(1, 2)
    assert cpu.dask_resources is None and cuda.dask_resources == {"GPU": 1}
    assert cpu.unit_bytes(2) == device_mod.host_unit_bytes()
    assert cpu.plan_bytes() == device_mod.HOST_TASK_BYTES
    assert cpu.peak_bytes() is None
