"""Every error stream-cqsa raises on purpose, in one place.

``StreamCQSAError`` is the base: the CLI catches it and prints its message
instead of a traceback. Each subclass also inherits the standard type a caller
would catch without knowing this library (a bad store is a ``ValueError``, a
full disk an ``OSError``, an exhausted device a ``RuntimeError``), so existing
``except ValueError`` code keeps working.

This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations


class StreamCQSAError(Exception):
    """Base of every error this library raises deliberately."""


class StoreError(StreamCQSAError, ValueError):
    """A path that is not a usable run store, or a store in the wrong state."""


class StoreBusyError(StoreError):
    """Another run holds the store's lock; the message names its owner."""


class PlanMismatchError(StoreError):
    """Unfinished work in the store was made under a different plan."""


class InputsChangedError(StoreError):
    """The store's inputs changed after a pass started or finished."""


class ChunkError(StoreError):
    """A chunk that the run vouches for cannot be used; names array and chunk."""

    def __init__(self, array: str, chunk: tuple[int, ...], message: str) -> None:
        self.array = array
        self.chunk = tuple(int(c) for c in chunk)
        super().__init__(message)


class CorruptChunkError(ChunkError):
    """A stored chunk failed its checksum."""

    def __init__(self, array: str, chunk: tuple[int, ...], detail: str = "") -> None:
        super().__init__(
            array,
            chunk,
            f"array '{array}' chunk {tuple(int(c) for c in chunk)} failed its crc32c "
            f"check{detail}; run `streamcqsa repair` on the store to recompute what "
            "depends on it",
        )


class MissingChunkError(ChunkError):
    """A chunk that finished work should have written is absent (it would
    otherwise read as zarr's fill value)."""

    def __init__(self, array: str, chunk: tuple[int, ...], detail: str = "") -> None:
        super().__init__(
            array,
            chunk,
            f"array '{array}' chunk {tuple(int(c) for c in chunk)} is missing{detail}; "
            "run `streamcqsa repair` on the store to recompute what depends on it",
        )


class DiskFullError(StreamCQSAError, OSError):
    """The store's filesystem ran out of space (or would, by the pre-run check)."""


class DeviceOOM(StreamCQSAError, RuntimeError):
    """Out of device memory (raised for CUDA OOM, budget overruns and injection)."""


__all__ = [
    "ChunkError",
    "CorruptChunkError",
    "DeviceOOM",
    "DiskFullError",
    "InputsChangedError",
    "MissingChunkError",
    "PlanMismatchError",
    "StoreBusyError",
    "StoreError",
    "StreamCQSAError",
]
