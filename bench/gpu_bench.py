"""GPU benchmark: torch SDPA (flash, in GPU memory) vs the engine and the pipeline.

B=1, H=8, D=64, causal, fp16 at L = 1M and 2M (override with --seq-lens).
Writes gpu.md / gpu.json into --out (default bench/results). Only run this
on a GPU; rows say which GPU they were measured on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from streamcqsa import attention
from streamcqsa.pipeline import run
from streamcqsa.storage import create


def cuda_time(fn) -> tuple[float, float]:  # noqa: ANN001
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


def predicted_gib(plan: dict, L: int, itr: int, n_cap: int) -> float:
    """The planner's device bytes for the run's units (``unit_device_bytes``),
    times the units that can be resident at once."""
    from streamcqsa.cqs import divide
    from streamcqsa.cqs.budget import unit_device_bytes

    p = divide(L, itr, plan["quorums"] or 3, is_causal=True)
    depth = plan["unit_depth"] if plan["unit_depth"] is not None else itr
    units = [n for n in p.nodes if n.depth == depth and not n.is_leaf]
    if not units:
        return float("nan")
    hg = plan["head_group"]
    one = max(
        unit_device_bytes(p, n, group_ratio=1, head_group=hg, head_dim=64, itemsize=2)
        for n in units
    )
    return one * min(n_cap, plan["units"]) / 2**30


def guardrail_rows(L: int) -> list[dict]:
    """The pipeline under ``set_per_process_memory_fraction`` below what q, k, v
    alone need: one SDPA call must fail, the run must finish and verify."""
    if L <= 0:
        return []
    from streamcqsa.pipeline import verify

    rows: list[dict] = []
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, L, 64, generator=g, dtype=torch.float16) for _ in range(3))
    tmp = Path(tempfile.mkdtemp(prefix="scqsa-guard-"))
    store = tmp / "store"
    create(store, q, k, v, is_causal=True)
    need = 3 * q.numel() * q.element_size()
    cap = need * 2 // 3  # the inputs alone do not fit
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        try:
            qc, kc, vc = (x.cuda() for x in (q, k, v))
            F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)
            single = "fits (cap too high)"
        except torch.cuda.OutOfMemoryError:
            single = "OOM"
        qc = kc = vc = None
        torch.cuda.empty_cache()
        stats: dict = {}

        def go() -> None:
            stats.update(run(store, itr=2, device="cuda", progress=False))

        t, m = cuda_time(go)
        err = verify(store, rows=32)
        rows.append(
            {
                "L": L,
                "what": f"pipeline itr=2 under a {cap / 2**30:.1f} GiB cap",
                "s": t,
                "ratio": float("nan"),
                "peak_gib": m,
                "note": f"one SDPA call: {single}; units {stats['plan']['units']}; "
                f"guardrail {stats['guardrail']}; verify {err}",
            }
        )
        print(rows[-1], flush=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq-lens", default="1048576,2097152")
    ap.add_argument(
        "--pipeline-max",
        type=int,
        default=1048576,
        help="largest L also run through the store pipeline",
    )
    ap.add_argument(
        "--guard-len",
        type=int,
        default=1048576,
        help="L of the run under a memory cap that one SDPA call cannot meet (0: skip)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs CUDA")
    gpu = torch.cuda.get_device_name()
    rows: list[dict] = []

    def save() -> None:
        print(rows[-1], flush=True)
        write_tables(rows, a.out, gpu)

    for L in (int(x) for x in a.seq_lens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, 8, L, 64, device="cuda", dtype=torch.float16, generator=g)
            for _ in range(3)
        )
        with torch.no_grad():
            F.scaled_dot_product_attention(
                q[:, :, :4096], k[:, :, :4096], v[:, :, :4096], is_causal=True
            )
            sdpa_s, sdpa_mem = cuda_time(
                partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
            )
            rows.append(
                {
                    "L": L,
                    "what": "torch SDPA (GPU memory)",
                    "s": sdpa_s,
                    "ratio": 1.0,
                    "peak_gib": sdpa_mem,
                }
            )
            save()
            for itr in (1, 2):
                t, m = cuda_time(partial(attention, q, k, v, itr=itr, is_causal=True))
                rows.append(
                    {
                        "L": L,
                        "what": f"engine itr={itr} (GPU memory)",
                        "s": t,
                        "ratio": t / sdpa_s,
                        "peak_gib": m,
                    }
                )
                save()
        if L <= a.pipeline_max:
            tmp = Path(tempfile.mkdtemp(prefix="scqsa-gpu-"))
            store = tmp / "store"  # on local disk: the page cache serves the reads
            create(store, q.cpu(), k.cpu(), v.cpu(), is_causal=True)
            del q, k, v
            torch.cuda.empty_cache()
            for itr in (1, 2):
                stats: dict = {}

                def go(itr: int = itr, stats: dict = stats, store: Path = store) -> None:
                    stats.update(run(store, itr=itr, device="cuda", progress=False, restart=True))

                try:
                    t, m = cuda_time(go)
                except Exception as e:  # noqa: BLE001 - record it and go on
                    rows.append(
                        {
                            "L": L,
                            "what": f"pipeline itr={itr} (disk store)",
                            "s": float("nan"),
                            "ratio": float("nan"),
                            "peak_gib": float("nan"),
                            "note": f"failed: {type(e).__name__}: {e}",
                        }
                    )
                    save()
                    continue
                st = stats.get("stages", {})
                pred = predicted_gib(stats["plan"], L, itr, stats["guardrail"]["n_cap"])
                rows.append(
                    {
                        "L": L,
                        "what": f"pipeline itr={itr} (disk store)",
                        "s": t,
                        "ratio": t / sdpa_s,
                        "peak_gib": m,
                        "predicted_gib": pred,
                        "note": "units {units}, unit depth {unit_depth}; ".format(**stats["plan"])
                        + f"predicted device peak {pred:.2f} GiB ({pred / m - 1:+.0%}); "
                        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(st.items())),
                    }
                )
                save()
            shutil.rmtree(tmp, ignore_errors=True)
        q = k = v = None  # type: ignore[assignment]  # free this length's inputs before the next
        torch.cuda.empty_cache()
    try:
        rows += guardrail_rows(a.guard_len)
    except Exception as e:  # noqa: BLE001 - record it; the rows so far still count
        rows.append(
            {
                "L": a.guard_len,
                "what": "memory-cap run",
                "s": float("nan"),
                "ratio": float("nan"),
                "peak_gib": float("nan"),
                "note": f"failed: {type(e).__name__}: {e}",
            }
        )
    save()


def write_tables(rows: list[dict], out_dir: str, gpu: str) -> None:
    """gpu.json and gpu.md with every row so far (rewritten after each row, so
    a run cut short by its time limit still leaves its figures)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(
        json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=2)
    )
    lines = [
        f"# GPU benchmark ({gpu}, torch {torch.__version__})",
        "",
        "B=1, H=8, D=64, causal, fp16. Ratio = time / SDPA time at the same L.",
        "",
        "| L | what | s | ratio | peak GiB | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['L']} | {r['what']} | {r['s']:.2f} | {r['ratio']:.2f} | {r['peak_gib']:.1f} "
        f"| {r.get('note', '')} |"
        for r in rows
    ]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
