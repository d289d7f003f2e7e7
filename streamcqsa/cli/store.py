"""Commands over a run store: init, run, backward, status, verify, repair, demo."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamcqsa.cli.options import OVERLAP_IO, _device_args, _human


def cmd_init(a: argparse.Namespace) -> int:
    from streamcqsa.storage import create, create_random

    if a.from_npy:
        kinds = {str(np.load(f, mmap_mode="r").dtype) for f in a.from_npy}
        if a.dtype is None and len(kinds) > 1:
            raise TypeError(f"the .npy files differ in dtype ({sorted(kinds)}); pass --dtype")
        q, k, v = (_load_npy(f, a.dtype) for f in a.from_npy)
        create(
            a.path,
            q,
            k,
            v,
            is_causal=a.causal,
            scale=a.scale,
            overwrite=a.overwrite,
            chunk_tokens=a.chunk_tokens,
            allow_nonfinite=a.allow_nonfinite,
        )
    else:
        if a.allow_nonfinite:
            raise ValueError("--allow-nonfinite is for --from-npy (random inputs are finite)")
        create_random(
            a.path,
            seq_len=a.seq_len,
            heads=a.heads,
            head_dim=a.head_dim,
            kv_heads=a.kv_heads,
            batch=a.batch,
            dtype=a.dtype or "float16",
            is_causal=a.causal,
            scale=a.scale,
            seed=a.seed,
            std=a.std,
            overwrite=a.overwrite,
            chunk_tokens=a.chunk_tokens,
        )
    print(f"created run store {a.path}")
    return 0


class _AsDtype:
    """A .npy array read as a store dtype, one slice at a time (numpy has no
    bfloat16, so a uint16 file holds bfloat16 bit patterns); the store asks
    for one chunk row at a time, so nothing larger is ever converted."""

    def __init__(self, arr: np.ndarray, dtype: str) -> None:
        from streamcqsa.storage.layout import torch_dtype

        self.arr, self.shape, self.dtype = arr, arr.shape, torch_dtype(dtype)

    def __getitem__(self, idx: Any) -> Any:
        import torch

        block = torch.from_numpy(np.array(self.arr[idx]))  # a writable copy of the slice
        return block.view(torch.bfloat16) if block.dtype == torch.uint16 else block.to(self.dtype)


def _load_npy(path: str, dtype: str | None) -> Any:
    """A .npy file, memory-mapped, as ``dtype`` (None: its own).

    Floating-point files are converted to ``dtype``; a uint16 file is read as
    bfloat16 bit patterns and only as bfloat16.
    """
    arr = np.load(path, mmap_mode="r")
    if arr.dtype == np.uint16:
        if dtype not in (None, "bfloat16"):
            raise TypeError(f"{path} is uint16 (bfloat16 bit patterns), not {dtype}")
        return _AsDtype(arr, "bfloat16")
    if arr.dtype.kind != "f":
        raise TypeError(f"{path} has dtype {arr.dtype}; expected floating point (or uint16 bf16)")
    return arr if dtype in (None, arr.dtype.name) else _AsDtype(arr, dtype)


def cmd_run(a: argparse.Namespace) -> int:
    from streamcqsa.pipeline import run

    stats = run(
        a.path,
        itr=a.itr,
        quorum=a.quorum,
        backend=a.backend,
        workers=a.workers,
        scheduler=a.scheduler,
        progress=not a.no_progress,
        restart=a.restart,
        unit_depth=a.unit_depth,
        head_group=a.head_group,
        overlap_io=OVERLAP_IO[a.overlap_io],
        **_device_args(a),
    )
    _print_stats(stats)
    return 0


def cmd_backward(a: argparse.Namespace) -> int:
    from streamcqsa.pipeline import run_backward
    from streamcqsa.storage.inspect import open as open_run

    dout = None
    if a.dout:
        dout = _load_npy(a.dout, open_run(a.path).problem.dtype)
    elif a.random_dout is not None:
        p = open_run(a.path).problem
        rng = np.random.default_rng(a.random_dout)
        dout = rng.standard_normal((p.batch, p.heads, p.seq_len, p.head_dim), dtype=np.float32)
        if p.dtype in ("float16", "float64"):
            dout = dout.astype(p.dtype)
        elif p.dtype == "bfloat16":
            import torch

            dout = torch.from_numpy(dout).bfloat16()
    stats = run_backward(
        a.path,
        dout,
        backend=a.backend,
        workers=a.workers,
        progress=not a.no_progress,
        restart=a.restart,
        unit_depth=a.unit_depth,
        overlap_io=OVERLAP_IO[a.overlap_io],
        **_device_args(a),
    )
    _print_stats(stats)
    return 0


_DOUT = {"new": "; dout written", "same": "; same dout as stored", "stored": ""}


def _print_stats(stats: dict) -> None:
    print(
        f"{stats['pass']}: done, {stats['units']}/{stats['units']} units ({stats['units_run']} "
        f"run now, {stats['units_skipped']} done before), {stats['seconds']:.2f} s; peak "
        f"disk for partials {_human(stats['partial_disk_bytes'])}"
        f"{' (kept)' if stats['keep_partials'] else ' (dropped when done)'}"
        f"{' (earlier work of this pass discarded)' if stats.get('restarted') else ''}"
        f"{_DOUT.get(stats.get('dout') or 'stored', '')}"
    )


def cmd_status(a: argparse.Namespace) -> int:
    from streamcqsa.storage.inspect import open as open_run

    s = open_run(a.path).status()
    if a.json:
        print(json.dumps(s, indent=2))
        return 0
    for k, v in s.items():
        if isinstance(v, dict):  # a pass: counted in the units `run` reports
            owner = v.get("owner") or {}
            by = f" (pid {owner['pid']} on {owner['host']})" if owner.get("pid") else ""
            v = f"{v['status']}{by}, {v['units_done']}/{v['units']} units done"
            v += f"; {s[k]['hint']}" if s[k].get("hint") else ""
        print(f"{k:>10}: {v}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from streamcqsa.pipeline import verify

    res = verify(a.path, rows=a.rows, seed=a.seed)
    print(
        f"verified {res['rows']} rows x {res['heads']} heads against float64: "
        f"max rel error {res['max_rel_error']:.3e} (tolerance {res['tolerance']:.1e}), "
        f"max lse error {res['max_lse_error']:.3e} (tolerance {res['lse_tolerance']:.1e}) "
        f"-> {'OK' if res['ok'] else 'FAILED'}"
    )
    for reason in res.get("reasons", ()) if not res["ok"] else ():
        print(f"  {reason}")
    return 0 if res["ok"] else 1


def cmd_repair(a: argparse.Namespace) -> int:
    from streamcqsa.pipeline import repair

    rep = repair(a.path)
    for kind in ("fwd", "bwd"):
        missing = {(name, tuple(c)) for name, c in rep.get(f"{kind}_missing", ())}
        for name, chunk in rep[kind]:
            what = "missing" if (name, tuple(chunk)) in missing else "corrupt"
            print(f"{kind}: {what} chunk {tuple(chunk)} of '{name}'")
        if rep.get(f"{kind}_units_reset"):
            print(f"{kind}: {rep[f'{kind}_units_reset']} units reset; run again to recompute them")
    if not rep["fwd"] and not rep["bwd"]:
        print("all chunks are present and pass their checksums")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Store pipeline end to end on a small default problem, then verify it."""
    from streamcqsa.cqs.divide import divide
    from streamcqsa.pipeline import run, verify
    from streamcqsa.storage import create_random

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.dir or tmp) / "demo.zarr"
        t0 = time.perf_counter()
        create_random(
            path,
            seq_len=a.seq_len,
            heads=a.heads,
            head_dim=a.head_dim,
            kv_heads=a.kv_heads,
            batch=a.batch,
            dtype=a.dtype,
            is_causal=a.causal,
            seed=a.seed,
            overwrite=True,
        )
        print(
            f"store: {path} (B={a.batch} H={a.heads} Hkv={a.kv_heads} L={a.seq_len} "
            f"D={a.head_dim} {a.dtype}, causal={a.causal})"
        )
        stats = run(path, itr=a.itr, progress=not a.no_progress)
        _print_stats(stats)
        plan = divide(a.seq_len, a.itr, 3, is_causal=a.causal)
        res = verify(path, rows=a.rows)
        print(
            f"plan: itr={a.itr}, {len(plan.tasks)} leaf tasks; computed/useful score "
            f"entries = {plan.entries / plan.useful_entries:.4f} (dense leaves would be "
            f"{plan.dense_entries / plan.useful_entries:.3f})"
        )
        print(
            f"verify: {res['rows']} rows x {res['heads']} heads, max rel error "
            f"{res['max_rel_error']:.2e} (tolerance {res['tolerance']:.0e}) -> "
            f"{'OK' if res['ok'] else 'FAILED'}; total {time.perf_counter() - t0:.1f} s"
        )
        return 0 if res["ok"] else 1
