"""``streamcqsa`` command line: init, run, backward, status, verify, plan, repair, demo."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _quorum(text: str) -> int | list[int]:
    parts = [int(x) for x in text.split(",") if x.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("quorum needs at least one int")
    return parts[0] if len(parts) == 1 else parts


def _itr(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def _unit_depth(text: str) -> int | str | None:
    if text in ("auto", "leaves"):
        return "auto" if text == "auto" else None
    return int(text)


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
        q, k, v = (np.load(f, mmap_mode="r") for f in a.from_npy)
        create(
            a.path,
            q,
            k,
            v,
            is_causal=a.causal,
            scale=a.scale,
            overwrite=a.overwrite,
            chunk_tokens=a.chunk_tokens,
        )
    else:
        create_random(
            a.path,
            seq_len=a.seq_len,
            heads=a.heads,
            head_dim=a.head_dim,
            kv_heads=a.kv_heads,
            batch=a.batch,
            dtype=a.dtype,
            is_causal=a.causal,
            scale=a.scale,
            seed=a.seed,
            std=a.std,
            overwrite=a.overwrite,
            chunk_tokens=a.chunk_tokens,
        )
    print(f"created run store {a.path}")
    return 0


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

    dout = None
    if a.dout:
        dout = np.load(a.dout, mmap_mode="r")
    elif a.random_dout is not None:
        from streamcqsa.storage.inspect import open as open_run

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
        unit_depth=a.unit_depth,
    )
    _print_stats(stats)
    return 0


def _print_stats(stats: dict) -> None:
    print(
        f"{stats['pass']}: {stats['units_run']} units run, {stats['units_skipped']} already "
        f"done, {stats['seconds']:.2f} s; partials need {_human(stats['partial_disk_bytes'])}"
        f"{' (deleted as parents finish)' if not stats['keep_partials'] else ''}"
    )


def cmd_status(a: argparse.Namespace) -> int:
    from streamcqsa.storage.inspect import open as open_run

    s = open_run(a.path).status()
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        for k, v in s.items():
            print(f"{k:>10}: {v}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from streamcqsa.pipeline import verify

    res = verify(a.path, rows=a.rows, seed=a.seed)
    print(
        f"verified {res['rows']} rows x {res['heads']} heads against float64: "
        f"max rel error {res['max_rel_error']:.3e} (tolerance {res['tolerance']:.1e}), "
        f"max lse error {res['max_lse_error']:.3e} -> {'OK' if res['ok'] else 'FAILED'}"
    )
    return 0 if res["ok"] else 1


def cmd_repair(a: argparse.Namespace) -> int:
    from streamcqsa.pipeline import repair

    rep = repair(a.path)
    for kind in ("fwd", "bwd"):
        for name, chunk in rep[kind]:
            print(f"{kind}: corrupt chunk {chunk} of '{name}'")
        if rep.get(f"{kind}_units_reset"):
            print(f"{kind}: {rep[f'{kind}_units_reset']} units reset; run again to recompute them")
    if not rep["fwd"] and not rep["bwd"]:
        print("all chunks pass their checksums")
    return 0


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(float(t))


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
        budget=Budget(_bytes(a.device_memory), _bytes(a.host_memory), a.devices),
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
        f"device memory: {_human(est.device_bytes_per_task)} per task, "
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
        device_memory=_bytes(a.device_memory),
        host_memory=_bytes(a.host_memory),
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
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create a run store (random data or .npy files)")
    s.add_argument("path")
    s.add_argument("--from-npy", nargs=3, metavar=("Q", "K", "V"), help="q, k, v .npy files")
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=None)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true")
    s.add_argument("--scale", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--std", type=float, default=1.0, help="std of the random inputs")
    s.add_argument("--chunk-tokens", type=int, default=None)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("run", help="run (or resume) the forward pass")
    s.add_argument("path")
    s.add_argument("--itr", type=_itr, default=3, help="depth, or 'auto' (from budgets)")
    s.add_argument("--quorum", type=_quorum, default=3, help="k, or k1,k2,... per level")
    s.add_argument("--backend", default="auto")
    s.add_argument("--workers", type=int, default=2)
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
    g.add_argument("--dout", help=".npy file with dout [B,H,L,D]")
    g.add_argument("--random-dout", type=int, metavar="SEED", help="use a random dout")
    s.add_argument("--backend", default="auto")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--drop-partials", action="store_true")
    _add_unit_depth(s)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_backward)

    s = sub.add_parser("status", help="show the store's problem and progress")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("verify", help="check sampled output rows against float64")
    s.add_argument("path")
    s.add_argument("--rows", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("plan", help="choose itr, head group and n_cap from memory budgets")
    s.add_argument("--seq-len", type=int, required=True)
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=None)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true")
    s.add_argument("--device-memory", default="80GiB")
    s.add_argument("--host-memory", default="64GiB")
    s.add_argument("--devices", type=int, default=1)
    s.add_argument("--quorum", type=int, default=3)
    s.add_argument(
        "--throughput",
        type=float,
        default=1e9,
        help="score entries per second per device (calibrate with the bench)",
    )
    s.add_argument("--chunk-tokens", type=int, default=65536)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser(
        "estimate",
        help="time sample tasks here and extrapolate a full run (the paper's scaled evaluation)",
    )
    s.add_argument("--seq-len", type=int, required=True)
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=None)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true")
    s.add_argument("--itr", type=_itr, default="auto", help="depth, or 'auto' (from budgets)")
    s.add_argument("--quorum", type=int, default=3)
    s.add_argument("--device-memory", default="80GiB")
    s.add_argument("--host-memory", default="64GiB")
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
    s.add_argument("--seq-len", type=int, default=8192)
    s.add_argument("--heads", type=int, default=4)
    s.add_argument("--kv-heads", type=int, default=2)
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--causal", action="store_true", default=True)
    s.add_argument("--itr", type=int, default=2)
    s.add_argument("--rows", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dir", default=None, help="keep the store here instead of a temp dir")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"streamcqsa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
