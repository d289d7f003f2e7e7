"""Pooled host buffers: reuse, the cap, and no read after release."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import streamcqsa
from streamcqsa.kernels import workspace
from streamcqsa.kernels.workspace import Workspace, cached_bytes, empty_cache, set_cache_limit
from streamcqsa.pipeline import run, run_backward
from streamcqsa.storage import create

MiB = 1 << 20


@pytest.fixture
def pool():
    """A clean pool that poisons what is given back; restored afterwards."""
    old = workspace._POOL.limit
    empty_cache()
    workspace._POOL.poison = True
    yield workspace._POOL
    workspace._POOL.poison = False
    set_cache_limit(old)
    empty_cache()


def test_released_buffer_is_lent_again(pool) -> None:
    ws = Workspace()
    a = ws.empty((1, 4, 2048, 64), torch.float32, torch.device("cpu"))  # 2 MiB
    ptr = a.data_ptr()
    b = ws.empty((1, 4, 2048, 64), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != ptr  # two live loans never share a buffer
    ws.release(a[:, :, :1000], a.view(4, 2048, 64))  # a slice or a reshape is not the loan
    assert cached_bytes() == 0
    ws.release(a)
    assert cached_bytes() >= a.numel() * 4
    c = ws.empty((1, 4, 1536, 64), torch.float32, torch.device("cpu"))  # 1.5 MiB
    d = ws.empty((1, 4, 2000, 64), torch.float32, torch.device("cpu"))
    assert c.data_ptr() != ptr  # the free buffer would waste more than 1/4 of c's size
    assert d.data_ptr() == ptr  # d fits it
    assert d.dtype == torch.float32 and d.shape == (1, 4, 2000, 64) and d.is_contiguous()


def test_small_and_foreign_tensors_bypass_the_pool(pool) -> None:
    ws = Workspace()
    small = ws.empty((10, 10), torch.float32, torch.device("cpu"))
    none = ws.empty((0, 64), torch.float32, torch.device("cpu"))
    ws.release(small, none, torch.empty(4 * MiB, dtype=torch.uint8))
    assert cached_bytes() == 0


def test_free_buffers_stay_under_the_cap(pool) -> None:
    set_cache_limit(3 * MiB)
    ws = Workspace()
    ts = [ws.empty((MiB,), torch.uint8, torch.device("cpu")) for _ in range(6)]
    ws.release(*ts)
    assert 0 < cached_bytes() <= 3 * MiB
    set_cache_limit(0)
    assert cached_bytes() == 0
    with pytest.raises(ValueError, match=">= 0"):
        set_cache_limit(-1)


class _Counting(Workspace):
    """Tracks the bytes on loan, to measure a tree's peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def empty(self, shape, dtype, device):  # noqa: ANN001, ANN201
        t = super().empty(shape, dtype, device)
        self.live += t.numel() * t.element_size()
        self.peak = max(self.peak, self.live)
        return t

    def release(self, *tensors):  # noqa: ANN002, ANN201
        for t in tensors:
            self.live -= t.numel() * t.element_size()
        super().release(*tensors)


@pytest.mark.parametrize(("L", "itr"), [(1009, 2), (700, 1), (2001, 3)])
def test_backward_peak_is_summed_fold_rows(pool, monkeypatch, L: int, itr: int) -> None:
    """What the backward tree actually holds at its peak, measured, is what
    ``Plan.summed_fold_rows`` says the budget should count."""
    from streamcqsa.attention import cached_plan
    from streamcqsa.kernels import runner
    from streamcqsa.kernels.tree import backward_tree

    monkeypatch.setattr(workspace, "MIN_BYTES", 1)
    plan = cached_plan(L, itr, 3, True)
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 2, L, 8, generator=g) for _ in range(4))
    out, lse = runner.forward(q, k, v, cached_plan(L, 0, 3, True).root.blocks)
    ws = _Counting()

    def leaf(node, *xs, workspace=None):  # noqa: ANN001, ANN002, ANN202
        return runner.backward(*xs, node.blocks, workspace=workspace)

    backward_tree(plan, plan.root, (q, k, v, dout, out, lse), leaf, torch.float32, workspace=ws)
    row = 3 * 2 * 8 * 4  # dq, dk, dv: 2 heads x 8 dims of fp32
    assert ws.peak == plan.summed_fold_rows(plan.root) * row


