"""``streamcqsa`` command line: init, run, backward, status, verify, plan, repair, demo.

Errors the library raises on purpose are printed as one line naming the
command-line flags (not the Python keywords) that change the outcome, with
exit status 2 for bad input or a store in the wrong state and 1 for a run
that failed (I/O, device); Ctrl-C exits 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamcqsa import __version__
from streamcqsa.errors import StreamCQSAError


def _quorum(text: str) -> int | list[int]:
    parts = [int(x) for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("quorum needs at least one int")
    return parts[0] if len(parts) == 1 else parts


def _itr(text: str) -> int | str:
    return "auto" if text == "auto" else _count(text, 0)


def _count(text: str, minimum: int = 1) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
    return v


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _unit_depth(text: str) -> int | str | None:
    if text in ("auto", "leaves"):
        return "auto" if text == "auto" else None
    return _count(text, 0)


def _add_unit_depth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unit-depth",
        type=_unit_depth,
        default="auto",
        help="resumable units: 'auto' (shallowest that fits host memory), 'leaves' "
        "(store every leaf partial), or a depth",
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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
        keep_partials=not a.drop_partials,
        progress=not a.no_progress,
        restart=a.restart,
        unit_depth=a.unit_depth,
        overlap_io={"auto": None, "on": True, "off": False}[a.overlap_io],
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
        keep_partials=not a.drop_partials,
        progress=not a.no_progress,
        restart=a.restart,
        unit_depth=a.unit_depth,
    )
    _print_stats(stats)
    return 0


_DOUT = {"new": "; dout written", "same": "; same dout as stored", "stored": ""}


def _print_stats(stats: dict) -> None:
    print(
        f"{stats['pass']}: done, {stats['units']}/{stats['units']} units ({stats['units_run']} "
        f"run now, {stats['units_skipped']} done before), {stats['seconds']:.2f} s; partials "
        f"need {_human(stats['partial_disk_bytes'])}"
        f"{' (deleted as parents finish)' if not stats['keep_partials'] else ''}"
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


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(t[-1:], 1)
    try:
        n = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 80GiB, got {text!r}") from None
    if not math.isfinite(n) or n < 1:
        raise argparse.ArgumentTypeError(f"must be a size >= 1 byte, got {text!r}")
    return int(n)


def cmd_plan(a: argparse.Namespace) -> int:
    from streamcqsa.cqs.budget import Budget, choose

    est = choose(
        seq_len=a.seq_len,
        heads=a.heads,
        kv_heads=a.kv_heads or a.heads,
        head_dim=a.head_dim,
        batch=a.batch,
        dtype=a.dtype,
        is_causal=a.causal,
        budget=Budget(a.device_memory, a.host_memory, a.devices),
        quorum=a.quorum,
        throughput=a.throughput,
        chunk_tokens=a.chunk_tokens,
    )
    if a.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    print(
        f"plan: itr={est.itr} quorum={est.quorum} head_group={est.head_group} "
        f"n_cap={est.n_cap}; {est.tasks} leaf tasks of <= {est.leaf_tokens} tokens"
    )
    print(
        f"device memory: {_human(est.device_bytes_per_task)} per task (forward "
        f"{_human(est.fwd_device_bytes_per_task)}, backward "
        f"{_human(est.bwd_device_bytes_per_task)}), "
        f"{_human(est.device_bytes)} resident"
    )
    print(f"host memory:   {_human(est.host_bytes)}")
    print(f"disk:          {_human(est.disk_bytes)} (inputs, outputs, all partials kept)")
    print(f"I/O:           {_human(est.read_bytes)} read, {_human(est.write_bytes)} written")
    print(
        f"time:          {est.seconds:.3g} s at {a.throughput:.3g} score entries/s "
        f"per device ({est.entries:.3g} entries)"
    )
    return 0


def cmd_estimate(a: argparse.Namespace) -> int:
    """The paper's scaled evaluation: time sample tasks here, extrapolate the full plan."""
    from streamcqsa import estimate as est

    def log(msg: str) -> None:
        if not a.quiet:
            print(f"[estimate] {msg}", file=sys.stderr, flush=True)

    shape = est.Shape(
        seq_len=a.seq_len,
        heads=a.heads,
        kv_heads=a.kv_heads or a.heads,
        head_dim=a.head_dim,
        batch=a.batch,
        dtype=a.dtype,
        is_causal=a.causal,
    )
    rep = est.estimate(
        shape,
        device_memory=a.device_memory,
        host_memory=a.host_memory,
        itr=a.itr,
        quorum=a.quorum,
        device=None if a.device == "auto" else a.device,
        quick=a.quick,
        pipeline=not a.no_pipeline_fit,
        log=log,
    )
    check = None
    if a.check:
        check = est.check_model(repeats=1 if a.quick else 3, log=log)
    if a.json:
        print(json.dumps({"estimate": rep, "check": check} if check else rep, indent=2))
        return 0
    print(est.format_report(rep))
    if check:
        print()
        print(est.format_check(check))
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
            dtype=a.dtype,
            is_causal=a.causal,
            seed=a.seed,
            overwrite=True,
        )
        print(
            f"store: {path} (B=1 H={a.heads} Hkv={a.kv_heads} L={a.seq_len} "
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamcqsa",
        description="Exact long-context attention over Zarr run stores (Stream-CQSA).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create a run store (random data or .npy files)")
    s.add_argument("path")
    s.add_argument("--from-npy", nargs=3, metavar=("Q", "K", "V"), help="q, k, v .npy files")
    s.add_argument("--seq-len", type=_count, default=4096)
    s.add_argument("--heads", type=_count, default=8)
    s.add_argument("--kv-heads", type=_count, default=None)
    s.add_argument("--head-dim", type=_count, default=64)
    s.add_argument("--batch", type=_count, default=1)
    s.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="store dtype (default: float16, or that of the .npy files, which are "
        "converted to it; a uint16 file holds bfloat16 bit patterns)",
    )
    s.add_argument("--causal", action="store_true")
    s.add_argument("--scale", type=_positive, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--std", type=_positive, default=1.0, help="std of the random inputs")
    s.add_argument("--chunk-tokens", type=_count, default=None)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument(
        "--allow-nonfinite", action="store_true", help="keep NaN/Inf in --from-npy inputs"
    )
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("run", help="run (or resume) the forward pass")
    s.add_argument("path")
    s.add_argument("--itr", type=_itr, default=3, help="depth, or 'auto' (from budgets)")
    s.add_argument("--quorum", type=_quorum, default=3, help="k, or k1,k2,... per level")
    s.add_argument("--backend", default="auto")
    s.add_argument("--workers", type=_count, default=2)
    s.add_argument("--scheduler", default=None, help="threads, sync, or a scheduler address")
    s.add_argument("--drop-partials", action="store_true", help="delete partials when merged")
    s.add_argument("--restart", action="store_true", help="discard unfinished work of another plan")
    _add_unit_depth(s)
    s.add_argument(
        "--overlap-io",
        choices=("auto", "on", "off"),
        default="auto",
        help="units read ahead and write back on threads of their own: 'auto' on a GPU "
        "or with a spare core, 'on' for slow storage",
    )
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("backward", help="run (or resume) the backward pass")
    s.add_argument("path")
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--dout",
        help=".npy file with dout [B,H,L,D], converted to the store's dtype (for bfloat16: "
        "float32, or uint16 bit patterns)",
    )
    g.add_argument("--random-dout", type=int, metavar="SEED", help="use a random dout")
    s.add_argument("--backend", default="auto")
    s.add_argument("--workers", type=_count, default=2)
    s.add_argument("--drop-partials", action="store_true")
    s.add_argument(
        "--restart", action="store_true", help="discard unfinished work of another unit depth"
    )
    _add_unit_depth(s)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_backward)

    s = sub.add_parser("status", help="show the store's problem and progress")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    from streamcqsa.pipeline.verify import TOLERANCE_RULE

    s = sub.add_parser(
        "verify",
        help="check sampled output rows against float64",
        description="Check sampled rows of out and lse against float64 attention. "
        + TOLERANCE_RULE,
    )
    s.add_argument("path")
    s.add_argument("--rows", type=_count, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("plan", help="choose itr, head group and n_cap from memory budgets")
    s.add_argument("--seq-len", type=_count, required=True)
    s.add_argument("--heads", type=_count, default=8)
    s.add_argument("--kv-heads", type=_count, default=None)
    s.add_argument("--head-dim", type=_count, default=64)
    s.add_argument("--batch", type=_count, default=1)
    s.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true")
    s.add_argument("--device-memory", type=_bytes, default="80GiB")
    s.add_argument("--host-memory", type=_bytes, default="64GiB")
    s.add_argument("--devices", type=_count, default=1)
    s.add_argument("--quorum", type=int, default=3)
    s.add_argument(
        "--throughput",
        type=_positive,
        default=1e9,
        help="score entries per second per device (calibrate with the bench)",
    )
    s.add_argument("--chunk-tokens", type=_count, default=65536)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser(
        "estimate",
        help="time sample tasks here and extrapolate a full run (the paper's scaled evaluation)",
    )
    s.add_argument("--seq-len", type=_count, required=True)
    s.add_argument("--heads", type=_count, default=8)
    s.add_argument("--kv-heads", type=_count, default=None)
    s.add_argument("--head-dim", type=_count, default=64)
    s.add_argument("--batch", type=_count, default=1)
    s.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true")
    s.add_argument("--itr", type=_itr, default="auto", help="depth, or 'auto' (from budgets)")
    s.add_argument("--quorum", type=int, default=3)
    s.add_argument("--device-memory", type=_bytes, default="80GiB")
    s.add_argument("--host-memory", type=_bytes, default="64GiB")
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    s.add_argument("--quick", action="store_true", help="fewer, smaller samples (seconds)")
    s.add_argument(
        "--no-pipeline-fit",
        action="store_true",
        help="skip the small end-to-end pipeline runs (wall = kernel + fold + I/O)",
    )
    s.add_argument(
        "--check",
        action="store_true",
        help="also check the model: predict, then run, a full pipeline at L=16384",
    )
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser("repair", help="find corrupt chunks; reset the units that made them")
    s.add_argument("path")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("demo", help="run the store pipeline on a small default and verify")
    s.add_argument("--seq-len", type=_count, default=8192)
    s.add_argument("--heads", type=_count, default=4)
    s.add_argument("--kv-heads", type=_count, default=2)
    s.add_argument("--head-dim", type=_count, default=64)
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true", default=True)
    s.add_argument("--itr", type=lambda t: _count(t, 0), default=2)
    s.add_argument("--rows", type=_count, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dir", default=None, help="keep the store here instead of a temp dir")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


# the library's messages name its Python keywords; here they become the flags
_FLAGS = (
    (r"\brestart=True\b", "--restart"),
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\ballow_nonfinite=True\b", "--allow-nonfinite"),
    (r"\bkeep_partials=False\b", "--drop-partials"),
    (r"\bunit_depth=None\b", "--unit-depth leaves"),
    (r"\bunit_depth=(\d+)", r"--unit-depth \1"),
    (r"\bpass dout=\.\.\.", "pass --dout FILE or --random-dout SEED"),
    (r"\bcall run\(\) first", "run `streamcqsa run` first"),
)


def cli_message(message: str) -> str:
    """A library message with each keyword argument it names as its CLI flag."""
    for pattern, flag in _FLAGS:
        message = re.sub(pattern, flag, message)
    return message


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        resume = "; rerun to resume" if args.command in ("run", "backward") else ""
        print(f"\nstreamcqsa {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except (StreamCQSAError, ValueError, TypeError, OSError) as e:
        print(f"streamcqsa {args.command}: error: {cli_message(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, TypeError)) else 1


if __name__ == "__main__":
    sys.exit(main())
