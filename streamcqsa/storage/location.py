"""Where a run store lives: a local directory, a URL, or a zarr store object.

Every store argument is resolved here once (``Location.of``), and every
difference between the three kinds is decided here:

- A ``str`` or ``os.PathLike`` without a scheme (or with ``file://``) is a
  local directory. Chunks are read and written as files directly, the lock is
  a file, and the free space is checked before a pass.
- A URL (``s3://bucket/prefix``, ``gs://…``, ``memory://…``: any protocol
  fsspec knows) is opened through zarr's ``FsspecStore`` with
  ``storage_options`` exactly as zarr and fsspec take them. Every chunk goes
  through the store API; the lock is an object created only if absent (see
  ``objectlock``). Object stores report no free space, so no disk check runs.
- A zarr store object (``MemoryStore``, …) is used as it is: it lives in this
  process, is never locked (nothing else can reach it) and is never reopened
  by workers, so it cannot serve a distributed run.

A Location pickles to its URL and options, so a distributed worker reopens
the same store; it never carries a live connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamcqsa.errors import StoreError


def _scheme(s: str) -> str | None:
    head, sep, _ = s.partition("://")
    return head.lower() if sep and head.replace("+", "").replace("-", "").isalnum() else None


@dataclass(frozen=True, eq=False)
class Location:
    """A resolved store argument; build it with ``Location.of``."""

    local: Path | None = None
    url: str | None = None
    storage_options: dict = field(default_factory=dict)
    obj: Any = None

    @classmethod
    def of(cls, path: Any, storage_options: dict | None = None) -> Location:
        """Resolve a store argument (a Location passes through unchanged)."""
        if isinstance(path, Location):
            if storage_options and path.storage_options != storage_options:
                raise ValueError("storage_options given twice, and they differ")
            return path
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {storage_options!r}")
        if isinstance(path, (str, os.PathLike)):
            s = os.fspath(path)
            if isinstance(s, bytes):
                raise TypeError(f"store path must be str, got bytes {s!r}")
            if "::" in s and "://" in s:
                raise ValueError(
                    f"chained URLs ({s!r}) are not supported: give the store's own URL"
                )
            scheme = _scheme(s)
            if scheme in (None, "file", "local"):
                if storage_options:
                    raise ValueError("storage_options apply to URLs, not local paths")
                if scheme:
                    from urllib.parse import urlparse
                    from urllib.request import url2pathname

                    s = url2pathname(urlparse(s).path)
                # absolute: a distributed worker may run in another directory
                return cls(local=Path(s).expanduser().absolute())
            rest = s.partition("://")[2].rstrip("/")
            if not rest:
                raise ValueError(f"the URL {s!r} names no bucket or path")
            _backend(scheme)
            return cls(url=f"{scheme}://{rest}", storage_options=dict(storage_options or {}))
        if storage_options:
            raise ValueError("storage_options apply to URLs, not store objects")
        return cls(obj=path)

    # -- what kind ----------------------------------------------------------

    @property
    def named(self) -> bool:
        """Reachable by name (a directory or a URL): lockable, reopened by workers."""
        return self.obj is None

    @property
    def remote(self) -> bool:
        return self.url is not None

    def __str__(self) -> str:
        if self.local is not None:
            return str(self.local)
        return self.url if self.url is not None else repr(self.obj)

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Location):
            return NotImplemented
        return (self.local, self.url, self.storage_options, id(self.obj)) == (
            other.local,
            other.url,
            other.storage_options,
            id(other.obj),
        )

    __hash__ = None  # type: ignore[assignment]

    def child(self, name: str) -> Location:
        """The location of ``name`` inside this one (same kind and options)."""
        if self.local is not None:
            return Location(local=self.local / name)
        if self.url is not None:
            return Location(url=f"{self.url}/{name}", storage_options=self.storage_options)
        raise StoreError("a store object has no named children")

    # -- zarr ---------------------------------------------------------------

    def zarr_store(self, *, read_only: bool = False) -> Any:
        import zarr

        if self.local is not None:
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        if self.url is not None:
            return zarr.storage.FsspecStore.from_url(
                self.url, storage_options=dict(self.storage_options), read_only=read_only
            )
        return self.obj

    # -- plain objects beside the arrays (lock, listings, sizes) -------------

    def filesystem(self) -> tuple[Any, str]:
        """A synchronous fsspec filesystem and this store's root path in it."""
        if self.url is None:
            raise StoreError(f"{self} is not a URL store")
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, root.rstrip("/")

    def key(self, name: str) -> str:
        """The filesystem path of ``name`` inside a URL store."""
        return f"{self.filesystem()[1]}/{name}"

    def _reach(self, fn: Any) -> Any:
        """Call the backend; a store that cannot be reached (credentials,
        endpoint, network, permissions) is a StoreError naming the URL and the
        backend's own reason, whatever error type the backend raises."""
        try:
            return fn()
        except (StoreError, FileNotFoundError):
            raise
        except Exception as e:  # each backend has its own error types
            raise StoreError(f"cannot reach {self}: {type(e).__name__}: {e}") from e

    def exists(self) -> bool:
        """Something is stored at this location (a directory, or any object)."""
        if self.local is not None:
            return self.local.exists()
        fs, root = self.filesystem()

        def ls() -> bool:
            fs.invalidate_cache(root)
            try:
                return bool(fs.ls(root, detail=False))
            except FileNotFoundError:
                return False

        return self._reach(ls)

    def is_store(self) -> bool:
        """A zarr group's metadata is here (zarr.json)."""
        return self.read_bytes("zarr.json") is not None

    def read_bytes(self, name: str) -> bytes | None:
        """The object or file ``name``, or None when absent."""
        try:
            if self.local is not None:
                return (self.local / name).read_bytes()
            if self.url is not None:
                fs, root = self.filesystem()
                return self._reach(lambda: fs.cat_file(f"{root}/{name}"))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return None

    def entries(self) -> list[str]:
        """Names directly inside this location."""
        if self.local is not None:
            return [e.name for e in self.local.iterdir()] if self.local.is_dir() else []
        fs, root = self.filesystem()

        def ls() -> list[str]:
            fs.invalidate_cache(root)
            try:
                return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
            except FileNotFoundError:
                return []

        return self._reach(ls)

    def remove(self, name: str) -> None:
        """Delete ``name`` and everything under it (absent: nothing to do)."""
        if self.local is not None:
            import shutil

            p = self.local / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            return
        fs, root = self.filesystem()
        try:
            fs.rm(f"{root}/{name}", recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(root)

    def size(self, name: str) -> int:
        """Bytes stored under ``name`` (0 when absent)."""
        if self.local is not None:
            base = self.local / name
            if base.is_file():
                return base.stat().st_size
            total = 0
            for dirpath, _, files in os.walk(base):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, f))
                    except FileNotFoundError:  # removed while we walked
                        pass
            return total
        if self.url is None:
            return 0
        fs, root = self.filesystem()
        fs.invalidate_cache(f"{root}/{name}")
        try:
            return int(fs.du(f"{root}/{name}"))
        except FileNotFoundError:
            return 0

    def free_bytes(self) -> int | None:
        """Free space for the store, or None where it has no limit we can read."""
        if self.local is None:
            return None
        import shutil

        return shutil.disk_usage(self.local).free


def _backend(scheme: str) -> None:
    """Fail early, and clearly, when the URL's fsspec backend is not installed."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - zarr depends on fsspec for URLs
        raise ImportError("stores at URLs need fsspec: pip install fsspec") from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(
            f"unknown storage protocol {scheme!r} (fsspec knows no such backend)"
        ) from None
    except ImportError as e:
        pkg = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}
        hint = pkg.get(scheme, "the fsspec backend for it")
        raise ImportError(f"stores at {scheme}:// URLs need {hint}: pip install {hint}") from e


__all__ = ["Location"]
