"""All-zero input chunks are stored like any other, so a run never reads them
as missing (zarr skips chunks equal to the fill value unless told not to)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import streamcqsa
from streamcqsa.pipeline import repair, run, run_backward
from streamcqsa.storage import create


@pytest.mark.usefixtures("default_threads")  # the engine's bits are compared with a pass's
def test_zero_chunks_are_written_and_the_run_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1024, 16, generator=g) for _ in range(3))
    q[:, :, 256:512] = 0  # one whole store chunk of zeros
    dout = torch.randn(q.shape, generator=g)
    dout[:, :, :256] = 0
    store = tmp_path / "s"
    create(store, q, k, v, is_causal=True, chunk_tokens=256)
    run(store, itr=1, progress=False)
    run_backward(store, dout, progress=False)
    assert repair(store)["fwd_units_reset"] == 0
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    out = streamcqsa.attention(qr, kr, vr, itr=1, is_causal=True)
    grads = torch.autograd.grad(out, (qr, kr, vr), dout)
    grp = zarr.open_group(store, mode="r")
    assert np.array_equal(grp["out"][:], out.detach().numpy())
    for name, gr in zip(("dq", "dk", "dv"), grads, strict=True):
        assert np.array_equal(grp[name][:], gr.numpy()), name
