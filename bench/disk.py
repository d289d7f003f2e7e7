"""Peak disk of a store pass, measured while it runs, against the prediction.

Runs the forward and the backward of one store with the library's defaults
and samples the size of ``partials/`` (the accumulator, and kept partials if
asked) every ``--every`` seconds from a thread. Reports each pass's measured
peak beside the prediction the pass made before it started
(``stats["disk"]``), and as a multiple of its outputs (out + lse forward,
dq + dk + dv backward). Writes bench/results/disk.md and disk.json.

    python bench/disk.py --seq-len 1048576          # the 1M-token shape
    python bench/disk.py --seq-len 1048576 --task-bytes 268435456   # units at the leaves
    python bench/disk.py --seq-len 131072 --quick   # a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except FileNotFoundError:  # dropped while we walked
                pass
    return total


class Sampler:
    """The largest size of ``path`` seen while the with-block runs."""

    def __init__(self, path: Path, every: float) -> None:
        self.path, self.every = path, every
        self.peak = 0
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, du(self.path))
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, du(self.path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--itr", type=int, default=3)
    ap.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--quick", action="store_true", help="forward only")
    ap.add_argument(
        "--task-bytes", type=int, default=None, help="unit memory budget (default: the library's)"
    )
    ap.add_argument("--dir", default=None, help="where to put the store (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()

    from streamcqsa.kernels.device import host_unit_bytes
    from streamcqsa.pipeline import run, run_backward
    from streamcqsa.storage import create_random

    root = Path(tempfile.mkdtemp(prefix="scqsa-disk-", dir=a.dir))
    store = root / "s.zarr"
    rows = []
    try:
        create_random(
            store,
            seq_len=a.seq_len,
            heads=a.heads,
            kv_heads=a.heads,
            head_dim=a.head_dim,
            dtype=a.dtype,
            is_causal=True,
            seed=0,
        )
        inputs = du(store)
        passes = [("fwd", ("out", "lse"))] + ([] if a.quick else [("bwd", ("dq", "dk", "dv"))])
        for kind, outs in passes:
            t = time.perf_counter()
            with Sampler(store / "partials", a.every) as s:
                if kind == "fwd":
                    stats = run(store, itr=a.itr, progress=False, task_bytes=a.task_bytes)
                else:
                    g = np.random.default_rng(1)
                    shape = (1, a.heads, a.seq_len, a.head_dim)
                    dout = g.standard_normal(shape, dtype=np.float32)
                    if a.dtype == "bfloat16":
                        import torch

                        dout = torch.from_numpy(dout).bfloat16()
                    else:
                        dout = dout.astype(a.dtype)
                    stats = run_backward(store, dout, progress=False, task_bytes=a.task_bytes)
            out_bytes = sum(du(store / n) for n in outs)
            pred = stats["disk"]["accumulator_bytes"] + stats["disk"]["kept_bytes"]
            rows.append(
                {
                    "pass": kind,
                    "seq_len": a.seq_len,
                    "itr": stats["plan"]["itr"],
                    "unit_depth": stats["plan"]["unit_depth"],
                    "units": stats["units"],
                    "unit_budget_bytes": a.task_bytes,  # None: the library's default
                    "unit_budget_used": a.task_bytes or host_unit_bytes(),
                    "seconds": round(time.perf_counter() - t, 1),
                    "inputs_bytes": inputs,
                    "outputs_bytes": out_bytes,
                    "peak_partials_bytes": s.peak,
                    "predicted_partials_bytes": pred,
                    "peak_over_outputs": round(s.peak / out_bytes, 3),
                    "predicted_over_measured": round(pred / s.peak, 3) if s.peak else None,
                }
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # rows of other shapes already in the results stay (each states its shape)
    for r in rows:
        r.update(heads=a.heads, head_dim=a.head_dim, dtype=a.dtype)
    old = out / "disk.json"
    if old.exists():

        def key(r: dict) -> tuple:
            return r["pass"], r["seq_len"], r.get("unit_budget_bytes")

        same = {key(r) for r in rows}
        kept = [r for r in json.loads(old.read_text()).get("rows", []) if key(r) not in same]
        rows = sorted(
            kept + rows,
            key=lambda r: (
                r["seq_len"],
                -(r.get("unit_budget_bytes") or 1 << 62),
                r["pass"] != "fwd",
            ),
        )
    (out / "disk.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    lines = [
        "# Peak disk of a store pass",
        "",
        f"B=1, H={a.heads}, D={a.head_dim}, {a.dtype}, causal, itr {a.itr}, library defaults "
        "but for the unit budget; "
        f"`partials/` sampled every {a.every} s while the pass ran. Regenerate a row: "
        "`python bench/disk.py --seq-len L [--task-bytes N]` (`--quick`: the forward only). "
        "Unit budget: the memory a unit may take (`task_bytes`; default: the library's, "
        "1/16 of the host's memory); a smaller one cuts units deeper. Units counts the "
        "task units and the final (cast) units.",
        "",
        "| pass | L | unit budget | unit depth | units | s | outputs MiB | peak partials MiB | "
        "peak / outputs | predicted / measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = r.get("unit_budget_bytes")
        used = r.get("unit_budget_used", budget)
        budget = f"{used / 2**20:.0f} MiB" + (" (default)" if budget is None else "")
        lines.append(
            f"| {r['pass']} | {r['seq_len']} | {budget} | {r['unit_depth']} | {r['units']} "
            f"| {r['seconds']} "
            f"| {r['outputs_bytes'] / 2**20:.1f} | {r['peak_partials_bytes'] / 2**20:.1f} "
            f"| {r['peak_over_outputs']} | {r['predicted_over_measured']} |"
        )
    (out / "disk.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