@pytest.mark.parametrize(("L", "itr"), [(1009, 2), (700, 1), (2001, 3)])
def test_streamed_forward_peak_is_streamed_fold_rows(pool, monkeypatch, L: int, itr: int) -> None:
    """The streamed forward (a node folds each merge range once its holders
    are done and frees a child nothing still reads, as device units run),
    measured: its peak is ``Plan.streamed_fold_rows``, the figure the device
    unit budget counts; its result is the plain tree's, bit for bit."""
    from streamcqsa.attention import cached_plan
    from streamcqsa.kernels import runner
    from streamcqsa.kernels.tree import forward_tree

    monkeypatch.setattr(workspace, "MIN_BYTES", 1)
    plan = cached_plan(L, itr, 3, True)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, L, 8, generator=g) for _ in range(3))

    def leaf(node, *xs, fill_empty=True, workspace=None):  # noqa: ANN001, ANN002, ANN202
        return runner.forward(*xs, node.blocks, fill_empty=fill_empty, workspace=workspace)

    ws = _Counting()
    final: list[tuple[int, int]] = []
    out, lse = forward_tree(
        plan,
        plan.root,
        (q, k, v),
        leaf,
        torch.float32,
        on_rows=lambda a, z, *_: final.append((a, z)),
        workspace=ws,
    )
    row = 2 * (8 + 1) * 4  # out and lse: 2 heads x (8 dims + 1) of fp32
    assert ws.peak == plan.streamed_fold_rows(plan.root) * row
    assert sum(z - a for a, z in final) == L
    plain = forward_tree(plan, plan.root, (q, k, v), leaf, torch.float32)
    assert torch.equal(out, plain[0]) and torch.equal(lse, plain[1])


# (B, H, L, D): the large shape's leaves are big enough for every pooled size class
SMALL = pytest.param((1, 2, 1009, 32), id="small")
LARGE = pytest.param((1, 4, 2001, 64), id="large", marks=pytest.mark.slow)


