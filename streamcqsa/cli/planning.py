"""Planning commands: plan (memory budgets) and estimate (the paper's scaled evaluation)."""

from __future__ import annotations

import argparse
import json
import sys

from streamcqsa.cli.options import _human


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
    print(
        f"disk:          {_human(est.disk_bytes)} at the forward's peak (inputs, outputs, "
        f"{_human(est.partial_disk_bytes)} of accumulator); --keep-partials adds "
        f"{_human(est.kept_partial_bytes)}"
    )
    print(
        f"I/O:           {_human(est.read_bytes)} read, {_human(est.write_bytes)} written "
        f"per forward, units at depth {est.unit_depth} (each level deeper reads the inputs "
        f"and folds the partials about k times more)"
    )
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
