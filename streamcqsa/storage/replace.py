"""Build a store's new contents under its lock; swap them in only when complete.

A failed or refused create or overwrite must lose nothing: a store that
exists stays as it was until its replacement is whole.

- A directory builds in a private directory inside the store, then moves the
  old entries aside and the new ones in by renames (``zarr.json`` last, so
  the directory is a run store again only when complete).
- A URL store that is empty builds in place, and a failure deletes what it
  wrote. One that holds a store builds under a private prefix inside it; only
  when that is complete does the swap start: a *journal* object naming the
  build is written, the old store deleted (``zarr.json`` first, so it stops
  being a run store before its arrays go) and the new one copied into place
  by server-side copies (``zarr.json`` last), then the journal and the build
  deleted. Object stores have no rename, so a swap cut short (a kill, an
  error of the store) leaves no run store; the journal says so, and the next
  create or overwrite of that URL first finishes the swap from the build.
- A store object is built in place (nothing else can see it).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamcqsa.errors import StoreError
from streamcqsa.storage.location import Location
from streamcqsa.storage.lock import LOCK_NAME, StoreLock

OURS = ".stream-cqsa-"  # prefix of the build and swap directories inside a store
JOURNAL = f"{OURS}swap"  # a URL store's unfinished swap: names the build to finish it from


def _foreign(names: list[str]) -> list[str]:
    """Entries that are not the lock's or a create's own bookkeeping."""
    return [n for n in names if not n.startswith((LOCK_NAME, OURS))]


def _check_target(loc: Location, overwrite: bool) -> None:
    if loc.local is not None and loc.local.is_file():
        raise StoreError(f"{loc} is a file, not a run store directory")
    names = loc.entries()
    if _foreign(names) or JOURNAL in names:
        if not overwrite:
            raise StoreError(f"{loc} exists and is not empty; pass overwrite=True")
        if not loc.is_store() and JOURNAL not in names:
            raise StoreError(f"{loc} is not a run store; refusing to overwrite it")


@contextmanager
def replacing(path: Any, overwrite: bool) -> Iterator[Any]:
    """Yield where to build the new contents; swap them in when the body ends.

    Holds the store's lock throughout (StoreBusyError if a run holds it). If
    the body raises, the old store is left as it was.
    """
    loc = Location.of(path)
    if not loc.named:
        yield loc.obj
        return
    _check_target(loc, overwrite)  # refuse before making anything
    made = False
    if loc.local is not None:
        try:
            loc.local.mkdir(parents=True)
            made = True
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create the run store directory {loc}: {e}") from e
    with StoreLock(loc):
        _check_target(loc, overwrite)  # as of holding the lock
        if loc.local is not None:
            with _local(loc.local, made) as build:
                yield build
        else:
            with _remote(loc) as build:
                yield build


@contextmanager
def _local(p: Path, made: bool) -> Iterator[Location]:
    build = p / f"{OURS}build-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        build.mkdir()
        yield Location(local=build)
        _swap_in(p, build)
    except BaseException:
        if made:
            shutil.rmtree(p, ignore_errors=True)
        else:
            shutil.rmtree(build, ignore_errors=True)
        raise


def _swap_in(p: Path, build: Path) -> None:
    """Move p's entries aside and build's in; on failure move everything back."""
    old = p / f"{OURS}old-{os.getpid()}-{secrets.token_hex(4)}"
    current = sorted(
        (p / n for n in _foreign([e.name for e in p.iterdir()])),
        key=lambda e: e.name != "zarr.json",  # zarr.json first
    )
    new = sorted(build.iterdir(), key=lambda e: e.name == "zarr.json")  # zarr.json last
    moved: list[tuple[Path, Path]] = []
    try:
        if current:
            old.mkdir()
        for src, dst in [(e, old / e.name) for e in current] + [(e, p / e.name) for e in new]:
            os.rename(src, dst)
            moved.append((src, dst))
    except BaseException:
        for src, dst in reversed(moved):
            try:
                os.rename(dst, src)
            except OSError:
                pass
        raise
    # the lock is held: other build and swap directories are a dead create's
    for e in p.iterdir():
        if e.name.startswith(OURS):
            shutil.rmtree(e, ignore_errors=True)


@contextmanager
def _remote(loc: Location) -> Iterator[Location]:
    names = loc.entries()
    if JOURNAL in names:  # a swap cut short: finish it first (the lock is held)
        _finish_swap(loc, loc.read_bytes(JOURNAL).decode())  # type: ignore[union-attr]
        names = loc.entries()
    for n in names:  # a dead create's leftovers
        if n.startswith(OURS):
            loc.remove(n)
    old = _foreign(loc.entries())
    if not old:
        try:
            yield loc
        except BaseException:
            for n in _foreign(loc.entries()):
                loc.remove(n)
            raise
        return
    name = f"{OURS}build-{os.getpid()}-{secrets.token_hex(4)}"
    build = loc.child(name)
    try:
        yield build
    except BaseException:
        loc.remove(name)
        raise
    fs, root = loc.filesystem()
    fs.pipe_file(f"{root}/{JOURNAL}", name.encode())
    try:
        _finish_swap(loc, name)
    except BaseException as e:
        raise StoreError(
            f"replacing {loc} was cut short ({type(e).__name__}: {e}); it holds no run store "
            f"now, and the complete new one lies under {loc}/{name}: create it again "
            "with overwrite=True to finish the swap"
        ) from e


def _finish_swap(loc: Location, name: str) -> None:
    """Delete what is not the build (zarr.json first), copy the build into
    place (zarr.json last), delete the journal, then the build. Run again
    after being cut short anywhere, it finishes the same swap: the build
    stays whole until the journal is gone."""
    fs, root = loc.filesystem()
    build = loc.child(name)
    new = build.entries()
    if "zarr.json" not in new:
        raise StoreError(f"{loc}: the journal names {name}, which holds no complete store")
    for n in sorted(_foreign(loc.entries()), key=lambda n: n != "zarr.json"):
        loc.remove(n)
    for n in sorted(new, key=lambda n: n == "zarr.json"):
        src = f"{root}/{name}/{n}"
        fs.invalidate_cache(f"{root}/{name}")
        fs.copy(src, f"{root}/{n}", recursive=fs.isdir(src))
    loc.remove(JOURNAL)
    loc.remove(name)
    fs.invalidate_cache(root)


__all__ = ["JOURNAL", "OURS", "replacing"]
