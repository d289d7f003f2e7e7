"""GPU benchmark: torch SDPA (flash, in GPU memory) vs the engine and the pipeline.

B=1, H=8, D=64, causal, fp16. One section per call, so that bench/gpu_check.sh
can give each its own time limit:

* ``fwd``: SDPA forward, the engine at itr 1-2, the pipeline over a disk store;
* ``bwd``: the backward of each (time of the backward alone);
* ``guard``: the pipeline under a device-memory cap that one SDPA call cannot meet;
* ``cut``: a row saying that a section's next row ran past the section's limit.

Every row is appended to gpu.json / gpu.md in --out as soon as it is measured,
so a section cut short by its limit keeps the rows it finished. A row that
fails is recorded with its error and the section goes on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamcqsa import attention
from streamcqsa.pipeline import run, run_backward, verify
from streamcqsa.storage import create

H, D = 8, 64
DTYPE = torch.float16
SDPA_BACKEND = SDPBackend.FLASH_ATTENTION
DEV = "cuda"


def cuda_time(fn: Callable[[], object]) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The baseline, pinned to flash (torch may otherwise pick cuDNN on sm90)."""
    with sdpa_kernel([SDPA_BACKEND]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Table:
    """gpu.json / gpu.md, rewritten after every row."""

    def __init__(self, out_dir: str) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "gpu.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        self.rows: list[dict] = old.get("rows", [])
        self.env = {k: old[k] for k in ("gpu", "torch", "cuda", "sdpa_backend") if k in old} or {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "sdpa_backend": SDPA_BACKEND.name,
        }

    def add(self, row: dict) -> None:
        print(row, flush=True)
        self.rows.append(row)
        env = self.env
        (self.out / "gpu.json").write_text(json.dumps({**env, "rows": self.rows}, indent=2))
        lines = [
            f"# GPU benchmark ({env['gpu']}, torch {env['torch']}, CUDA {env['cuda']})",
            "",
            f"B=1, H={H}, D={D}, causal, fp16. Baseline: torch SDPA pinned to "
            f"{env['sdpa_backend']}. Ratio = time / SDPA time at the same L and direction.",
            "",
            "| L | what | s | ratio | peak GiB | note |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['L']} | {r['what']} | {r['s']:.2f} | {r['ratio']:.2f} | "
            f"{r['peak_gib']:.1f} | {r.get('note', '')} |"
            for r in self.rows
        ]
        (self.out / "gpu.md").write_text("\n".join(lines) + "\n")

    def measure(
        self, L: int, what: str, fn: Callable[[], object], base: float | None, note=None
    ) -> float:
        """Time ``fn`` and add its row; on failure add the error instead.
        ``note`` is a callable run after timing (it may read what fn stored)."""
        pending = self.out / "pending.json"  # what ``cut`` reports if the limit stops us
        pending.write_text(json.dumps({"L": L, "what": what}))
        try:
            t, m = cuda_time(fn)
            extra = note() if note else ""
        except Exception as e:  # noqa: BLE001 - record it and go on
            traceback.print_exc()
            torch.cuda.empty_cache()
            pending.unlink()
            nan = float("nan")
            self.add(
                {
                    "L": L,
                    "what": what,
                    "s": nan,
                    "ratio": nan,
                    "peak_gib": nan,
                    "note": f"failed: {type(e).__name__}: {str(e)[:300]}",
                }
            )
            return nan
        pending.unlink()
        ratio = t / base if base else 1.0
        self.add({"L": L, "what": what, "s": t, "ratio": ratio, "peak_gib": m, "note": extra})
        return t


def _raise(e: Exception) -> None:
    raise e


def inputs(L: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(1, H, L, D, device=DEV, dtype=DTYPE, generator=g) for _ in range(3))


def predicted_gib(plan: dict, L: int, itr: int, n_cap: int) -> float:
    """The planner's device bytes for the run's units (``unit_device_bytes``),
    times the units that can be resident at once."""
    from streamcqsa.cqs import divide
    from streamcqsa.cqs.footprint import unit_device_bytes

    p = divide(L, itr, plan["quorums"] or 3, is_causal=True)
    depth = plan["unit_depth"] if plan["unit_depth"] is not None else itr
    units = [n for n in p.nodes if n.depth == depth and not n.is_leaf]
    if not units:
        return float("nan")
    hg = plan["head_group"]
    one = max(
        unit_device_bytes(p, n, group_ratio=1, head_group=hg, head_dim=D, itemsize=2) for n in units
    )
    return one * min(n_cap, plan["units"]) / 2**30


def run_note(stats: dict, L: int, itr: int, peak: Callable[[], float]) -> str:
    plan = stats["plan"]
    st = stats.get("stages", {})
    try:
        pred = predicted_gib(plan, L, itr, stats["guardrail"]["n_cap"])
        pred_s = f"predicted device peak {pred:.2f} GiB ({pred / peak() - 1:+.0%}); "
    except Exception as e:  # noqa: BLE001
        pred_s = f"prediction failed: {type(e).__name__}: {e}; "
    return (
        f"units {plan.get('units')}, unit depth {plan.get('unit_depth')}, "
        f"head group {plan.get('head_group')}; stored partials "
        f"{stats.get('partial_disk_bytes', 0) / 2**30:.2f} GiB; {pred_s}"
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(st.items()) if isinstance(v, float))
    )


