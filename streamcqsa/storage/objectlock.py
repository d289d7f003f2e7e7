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
- Only backends whose conditional writes the store itself enforces can lock
  a store: S3 and S3-compatible servers (checked: the installed botocore must
  send ``If-None-Match`` and ``If-Match``, or s3fs would drop them silently),
  and ``memory://`` (one process; its check-then-write runs under a process
  lock). Any other backend is refused, naming it: fsspec's generic
  ``mode="create"`` is a check, then a write, which two machines can both pass.
- A conditional write that races a delete of the same key (S3 answers 409,
  ConditionalRequestConflict) is retried; any other error of the store is
  raised as a StoreError naming the lock, never taken for a lost race.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import threading
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
        return self.location._reach(self._enter)  # a StoreError names an unreachable store

    def _enter(self) -> ObjectLock:
        fs, root = self.location.filesystem()
        _check_backend(fs, str(self.location))
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
            with _process_lock(fs):
                fs.pipe_file(key, raw, mode="create")
        except FileExistsError:
            return False
        except PermissionError as e:
            raise StoreError(f"store {self.location} is not writable: {e}") from e
        except OSError as e:
            if _conflict(e):
                return False  # raced a delete of the lock: read it again
            raise StoreError(f"could not create the lock {self.name}: {e}") from e
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

    def _delete(self, fs: Any, key: str, seen: _Seen, etag: str | None) -> bool:
        """Delete the lock if it is still the version in ``seen``; True if we did."""
        if hasattr(fs, "call_s3"):
            bucket, obj, _ = fs.split_path(key)
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=obj, IfMatch=etag or "*")
            except FileNotFoundError:
                return False  # gone: read it again
            except OSError as e:
                if e.errno == errno.EINVAL or _conflict(e):  # 412: another version now
                    return False
                raise StoreError(f"could not delete the lock {self.name}: {e}") from e
            finally:
                fs.invalidate_cache(key)
            return True
        with _process_lock(fs):  # memory://: one process, compare and delete as one step
            fs.invalidate_cache(key)
            try:
                if fs.cat_file(key) != seen.raw:
                    return False
                fs.rm(key)
            except FileNotFoundError:
                return False
        return True


_MEMORY_LOCK = threading.Lock()


def _process_lock(fs: Any) -> Any:
    """memory://'s conditional writes: check and write as one step, in-process."""
    import contextlib

    return _MEMORY_LOCK if "memory" in _protocols(fs) else contextlib.nullcontext()


def _protocols(fs: Any) -> tuple[str, ...]:
    p = getattr(fs, "protocol", ())
    return (p,) if isinstance(p, str) else tuple(p)


def _conflict(e: BaseException) -> bool:
    """S3's 409 ConditionalRequestConflict (a conditional write raced another)."""
    resp = getattr(e.__cause__, "response", None) or {}
    code = resp.get("Error", {}).get("Code")
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code == "ConditionalRequestConflict" or status == 409


def _check_backend(fs: Any, where: str) -> None:
    protocols = _protocols(fs)
    if "memory" in protocols:
        return
    if "s3" in protocols:
        if not _botocore_conditionals():
            raise StoreError(
                f"cannot lock {where}: the installed botocore does not send S3's "
                "conditional writes (If-None-Match, If-Match); pip install 'botocore>=1.36'"
            )
        return
    raise StoreError(
        f"cannot lock {where}: stream-cqsa locks stores on S3-compatible object storage "
        f"(conditional writes) and local directories; {type(fs).__name__} offers no "
        "atomic create-if-absent"
    )


@functools.cache
def _botocore_conditionals() -> bool:
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    put = model.operation_model("PutObject").input_shape.members
    delete = model.operation_model("DeleteObject").input_shape.members
    return "IfNoneMatch" in put and "IfMatch" in delete


__all__ = ["ObjectLock"]
