"""Peak-RSS probe for tests/pipeline/test_memory.py: one store operation in a fresh process.

    python mem_probe.py create PATH --seq-len L --heads H --head-dim D [--dtype DT]
    python mem_probe.py run PATH --itr N [--head-group G] [--workers W] [--no-check-inputs]
    python mem_probe.py fingerprint PATH

Prints one JSON line: the peak RSS (ru_maxrss, KiB) after imports and after
opening the store (the baseline), the peak after the operation, and timings.
``fingerprint`` is the input check ``run`` does first unless check_inputs=False
(storage.fingerprint); ``create`` ends with it too.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def peak_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, the high-water mark of its own
    address space. Not ru_maxrss: Linux keeps that across exec, so a probe
    started by a large parent (a pytest process that ran other tests) would
    report the parent's size and every operation would read as 0 growth."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    # elsewhere: Linux reports KiB (macOS bytes; these tests only run on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["create", "run", "fingerprint"])
    ap.add_argument("path")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--itr", type=int, default=2)
    ap.add_argument("--head-group", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--keep-partials", action="store_true")
    ap.add_argument("--no-check-inputs", action="store_true")
    a = ap.parse_args(argv)

    import streamcqsa  # noqa: F401
    from streamcqsa.pipeline import run
    from streamcqsa.storage import create_random, fingerprint
    from streamcqsa.storage import open as open_run

    result: dict = {"mode": a.mode}
    if a.mode == "create":
        base = peak_kib()
        t0 = time.perf_counter()
        create_random(
            a.path,
            seq_len=a.seq_len,
            heads=a.heads,
            head_dim=a.head_dim,
            dtype=a.dtype,
            is_causal=a.causal,
            chunk_tokens=a.chunk_tokens,
        )
        result["seconds"] = time.perf_counter() - t0
    elif a.mode == "fingerprint":
        store = open_run(a.path)
        result["problem"] = store.problem.to_json()
        base = peak_kib()
        t0 = time.perf_counter()
        fingerprint(store.group)
        result["seconds"] = time.perf_counter() - t0
    else:
        problem = open_run(a.path).problem
        result["problem"] = problem.to_json()
        base = peak_kib()
        t0 = time.perf_counter()
        stats = run(
            a.path,
            itr=a.itr,
            head_group=a.head_group,
            workers=a.workers,
            keep_partials=a.keep_partials,
            check_inputs=not a.no_check_inputs,
            progress=False,
        )
        result["seconds"] = time.perf_counter() - t0
        result["plan"] = stats["plan"]
        result["units_run"] = stats["units_run"]
    peak = peak_kib()
    result.update(
        baseline_kib=base,
        peak_kib=peak,
        growth_mib=(peak - base) / 1024,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
