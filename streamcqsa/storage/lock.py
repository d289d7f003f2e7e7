"""One driver per store: a lock file naming its owner (pid, host, start time).

Only the driver of a run takes the lock; the workers of one distributed run
are not separate runs. Rules:

- The lock is the file's existence, and it never exists without its owner:
  the owner record is written to a private temporary file first and
  hard-linked to the lock's name, which fails if the name exists, so of any
  number of contenders exactly one gets it and every loser can name it.
  Where the filesystem has no hard links the file is created exclusively and
  then written; a contender that finds it still unwritten waits a moment.
- A lock whose owner cannot be read is being written by a live process, never
  stale, unless it is older than ``UNREADABLE_STALE_S``.
- A lock is stale when its owner is gone: same host, pid not alive. Taking
  one over is itself guarded by a lock: the taker first takes a *claim* named
  after that exact lock file (device, inode, mtime, content) by the same link
  rule, checks the lock is still that file, and only then replaces it, by an
  atomic rename (the lock never vanishes, so no newcomer slips in). Two
  takers of one stale lock cannot both win; a taker that died holding its claim
  left a stale claim, which is taken over the same way.
- A lock from another host is never stale (its pid means nothing here): the
  error names the file to remove once that run is known to be dead.

A store at a URL is locked by ``objectlock`` under the same rules. Building a
store's new contents under the lock is ``replace``'s job.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamcqsa.errors import StoreBusyError, StoreError

LOCK_NAME = "stream-cqsa.lock"
UNREADABLE_STALE_S = 60.0  # an owner not written after this long was abandoned
OWNER_WAIT_S = 1.0  # how long to wait for an owner being written to appear
TAKEOVER_WAIT_S = 10.0  # how long to wait for another process's takeover to finish
_MAX_CLAIM_DEPTH = 2  # a claim on a claim covers one dead taker; deeper is refused
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class _Seen:
    """One read of a lock (or claim) file: which file it is and whom it names."""

    ident: str  # device, inode, mtime and content: this file, not just its name
    raw: bytes
    owner: dict | None  # None: empty or not (yet) a complete owner record
    age: float

    @property
    def stale(self) -> bool:
        if self.owner is None:
            return self.age > UNREADABLE_STALE_S
        return self.owner["host"] == socket.gethostname() and not _alive(self.owner["pid"])


def _parse(raw: bytes) -> dict | None:
    try:
        owner = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(owner, dict):
        return None
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1 or not isinstance(host, str):
        return None
    return owner


def _read(file: Path) -> _Seen | None:
    """The file as it is now, or None if it does not exist."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    key = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:".encode() + raw
    ident = hashlib.blake2b(key, digest_size=12).hexdigest()
    return _Seen(ident, raw, _parse(raw), time.time() - st.st_mtime)


def owner_record() -> tuple[bytes, str]:
    """This process's owner record for a lock, and its unique token."""
    token = secrets.token_hex(8)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "token": token}
    return json.dumps(me).encode(), token


class _Held(Exception):
    """Internal: the file is held by the owner in ``seen``."""

    def __init__(self, seen: _Seen) -> None:
        self.seen = seen


