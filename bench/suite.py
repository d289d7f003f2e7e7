"""The benchmark suite: one command, one table (markdown + JSON).

Rows, all measured in this process:

1. engine vs torch SDPA, and the store pipeline vs SDPA, same inputs (B=1, H, L, D),
   causal and not, itr 1-3, interleaved per repeat, ratios of medians, peak RSS;
   then all again beside one CPU-bound process (``bench/busy.py``), and the
   plan's kernel calls alone against SDPA, both on one thread (``bench/floor.py``);
2. block-sparse leaves vs the paper's dense masked leaves: every leaf of the
   plan run both ways with the same CPU flash kernel (the dense way with an
   explicit additive mask over the leaf's whole square), in work and in time;
3. I/O overlapping compute (``bench/overlap.py``: input reads delayed on purpose);
4. the ``streamcqsa estimate`` model: a full pipeline predicted from smaller
   calibration runs, then measured (target: within 20%);
5. GPU rows only when a CUDA device is present.

Usage: python bench/run.py [--quick]   (``make bench`` runs the full suite)
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from streamcqsa import attention
from streamcqsa.cqs import divide
from streamcqsa.cqs.divide import Node
from streamcqsa.kernels import runner
from streamcqsa.kernels.tokens import gather_runs
from streamcqsa.pipeline import run
from streamcqsa.storage import create

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overlap  # noqa: E402  (bench/ is not a package)
from busy import busy_rows  # noqa: E402
from floor import floor_rows  # noqa: E402
from results_readme import git_commit  # noqa: E402
from table import markdown, row, timed  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
ESTIMATE_TARGET = 0.20


# ---------------------------------------------------------------- 1. vs SDPA


def sdpa_rows(
    L: int,
    H: int,
    D: int,
    reps: int,
    itrs: list[int],
    pipeline_itrs: list[int],
    dtypes: list[torch.dtype],
    device: str = "cpu",
    label: str = "",
) -> list[dict]:
    """Engine and pipeline against SDPA, interleaved per repeat so that load on a
    shared machine shifts all columns of a repeat together. ``label`` is added
    to the section names."""
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="scqsa-suite-"))
    try:
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, H, L, D, generator=g).to(device, dtype) for _ in range(3))
            pipe_itrs = pipeline_itrs if dtype == torch.float32 and device == "cpu" else []
            for causal in (False, True):
                src = tmp / f"src-{name}-{causal}"
                if pipe_itrs:
                    create(src, q, k, v, is_causal=causal)
                times: dict[str, list[float]] = {}
                mem: dict[str, float] = {}

                def add(
                    key: str,
                    fn: Callable[[], Any],
                    times: dict[str, list[float]] = times,
                    mem: dict[str, float] = mem,
                ) -> None:
                    t, m = timed(fn, device)
                    times.setdefault(key, []).append(t)
                    mem[key] = max(mem.get(key, 0.0), m)

                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # warm up
                    attention(q, k, v, itr=1, is_causal=causal)
                    if pipe_itrs:  # and the pipeline: its first run maps fresh buffers
                        warm = tmp / "warm"
                        shutil.copytree(src, warm)
                        run(warm, itr=pipe_itrs[0], progress=False)
                        shutil.rmtree(warm)
                    for r in range(reps):
                        add(
                            "sdpa",
                            partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                        )
                        for itr in itrs:
                            add(f"e{itr}", partial(attention, q, k, v, itr=itr, is_causal=causal))
                        for itr in pipe_itrs:
                            dst = tmp / f"run-{r}-{itr}"
                            shutil.copytree(src, dst)
                            os.sync()  # flush the copy now, not during the timed run
                            add(f"p{itr}", partial(run, dst, itr=itr, progress=False))
                            shutil.rmtree(dst)
                shutil.rmtree(src, ignore_errors=True)
                base = statistics.median(times["sdpa"])
                kinds = (
                    ("e", "engine", itrs),
                    ("p", "pipeline", pipe_itrs),
                )
                for kind, ours, its in kinds:
                    for itr in its:
                        plan = divide(L, itr, 3, is_causal=causal)
                        t = statistics.median(times[f"{kind}{itr}"])
                        note = ""
                        if kind in "ps":
                            e = statistics.median(times[f"e{itr}"])
                            note = f"{ours} / engine = {t / e:.2f}"
                        rows.append(
                            row(
                                f"{ours} vs SDPA{label}",
                                device=device,
                                dtype=name,
                                causal=causal,
                                itr=itr,
                                L=L,
                                ours=ours,
                                baseline="SDPA",
                                ours_s=t,
                                base_s=base,
                                ratio=t / base,
                                work=plan.entries / L**2,
                                base_work=plan.useful_entries / L**2,
                                ours_mib=mem[f"{kind}{itr}"],
                                base_mib=mem["sdpa"],
                                note=note,
                            )
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- 2. dense leaves


def leaf_mask(leaf: Node) -> torch.Tensor:
    """The leaf's allowed pairs as an additive fp32 mask over its whole square
    (0 where a block computes, -inf elsewhere): the paper's dense masked leaf."""
    n = leaf.length
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for b in leaf.blocks.blocks:  # type: ignore[union-attr]
        if b.causal:
            m = b.q_stop - b.q_start
            allowed[b.q_start : b.q_stop, b.k_start : b.k_stop] |= torch.ones(
                m, m, dtype=torch.bool
            ).tril()
        else:
            allowed[b.q_start : b.q_stop, b.k_start : b.k_stop] = True
    return torch.zeros(n, n).masked_fill_(~allowed, float("-inf"))


