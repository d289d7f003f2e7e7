"""Every argument of a pass checked before the store is touched.

A bad argument must fail with nothing written, not leave a pass marked
running that the next run refuses to resume; so ``run`` and ``run_backward``
check all of theirs here first, and check ``dout`` in full (shape, dtype,
finite values) before a byte of it is stored.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from streamcqsa.errors import StoreError
from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.device import Device
from streamcqsa.storage.layout import Problem, dtype_name, to_stored
from streamcqsa.storage.location import Location
from streamcqsa.validate import as_flag, as_int


def resolve_device(device: str) -> str:
    """ "auto", "cpu", "cuda" or "cuda:N", resolved once where a pass starts:
    "cuda" is pinned to the current device's index (``kernels.device``)."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
    return str(Device.of(device))


def int_arg(name: str, value: Any, minimum: int, *, none: bool = False) -> int | None:
    return None if value is None and none else as_int(name, value, minimum=minimum)


def is_client(scheduler: Any) -> bool:
    return not isinstance(scheduler, (str, bytes, Mapping)) and callable(
        getattr(scheduler, "get", None)
    )


def is_distributed(scheduler: Any) -> bool:
    return is_client(scheduler) or (isinstance(scheduler, str) and "://" in scheduler)


def check_args(store_path: Any, args: dict) -> dict:
    """Every argument of a pass, checked (numpy ints made ints) before the store
    is touched: a bad one must fail with nothing written, not leave a pass
    marked running that the next run refuses to resume."""
    out = dict(args)
    out["device"] = resolve_device(args["device"])
    get_backend(args["backend"], out["device"])  # unknown or unavailable here
    out["workers"] = int_arg("workers", args["workers"], 1)
    for name in ("task_bytes", "device_memory", "n_cap", "head_group"):
        out[name] = int_arg(name, args.get(name), 1, none=True)
    depth = args["unit_depth"]
    if not (isinstance(depth, str) and depth == "auto"):
        try:
            out["unit_depth"] = int_arg("unit_depth", depth, 0, none=True)
        except (TypeError, ValueError):
            raise ValueError(
                f"unit_depth must be 'auto', None or an int >= 0, got {depth!r}"
            ) from None
    for name in ("keep_partials", "progress", "restart", "check_inputs"):
        out[name] = as_flag(name, args[name])
    sched = args["scheduler"]
    named = isinstance(sched, str) and sched in ("threads", "sync", "synchronous")
    if not (sched is None or named or is_distributed(sched)):
        raise ValueError(
            "scheduler must be None, 'threads', 'sync', a scheduler address "
            f"('tcp://host:port') or a dask.distributed Client, got {sched!r}"
        )
    if is_distributed(sched) and not Location.of(store_path).named:
        raise ValueError(
            "a distributed run needs a store every worker can reach: a path on a shared "
            "filesystem or a URL (s3://...), not a store object"
        )
    return out


def check_writable(path: Any) -> None:
    """A read-only store fails before any work starts (root ignores mode bits,
    so they are checked too)."""
    loc = Location.of(path)
    if loc.local is None:  # a URL store says so at its first write (the lock)
        return
    p = loc.local
    if not os.access(p, os.W_OK) or not (p.stat().st_mode & stat.S_IWUSR):
        raise StoreError(f"store {p} is read-only; a run needs to write into it")


def same_dout(meta: dict, digest: str) -> bool:
    stored = meta.get("dout") or {}
    return stored.get("status") == "complete" and stored.get("digest") == digest


def dout_digest(problem: Problem, dout: Any) -> str:
    """Check dout in full (shape, dtype, finite) and digest its stored bytes.

    Reads one chunk row at a time, so a dout of any size is checked before a
    byte of it is written, and the digest (kept in the store's metadata) is
    the same for the same values from numpy, torch or dask.
    """
    shape = (problem.batch, problem.heads, problem.seq_len, problem.head_dim)
    if not hasattr(dout, "shape") or not hasattr(dout, "dtype"):
        raise TypeError(f"dout must be an array (numpy, torch or dask), got {type(dout).__name__}")
    if tuple(dout.shape) != shape:
        raise ValueError(f"dout must have shape {shape} (that of q), got {tuple(dout.shape)}")
    try:
        same_dtype = dtype_name(dout.dtype) == problem.dtype
    except TypeError:
        same_dtype = False
    if not same_dtype:
        raise TypeError(f"dout dtype {dout.dtype} differs from the store's {problem.dtype}")
    h = hashlib.blake2b(repr((shape, problem.dtype)).encode(), digest_size=16)
    c = problem.chunk_tokens
    for b in range(problem.batch):
        for a in range(0, problem.seq_len, c):
            block = dout[b : b + 1, :, a : a + c, :]
            if hasattr(block, "compute"):
                block = block.compute()
            if not isinstance(block, torch.Tensor):
                block = torch.from_numpy(np.array(block, dtype=problem.dtype))  # a copy
            bad = ~torch.isfinite(block.cpu())
            if bad.any():
                tokens = bad.any(dim=3).any(dim=1).flatten().nonzero().flatten() + a
                raise ValueError(
                    f"dout has NaN/Inf at {len(tokens)} token(s) in positions "
                    f"[{int(tokens[0])}, {int(tokens[-1])}] of batch {b}; the backward needs "
                    "a finite dout (dout is not stored; the store is unchanged)"
                )
            h.update(np.ascontiguousarray(to_stored(block, problem.dtype)))
    return h.hexdigest()


__all__ = ["check_args", "check_writable", "dout_digest", "is_distributed", "resolve_device"]