class StoreLock:
    """Context manager: exclusive use of a directory store (no-op in memory).

    Raises StoreBusyError naming the owner when another run holds the store.
    """

    def __init__(self, path: Any) -> None:
        from streamcqsa.storage.location import Location

        loc = Location.of(path)
        self.file = loc.local / LOCK_NAME if loc.local is not None else None
        self.taken_over: dict | None = None  # the stale owner replaced, if any
        self._raw: bytes | None = None  # our owner record while we hold the lock
        self._links = True
        self._object: Any = None
        if loc.remote:  # an object store: the same rules on its primitives
            from streamcqsa.storage.objectlock import ObjectLock

            self._object = ObjectLock(loc)

    def __enter__(self) -> StoreLock:
        if self._object is not None:
            self._object.__enter__()
            self.taken_over = self._object.taken_over
            return self
        if self.file is None:
            return self
        raw, token = owner_record()
        tmp = self.file.with_name(f"{LOCK_NAME}.{os.getpid()}.{token}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:
            raise StoreError(f"no run store at {self.file.parent}: path does not exist") from None
        except OSError as e:
            raise StoreError(f"store {self.file.parent} is not writable: {e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            self._take(self.file, tmp, raw, 0)
        except FileNotFoundError:
            raise StoreError(f"store {self.file.parent} was removed while locking it") from None
        except _Held as h:
            raise StoreBusyError(self._busy(h.seen)) from None
        finally:
            tmp.unlink(missing_ok=True)
        self._raw = raw
        self._sweep()
        return self

    def _take(self, target: Path, tmp: Path, raw: bytes, depth: int) -> None:
        """Make ``target`` ours (linked to ``tmp``) or raise _Held naming its owner."""
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while True:
            if self._place(tmp, target, raw):
                return
            seen = _read(target)
            if seen is not None and seen.owner is None and not seen.stale:
                seen = self._await_owner(target, seen)
            if seen is None:
                pass  # released meanwhile: try again
            elif not seen.stale or depth >= _MAX_CLAIM_DEPTH:
                raise _Held(seen)
            elif self._take_over(target, seen, tmp, raw, depth, deadline):
                return
            if time.monotonic() > deadline:
                raise StoreBusyError(
                    f"could not take {target}: other processes kept taking and releasing it"
                )
            time.sleep(0.001)

    def _take_over(
        self, target: Path, seen: _Seen, tmp: Path, raw: bytes, depth: int, deadline: float
    ) -> bool:
        """Replace the stale ``target`` (as read in ``seen``) under a claim on it.

        Only the claim's holder may replace the file, and only while it is still
        the one judged stale. False: another process holds the claim, or the
        lock changed since it was read; the caller reads it again.
        """
        claim = target.with_name(f"{target.name}.takeover-{seen.ident}")
        try:
            self._take(claim, tmp, raw, depth + 1)
        except _Held:
            if time.monotonic() > deadline:
                raise  # named: the process that has been taking it over all this time
            return False  # a live process is taking it over: see what it leaves
        try:
            now = _read(target)
            if now is None or now.ident != seen.ident:
                return False
            # one atomic step: the lock never vanishes, so no newcomer slips in
            swap = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.swap")
            try:
                swap.write_bytes(raw)
                os.replace(swap, target)
            finally:
                swap.unlink(missing_ok=True)
            if depth == 0:
                self.taken_over = seen.owner or {}
            return True
        finally:
            claim.unlink(missing_ok=True)

    def _place(self, tmp: Path, target: Path, raw: bytes) -> bool:
        """Create ``target`` holding our owner record, only if it does not exist."""
        if self._links:
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                # NFS may answer EEXIST to a retried link that did succeed
                try:
                    a, b = os.stat(target), os.stat(tmp)
                except FileNotFoundError:
                    return False
                return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise StoreError(f"could not create the lock {target}: {e}") from e
                self._links = False  # no hard links here: exclusive create, then write
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        return True

    @staticmethod
    def _await_owner(target: Path, seen: _Seen) -> _Seen | None:
        """Wait for the owner of a lock being written (exclusive create, then write)."""
        deadline = time.monotonic() + OWNER_WAIT_S
        while seen is not None and seen.owner is None and time.monotonic() < deadline:
            time.sleep(0.005)
            seen = _read(target)
        return seen

    def _busy(self, seen: _Seen) -> str:
        return busy_message(self.file.parent, self.file, seen.owner)  # type: ignore[union-attr]

    def _sweep(self) -> None:
        """Remove temporary and claim files that dead processes left (best effort)."""
        for f in self.file.parent.glob(f"{LOCK_NAME}.*"):  # type: ignore[union-attr]
            try:
                seen = _read(f)
                if seen is not None and seen.owner is not None and seen.stale:
                    f.unlink(missing_ok=True)
            except OSError:
                pass  # not ours to judge (a directory, no permission): leave it

    def __exit__(self, *exc: object) -> None:
        if self._object is not None:
            self._object.__exit__(*exc)
            return
        if self.file is None or self._raw is None:
            return
        seen = _read(self.file)
        if seen is not None and seen.raw == self._raw:
            self.file.unlink(missing_ok=True)
        self._raw = None


def busy_message(where: Any, file: Any, owner: dict | None) -> str:
    """The StoreBusyError text: who holds ``file``, and what to do if it is dead."""
    if owner is None:
        return (
            f"store {where} is in use: its lock {file} names no owner yet (a run is "
            f"starting); if no run is using the store, remove {file}"
        )
    since = owner.get("since", 0)
    since = time.ctime(since) if isinstance(since, (int, float)) else "?"
    return (
        f"store {where} is in use by pid {owner['pid']} on host {owner['host']} "
        f"(since {since}); if that run is dead on another host, remove {file}"
    )
