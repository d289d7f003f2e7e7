"""The ``streamcqsa`` argument parser: one subcommand per job."""

from __future__ import annotations

import argparse
import functools

from streamcqsa import __version__
from streamcqsa.cli.options import (
    DTYPES,
    _add_budgets,
    _add_device_args,
    _add_overlap_io,
    _add_problem,
    _add_store,
    _add_unit_depth,
    _count,
    _itr,
    _positive,
    _quorum,
)
from streamcqsa.cli.planning import cmd_estimate, cmd_plan
from streamcqsa.cli.store import (
    cmd_backward,
    cmd_demo,
    cmd_init,
    cmd_repair,
    cmd_run,
    cmd_status,
    cmd_verify,
)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help already says
    it or there is none to say (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamcqsa",
        description="Exact long-context attention over Zarr run stores (Stream-CQSA).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # every option says what it does; defaults are appended to its help
    sub.add_parser = functools.partial(  # type: ignore[method-assign]
        sub.add_parser, formatter_class=_Help
    )

    s = sub.add_parser("init", help="create a run store (random data or .npy files)")
    _add_store(s)
    s.add_argument(
        "--from-npy",
        nargs=3,
        metavar=("Q", "K", "V"),
        help="q, k, v .npy files [B,H,L,D] (the shape options are then read from them)",
    )
    _add_problem(s, seq_len=4096)
    s.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="store dtype (default: float16, or that of the .npy files, which are "
        "converted to it; a uint16 file holds bfloat16 bit patterns)",
    )
    s.add_argument("--causal", action="store_true", help="causal attention (is_causal)")
    s.add_argument(
        "--scale", type=_positive, default=None, help="softmax scale (default: 1/sqrt(D))"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    s.add_argument("--std", type=_positive, default=1.0, help="std of the random inputs")
    s.add_argument(
        "--chunk-tokens",
        type=_count,
        default=None,
        help="store chunk along L (default: from L, 2048 to 65536)",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store (only once the new one is complete)",
    )
    s.add_argument(
        "--allow-nonfinite", action="store_true", help="keep NaN/Inf in --from-npy inputs"
    )
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("run", help="run (or resume) the forward pass")
    _add_store(s)
    s.add_argument("--itr", type=_itr, default=3, help="depth, or 'auto' (from budgets)")
    s.add_argument("--quorum", type=_quorum, default=3, help="k, or k1,k2,... per level")
    s.add_argument("--backend", default="auto", help="kernel backend: auto, flash, math, flex, ...")
    s.add_argument("--workers", type=_count, default=2, help="I/O threads (Dask's)")
    s.add_argument("--scheduler", default=None, help="threads, sync, or a scheduler address")
    s.add_argument("--restart", action="store_true", help="discard unfinished work of another plan")
    s.add_argument("--head-group", type=_count, default=None, help="kv heads per unit")
    _add_unit_depth(s)
    _add_device_args(s)
    _add_overlap_io(s)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("backward", help="run (or resume) the backward pass")
    _add_store(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--dout",
        help=".npy file with dout [B,H,L,D], converted to the store's dtype (for bfloat16: "
        "float32, or uint16 bit patterns)",
    )
    g.add_argument("--random-dout", type=int, metavar="SEED", help="use a random dout")
    s.add_argument("--backend", default="auto", help="kernel backend: auto, flash, math, flex, ...")
    s.add_argument("--workers", type=_count, default=2, help="I/O threads (Dask's)")
    s.add_argument(
        "--restart", action="store_true", help="discard unfinished work of another unit depth"
    )
    _add_unit_depth(s)
    _add_device_args(s)
    _add_overlap_io(s)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_backward)

    s = sub.add_parser("status", help="show the store's problem and progress")
    _add_store(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    from streamcqsa.pipeline.verify import TOLERANCE_RULE

    s = sub.add_parser(
        "verify",
        help="check sampled output rows against float64",
        description="Check sampled rows of out and lse against float64 attention. "
        + TOLERANCE_RULE,
    )
    _add_store(s)
    s.add_argument("--rows", type=_count, default=64, help="rows sampled per batch and head")
    s.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(
        "plan",
        help="choose itr, head group and n_cap from memory budgets",
        description="Choose the shallowest plan whose tasks fit the budgets, and print its "
        "memory, peak disk, I/O and time at a given throughput. Nothing is run.",
    )
    _add_problem(s, seq_len=None)
    s.add_argument("--dtype", default="float16", choices=DTYPES, help="store dtype")
    s.add_argument("--causal", action="store_true", help="causal attention")
    _add_budgets(s)
    s.add_argument("--devices", type=_count, default=1, help="devices the tasks spread over")
    s.add_argument(
        "--throughput",
        type=_positive,
        default=1e9,
        help="score entries per second per device (default: 1e9; measure yours with "
        "'streamcqsa estimate')",
    )
    s.add_argument("--chunk-tokens", type=_count, default=65536, help="store chunk along L")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser(
        "estimate",
        help="time sample tasks here and extrapolate a full run (the paper's scaled evaluation)",
    )
    _add_problem(s, seq_len=None)
    s.add_argument("--dtype", default="float16", choices=DTYPES, help="store dtype")
    s.add_argument("--causal", action="store_true", help="causal attention")
    s.add_argument("--itr", type=_itr, default="auto", help="depth, or 'auto' (from budgets)")
    _add_budgets(s)
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
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_estimate)

    s = sub.add_parser("repair", help="find corrupt chunks; reset the units that made them")
    _add_store(s)
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("demo", help="run the store pipeline on a small default and verify")
    _add_problem(s, seq_len=8192, heads=4, kv_heads=2)
    s.add_argument("--dtype", default="float32", choices=DTYPES, help="store dtype")
    s.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="causal attention",
    )
    s.add_argument("--itr", type=lambda t: _count(t, 0), default=2, help="depth")
    s.add_argument("--rows", type=_count, default=64, help="rows verified per batch and head")
    s.add_argument("--seed", type=int, default=0, help="seed of the inputs and the sample")
    s.add_argument("--dir", default=None, help="keep the store here instead of a temp dir")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_demo)
    return p