def new_store(L: int, q, k, v) -> Path:  # noqa: ANN001
    tmp = Path(tempfile.mkdtemp(prefix="scqsa-gpu-"))
    store = tmp / "store"  # on local disk: the page cache serves the reads
    t = time.perf_counter()
    create(store, q.cpu(), k.cpu(), v.cpu(), is_causal=True)
    print(f"store of L={L} written in {time.perf_counter() - t:.1f} s", flush=True)
    return store


def section_fwd(tab: Table, L: int, itrs: list[int], pipeline: bool) -> None:
    q, k, v = inputs(L)
    with torch.no_grad():
        sdpa(q[:, :, :4096], k[:, :, :4096], v[:, :, :4096])
        attention(q[:, :, :4096], k[:, :, :4096], v[:, :, :4096], itr=1, is_causal=True)
        base = tab.measure(L, "fwd: torch SDPA (GPU memory)", lambda: sdpa(q, k, v), None)
        for itr in itrs:
            tab.measure(
                L,
                f"fwd: engine itr={itr} (GPU memory)",
                lambda itr=itr: attention(q, k, v, itr=itr, is_causal=True),
                base,
            )
    if not pipeline:
        return
    store = new_store(L, q, k, v)
    q = k = v = None  # type: ignore[assignment]  # free the device copies
    torch.cuda.empty_cache()
    try:
        for itr in itrs:
            stats: dict = {}
            peak = [0.0]

            def go(itr: int = itr, stats: dict = stats, peak: list = peak) -> None:
                stats.update(run(store, itr=itr, device=DEV, progress=False, restart=True))
                peak[0] = torch.cuda.max_memory_allocated() / 2**30

            tab.measure(
                L,
                f"fwd: pipeline itr={itr} (disk store)",
                go,
                base,
                note=lambda itr=itr, stats=stats, peak=peak: (
                    run_note(stats, L, itr, lambda: peak[0]) + f"; verify {verify(store, rows=16)}"
                ),
            )
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)


