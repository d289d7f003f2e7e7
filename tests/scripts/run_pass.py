"""Subprocess entry point for tests/test_resume.py: run (or resume) one pass.

    python run_pass.py PATH fwd --itr N [--drop-partials] [--unit-depth D] [--overlap-io]
    python run_pass.py PATH bwd --dout-seed S [--drop-partials] [--unit-depth D]

Prints ``ready`` (flushed) once imports are done and just before the pass
starts, so the parent can time its kill from that moment; prints the pass's
stats as one JSON line when it finishes.

The backward passes ``dout`` (made from ``--dout-seed``) only while the store
holds no backward entry yet: run_backward records that entry only after dout
is fully written, so a kill while dout is being written makes the next launch
write it again, and any later launch resumes with the stored dout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def make_dout(problem: Any, seed: int) -> Any:
    """A fixed random dout [B,H,L,D] in the store's dtype, as a torch tensor."""
    import numpy as np
    import torch

    from streamcqsa.storage.layout import torch_dtype

    shape = (problem.batch, problem.heads, problem.seq_len, problem.head_dim)
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(x).to(torch_dtype(problem.dtype))


def _die_while_writing_dout(n: int) -> None:
    """SIGKILL ourselves as the n-th block of dout is about to be stored.

    run_backward writes dout block by block through storage.store._stored_block
    (imported at call time), so wrapping that function here simulates a kill
    landing in the middle of writing dout, deterministically. Nothing else
    calls it during a backward. (The caller checks the process did die.)
    """
    import os
    import signal

    from streamcqsa.pipeline import run as run_module
    from streamcqsa.storage import store

    original = store._stored_block
    calls = 0

    def wrapped(block, dtype):
        nonlocal calls
        calls += 1
        if calls >= n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(block, dtype)

    for module in (store, run_module):
        if hasattr(module, "_stored_block"):
            module._stored_block = wrapped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("kind", choices=["fwd", "bwd"])
    ap.add_argument("--itr", type=int, default=2)
    ap.add_argument("--dout-seed", type=int, default=0)
    ap.add_argument("--drop-partials", action="store_true")
    ap.add_argument("--unit-depth", default="auto", help="an int, 'None' (every leaf) or 'auto'")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force-dout", action="store_true", help="pass dout even when resuming")
    ap.add_argument(
        "--overlap-io", action="store_true", help="forward units read ahead / write back"
    )
    ap.add_argument(
        "--kill-self-at-dout-block",
        type=int,
        default=None,
        metavar="N",
        help="SIGKILL this process while the N-th block of dout is being written",
    )
    a = ap.parse_args(argv)

    from streamcqsa.pipeline import run, run_backward
    from streamcqsa.storage import open as open_run

    keep = not a.drop_partials
    depth = None if a.unit_depth == "None" else a.unit_depth
    if depth not in (None, "auto"):
        depth = int(depth)
    if a.kind == "fwd":
        print("ready", flush=True)
        stats = run(
            a.path,
            itr=a.itr,
            keep_partials=keep,
            workers=a.workers,
            progress=False,
            unit_depth=depth,
            overlap_io=True if a.overlap_io else None,
        )
    else:
        store = open_run(a.path)
        fresh = a.force_dout or not store.meta.get("bwd")
        dout = make_dout(store.problem, a.dout_seed) if fresh else None
        if a.kill_self_at_dout_block is not None:
            _die_while_writing_dout(a.kill_self_at_dout_block)
        print("ready", flush=True)
        stats = run_backward(
            a.path,
            dout,
            keep_partials=keep,
            workers=a.workers,
            progress=False,
            unit_depth=depth,
        )
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
