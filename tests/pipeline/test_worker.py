"""Compute slots: jobs run on the serving thread; nothing waits forever."""

from __future__ import annotations

import threading

import pytest

from streamcqsa.pipeline import worker

LIVENESS_S = 120  # only catches a hang


def test_jobs_run_on_the_serving_thread():
    slots = worker.ComputeSlots(1, threads=None)
    done = threading.Event()
    seen: list[str] = []

    def submit() -> None:
        seen.append(slots.call(lambda: threading.current_thread().name))
        done.set()
        slots.wake()

    t = threading.Thread(target=submit)
    t.start()
    slots.serve(done)
    t.join()
    slots.close()
    assert seen == [threading.current_thread().name]


def test_close_fails_waiting_jobs_and_later_calls():
    slots = worker.ComputeSlots(1, threads=None)  # nobody serves
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            slots.call(lambda: 1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=submit)
    t.start()
    while not slots._pending:  # the job is queued
        pass
    slots.close()
    t.join(timeout=LIVENESS_S)
    assert not t.is_alive() and isinstance(errors[0], worker.Cancelled)
    with pytest.raises(worker.Cancelled):
        slots.call(lambda: 1)


def test_helpers_run_jobs_and_stop():
    slots = worker.ComputeSlots(3, threads=None)  # two helpers, nobody serving
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(slots.call(lambda: 7))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=LIVENESS_S)
    assert results == [7, 7, 7, 7]
    slots.close()
    assert not any(h.is_alive() for h in slots._helpers)


def test_an_ended_local_pass_refuses_stragglers():
    """A step left running after its pass ended (failed or interrupted) gets
    no compute: the driver's slots are gone with the pass."""
    from streamcqsa.pipeline.runtime import Runtime

    rt = Runtime(device="cpu", n_cap=1)
    rt.attach(worker.Inline())
    assert rt.compute(lambda: 3, None) == 3
    rt.detach()
    with pytest.raises(worker.Cancelled):
        rt.compute(lambda: 3, None)
