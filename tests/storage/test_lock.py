"""The store lock: of contenders started at once exactly one wins and the
others name it, also when they race to take over a stale lock; a lock whose
owner is still being written is not stale."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading

import pytest

from streamcqsa.errors import StoreBusyError, StoreError
from streamcqsa.storage import lock as lock_mod
from streamcqsa.storage.lock import LOCK_NAME, StoreLock

LIVENESS_S = 120  # only catches a hang


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_stale(path, pid: int) -> None:
    owner = {"pid": pid, "host": socket.gethostname(), "since": 0}
    (path / LOCK_NAME).write_text(json.dumps(owner))


def _contender(path, barrier, rounds, stale_pid, results) -> None:
    """Each round: start with the other contender, try the lock, hold it until
    both have tried, release; the winner then lays the next round's stale lock."""
    for r in range(rounds):
        barrier.wait(LIVENESS_S)
        lock, outcome = StoreLock(path), None
        try:
            lock.__enter__()
            outcome = ("won", (lock.taken_over or {}).get("pid"))
        except StoreError as e:  # counted as a loss; its type is checked below
            outcome = ("busy", f"{type(e).__name__}: {e}")
        except Exception as e:  # reported, never hidden
            outcome = ("error", repr(e))
        barrier.wait(LIVENESS_S)
        if outcome[0] == "won":
            lock.__exit__(None, None, None)
            if stale_pid is not None:
                _write_stale(path, stale_pid)
        results.put((str(path), r, os.getpid(), *outcome))


def _race(tmp_path, *, pairs: int, rounds: int, stale: bool) -> None:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    dead = _dead_pid() if stale else None
    procs = []
    for i in range(pairs):
        path = tmp_path / f"s{i}"
        path.mkdir()
        if stale:
            _write_stale(path, dead)
        barrier = ctx.Barrier(2)
        for _ in range(2):
            procs.append(
                ctx.Process(target=_contender, args=(path, barrier, rounds, dead, results))
            )
    for p in procs:
        p.start()
    got = [results.get(timeout=LIVENESS_S) for _ in range(pairs * rounds * 2)]
    for p in procs:
        p.join(LIVENESS_S)
        assert p.exitcode == 0
    by_round: dict = {}
    for path, r, pid, kind, detail in got:
        by_round.setdefault((path, r), []).append((pid, kind, detail))
    assert all(len(two) == 2 for two in by_round.values())
    errors = {k: two for k, two in by_round.items() if any(t[1] == "error" for t in two)}
    assert not errors
    not_one = {k: two for k, two in by_round.items() if sum(t[1] == "won" for t in two) != 1}
    assert not not_one, f"{len(not_one)} of {len(by_round)} rounds without exactly one winner"
    for (path, _), two in by_round.items():
        (wpid, _, taken), (_, _, msg) = sorted(two, key=lambda t: t[1] != "won")
        assert msg.startswith(f"StoreBusyError: store {path} is in use by pid {wpid} on host")
        assert taken == dead  # with a stale lock the winner took it over; else None
    left = {tuple(sorted(f.name for f in p.iterdir())) for p in tmp_path.iterdir()}
    assert left == {(LOCK_NAME,) if stale else ()}  # no temporary or claim files left


@pytest.fixture(params=["link", "no-hard-links"])
def links(request, monkeypatch):
    """Run each race with hard links and on a filesystem without them."""
    if request.param == "no-hard-links":

        def no_link(*a, **k):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(lock_mod.os, "link", no_link)
    return request.param


def test_pairs_started_at_once_have_exactly_one_winner(tmp_path, links):
    _race(tmp_path, pairs=4, rounds=40, stale=False)


def test_stale_lock_taken_over_by_exactly_one(tmp_path, links):
    _race(tmp_path, pairs=4, rounds=40, stale=True)


