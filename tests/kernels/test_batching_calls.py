"""A task's kernel calls (``runner.calls``): rectangles regrouped by rows, each
pair computed once, merges only where a triangle shares rows, and key ranges
joined across a task's runs read correctly."""

from __future__ import annotations

import pytest
import torch
from sdpa_reference import F32, F64, make_inputs

from streamcqsa.cqs import divide
from streamcqsa.cqs.blocks import BlockList
from streamcqsa.kernels import runner
from streamcqsa.kernels.tokens import Tokens, gather_runs


def _pairs(n: int, spans) -> torch.Tensor:  # noqa: ANN001
    """How many times each (row, key) pair is computed by (rows, keys, causal) spans."""
    count = torch.zeros(n, n, dtype=torch.int32)
    for (a, z), ranges, causal in spans:
        cols = torch.cat([torch.arange(c, d) for c, d in ranges])
        cell = torch.ones(z - a, len(cols), dtype=torch.int32)
        if causal:
            cell = cell.tril()
        count[a:z][:, cols] += cell
    return count


def _block_spans(blocks: BlockList):  # noqa: ANN202
    return [((b.q_start, b.q_stop), ((b.k_start, b.k_stop),), b.causal) for b in blocks.blocks]


PLANS = [(700, 2, 3), (900, 3, 3), (500, 2, [3, 2]), (300, 1, 4)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("L", "itr", "quorum"), PLANS, ids=str)
def test_calls_compute_the_blocks_pairs_once(
    L: int, itr: int, quorum: object, causal: bool
) -> None:
    plan = divide(L, itr, quorum, is_causal=causal)
    for task in plan.tasks:
        blocks = task.blocks
        for regroup in (True, False):
            calls = runner.calls(blocks, regroup)
            spans = [((c.q_start, c.q_stop), c.ranges, c.causal) for c in calls]
            assert torch.equal(
                _pairs(blocks.length, spans), _pairs(blocks.length, _block_spans(blocks))
            )
            assert int(_pairs(blocks.length, spans).max()) <= 1
            seen = torch.zeros(blocks.length, dtype=torch.bool)
            for c in calls:  # fresh: no earlier call reached these rows
                assert c.fresh == (not seen[c.q_start : c.q_stop].any())
                seen[c.q_start : c.q_stop] = True
        rect_rows = torch.zeros(blocks.length, dtype=torch.int32)
        for c in runner.calls(blocks):
            assert all(a < z for a, z in c.ranges)
            assert all(z < a for (_, z), (a, _) in zip(c.ranges, c.ranges[1:], strict=False))
            if not c.causal:
                rect_rows[c.q_start : c.q_stop] += 1
        assert int(rect_rows.max()) <= 1  # one rectangle call per row


def test_regrouping_removes_most_merges() -> None:
    plan = divide(8192, 3, 3, is_causal=False)
    merges = sum(not c.fresh for t in plan.tasks for c in runner.calls(t.blocks))
    before = sum(not b.fresh for t in plan.tasks for b in t.blocks.blocks)
    assert before > 100 and merges == 0


def test_tokens_join_ranges_across_runs() -> None:
    """A call may join key ranges that lie in different runs and that no block
    read as one range: Tokens copies them together, in local order."""
    x = torch.randn(1, 2, 50, 4)
    runs = [(30, 10), (5, 8), (20, 6)]  # local order: 30..39, 5..12, 20..25
    want = gather_runs(x, runs)
    tok = Tokens(x, runs, used=[(0, 24)], crossing=[(8, 12)])
    for a, z in [(0, 24), (2, 17), (8, 12), (9, 11), (10, 18), (18, 24), (3, 7)]:
        assert torch.equal(tok.rows(a, z), want[:, :, a:z]), (a, z)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_regrouped_task_matches_float64(causal: bool) -> None:
    """Every task's partial, from regrouped calls, equals its blocks' partial
    computed in float64 (one call per block, merged in block order)."""
    L = 500
    plan = divide(L, 2, 3, is_causal=causal)
    q, k, v, dout = make_inputs(6, L, 16, F32, B=1, H=4, Hkv=2)
    for task in plan.tasks:
        xs = [gather_runs(t, task.runs) for t in (q, k, v, dout)]
        out, lse = runner.forward(*xs[:3], task.blocks)
        ref_out, ref_lse = runner.forward(*(t.to(F64) for t in xs[:3]), task.blocks)
        live = torch.isfinite(ref_lse)
        assert torch.equal(live, torch.isfinite(lse))
        assert (out.double() - ref_out)[live].abs().max() < 1e-5
        assert (lse.double() - ref_lse)[live].abs().max() < 1e-5
        grads = runner.backward(*xs[:3], xs[3], out, lse, task.blocks)
        ref = runner.backward(*(t.to(F64) for t in xs), ref_out, ref_lse, task.blocks)
        for g, r in zip(grads, ref, strict=True):
            assert (g.double() - r).abs().max() < 1e-4
