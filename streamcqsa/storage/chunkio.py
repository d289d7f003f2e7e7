"""Fast whole-chunk I/O for the store's own arrays (raw bytes + crc32c).

Every array the pipeline reads in its hot path is uncompressed little-endian
bytes followed by a crc32c trailer: zarr's format, written and read here
without zarr's per-chunk codec pipeline, all chunks of a selection fetched
concurrently. zarr reads what this writes and the other way round. Arrays
with any other codecs take zarr's own path.

Chunk files of a local store go through a small pool of plain threads; other
stores through zarr's event loop. A local read or write is a copy to or from
the page cache and a crc, work for a core rather than a wait, so threads
beyond the cores only take turns, and each hop through an event loop costs
more than the copy of a small chunk (docs/speed.md).

A chunk a read needs that is not stored raises ``MissingChunkError`` (see
``integrity``), unless the caller passes ``missing_ok``. Writes always store
every chunk, even one that is all fill value, so that "absent" never means
"zeros" in an array this module wrote.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from streamcqsa.storage.integrity import (
    CorruptChunkError,
    checked_read,
    local_root,
    missing_error,
)

_PROTO = default_buffer_prototype()
_CONCURRENCY = 64  # requests in flight to a store other than local files

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _local_threads() -> int:
    """Threads for local chunk files: the cores and two more, at most 8 (a
    file not in the page cache waits on the disk meanwhile)."""
    return min(8, (os.cpu_count() or 1) + 2)


def _each(fn: Callable[..., Any], jobs: Sequence[tuple]) -> list:
    """``fn(*job)`` for every job, on the local-file threads; every one is
    waited for (they fill the caller's memory), then the first failure in
    ``jobs`` order is raised. The jobs never wait on each other."""
    global _pool
    if len(jobs) < 2:
        return [fn(*job) for job in jobs]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_local_threads(), thread_name_prefix="streamcqsa-chunkio")
        pool = _pool
    futures = [pool.submit(fn, *job) for job in jobs]
    wait(futures)
    return [f.result() for f in futures]


def _after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # the parent's threads do not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def fast_path(arr: Any) -> bool:
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    enc = getattr(meta, "chunk_key_encoding", None)
    return (
        len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and isinstance(codecs[1], Crc32cCodec)
        and getattr(enc, "separator", None) == "/"
        and type(enc).__name__ == "DefaultChunkKeyEncoding"
        and np.dtype(arr.dtype).byteorder in ("<", "=", "|")
    )


def _norm(arr: Any, sel: tuple) -> tuple[list[tuple[int, int]], list[bool]]:
    bounds, keep = [], []
    for d, n in enumerate(arr.shape):
        s = sel[d] if d < len(sel) else slice(None)
        if isinstance(s, slice):
            a, z, step = s.indices(n)
            if step != 1:
                raise ValueError("strided selections are not supported")
            bounds.append((a, max(a, z)))
            keep.append(True)
        else:
            i = int(s)
            bounds.append((i, i + 1))
            keep.append(False)
    return bounds, keep


def _chunks(arr: Any, bounds: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    ranges = [
        range(a // c, (z - 1) // c + 1) if z > a else range(0)
        for (a, z), c in zip(bounds, arr.chunks, strict=True)
    ]
    return list(itertools.product(*ranges))


def _key(arr: Any, coord: tuple[int, ...]) -> str:
    return f"{arr.path}/c/" + "/".join(str(i) for i in coord)


async def _gather(coros: list) -> list:
    sem = asyncio.Semaphore(_CONCURRENCY)

    async def one(c):  # noqa: ANN001, ANN202
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


def _whole_chunk_pieces(
    arr: Any, bounds: list[tuple[int, int]], coord: tuple[int, ...], full: np.ndarray
) -> list[np.ndarray] | None:
    """A full (not edge) chunk of ``full`` as C-contiguous pieces in chunk
    byte order, or None (edge chunk: it needs padding, so it is staged)."""
    src = []
    for (a, z), c, i, n in zip(bounds, arr.chunks, coord, arr.shape, strict=True):
        lo, hi = i * c, min((i + 1) * c, n)
        if lo < a or hi > z:
            raise ValueError(f"write to {arr.path} covers chunk {coord} only in part")
        if hi - lo < c:
            return None
        src.append(slice(lo - a, hi - a))
    out: list[np.ndarray] = []
    stack = [full[tuple(src)]]
    while stack:  # split along leading axes until every piece is contiguous
        v = stack.pop()
        if v.flags.c_contiguous:
            out.append(v)
        else:
            stack.extend(reversed(list(v)))
    return out


def _write_file(path: Path, pieces: list[np.ndarray]) -> None:
    """Write pieces + crc32c trailer atomically (temp file, then rename), the
    way zarr's LocalStore does, so readers never see a torn chunk and a kill
    leaves only a ``*.partial`` orphan."""
    crc = 0
    views = []
    for p in pieces:
        b = p.reshape(-1).view(np.uint8)  # a view: p is C-contiguous
        b.flags.writeable = False  # crc32c's extend takes read-only buffers only
        crc = google_crc32c.extend(crc, b)
        views.append(memoryview(b))
    views.append(memoryview(np.uint32(crc).tobytes()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # umask applies
        try:
            want = sum(v.nbytes for v in views)
            done = 0
            while views:
                n = os.writev(fd, views[:1024])
                done += n
                while views and n >= views[0].nbytes:  # drop what went out whole
                    n -= views[0].nbytes
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
            if done != want:
                raise OSError(f"short write to {tmp}")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_into(path: Path, dst: np.ndarray) -> bool:
    """Read a chunk file straight into ``dst`` (C-contiguous); False if absent.
    Raises CorruptChunkError-worthy ValueError on a short file or bad crc."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return False
    with f:
        body = dst.reshape(-1).view(np.uint8)  # a view: dst is C-contiguous
        if f.readinto(memoryview(body)) != body.size:
            raise ValueError("short chunk")
        trailer = f.read(5)
    if len(trailer) != 4 or np.uint32(google_crc32c.value(body)).tobytes() != trailer:
        raise ValueError("bad crc32c")
    return True


def read(
    arr: Any, sel: tuple, out: np.ndarray | None = None, *, missing_ok: bool = False
) -> np.ndarray:
    """``arr[sel]`` for basic selections; checks every chunk's crc32c.

    With ``out`` (shaped like the selection with every dimension kept) the
    data lands there, whole chunks straight from their files. A chunk that
    is not stored raises ``MissingChunkError`` naming the first one, unless
    ``missing_ok`` (then it reads as the fill value, as in zarr).
    """
    bounds, keep = _norm(arr, sel)
    if out is not None:
        want = tuple(z - a for a, z in bounds)
        if out.shape != want or out.dtype != np.dtype(arr.dtype):
            raise ValueError(f"out is {out.dtype}{out.shape}, the selection {arr.dtype}{want}")
    if not fast_path(arr):
        data = np.asarray(checked_read(arr, sel, missing_ok=missing_ok))
        if out is None:
            return data
        out[...] = data.reshape(out.shape)
        return out
    dtype = np.dtype(arr.dtype)
    if out is None:
        out = np.empty([z - a for a, z in bounds], dtype=dtype)
    coords = _chunks(arr, bounds)
    fill = arr.metadata.fill_value
    places = []
    for coord in coords:
        src, dst = [], []
        whole = True
        for (a, z), c, i in zip(bounds, arr.chunks, coord, strict=True):
            lo, hi = max(a, i * c), min(z, (i + 1) * c)
            src.append(slice(lo - i * c, hi - i * c))
            dst.append(slice(lo - a, hi - a))
            whole &= hi - lo == c  # the chunk lies wholly inside the selection
        places.append((coord, tuple(src), tuple(dst), whole))
    root = local_root(arr)
    rest = []
    gone: list[tuple[int, ...]] = []
    if root is not None:  # local files: whole chunks land in place, no extra copy
        fast = [p[3] and out[p[2]].flags.c_contiguous for p in places]
        direct = [p for p, f in zip(places, fast, strict=True) if f]
        rest = [p for p, f in zip(places, fast, strict=True) if not f]

        def one(coord: tuple[int, ...], dst: tuple) -> None:
            region = out[dst]
            try:
                found = _read_into(root / _key(arr, coord), region)
            except ValueError:
                raise CorruptChunkError(arr.path, coord) from None
            if not found:
                gone.append(coord)
                region[...] = fill

        _each(one, [(c, d) for c, _, d, _ in direct])
    else:
        rest = places
    gets = [arr.store.get(_key(arr, c), _PROTO) for c, _, _, _ in rest]
    bufs = sync(_gather(gets)) if gets else []
    for (coord, src, dst, _), buf in zip(rest, bufs, strict=True):
        if buf is None:
            gone.append(coord)
            out[dst] = fill
            continue
        raw = buf.as_numpy_array()
        body = raw[:-4]
        if np.uint32(google_crc32c.value(body)).tobytes() != raw[-4:].tobytes():
            raise CorruptChunkError(arr.path, coord)
        chunk = body.view(dtype).reshape(arr.chunks)
        out[dst] = chunk[src]
    if gone and not missing_ok:
        raise missing_error(arr, sorted(gone))
    return out[tuple(slice(None) if k else 0 for k in keep)]


def write(arr: Any, sel: tuple, data: np.ndarray) -> None:
    """``arr[sel] = data`` where sel covers whole chunks (edge chunks padded)."""
    if not fast_path(arr):  # zarr would drop a chunk that is all fill value
        arr.with_config({"write_empty_chunks": True})[sel] = data
        return
    bounds, keep = _norm(arr, sel)
    dtype = np.dtype(arr.dtype)
    full = np.asarray(data, dtype=dtype).reshape([z - a for a, z in bounds])
    coros = []
    files: list[tuple[Path, list[np.ndarray]]] = []
    nbytes = int(np.prod(arr.chunks)) * dtype.itemsize
    root = local_root(arr)
    for coord in _chunks(arr, bounds):
        if root is not None:
            pieces = _whole_chunk_pieces(arr, bounds, coord, full)
            if pieces is not None:  # straight from the caller's memory to the file
                files.append((root / _key(arr, coord), pieces))
                continue
        # one copy per chunk: the data goes straight into the encoded bytes
        raw = np.empty(nbytes + 4, dtype=np.uint8)
        chunk = raw[:nbytes].view(dtype).reshape(arr.chunks)
        src, dst = [], []
        edge = False
        for (a, z), c, i, n in zip(bounds, arr.chunks, coord, arr.shape, strict=True):
            lo, hi = i * c, min((i + 1) * c, n)
            if lo < a or hi > z:
                raise ValueError(f"write to {arr.path} covers chunk {coord} only in part")
            src.append(slice(lo - a, hi - a))
            dst.append(slice(0, hi - lo))
            edge |= hi - lo < c
        if edge:
            chunk.fill(arr.metadata.fill_value)
        chunk[tuple(dst)] = full[tuple(src)]
        raw[nbytes:] = np.frombuffer(
            np.uint32(google_crc32c.value(raw[:nbytes])).tobytes(), dtype=np.uint8
        )
        coros.append(arr.store.set(_key(arr, coord), _PROTO.buffer.from_array_like(raw)))
    _each(_write_file, files)
    if coros:
        sync(_gather(coros))
    del keep
