"""Hypothesis strategies shared by the fuzz tests of several layers.

``store_inputs`` draws only what ``storage.create`` must accept: SDPA's shape
rules (query heads a multiple of key/value heads, equal lengths), float32,
float16 or bfloat16, any positive chunking or the default. ``make_store_inputs``
turns a draw into q, k, v as a caller passes them (numpy, torch for bf16),
random and never zeros.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

STORE_DTYPES = ["float32", "float16", "bfloat16"]


@st.composite
def store_inputs(draw: st.DrawFn) -> dict:
    hk = draw(st.integers(1, 3))
    return dict(
        b=draw(st.integers(1, 2)),
        h=hk * draw(st.integers(1, 2)),
        hk=hk,
        length=draw(st.integers(1, 50)),
        d=draw(st.integers(1, 9)),
        dtype=draw(st.sampled_from(STORE_DTYPES)),
        causal=draw(st.booleans()),
        chunk=draw(st.none() | st.integers(1, 64) | st.just(1000)),
        seed=draw(st.integers(0, 2**16)),
    )


def make_store_inputs(a: dict) -> tuple:
    """q, k, v as a caller passes them: numpy in float32/float16, torch for bf16."""
    rng = np.random.default_rng(a["seed"])
    shapes = [(a["b"], a["h"], a["length"], a["d"])] + [(a["b"], a["hk"], a["length"], a["d"])] * 2
    xs = [rng.standard_normal(s) for s in shapes]
    if a["dtype"] == "bfloat16":
        return tuple(torch.from_numpy(x).bfloat16() for x in xs)
    return tuple(x.astype(a["dtype"]) for x in xs)
