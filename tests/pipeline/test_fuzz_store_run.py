"""Passes over fuzzed valid stores: every example is run, verified and checked exact.

Stores come from ``fuzz_inputs.store_inputs`` (any
shape the rules accept, float32, float16 or bfloat16, any chunking). Each one
is run forward at itr=1 and must pass ``verify`` and match float64 SDPA on
the stored inputs; a tally asserted at the end shows every example got there.
Invalid stores are refused by ``create`` (tests/storage/test_create_fuzz.py),
so no example here is allowed to fail.
"""

from __future__ import annotations

from collections import Counter

import torch.nn.functional as F
import zarr
from fuzz_inputs import make_store_inputs, store_inputs
from hypothesis import HealthCheck, event, given, settings

from streamcqsa.pipeline import run, verify
from streamcqsa.storage import create
from streamcqsa.storage.layout import to_torch

# relative norm error allowed against float64: a few units of the stored dtype's rounding
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def test_passes_over_fuzzed_stores_are_exact(tmp_path_factory) -> None:
    tally: Counter[str] = Counter()

    @settings(
        max_examples=10,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(a=store_inputs())
    def check(a: dict) -> None:
        tally["examples"] += 1
        path = tmp_path_factory.mktemp("fuzz") / "s"
        create(path, *make_store_inputs(a), is_causal=a["causal"], chunk_tokens=a["chunk"])
        run(path, itr=1, progress=False)
        assert verify(path, rows=8)["ok"]
        g = zarr.open_group(path, mode="r")
        q, k, v, out = (to_torch(g[n][:], a["dtype"]) for n in ("q", "k", "v", "out"))
        ref = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), is_causal=a["causal"], enable_gqa=True
        )
        err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        event("reached the exactness check")
        tally["exact"] += 1
        assert err <= TOL[a["dtype"]], f"relative error {err:.3g} in {a['dtype']}"

    check()
    print(f"\nfuzz: {tally['exact']}/{tally['examples']} examples reached the exactness check")
    assert tally["examples"] > 0 and tally["exact"] >= 0.9 * tally["examples"]
