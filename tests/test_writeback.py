"""Streamed folds and the unit's chunk writer (``pipeline.writeback``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamcqsa.attention import cached_plan
from streamcqsa.kernels import runner
from streamcqsa.kernels.tree import forward_tree
from streamcqsa.pipeline.writeback import ChunkWriter


def _leaf(node, q, k, v, fill_empty=True):  # noqa: ANN001, ANN202
    return runner.forward(q, k, v, node.blocks, fill_empty=fill_empty)


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


def test_chunk_writer_writes_each_chunk_once_when_complete():
    out, lse = torch.randn(1, 1, 10, 2), torch.randn(1, 1, 10)
    written = []
    w = ChunkWriter(lambda a, z, o, s: written.append((a, z)), length=10, chunk=4)
    for a, z in [(6, 10), (0, 3), (3, 6)]:
        w.rows(a, z, out, lse)
    w.finish()
    assert sorted(written) == [(0, 4), (4, 8), (8, 10)]


def test_chunk_writer_reports_errors_and_missing_rows():
    def boom(a, z, o, s):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    w = ChunkWriter(boom, length=4, chunk=4)
    w.rows(0, 4, torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4))
    with pytest.raises(OSError, match="disk full"):
        w.finish()
    w = ChunkWriter(lambda *a: None, length=8, chunk=4)
    w.rows(0, 4, torch.zeros(1, 1, 8, 1), torch.zeros(1, 1, 8))
    with pytest.raises(RuntimeError, match="never reported"):
        w.finish()
    w = ChunkWriter(boom, length=4, chunk=4)  # a failed compute reports its own error
    w.rows(0, 4, torch.zeros(1, 1, 4, 1), torch.zeros(1, 1, 4))
    w.finish(failed=True)
