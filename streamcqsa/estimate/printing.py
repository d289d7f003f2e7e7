"""Plain-text rendering of the ``estimate`` and ``check_model`` reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from streamcqsa.estimate.model import PASSES


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def format_report(rep: dict[str, Any]) -> str:
    """The estimate as a plain-text table."""
    s, pl, cal = rep["shape"], rep["plan"], rep["calibration"]
    fw, bw = rep["passes"]["fwd"], rep["passes"]["bwd"]
    lines = [
        f"problem: L={s['seq_len']:,} B={s['batch']} H={s['heads']} Hkv={s['kv_heads']} "
        f"D={s['head_dim']} {s['dtype']} causal={s['is_causal']}; device {rep['device']}",
        f"plan:    itr={pl['itr']} quorum={pl['quorum']} head_group={pl['head_group']} "
        f"n_cap={rep['budget']['n_cap']}; {fw['tasks']:,} tasks per pass "
        f"({pl['leaves_per_group']:,} leaves x groups x batch), leaves <= {pl['leaf_tokens']:,} "
        f"tokens; work {pl['work_over_useful']:.3f} x useful (dense leaves "
        f"{pl['dense_over_useful']:.3f}); planned in {pl['plan_seconds']:.2f} s"
        + ("" if pl["fits"] else "  ** tasks do NOT fit the device budget **"),
    ]
    if (pl.get("requested_itr") or pl["itr"]) > pl["itr"]:
        lines.append(
            f"         itr={pl['requested_itr']} asked; levels past {pl['itr']} would split "
            "nothing, so the plan stops there (same work)"
        )
    lines += [f"WARNING: {w}" for w in rep.get("warnings", [])]
    lines += [
        "",
        f"| {'':28} | {'forward':>14} | {'backward':>14} | {'total':>14} |",
        f"|{'-' * 30}|{'-' * 16}|{'-' * 16}|{'-' * 16}|",
    ]

    def row(
        label: str, f: float, b: float, fmt: Callable[[float], str], total: bool = True
    ) -> None:
        t = fmt(f + b) if total else ""
        lines.append(f"| {label:28} | {fmt(f):>14} | {fmt(b):>14} | {t:>14} |")

    def hours(x: float) -> str:
        return f"{x:,.3g} h"

    row("kernel device-hours", fw["kernel_device_hours"], bw["kernel_device_hours"], hours)
    row("pipeline wall hours (model)", fw["pipeline_hours"], bw["pipeline_hours"], hours)
    row("  fold (isolated)", fw["fold_hours"], bw["fold_hours"], hours)
    row("  store I/O (isolated)", fw["io_hours"], bw["io_hours"], hours)
    row("tasks", fw["tasks"], bw["tasks"], lambda x: f"{x:,.0f}")
    row(
        "device memory / task",
        fw["device_bytes_per_task"],
        bw["device_bytes_per_task"],
        human_bytes,
        total=False,
    )
    row(
        "host memory / task",
        fw["host_bytes_per_task"],
        bw["host_bytes_per_task"],
        human_bytes,
        total=False,
    )
    row("read", fw["read_bytes"], bw["read_bytes"], human_bytes)
    row("written", fw["write_bytes"], bw["write_bytes"], human_bytes)
    row("disk: outputs", fw["output_disk_bytes"], bw["output_disk_bytes"], human_bytes)
    row("disk: accumulator", fw["partial_disk_bytes"], bw["partial_disk_bytes"], human_bytes)
    d = rep["disk"]
    lines += [
        "",
        f"disk: inputs {human_bytes(d['inputs'])}, at the peak of both passes "
        f"{human_bytes(d['total'])} (each pass's accumulator is dropped when it is done)",
        "",
        "fitted on this machine:",
    ]
    for p in PASSES:
        k = cal["kernel"][p]
        lines.append(
            f"  {p} task seconds = {k['a']:.3g} + {k['b']:.3g} x entries "
            f"({k['points']} tasks, rel rms {k['rel_rms']:.1%}; "
            f"{1 / k['b'] if k['b'] else math.inf:.3g} entries/s)"
        )
    samples = cal.get("samples") or []
    if samples:
        big = max(samples, key=lambda r: r["entries"])
        lines.append(
            f"  sampled leaves of {min(r['tokens'] for r in samples):,}-"
            f"{max(r['tokens'] for r in samples):,} tokens (the plan's: up to "
            f"{pl['leaf_tokens']:,}); the largest ran {big['entries'] / big['fwd_s']:.3g} / "
            f"{big['entries'] / big['bwd_s']:.3g} entries/s (fwd/bwd). Bigger leaves run "
            "bigger blocks, so the hours above lean high."
        )
    spread = cal.get("spread") or {}
    if any(v["samples"] for v in spread.values()):
        lines.append(
            "  repeats of one sample task landed apart by "
            + ", ".join(
                f"{p} {v['median']:.0%} median / {v['max']:.0%} max"
                for p, v in spread.items()
                if v["samples"]
            )
            + " (load on this machine; the fits keep each task's best)"
        )
    lines.append(
        f"  fold {cal['fold_s_per_elem']['fwd']:.3g} / {cal['fold_s_per_elem']['bwd']:.3g} "
        f"s per element (fwd/bwd); store read {human_bytes(cal['read_Bps'])}/s, "
        f"write {human_bytes(cal['write_Bps'])}/s"
    )
    if cal.get("pipeline"):
        for p in PASSES:
            f = cal["pipeline"][p]
            lines.append(
                f"  {p} pipeline = {f['c0']:.3g} s + {f['alpha']:.3g} x kernel + "
                f"{f['beta']:.3g} x (fold + I/O)  (rel rms {f['rel_rms']:.1%} over "
                f"{len(cal['pipeline_runs'])} runs)"
            )
    else:
        lines.append("  pipeline overhead not calibrated: wall = kernel + fold + I/O")
    return "\n".join(lines)


def format_check(res: dict[str, Any]) -> str:
    s = res["shape"]
    out = [
        f"model check: L={s['seq_len']} H={s['heads']} D={s['head_dim']} {s['dtype']} "
        f"causal={s['is_causal']} itr={res['itr']} on {res['device']}; calibrated at "
        + ", ".join(f"L={L}/itr={i}" for L, i in res["calibration_points"]),
        "",
        "| pass | predicted s | measured s | rel. error |",
        "|---|---|---|---|",
    ]
    for p, r in res["passes"].items():
        out.append(
            f"| {p} | {r['predicted_s']:.2f} | {r['measured_s']:.2f} | {r['rel_error']:+.1%} |"
        )
    return "\n".join(out)
