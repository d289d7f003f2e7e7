"""Streamed folds and the unit's chunk writer (``pipeline.writeback``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamcqsa.attention import cached_plan
from streamcqsa.kernels import runner
from streamcqsa.kernels.device import Device
from streamcqsa.kernels.fold import fold, sum_partials
from streamcqsa.kernels.tree import backward_tree, forward_tree
from streamcqsa.pipeline.writeback import ChunkWriter

CPU = Device.of("cpu")


def _leaf(node, q, k, v, fill_empty=True, workspace=None):  # noqa: ANN001, ANN202
    return runner.forward(q, k, v, node.blocks, fill_empty=fill_empty, workspace=workspace)


@pytest.mark.parametrize(("L", "itr", "causal"), [(1009, 2, True), (700, 1, False), (333, 3, True)])
def test_streamed_fold_reports_every_row_once_with_the_same_bits(L, itr, causal):
    plan = cached_plan(L, itr, 3, causal)
    g = torch.Generator().manual_seed(1)
    qkv = tuple(torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    ref = forward_tree(plan, plan.root, qkv, _leaf, torch.float32)
    seen = np.zeros(L, dtype=int)
    copies = {}

    def on_rows(a, z, out, lse):  # noqa: ANN001, ANN202
        seen[a:z] += 1
        copies[(a, z)] = (out[:, :, a:z].clone(), lse[:, :, a:z].clone())  # final when reported

    got = forward_tree(plan, plan.root, qkv, _leaf, torch.float32, on_rows=on_rows)
    assert (seen == 1).all()
    for t, r in zip(got, ref, strict=True):
        assert torch.equal(t, r)
    for (a, z), (o, s) in copies.items():
        assert torch.equal(o, ref[0][:, :, a:z]) and torch.equal(s, ref[1][:, :, a:z])


def _leaf_backward(node, *xs, workspace=None):  # noqa: ANN001, ANN002, ANN202
    return runner.backward(*xs, node.blocks, workspace=workspace)


def _held_backward(plan, node, xs):  # noqa: ANN001, ANN202
    """The fold as it was: every child kept until one ``sum_partials`` fold."""
    if node.is_leaf:
        return backward_tree(plan, node, xs, _leaf_backward, torch.float32, base=plan.root)
    parts = {c: _held_backward(plan, plan.by_path[c], xs) for c in node.children}
    out = tuple(torch.empty(*t.shape[:2], node.length, t.shape[3]) for t in xs[:3])
    return fold(plan.merge_sources(node, skip_empty=False), parts, out, sum_partials, (0.0,) * 3)


@pytest.mark.parametrize(
    ("L", "itr", "causal"), [(1009, 2, True), (700, 1, False), (333, 3, False)]
)
def test_backward_adds_each_child_as_it_finishes_with_the_same_bits(L, itr, causal):
    """Gradients added into the parent child by child (one child held at a
    time) equal the fold that keeps all children, bit for bit, GQA included."""
    plan = cached_plan(L, itr, 3, causal)
    g = torch.Generator().manual_seed(2)
    q, dout = (torch.randn(1, 4, L, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(2))
    out, lse = runner.forward(q, k, v, cached_plan(L, 0, 3, causal).root.blocks)
    xs = (q, k, v, dout, out, lse)
    got = backward_tree(plan, plan.root, xs, _leaf_backward, torch.float32)
    ref = _held_backward(plan, plan.root, xs)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_chunk_writer_writes_each_chunk_once_when_complete():
    out, lse = torch.randn(1, 1, 10, 2), torch.randn(1, 1, 10)
    written = []
    w = ChunkWriter(lambda a, z, o, s: written.append((a, z)), length=10, chunk=4, device=CPU)
    for a, z in [(6, 10), (0, 3), (3, 6)]:
        w.rows(a, z, out, lse)
    w.finish()
    assert sorted(written) == [(0, 4), (4, 8), (8, 10)]


def test_chunk_writer_reports_errors_and_missing_rows():
    def boom(a, z, o, s):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    w = ChunkWriter(boom, length=4, chunk=4, device=CPU)
    w.rows(0, 4, torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4))
    with pytest.raises(OSError, match="disk full"):
        w.finish()
    w = ChunkWriter(lambda *a: None, length=8, chunk=4, device=CPU)
    w.rows(0, 4, torch.zeros(1, 1, 8, 1), torch.zeros(1, 1, 8))
    with pytest.raises(RuntimeError, match="never reported"):
        w.finish()
    w = ChunkWriter(boom, length=4, chunk=4, device=CPU)  # a failed compute reports its own error
    w.rows(0, 4, torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4))
    w.finish(failed=True)


@pytest.mark.parametrize(
    ("dtype", "causal", "itr", "unit_depth"),
    [
        (torch.float32, True, 2, 0),
        pytest.param(torch.float32, True, 2, 1, marks=pytest.mark.slow),
        pytest.param(torch.bfloat16, False, 3, 0, marks=pytest.mark.slow),
        (torch.bfloat16, False, 3, 1),
        (torch.float16, True, 1, 0),
        pytest.param(torch.float16, True, 1, 1, marks=pytest.mark.slow),
    ],
)
@pytest.mark.usefixtures("default_threads")  # the engine's bits are compared with a pass's
def test_read_ahead_and_write_back_keep_the_bits(
    tmp_path, monkeypatch, dtype, causal, itr, unit_depth
):
    """Units that read ahead and write back (the GPU path, forced on here)
    store exactly the engine's bits; odd lengths and store chunks that cut
    the plan's chunks exercise the piece bookkeeping."""
    import zarr

    import streamcqsa
    from streamcqsa.attention import Engine
    from streamcqsa.kernels.backend import get_backend
    from streamcqsa.pipeline import run
    from streamcqsa.storage import create
    from streamcqsa.storage.layout import to_torch

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, hh, 517, 32, generator=g).to(dtype) for hh in (4, 2, 2))
    path = tmp_path / "s"
    create(path, q, k, v, is_causal=causal, chunk_tokens=48)
    stats = run(path, itr=itr, progress=False, head_group=1, unit_depth=unit_depth, overlap_io=True)
    assert stats["units_run"] > 0
    # the engine folding at the pass's unit depth (0: streamcqsa.attention's bits)
    plan = cached_plan(517, itr, tuple(stats["plan"]["quorums"]), causal)
    eng = Engine(plan, get_backend("auto", q.device), 32**-0.5, 1, None, unit_depth)
    out, lse = eng.forward(q, k, v)
    out = out.to(dtype)
    if unit_depth == 0:
        o2, l2 = streamcqsa.attention(q, k, v, itr=itr, is_causal=causal, return_lse=True)
        assert torch.equal(o2, out) and torch.equal(l2, lse)
    grp = zarr.open_group(path, mode="r")
    name = str(dtype).removeprefix("torch.")
    assert torch.equal(to_torch(np.asarray(grp["out"][:]), name), out)
    assert np.array_equal(np.asarray(grp["lse"][:]), lse.numpy())


