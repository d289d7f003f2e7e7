"""``storage.open``'s Run: node lookups name valid nodes; its repr reads no markers."""

from __future__ import annotations

import pytest

from streamcqsa.pipeline import run
from streamcqsa.storage import create_random
from streamcqsa.storage import open as open_run
from streamcqsa.storage.runarrays import RunArrays


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "s.zarr"
    create_random(path, seq_len=300, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    run(path, itr=2, progress=False, unit_depth=None, keep_partials=True)
    return path


@pytest.mark.parametrize("bad", ["anything", "r.x", "r.99", "0.1", (99,), ("a",), (True,)])
def test_unknown_node_is_refused_naming_valid_ones(store, bad):
    r = open_run(store)
    with pytest.raises(
        ValueError, match=r"no node .* in the fwd plan; nodes are named 'r'.*'r\.0'"
    ):
        r.partial(bad)
    with pytest.raises(ValueError, match="nodes are named"):
        r.node(bad)


def test_valid_names_and_paths_agree(store):
    r = open_run(store)
    assert r.node("r").path == r.node(()).path == ()
    leaf = next(t for t in r.tasks() if t.kind == "unit")
    assert r.node(leaf.name).path == r.node(list(leaf.path)).path == leaf.path
    assert r.partial(leaf.name).out.shape == r.partial(leaf).out.shape


def test_repr_reads_no_progress_markers(store, monkeypatch):
    def refuse(self):
        raise AssertionError("repr read the progress markers")

    r = open_run(store)
    monkeypatch.setattr(RunArrays, "done", refuse)
    text = repr(r)
    assert "fwd=done" in text and "bwd=not started" in text and "L=300" in text