def dense_leaf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Any:
    """One dense masked leaf with the same CPU flash kernel the blocks use."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=q.shape[-1] ** -0.5
    )


def dense_rows(L: int, H: int, D: int, reps: int, itrs: list[int]) -> list[dict]:
    """Every leaf of the plan run block-sparse (``runner.forward``) and dense
    (its whole square, explicit mask). Gathers and masks are built outside the
    timed region; the outputs of rows with any allowed key must agree."""
    rows = []
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    for causal in (False, True):
        for itr in itrs:
            plan = divide(L, itr, 3, is_causal=causal)
            sparse_t = [0.0] * reps
            dense_t = [0.0] * reps
            worst = 0.0
            for leaf in plan.tasks:
                ql, kl, vl = (gather_runs(x, leaf.runs).contiguous() for x in (q, k, v))
                mask = leaf_mask(leaf)
                live = torch.isfinite(mask).any(dim=1)
                for r in range(reps):
                    t = time.perf_counter()
                    o_s, _ = runner.forward(ql, kl, vl, leaf.blocks, backend="torch")  # type: ignore[arg-type]
                    sparse_t[r] += time.perf_counter() - t
                    t = time.perf_counter()
                    o_d = dense_leaf(ql, kl, vl, mask)[0]
                    dense_t[r] += time.perf_counter() - t
                worst = max(worst, float((o_s - o_d)[:, :, live].abs().max()))
            s, d = statistics.median(sparse_t), statistics.median(dense_t)
            rows.append(
                row(
                    "block-sparse vs dense leaves",
                    causal=causal,
                    itr=itr,
                    L=L,
                    ours="block-sparse leaves",
                    baseline="dense masked leaves",
                    ours_s=s,
                    base_s=d,
                    ratio=s / d,
                    work=plan.entries / L**2,
                    base_work=plan.dense_entries / L**2,
                    note=f"{len(plan.tasks)} leaves; outputs agree to {worst:.1e}",
                )
            )
    return rows


# ---------------------------------------------------------------- 3. overlap


def overlap_rows(L: int, delay: float, itr: int) -> list[dict]:
    """``bench/overlap.py``'s three runs, with the pipeline's own unit choice and,
    if it offers one, with every leaf its own unit (the most I/O to hide)."""
    variants: list[tuple[str, dict]] = [("units: pipeline default", {})]
    if "overlap_io" in inspect.signature(run).parameters:  # slow storage: read ahead
        variants = [("units: pipeline default, overlap_io=True", {"overlap_io": True})]
    if "unit_depth" in inspect.signature(run).parameters:
        variants.append(("units: every leaf", {"unit_depth": None}))
    rows = []
    for label, kw in variants:
        res = overlap.measure(seq_len=L, heads=4, delay=delay, workers=3, itr=itr, **kw)
        rows.append(
            row(
                "I/O overlap",
                causal=True,
                itr=itr,
                L=L,
                ours="I/O + compute",
                baseline="max(I/O only, compute only)",
                ours_s=res["both_s"],
                base_s=max(res["io_s"], res["compute_s"]),
                ratio=res["both_over_max"],
                note=(
                    f"{label}; reads delayed {delay} s/chunk; I/O only {res['io_s']:.2f} s, "
                    f"compute only {res['compute_s']:.2f} s, both / sum "
                    f"{res['both_over_sum']:.2f}"
                ),
            )
        )
    return rows


# ---------------------------------------------------------------- 4. estimate


def estimate_rows(quick: bool, L: int) -> tuple[list[dict], dict]:
    """Full: the default check (L=16384, itr=2, best of 3). Quick: the same at L,
    calibrated on L/4 and L/2, once."""
    from streamcqsa.estimate import Shape, check_model

    if quick:
        res = check_model(
            Shape(L, 4, 4, 64, dtype="float32", is_causal=True),
            itr=2,
            calibration_points=((L // 4, 1), (L // 2, 1), (L // 2, 2)),
            leaf_tokens=(L // 16, L // 8, L // 4),
            repeats=1,
        )
    else:
        res = check_model(repeats=3)  # L=16384, H=4, D=64, fp32, causal, itr=2
    s = res["shape"]
    points = ", ".join(f"{L}/{i}" for L, i in res["calibration_points"])
    rows = []
    for p, r in res["passes"].items():
        ok = abs(r["rel_error"]) <= ESTIMATE_TARGET
        rows.append(
            row(
                "estimate model",
                dtype=s["dtype"],
                causal=s["is_causal"],
                itr=res["itr"],
                L=s["seq_len"],
                ours=f"predicted ({p})",
                baseline=f"measured ({p})",
                ours_s=r["predicted_s"],
                base_s=r["measured_s"],
                ratio=r["predicted_s"] / r["measured_s"],
                note=(
                    f"{p}: rel. error {r['rel_error']:+.1%} "
                    f"({'within' if ok else 'OVER'} the {ESTIMATE_TARGET:.0%} target); "
                    f"fitted on L/itr {points}, best of {res['repeats']}"
                ),
            )
        )
    return rows, res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-len", type=int, help="vs-SDPA rows (16384; quick 4096)")
    ap.add_argument("--dense-seq-len", type=int, help="dense-leaf rows (8192; quick 2048)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, help="repeats (3; quick 1)")
    ap.add_argument("--delay", type=float, help="overlap rows: s per input chunk read (0.04)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    ap.add_argument(
        "--no-busy", dest="busy", action="store_false", help="skip the busy-neighbour section"
    )
    ap.add_argument("--out", default=str(OUT), help="directory for suite[-quick].md/.json")
    a = ap.parse_args(argv)
    for name, full, quick in (
        ("seq_len", 16384, 4096),
        ("dense_seq_len", 8192, 2048),
        ("reps", 3, 1),
        ("delay", 0.04, 0.01),
    ):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    t0 = time.perf_counter()
    itrs = [1, 2, 3]
    dtypes = [torch.float32, torch.bfloat16]
    rows = sdpa_rows(a.seq_len, a.heads, a.head_dim, a.reps, itrs, itrs, dtypes)
    if a.busy:  # the same rows again beside one CPU-bound process
        rows += busy_rows(
            partial(sdpa_rows, a.seq_len, a.heads, a.head_dim, a.reps, itrs, itrs, dtypes)
        )
    rows += floor_rows(a.seq_len, a.heads, a.head_dim, a.reps, itrs, dtypes)
    cuda = torch.cuda.is_available()
    if cuda:
        rows += sdpa_rows(
            a.seq_len, a.heads, a.head_dim, a.reps, itrs, [], [torch.bfloat16], device="cuda"
        )
    rows += dense_rows(a.dense_seq_len, a.heads, a.head_dim, a.reps, itrs)
    rows += overlap_rows(a.seq_len, a.delay, 2)
    est, check = estimate_rows(a.quick, a.seq_len)
    rows += est
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {psutil.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "L": a.seq_len,
        "L_dense": a.dense_seq_len,
        "H": a.heads,
        "D": a.head_dim,
        "reps": a.reps,
        "command": "python bench/run.py --quick" if a.quick else "make bench",
        "commit": git_commit(),
        "wall_s": time.perf_counter() - t0,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_note": (
            f"GPU rows: measured on {torch.cuda.get_device_name()} (engine vs SDPA, bf16)."
            if cuda
            else "No GPU rows: no CUDA device in this run (the CPU rows are all there is)."
        ),
        "estimate_rel_error": check["rel_error"],  # forward + backward
        "estimate_check_ok": abs(check["rel_error"]) <= ESTIMATE_TARGET,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "suite-quick" if a.quick else "suite"
    (out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "estimate_check": check}, indent=2, default=str)
    )
    (out / f"{name}.md").write_text(markdown(meta, rows))
    print(f"wrote {out / (name + '.md')} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
