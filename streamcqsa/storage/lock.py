"""One driver per store: a lock file naming its owner (pid, host, start time).

Only the driver of a run takes the lock; the workers of one distributed run
are not separate runs. A lock whose owner process is gone (same host, pid not
alive) is stale and is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from streamcqsa.storage.store import StoreError

LOCK_NAME = "stream-cqsa.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Context manager: exclusive use of a directory store (no-op in memory)."""

    def __init__(self, path: Any) -> None:
        self.file = Path(path) / LOCK_NAME if isinstance(path, (str, os.PathLike)) else None
        self.taken_over: dict | None = None

    def __enter__(self) -> StoreLock:
        if self.file is None:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or self._stale(owner):
                    self.taken_over = owner
                    self.file.unlink(missing_ok=True)
                    continue
                raise StoreError(
                    f"store {self.file.parent} is in use by pid {owner.get('pid')} on host "
                    f"{owner.get('host')} (since {time.ctime(owner.get('since', 0))}); "
                    f"if that run is dead on another host, remove {self.file}"
                ) from None
            except PermissionError as e:
                raise StoreError(f"store {self.file.parent} is not writable: {e}") from e
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise StoreError(f"could not take the lock {self.file}: another run keeps taking it")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())  # type: ignore[union-attr]
        except (OSError, ValueError):
            return None  # half-written or vanished: treat as stale

    @staticmethod
    def _stale(owner: dict) -> bool:
        return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", 0)))

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.file.unlink(missing_ok=True)