def _engine(q, k, v, is_causal: bool) -> list[torch.Tensor]:
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = streamcqsa.attention(*xs, itr=3, is_causal=is_causal, return_lse=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return [out.detach(), lse, *torch.autograd.grad(out, xs, dout)]


@pytest.mark.parametrize("shape", [SMALL, LARGE])
@pytest.mark.parametrize("is_causal", [False, True])
def test_engine_bits_do_not_depend_on_the_pool(pool, monkeypatch, is_causal: bool, shape) -> None:
    """Given-back buffers are NaN-poisoned: a partial read after its release
    would show; and pooled runs give the unpooled bits, forward and backward.
    Every partial is pooled here, down to the smallest leaf's."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 1)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    pool.poison = False
    set_cache_limit(0)
    ref = _engine(q, k, v, is_causal)
    assert all(torch.isfinite(t).all() for t in ref)
    pool.poison = True
    set_cache_limit(256 * MiB)
    for _ in range(2):  # the second call runs on buffers the first gave back
        got = _engine(q, k, v, is_causal)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert 0 < cached_bytes() <= 256 * MiB


@pytest.mark.parametrize(
    "shape", [(1, 2, 1200, 32), pytest.param((1, 4, 3000, 64), marks=pytest.mark.slow)]
)
@pytest.mark.parametrize(
    ("dtype", "unit_depth", "overlap"),
    [(torch.float32, 0, False), (torch.bfloat16, 1, False), (torch.float32, 0, True)],
)
def test_pipeline_bits_do_not_depend_on_the_pool(
    pool, monkeypatch, tmp_path, dtype: torch.dtype, unit_depth: int, overlap: bool, shape
) -> None:
    """Units' inputs, partials and outputs pooled (and poisoned when given
    back), also with the write-back thread storing rows during the compute."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 1)
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(*shape, generator=g).to(dtype) for _ in range(4))
    outs = []
    for limit in (0, 256 * MiB, 256 * MiB):
        pool.poison = bool(limit)  # the reference run gives back clean buffers
        set_cache_limit(limit)
        path = tmp_path / f"s{len(outs)}"
        create(path, q, k, v, is_causal=True)
        run(path, itr=2, progress=False, unit_depth=unit_depth, overlap_io=overlap)
        run_backward(path, dout=dout, progress=False, unit_depth=unit_depth)
        g = zarr.open_group(path, mode="r")
        outs.append([np.asarray(g[n][:]) for n in ("out", "lse", "dq", "dk", "dv")])
    assert all(np.isfinite(a.astype(np.float32)).all() for a in outs[0])
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("L", "itr"), [(1009, 1), (1009, 2), (2001, 3), (3000, 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tree_peaks_at_any_width_are_tree_rows(pool, monkeypatch, L, itr, causal) -> None:
    """On a CPU width w >= 2 the trees run leaves at once and folds or adds
    beside later leaves, so they hold more than one by one. What they hold,
    measured, stays within ``footprint.tree_rows``, which the CPU unit model
    counts; at width 1 it is exact. The streamed forward (a unit writing
    rows as they are final) keeps the plain tree's bits at every width."""
    from streamcqsa.attention import cached_plan
    from streamcqsa.cqs.footprint import tree_rows
    from streamcqsa.kernels import runner, threads
    from streamcqsa.kernels.tree import backward_tree, forward_tree

    monkeypatch.setattr(workspace, "MIN_BYTES", 1)
    plan = cached_plan(L, itr, 3, causal)
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 2, L, 8, generator=g) for _ in range(4))
    out, lse = runner.forward(q, k, v, cached_plan(L, 0, 3, causal).root.blocks)

    def fwd(node, *xs, fill_empty=True, workspace=None):  # noqa: ANN001, ANN002, ANN202
        return runner.forward(*xs, node.blocks, fill_empty=fill_empty, workspace=workspace)

    def bwd(node, *xs, workspace=None):  # noqa: ANN001, ANN002, ANN202
        return runner.backward(*xs, node.blocks, workspace=workspace)

    plain = forward_tree(plan, plan.root, (q, k, v), fwd, torch.float32)
    for w in (1, 2, 3):
        with threads.scope(w):
            f, b, st = _Counting(), _Counting(), _Counting()
            forward_tree(plan, plan.root, (q, k, v), fwd, torch.float32, workspace=f)
            xs = (q, k, v, dout, out, lse)
            backward_tree(plan, plan.root, xs, bwd, torch.float32, workspace=b)
            rows: list[int] = []
            streamed = forward_tree(
                plan,
                plan.root,
                (q, k, v),
                fwd,
                torch.float32,
                on_rows=lambda a, z, *_, rows=rows: rows.append(z - a),
                workspace=st,
            )
        assert sum(rows) == L
        assert all(torch.equal(x, y) for x, y in zip(streamed, plain, strict=True))
        f_rows, b_rows = f.peak // (2 * 9 * 4), b.peak // (3 * 2 * 8 * 4)
        st_rows = st.peak // (2 * 9 * 4)
        fwd_model = tree_rows(plan, plan.root, "fwd", w)
        bwd_model = tree_rows(plan, plan.root, "bwd", w)
        if w == 1:
            assert st_rows == plan.streamed_fold_rows(plan.root)
            assert (f_rows, b_rows) == (fwd_model, bwd_model)
            assert (fwd_model, bwd_model) == (
                plan.fold_rows(plan.root),
                plan.summed_fold_rows(plan.root),
            )
        else:
            assert f_rows <= fwd_model and b_rows <= bwd_model
            # streamed, the node's own rows are held from the start: the unit
            # model counts them (``unit_host_bytes``: the rows written out)
            assert st_rows <= fwd_model + plan.root.length
