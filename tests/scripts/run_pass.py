"""Run (or resume) one pass in a process of its own, killing itself by progress.

    python run_pass.py serve
    python run_pass.py PATH fwd --itr N [--drop-partials] [--unit-depth D] [--overlap-io]
    python run_pass.py PATH bwd --dout-seed S [--drop-partials] [--unit-depth D]

``serve`` imports the package once and then forks one child per request
(a JSON argument list on a line of stdin), answering each with the child's
exit status (``{"rc": N}``, negative for a signal). A fresh interpreter per
launch would spend most of a kill test importing torch; a forked child is
just as separate a process for a SIGKILL. The serving process itself starts
no threads, so forking it is safe.

Every launch counts the store writes it makes: one per file written through
zarr's LocalStore (metadata, markers, zarr-encoded chunks) or through
``storage.chunkio`` (the chunks of the store's own arrays). Counting happens
below the pipeline, so it does not depend on how a pass is split into units.
With ``--kill-at-write N`` the launch SIGKILLs itself at its N-th write:

- ``before``: the write has not started;
- ``after``: the file is in place, the pass has not seen the write return;
- ``torn``: half the file's bytes lie in its ``*.partial`` temp file, as a
  kill between a writer's temp write and its rename leaves them.

The stats of a finished launch, with ``writes`` added, go to ``--result`` as
one JSON object (to stdout without it).

The backward passes ``dout`` (made from ``--dout-seed``) only while the store
holds no backward entry yet (or with ``--force-dout``): a launch that resumes
uses the stored one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any

KILL_MODES = ("before", "after", "torn")


def make_dout(problem: Any, seed: int) -> Any:
    """A fixed random dout [B,H,L,D] in the store's dtype, as a torch tensor."""
    import numpy as np
    import torch

    from streamcqsa.storage.layout import torch_dtype

    shape = (problem.batch, problem.heads, problem.seq_len, problem.head_dim)
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(x).to(torch_dtype(problem.dtype))


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _torn(path: Path, data: bytes) -> None:
    """Leave what a writer killed between its temp write and its rename leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[: len(data) // 2])
    _die()


class WriteHook:
    """Counts store writes; at the ``kill_at``-th one, kills this process."""

    def __init__(self, kill_at: int | None = None, mode: str = "before") -> None:
        self.kill_at, self.mode = kill_at, mode
        self.count = 0
        self._lock = threading.Lock()

    def _wrap(self, write: Any, payload: Any) -> Any:
        def wrapped(path: Path, data: Any, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.count += 1
                hit = self.count == self.kill_at
            if hit and self.mode == "before":
                _die()
            if hit and self.mode == "torn":
                _torn(Path(path), payload(data))
            result = write(path, data, *args, **kwargs)
            if hit:
                _die()
            return result

        return wrapped

    def install(self) -> WriteHook:
        import zarr.storage._local as zarr_local

        from streamcqsa.storage import chunkio

        def zarr_bytes(value: Any) -> bytes:
            return bytes(value.as_buffer_like())

        def chunk_bytes(pieces: Any) -> bytes:
            return b"".join(p.tobytes() for p in pieces)

        zarr_local._put = self._wrap(zarr_local._put, zarr_bytes)
        chunkio._write_file = self._wrap(chunkio._write_file, chunk_bytes)
        return self


def _die_while_writing_dout(n: int) -> None:
    """SIGKILL this process as the n-th block of dout is about to be stored.

    run_backward stores dout block by block through storage.store._stored_block
    (looked up at call time), so wrapping it lands the kill in the middle of
    writing dout. Nothing else calls it during a backward.
    """
    from streamcqsa.storage import store

    original = store._stored_block
    calls = 0

    def wrapped(block: Any, dtype: str) -> Any:
        nonlocal calls
        calls += 1
        if calls >= n:
            _die()
        return original(block, dtype)

    store._stored_block = wrapped


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("kind", choices=["fwd", "bwd"])
    ap.add_argument("--itr", type=int, default=2)
    ap.add_argument("--dout-seed", type=int, default=0)
    ap.add_argument("--drop-partials", action="store_true")
    ap.add_argument("--unit-depth", default="auto", help="an int, 'None' (every leaf) or 'auto'")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force-dout", action="store_true", help="pass dout even when resuming")
    ap.add_argument("--overlap-io", action="store_true", help="forward read-ahead / write-back")
    ap.add_argument("--kill-at-write", type=int, default=None, metavar="N")
    ap.add_argument("--kill-mode", choices=KILL_MODES, default="before")
    ap.add_argument("--kill-self-at-dout-block", type=int, default=None, metavar="N")
    ap.add_argument("--result", default=None, help="file for the stats JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    from streamcqsa.pipeline import run, run_backward
    from streamcqsa.storage import open as open_run

    keep = not a.drop_partials
    depth: Any = None if a.unit_depth == "None" else a.unit_depth
    if depth not in (None, "auto"):
        depth = int(depth)
    common = dict(keep_partials=keep, workers=a.workers, progress=False, unit_depth=depth)
    if a.kind == "fwd":
        hook = WriteHook(a.kill_at_write, a.kill_mode).install()
        stats = run(a.path, itr=a.itr, overlap_io=True if a.overlap_io else None, **common)
    else:
        store = open_run(a.path)
        fresh = a.force_dout or not store.meta.get("bwd")
        dout = make_dout(store.problem, a.dout_seed) if fresh else None
        if a.kill_self_at_dout_block is not None:
            _die_while_writing_dout(a.kill_self_at_dout_block)
        hook = WriteHook(a.kill_at_write, a.kill_mode).install()
        stats = run_backward(a.path, dout, **common)
    text = json.dumps({**stats, "writes": hook.count}, default=str)
    if a.result:
        Path(a.result).write_text(text)
    else:
        print(text, flush=True)
    return 0


def serve() -> int:
    """Fork a child per request line; answer with its exit status."""
    import zarr.storage._local  # noqa: F401

    import streamcqsa.pipeline  # noqa: F401 - the imports every child shares
    import streamcqsa.storage  # noqa: F401

    print("ready", flush=True)
    while line := sys.stdin.readline():
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: stdout is the reply channel, keep it clean
            os.dup2(2, 1)
            code = 1
            try:
                code = main(argv)
            except BaseException:  # noqa: BLE001 - reported, then the exit code says it
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["serve"] else main())
