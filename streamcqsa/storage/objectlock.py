"""The store lock on object storage: one object, created only if absent.

The same rules as the file lock (``lock``), on an object store's primitives:

- The lock is the object ``stream-cqsa.lock`` holding its owner record. It is
  created with a conditional write (S3's ``If-None-Match: *``, fsspec's
  ``mode="create"``), which the store itself makes atomic: of any number of
  contenders on any number of machines exactly one gets it, and an object
  appears whole or not at all, so it never exists without its owner.
- A lock is stale when its owner is gone: same host, pid not alive. A lock
  from another host is never stale: the error names the object to delete
  once that run is known to be dead. (A lease with an expiry would instead
  let a paused but live run lose its lock; a run must never share a store.)
- A stale lock is taken over by deleting exactly the version judged stale
  (S3's conditional ``DeleteObject`` with ``If-Match: <etag>``) and creating
  ours as above. Two takers of one stale lock cannot both win: only one
  delete of that version succeeds, and only one create after it.
- Backends with no conditional delete fall back to read, compare and delete,
  which two simultaneous takers of one stale lock could race; exclusive
  creation, and so the lock itself, still holds there. A backend with no
  exclusive create cannot lock a store, and says so.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from streamcqsa.errors import StoreBusyError, StoreError
from streamcqsa.storage.lock import (
    LOCK_NAME,
    TAKEOVER_WAIT_S,
    _parse,
    _Seen,
    busy_message,
    owner_record,
)


class ObjectLock:
    """Context manager: exclusive use of a store at a URL."""

    def __init__(self, location: Any) -> None:
        self.location = location
        self.taken_over: dict | None = None
        self._raw: bytes | None = None

    @property
    def name(self) -> str:
        return f"{self.location}/{LOCK_NAME}"

    def __enter__(self) -> ObjectLock:
        fs, root = self.location.filesystem()
        key = f"{root}/{LOCK_NAME}"
        raw, _ = owner_record()
        removed: dict | None = None
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while True:
            if self._create(fs, key, raw):
                break
            found = self._read(fs, key)
            if found is not None:
                seen, etag = found
                if not seen.stale:
                    raise StoreBusyError(busy_message(self.location, self.name, seen.owner))
                if self._delete(fs, key, seen, etag):
                    removed = seen.owner or {}
            if time.monotonic() > deadline:
                raise StoreBusyError(
                    f"could not take {self.name}: other processes kept taking and releasing it"
                )
            time.sleep(0.01)
        self.taken_over = removed
        self._raw = raw
        return self

    def __exit__(self, *exc: object) -> None:
        if self._raw is None:
            return
        fs, root = self.location.filesystem()
        key = f"{root}/{LOCK_NAME}"
        found = self._read(fs, key)
        if found is not None and found[0].raw == self._raw:
            self._delete(fs, key, found[0], found[1])
        self._raw = None

    # -- primitives -----------------------------------------------------------

    def _create(self, fs: Any, key: str, raw: bytes) -> bool:
        """Write the lock only if no object has its name; False if one has."""
        try:
            fs.pipe_file(key, raw, mode="create")
        except FileExistsError:
            return False
        except TypeError as e:
            raise StoreError(
                f"{type(fs).__name__} cannot create an object only if it is absent, so a "
                f"store at {self.location} cannot be locked: {e}"
            ) from e
        except PermissionError as e:
            raise StoreError(f"store {self.location} is not writable: {e}") from e
        return True

    @staticmethod
    def _read(fs: Any, key: str) -> tuple[_Seen, str | None] | None:
        """The lock as it is now and its etag, or None if it does not exist.

        The etag is read before and after the body: if they differ the lock
        changed meanwhile, and it is read again, so the body and the etag are
        always of one version.
        """
        for _ in range(100):
            fs.invalidate_cache(key)
            try:
                before = fs.info(key)
                raw = fs.cat_file(key)
                after = fs.info(key)
            except FileNotFoundError:
                return None
            etag = before.get("ETag")
            if etag != after.get("ETag"):
                continue
            ident = etag or hashlib.blake2b(raw, digest_size=12).hexdigest()
            modified = before.get("LastModified") or before.get("mtime") or before.get("created")
            age = time.time() - modified.timestamp() if hasattr(modified, "timestamp") else 0.0
            return _Seen(str(ident), raw, _parse(raw), age), etag
        raise StoreBusyError(f"{key} keeps changing: other processes are taking it")

    @staticmethod
    def _delete(fs: Any, key: str, seen: _Seen, etag: str | None) -> bool:
        """Delete the lock if it is still the version in ``seen``; True if we did."""
        if etag is not None and hasattr(fs, "call_s3"):
            bucket, obj, _ = fs.split_path(key)
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=obj, IfMatch=etag)
            except (OSError, FileNotFoundError):
                return False  # another version now, or gone: read it again
            finally:
                fs.invalidate_cache(key)
            return True
        fs.invalidate_cache(key)
        try:
            if fs.cat_file(key) != seen.raw:
                return False
            fs.rm(key)
        except FileNotFoundError:
            return False
        return True


__all__ = ["ObjectLock"]
