"""Checked reads: a corrupt or missing chunk is reported by array and chunk, never used.

Every array carries zarr's crc32c codec. zarr's own error does not say where
the bad chunk is, so reads go through ``checked_read``, which finds it.

zarr reads an absent chunk as the fill value, so a lost chunk file would
pass for zeros. Every array the pipeline reads is written whole before
anything reads it (inputs by ``create``, partials and outputs by the unit
that a done marker vouches for), and every writer stores each chunk even
when it is all fill value (zarr's default drops those), so an absent chunk
under a read is damage: ``checked_read`` (and ``chunkio.read``) raise
``MissingChunkError`` for it. zarr 3.1 has no setting for that, hence the
existence check here. The one legitimate exception is the progress markers,
where "never written" means "not done": their reads pass ``missing_ok=True``.

``scan`` decodes every stored chunk of an array and ``stored_chunks`` lists
them, for ``repair``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamcqsa.errors import CorruptChunkError, MissingChunkError, StoreError  # noqa: F401


def _is_checksum_error(e: Exception) -> bool:
    return "checksum" in str(e).lower()


def chunk_ranges(arr: Any, sel: tuple[slice | int, ...]) -> list[tuple[int, ...]]:
    """Chunk coordinates a basic selection touches (none for an empty one)."""
    coords = []
    for s, c, n in zip(sel, arr.chunks, arr.shape, strict=False):
        if not isinstance(s, slice):
            i = int(s) % n if n else int(s)
            coords.append(range(i // c, i // c + 1))
        else:
            a, z, _ = s.indices(n)
            coords.append(range(a // c, (z - 1) // c + 1) if z > a else range(0))
    for c, n in zip(arr.chunks[len(sel) :], arr.shape[len(sel) :], strict=True):
        coords.append(range(0, -(-n // c)))
    return list(itertools.product(*coords))


def all_chunks(arr: Any) -> list[tuple[int, ...]]:
    """Every chunk coordinate of ``arr``'s grid."""
    return list(
        itertools.product(*(range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks, strict=True)))
    )


def _chunk_sel(arr: Any, coord: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(i * c, min((i + 1) * c, n))
        for i, c, n in zip(coord, arr.chunks, arr.shape, strict=True)
    )


def chunk_key(arr: Any, coord: tuple[int, ...]) -> str:
    """The store key of one chunk of ``arr``."""
    key = arr.metadata.encode_chunk_key(tuple(int(i) for i in coord))
    return f"{arr.path}/{key}" if arr.path else key


def local_root(arr: Any) -> Path | None:
    """The directory of a local store (its chunk files can be used directly)."""
    from zarr.storage import LocalStore

    store = arr.store
    return Path(store.root) if isinstance(store, LocalStore) else None


def absent(arr: Any, coords: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The chunks among ``coords`` that are not stored, in the given order."""
    coords = list(coords)
    root = local_root(arr)
    if root is not None:
        return [c for c in coords if not (root / chunk_key(arr, c)).is_file()]
    from zarr.core.sync import sync

    sem = asyncio.Semaphore(64)

    async def one(c: tuple[int, ...]) -> bool:
        async with sem:
            return await arr.store.exists(chunk_key(arr, c))

    async def _exists() -> list[bool]:
        return list(await asyncio.gather(*(one(c) for c in coords)))

    found = sync(_exists()) if coords else []
    return [c for c, ok in zip(coords, found, strict=True) if not ok]


def missing_error(arr: Any, gone: list[tuple[int, ...]]) -> MissingChunkError:
    """The error for the first of ``gone`` (the count says if there are more)."""
    more = f" (one of {len(gone)} missing chunks of this read)" if len(gone) > 1 else ""
    return MissingChunkError(arr.path, gone[0], more)


def checked_read(arr: Any, sel: tuple[slice | int, ...], *, missing_ok: bool = False) -> Any:
    """``arr[sel]``, but a chunk that fails its checksum, or (unless
    ``missing_ok``) is not stored, raises an error naming the array and chunk."""
    if not missing_ok:
        gone = absent(arr, chunk_ranges(arr, sel))
        if gone:
            raise missing_error(arr, gone)
    try:
        return arr[sel]
    except ValueError as e:
        if not _is_checksum_error(e):
            raise
        for coord in chunk_ranges(arr, sel):
            try:
                arr[_chunk_sel(arr, coord)]
            except ValueError as inner:
                if _is_checksum_error(inner):
                    raise CorruptChunkError(arr.path, coord) from None
        raise CorruptChunkError(arr.path, (), f" ({e})") from None


def stored_chunks(arr: Any) -> list[tuple[int, ...]]:
    """Coordinates of the chunks that exist in the store (sync listing)."""
    from zarr.core.sync import sync

    async def _list() -> list[str]:
        return [k async for k in arr.store.list_prefix(f"{arr.path}/c/")]

    out = []
    for key in sync(_list()):
        if key.endswith(".partial"):
            continue
        parts = key[len(arr.path) + 3 :].split("/")
        try:
            out.append(tuple(int(p) for p in parts))
        except ValueError:
            continue
    return sorted(out)


def scan(arr: Any) -> list[tuple[int, ...]]:
    """Chunks of ``arr`` that fail their checksum."""
    bad = []
    for coord in stored_chunks(arr):
        try:
            arr[_chunk_sel(arr, coord)]
        except ValueError as e:
            if _is_checksum_error(e):
                bad.append(coord)
            else:
                raise
    return bad