@pytest.mark.parametrize("content", [b"", b'{"pid": 12', b"[]"])
def test_unwritten_lock_is_not_stale_until_old(tmp_path, monkeypatch, content):
    """An owner not written yet is a run starting: refused, and the file left
    alone; only once it is old is it abandoned and taken over."""
    monkeypatch.setattr(lock_mod, "OWNER_WAIT_S", 0.05)
    f = tmp_path / LOCK_NAME
    f.write_bytes(content)
    with pytest.raises(StoreBusyError, match="names no owner yet"):
        with StoreLock(tmp_path):
            pass
    assert f.read_bytes() == content
    old = f.stat().st_mtime - 2 * lock_mod.UNREADABLE_STALE_S
    os.utime(f, (old, old))
    with StoreLock(tmp_path) as lock:
        assert lock.taken_over == {}
        assert json.loads(f.read_text())["pid"] == os.getpid()
    assert not f.exists()


def test_owner_written_late_is_named(tmp_path, monkeypatch):
    """Exclusive create, then write (no hard links): the loser waits for the
    owner to appear and names it."""
    monkeypatch.setattr(lock_mod, "OWNER_WAIT_S", LIVENESS_S)
    holder = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    f = tmp_path / LOCK_NAME
    f.write_bytes(b"")
    owner = {"pid": holder.pid, "host": socket.gethostname(), "since": 0}
    started = threading.Event()

    def write_owner() -> None:
        started.wait(LIVENESS_S)
        f.write_text(json.dumps(owner))

    real_read = lock_mod._read

    def read(file):
        started.set()  # the owner is written only after the contender has looked
        return real_read(file)

    monkeypatch.setattr(lock_mod, "_read", read)
    t = threading.Thread(target=write_owner, daemon=True)
    t.start()
    try:
        with pytest.raises(StoreBusyError, match=rf"in use by pid {holder.pid} on host"):
            with StoreLock(tmp_path):
                pass
    finally:
        t.join(LIVENESS_S)
        holder.kill()
        holder.wait()
    assert json.loads(f.read_text()) == owner


def test_dead_takers_claim_is_taken_over(tmp_path):
    """A taker that died holding its claim on a stale lock does not block the
    store: its claim is stale too, and the leftovers are swept."""
    dead = _dead_pid()
    _write_stale(tmp_path, dead)
    seen = lock_mod._read(tmp_path / LOCK_NAME)
    claim = tmp_path / f"{LOCK_NAME}.takeover-{seen.ident}"
    claim.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "since": 0}))
    (tmp_path / f"{LOCK_NAME}.{dead}.abc.tmp").write_text(claim.read_text())
    with StoreLock(tmp_path) as lock:
        assert lock.taken_over["pid"] == dead
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    assert not list(tmp_path.iterdir())


def test_other_hosts_lock_is_never_stale(tmp_path):
    owner = {"pid": _dead_pid(), "host": socket.gethostname() + "-elsewhere", "since": 0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(owner))
    with pytest.raises(StoreBusyError, match=r"dead on another host, remove .*stream-cqsa.lock"):
        with StoreLock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == owner


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
    with StoreLock(tmp_path):
        other = {"pid": os.getpid(), "host": socket.gethostname(), "token": "x"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


def test_missing_store_is_named(tmp_path):
    with pytest.raises(StoreError, match="no run store"):
        with StoreLock(tmp_path / "absent"):
            pass


def test_takeover_in_progress_is_waited_for_then_named(tmp_path, monkeypatch):
    """A stale lock whose claim a live process holds is not taken over beside
    it: the contender waits for that takeover, and names the taker if it
    never finishes."""
    monkeypatch.setattr(lock_mod, "TAKEOVER_WAIT_S", 0.05)
    _write_stale(tmp_path, _dead_pid())
    seen = lock_mod._read(tmp_path / LOCK_NAME)
    taker = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        claim = tmp_path / f"{LOCK_NAME}.takeover-{seen.ident}"
        claim.write_text(json.dumps({"pid": taker.pid, "host": socket.gethostname()}))
        with pytest.raises(StoreBusyError, match=rf"in use by pid {taker.pid} on host"):
            with StoreLock(tmp_path):
                pass
        assert lock_mod._read(tmp_path / LOCK_NAME).ident == seen.ident  # left for the taker
    finally:
        taker.kill()
        taker.wait()
