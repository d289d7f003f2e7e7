"""Run (or resume) one pass over a store at a URL, killing itself by progress.

    python run_remote.py URL ENDPOINT fwd|bwd [--kill-at-write N] [--kill-mode before|after]

Counts the object writes the pass makes (every ``FsspecStore.set``: chunks,
metadata, markers) and SIGKILLs itself at the N-th: ``before`` it is sent, or
``after`` the object is in place but before the pass sees the write return.
An object store has no torn writes (an object appears whole or not at all).
Prints ``{"writes": N, "units_run": M}`` when the pass finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("endpoint")
    ap.add_argument("kind", choices=["fwd", "bwd"])
    ap.add_argument("--kill-at-write", type=int, default=None)
    ap.add_argument("--kill-mode", choices=["before", "after"], default="before")
    ap.add_argument("--dout-seed", type=int, default=None)
    a = ap.parse_args()

    import numpy as np
    import zarr

    from streamcqsa.pipeline import run, run_backward

    count = [0]
    guard = threading.Lock()
    orig = zarr.storage.FsspecStore.set

    async def counted(self, key, value):  # noqa: ANN001, ANN202
        with guard:
            count[0] += 1
            n = count[0]
        if n == a.kill_at_write and a.kill_mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        await orig(self, key, value)
        if n == a.kill_at_write:
            os.kill(os.getpid(), signal.SIGKILL)

    zarr.storage.FsspecStore.set = counted
    so = {"key": "testing", "secret": "testing", "endpoint_url": a.endpoint}
    if a.kind == "fwd":
        stats = run(a.url, itr=2, unit_depth=1, progress=False, storage_options=so)
    else:
        dout = None
        if a.dout_seed is not None:
            from streamcqsa.storage import open as open_run

            p = open_run(a.url, storage_options=so).problem
            shape = (p.batch, p.heads, p.seq_len, p.head_dim)
            dout = np.random.default_rng(a.dout_seed).standard_normal(shape).astype(p.dtype)
        stats = run_backward(a.url, dout, unit_depth=1, progress=False, storage_options=so)
    print(json.dumps({"writes": count[0], "units_run": stats["units_run"]}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