def test_read_ahead_orders_pieces_by_first_use():
    from streamcqsa.pipeline.readahead import pieces, schedule

    plan = cached_plan(3000, 2, 3, True)
    cut = pieces(plan.root, 256)
    assert [p[1] - p[0] for p in cut] == [256] * 11 + [184]
    order, need = schedule(plan, plan.root, cut)
    assert sorted(order) == list(range(len(cut)))
    first = plan.tasks[0]
    assert 0 < need[first.path] < len(cut)  # the first leaf waits for part of the read only
    for leaf in plan.tasks:  # every piece a leaf reads comes before its count
        got = {order[i] for i in range(need[leaf.path])}
        for a, n in plan.local_runs(leaf, plan.root):
            for i, (la, lz, _) in enumerate(cut):
                if la < a + n and a < lz:
                    assert i in got


def test_read_ahead_reports_a_corrupt_input_chunk(tmp_path, monkeypatch):
    """A bad chunk met by the reader thread fails the unit (no hang), and the
    run names it; nothing is marked done."""
    import glob

    import zarr

    from streamcqsa.pipeline import run, unit
    from streamcqsa.storage import create_random
    from streamcqsa.storage.integrity import CorruptChunkError

    monkeypatch.setattr(unit, "overlaps_io", lambda ctx: True)
    path = tmp_path / "s"
    create_random(path, seq_len=700, heads=2, head_dim=16, dtype="float32", chunk_tokens=64)
    victim = sorted(glob.glob(f"{path}/v/c/0/1/*/0"))[7]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CorruptChunkError, match="array 'v'"):
        run(path, itr=2, progress=False, unit_depth=0)
    assert not np.asarray(zarr.open_group(path)["progress/fwd"][:]).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_ahead_through_staging_slots_fills_the_unit(tmp_path, dtype):
    """The device path's bookkeeping (reused staging slots, one send per piece
    and source, marks, waits) run on CPU: every row arrives, from any order."""
    import zarr

    from streamcqsa.pipeline.readahead import ReadAhead
    from streamcqsa.storage import create_random
    from streamcqsa.storage.layout import to_torch

    path = tmp_path / "s"
    create_random(path, seq_len=1111, heads=4, kv_heads=2, head_dim=8, dtype=dtype, chunk_tokens=64)
    grp = zarr.open_group(path, mode="r")
    plan = cached_plan(1111, 2, 3, True)
    node = plan.by_path[(2,)]
    srcs = [(grp["q"], slice(2, 4)), (grp["k"], slice(1, 2)), (grp["v"], slice(0, 2))]
    ra = ReadAhead(plan, node, srcs, 0, dtype, 64, device=torch.device("cpu"))
    for leaf in reversed(plan.tasks):
        if leaf.path[:1] == node.path:
            ra.wait(leaf)
    ra.finish()
    for (arr, h), t in zip(srcs, ra.tensors, strict=True):
        full = to_torch(np.asarray(arr[0:1, h]), dtype)
        want = torch.cat([full[:, :, a : a + n] for a, n in node.runs], dim=2)
        assert torch.equal(t, want)
