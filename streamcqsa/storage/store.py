"""Create and open run stores; stream inputs in chunk by chunk.

Nothing here holds more than one store chunk (per array) in memory: numpy,
torch and dask inputs are copied a chunk at a time, and random stores are
generated per chunk from per-chunk seeds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from streamcqsa.errors import StoreError  # re-exported: storage.store.StoreError
from streamcqsa.storage.fingerprint import fingerprint  # re-exported
from streamcqsa.storage.layout import (
    ATTR,
    FORMAT,
    FORMAT_VERSION,
    INPUTS,
    Problem,
    default_chunk_tokens,
    dtype_name,
    stored_dtype,
    to_stored,
    to_torch,
)
from streamcqsa.storage.location import Location
from streamcqsa.storage.replace import replacing
from streamcqsa.validate import as_flag, check_finite

StorePath = str | os.PathLike | zarr.storage.StoreLike


def _store(path: Any, *, create: bool = False) -> Any:
    loc = Location.of(path)
    if loc.local is not None:
        p = loc.local
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not a run store directory")
        if not create and not p.exists():
            raise StoreError(f"no run store at {p}: path does not exist")
    return loc.zarr_store()


def array_kwargs(dtype: str, chunks: tuple[int, ...]) -> dict[str, Any]:
    """Uncompressed (random floats do not compress) with a crc32c checksum."""
    return dict(
        dtype=dtype,
        chunks=chunks,
        compressors=(Crc32cCodec(),),
        fill_value=0,
        overwrite=True,
    )


def _problem(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    dtype: str,
    is_causal: bool,
    scale: float | None,
    chunk_tokens: int | None,
) -> Problem:
    for name, s in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(s) != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {s}")
    if k_shape != v_shape:
        raise ValueError(f"k and v shapes differ: {k_shape} vs {v_shape}")
    b, h, n, d = q_shape
    bk, hk, nk, dk = k_shape
    if b != bk or d != dk:
        raise ValueError(f"q {q_shape} and k/v {k_shape} differ in batch or head dim")
    if n != nk:
        raise ValueError(f"q has {n} tokens but k/v have {nk}: Lq must equal Lk")
    if min(b, h, n, d, hk) < 1:
        raise ValueError(f"all dimensions must be >= 1, got q {q_shape}, k/v {k_shape}")
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if scale is None:
        scale = d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    c = default_chunk_tokens(n) if chunk_tokens is None else chunk_tokens
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return Problem(b, h, hk, n, d, dtype, is_causal, float(scale), c)


def _init_group(path: Any, problem: Problem) -> zarr.Group:
    # a named target is empty but for the lock, which mode "w" would delete
    mode = "a" if Location.of(path).named else "w"
    group = zarr.open_group(_store(path, create=True), mode=mode)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "problem": problem.to_json()}
    group.attrs[ATTR] = meta
    shapes = {
        "q": (problem.batch, problem.heads, problem.seq_len, problem.head_dim),
        "k": (problem.batch, problem.kv_heads, problem.seq_len, problem.head_dim),
        "v": (problem.batch, problem.kv_heads, problem.seq_len, problem.head_dim),
    }
    for name, shape in shapes.items():
        chunks = (1, 1, problem.chunk_tokens, problem.head_dim)
        group.create_array(name, shape=shape, **array_kwargs(stored_dtype(problem.dtype), chunks))
    return group


def _as_source(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return x


def create(
    path: StorePath,
    q: Any,
    k: Any,
    v: Any,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    overwrite: bool = False,
    chunk_tokens: int | None = None,
    allow_nonfinite: bool = False,
    storage_options: dict | None = None,
) -> Path | Any:
    """Write q [B,H,L,D], k, v [B,Hkv,L,D] (numpy, torch or dask) into a new store.

    Inputs are copied one store chunk at a time (a dask array is computed
    chunk by chunk, never whole). Shapes and dtypes are checked before
    anything is written. A directory store is built in a private directory
    (the data checked for NaN/Inf as it is copied) and swapped in only when
    complete (``replace.replacing``): any failure leaves an existing store as
    it was, and a store another run holds is refused (StoreBusyError). A URL
    (``s3://bucket/prefix``) is opened with ``storage_options`` as in zarr.
    """
    loc = Location.of(path, storage_options)
    srcs = [_as_source(x) for x in (q, k, v)]
    for name, x in zip(INPUTS, srcs, strict=True):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array (numpy, torch or dask), got {type(x)}")
    dtypes = {dtype_name(x.dtype) for x in srcs}
    if len(dtypes) != 1:
        raise TypeError(f"q, k, v dtypes differ: {[str(x.dtype) for x in srcs]}")
    problem = _problem(
        tuple(srcs[0].shape),
        tuple(srcs[1].shape),
        tuple(srcs[2].shape),
        dtypes.pop(),
        is_causal,
        scale,
        chunk_tokens,
    )
    allow_nonfinite = as_flag("allow_nonfinite", allow_nonfinite)
    with replacing(loc, overwrite) as target:
        group = _init_group(target, problem)
        last: list = []  # causal: the last non-finite token of each V column
        for name, x in zip(INPUTS, srcs, strict=True):
            seen = _track_last(last, problem) if name == "v" and allow_nonfinite else None
            write_chunked(
                group[name],
                name,
                x,
                problem,
                check_finite=not allow_nonfinite,
                note="; nothing was written",
                on_block=seen,
            )
        _finish_inputs(group, problem)
        if allow_nonfinite:  # passes then compute as the dense NaN/Inf rule asks
            update_meta(group, allow_nonfinite=True)
        if last and problem.is_causal:
            update_meta(group, v_nonfinite_last=last[0].tolist())
    return path


def _track_last(last: list, problem: Problem) -> Any:
    """A write_chunked callback folding ``last_nonfinite`` over V's chunks
    into ``last[0]`` ([B, Hkv, D]; absent while V is finite)."""
    from streamcqsa.kernels.nonfinite import last_nonfinite

    def seen(b: int, a: int, data: np.ndarray) -> None:
        found = last_nonfinite(to_torch(data, problem.dtype), offset=a)
        if found is None:
            return
        if not last:
            shape = (problem.batch, problem.kv_heads, problem.head_dim)
            last.append(torch.full(shape, -1, dtype=torch.int64))
        last[0][b] = torch.maximum(last[0][b], found[0])

    return seen


def write_chunked(
    arr: Any,
    name: str,
    src: Any,
    problem: Problem,
    *,
    check_finite: bool,
    note: str = "",
    on_block: Any = None,
) -> None:
    """Copy src [B,H,L,D] (numpy, torch or dask) into arr one store chunk row at a
    time, so nothing larger than a chunk row is ever in memory."""
    c = problem.chunk_tokens
    # every chunk must exist once written (a missing one is an error, not zeros),
    # so all-zero chunks are written too
    arr = arr.with_config({"write_empty_chunks": True})
    for b in range(problem.batch):
        for a in range(0, problem.seq_len, c):
            z = min(a + c, problem.seq_len)
            block = src[b : b + 1, :, a:z, :]
            if hasattr(block, "compute"):
                block = block.compute()
            data = _stored_block(block, problem.dtype)
            if check_finite:
                _check_finite(name, b, a, data, problem.dtype, note)
            if on_block is not None:
                on_block(b, a, data)
            arr[b : b + 1, :, a:z, :] = data


def _check_finite(name: str, b: int, start: int, data: np.ndarray, dtype: str, note: str) -> None:
    try:
        check_finite(name, to_torch(data, dtype), offset=start)
    except ValueError as e:
        raise ValueError(f"{e} (batch {b}){note}") from None


def _stored_block(block: Any, dtype: str) -> np.ndarray:
    if isinstance(block, torch.Tensor):
        return to_stored(block, dtype)
    arr = np.asarray(block)
    if dtype == "bfloat16":
        return to_stored(torch.from_numpy(np.ascontiguousarray(arr)), dtype)
    return arr


def create_random(
    path: StorePath,
    *,
    seq_len: int,
    heads: int,
    head_dim: int,
    kv_heads: int | None = None,
    batch: int = 1,
    dtype: str = "float16",
    is_causal: bool = False,
    scale: float | None = None,
    seed: int = 0,
    std: float = 1.0,
    overwrite: bool = False,
    chunk_tokens: int | None = None,
    storage_options: dict | None = None,
) -> Path | Any:
    """A store of standard-normal inputs (times ``std``), one chunk at a time.

    Each (array, batch, head, chunk) has its own seed, so the data does not
    depend on chunk order and no step holds more than one chunk. Every
    argument is checked before anything is written, and an existing store is
    replaced only by a complete new one, as in ``create``.
    """
    loc = Location.of(path, storage_options)
    kv_heads = heads if kv_heads is None else kv_heads
    name = dtype_name(dtype)
    for label, val in (
        ("seq_len", seq_len),
        ("heads", heads),
        ("head_dim", head_dim),
        ("kv_heads", kv_heads),
        ("batch", batch),
        ("seed", seed),
    ):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{label} must be an int, got {val!r}")
    problem = _problem(
        (batch, heads, seq_len, head_dim),
        (batch, kv_heads, seq_len, head_dim),
        (batch, kv_heads, seq_len, head_dim),
        name,
        is_causal,
        scale,
        chunk_tokens,
    )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if isinstance(std, bool) or not isinstance(std, (int, float, np.integer, np.floating)):
        raise TypeError(f"std must be a float, got {std!r}")
    if not np.isfinite(std) or std < 0:
        raise ValueError(f"std must be finite and >= 0, got {std}")
    with replacing(loc, overwrite) as target:
        group = _init_group(target, problem)
        c = problem.chunk_tokens
        for ai, arr_name in enumerate(INPUTS):
            arr = group[arr_name].with_config({"write_empty_chunks": True})
            for b in range(batch):
                for h in range(arr.shape[1]):
                    for j, a in enumerate(range(0, seq_len, c)):
                        z = min(a + c, seq_len)
                        rng = np.random.default_rng([seed, ai, b, h, j])
                        x = rng.standard_normal((1, 1, z - a, head_dim), dtype=np.float32) * std
                        data = _stored_block(torch.from_numpy(x), name)
                        if not torch.isfinite(to_torch(data, name)).all():
                            raise ValueError(
                                f"std={std} is too large for {name}: values overflow to "
                                "inf; nothing was written"
                            )
                        arr[b : b + 1, h : h + 1, a:z, :] = data
        _finish_inputs(group, problem)
    return path


def _finish_inputs(group: zarr.Group, problem: Problem) -> None:
    meta = dict(group.attrs[ATTR])
    meta["fingerprint"] = fingerprint(group)
    group.attrs[ATTR] = meta


def open_group(
    path: StorePath, *, mode: str = "r+", storage_options: dict | None = None
) -> tuple[zarr.Group, Problem, dict]:
    """Open a run store and check its format; StoreError if it is not one."""
    loc = Location.of(path, storage_options)
    store = _store(loc)
    if loc.named and not loc.is_store():
        if loc.remote and not loc.exists():
            raise StoreError(f"no run store at {loc}: nothing is stored there")
        raise StoreError(f"{loc} is not a run store (no zarr.json)")
    try:
        group = zarr.open_group(store, mode=mode)
    except Exception as e:  # zarr raises several types for "not a group"
        raise StoreError(f"{loc} is not a run store: {e}") from e
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{loc} is a zarr group but not a stream-cqsa run store")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{loc} has store format version {meta.get('format_version')}; "
            f"this version of stream-cqsa reads version {FORMAT_VERSION}"
        )
    return group, Problem(**meta["problem"]), meta


def update_meta(group: zarr.Group, **changes: Any) -> dict:
    """Rewrite the store's metadata (driver only; tasks never touch attrs)."""
    meta = dict(group.attrs[ATTR])
    meta.update(changes)
    group.attrs[ATTR] = meta
    return meta
