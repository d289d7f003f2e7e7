"""``kernels.device.Device``: the CPU/GPU differences, checked on CPU (the
CUDA branches against stand-ins for ``torch.cuda``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from streamcqsa.errors import DeviceOOM
from streamcqsa.kernels import device as device_mod
from streamcqsa.kernels import workspace
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


def test_dtype_rules(fake_cuda):
    cpu, cuda = Device.of("cpu"), Device.of("cuda")
    half = (torch.float16, torch.bfloat16)
    assert [cpu.compute_dtype(d) for d in half] == [torch.float32, torch.float32]
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
    monkeypatch.setattr(device_mod.time, "perf_counter", lambda: next(clock))
    timer = Device.of("cpu").timer()
    with timer as t:
        with pytest.raises(RuntimeError, match="not ended"):
            t.seconds  # noqa: B018
    assert t.seconds == 2.5
    ctx = Device.of("cpu").side_stream()
    assert ctx.stream is None
    with ctx:
        pass


def test_cuda_timer_and_stream(monkeypatch, fake_cuda):
    class Event:
        def __init__(self, enable_timing=False):  # noqa: ANN001
            assert enable_timing
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

    monkeypatch.setattr(torch.cuda, "Stream", lambda dev: ("new stream", dev))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: SimpleNamespace(stream=s))
    assert Device.of("cuda").side_stream().stream == ("new stream", torch.device("cuda", 2))
