"""Checksummed reads: a corrupt chunk is reported by array and chunk, never used.

Every array carries zarr's crc32c codec. zarr's own error does not say where
the bad chunk is, so reads go through ``checked_read``, which finds it.
``scan`` decodes every stored chunk of some arrays, for ``repair``.
"""

from __future__ import annotations

import itertools
from typing import Any

from streamcqsa.errors import CorruptChunkError, MissingChunkError, StoreError  # noqa: F401


def _is_checksum_error(e: Exception) -> bool:
    return "checksum" in str(e).lower()


def chunk_ranges(arr: Any, sel: tuple[slice | int, ...]) -> list[tuple[int, ...]]:
    """Chunk coordinates a basic selection touches."""
    coords = []
    for s, c, n in zip(sel, arr.chunks, arr.shape, strict=False):
        if not isinstance(s, slice):
            i = int(s)
            coords.append(range(i // c, i // c + 1))
        else:
            a, z, _ = s.indices(n)
            coords.append(range(a // c, max(a, z - 1) // c + 1))
    for c, n in zip(arr.chunks[len(sel) :], arr.shape[len(sel) :], strict=True):
        coords.append(range(0, -(-n // c)))
    return list(itertools.product(*coords))


def _chunk_sel(arr: Any, coord: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(i * c, min((i + 1) * c, n))
        for i, c, n in zip(coord, arr.chunks, arr.shape, strict=True)
    )


def checked_read(arr: Any, sel: tuple[slice | int, ...]) -> Any:
    """``arr[sel]``, but a checksum failure names the array and the chunk."""
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