def section_bwd(tab: Table, L: int, itrs: list[int], pipeline_itr: int) -> None:
    q, k, v = inputs(L)
    g = torch.Generator(device=DEV).manual_seed(7)
    dout = torch.randn(q.shape, device=DEV, dtype=DTYPE, generator=g)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def backward_of(fwd: Callable[[], torch.Tensor]) -> Callable[[], object]:
        out = fwd()
        return lambda: torch.autograd.grad(out, (qg, kg, vg), dout)

    # warm-up at a small length
    qs, ks, vs = (x[:, :, :4096].detach().requires_grad_() for x in (q, k, v))
    torch.autograd.grad(sdpa(qs, ks, vs), (qs, ks, vs), dout[:, :, :4096])
    torch.autograd.grad(
        attention(qs, ks, vs, itr=1, is_causal=True), (qs, ks, vs), dout[:, :, :4096]
    )
    base = tab.measure(
        L, "bwd: torch SDPA (GPU memory)", backward_of(lambda: sdpa(qg, kg, vg)), None
    )
    torch.cuda.empty_cache()
    for itr in itrs:
        try:
            fn = backward_of(lambda itr=itr: attention(qg, kg, vg, itr=itr, is_causal=True))
        except Exception as e:  # noqa: BLE001
            fn = partial(_raise, e)  # recorded as the row's failure
        tab.measure(L, f"bwd: engine itr={itr} (GPU memory)", fn, base)
        fn = None
        torch.cuda.empty_cache()
    if pipeline_itr < 0:
        return
    store = new_store(L, q, k, v)
    dout_h = dout.cpu()
    q = k = v = qg = kg = vg = dout = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    try:
        t = time.perf_counter()
        run(store, itr=pipeline_itr, device=DEV, progress=False)
        print(f"forward for the backward: {time.perf_counter() - t:.1f} s", flush=True)
        stats: dict = {}
        tab.measure(
            L,
            f"bwd: pipeline itr={pipeline_itr} (disk store, incl. writing dout)",
            lambda: stats.update(run_backward(store, dout_h, device=DEV, progress=False)),
            base,
            note=lambda: run_note(stats, L, pipeline_itr, lambda: float("nan")),
        )
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)


def section_guard(tab: Table, L: int) -> None:
    """The pipeline under ``set_per_process_memory_fraction`` below what q, k, v
    alone need: one SDPA call must fail, the run must finish and verify."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, L, D, generator=g, dtype=DTYPE) for _ in range(3))
    store = new_store(L, q, k, v)
    need = 3 * q.numel() * q.element_size()
    cap = need * 2 // 3  # the inputs alone do not fit
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        try:
            qc, kc, vc = (x.to(DEV) for x in (q, k, v))
            sdpa(qc, kc, vc)
            single = "fits (cap too high)"
        except torch.cuda.OutOfMemoryError:
            single = "OOM"
        qc = kc = vc = None
        torch.cuda.empty_cache()
        stats: dict = {}

        def note() -> str:
            out = np.asarray(__import__("zarr").open_group(store, mode="r")["out"][:])
            finite = bool(np.isfinite(out.astype(np.float32)).all())
            return (
                f"cap {cap / 2**30:.2f} GiB; one SDPA call: {single}; units "
                f"{stats['plan']['units']}; guardrail {stats['guardrail']}; "
                f"out all finite: {finite}; verify {verify(store, rows=32)}"
            )

        tab.measure(
            L,
            "fwd: pipeline itr=2 under a device cap",
            lambda: stats.update(run(store, itr=2, device=DEV, progress=False)),
            float("nan"),
            note=note,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        shutil.rmtree(store.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("section", choices=["fwd", "bwd", "guard", "cut"])
    ap.add_argument("--what", default="", help="cut: the row, if none was being measured")
    ap.add_argument("--limit", type=int, default=0, help="cut: the section's limit in seconds")
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--itrs", default="1,2", help="engine (and fwd pipeline) depths")
    ap.add_argument("--no-pipeline", action="store_true", help="fwd: skip the store pipeline")
    ap.add_argument(
        "--pipeline-itr",
        type=int,
        default=1,
        help="bwd: depth of the store pipeline's pass (-1: skip)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if a.section == "cut":  # gpu_check.sh: a section ran past its limit
        tab = Table(a.out)
        pending = tab.out / "pending.json"
        row = json.loads(pending.read_text()) if pending.exists() else {"L": a.seq_len}
        row.setdefault("what", a.what or "(between rows: setup or store writing)")
        nan = float("nan")
        note = f"not finished: the section hit its {a.limit} s limit"
        tab.add({**row, "s": nan, "ratio": nan, "peak_gib": nan, "note": note})
        pending.unlink(missing_ok=True)
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs CUDA")
    tab = Table(a.out)
    itrs = [int(x) for x in a.itrs.split(",") if x]
    if a.section == "fwd":
        section_fwd(tab, a.seq_len, itrs, not a.no_pipeline)
    elif a.section == "bwd":
        section_bwd(tab, a.seq_len, itrs, a.pipeline_itr)
    else:
        section_guard(tab, a.seq_len)


if __name__ == "__main__":
    main()
