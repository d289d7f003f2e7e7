"""verify: judges out and lse, fails on non-finite values, scales its tolerance
with the scores, and reads only the chunks its sampled rows lie in."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from streamcqsa.errors import CorruptChunkError
from streamcqsa.pipeline import run, verify
from streamcqsa.storage import create, create_random
from streamcqsa.storage.layout import to_stored, to_torch

L, CHUNK = 512, 64


def _store(path: Path, dtype: str = "float32", std: float = 1.0, **kw) -> Path:
    create_random(
        path,
        seq_len=L,
        heads=2,
        kv_heads=1,
        head_dim=16,
        dtype=dtype,
        std=std,
        chunk_tokens=CHUNK,
        seed=3,
        **kw,
    )
    run(path, itr=1, progress=False)
    return path


def _sampled(rows: int, seed: int = 0) -> np.ndarray:
    """The positions verify samples (numpy's default_rng(seed), no replacement)."""
    return np.sort(np.random.default_rng(seed).choice(L, size=rows, replace=False))


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def test_rule_is_stated():
    from streamcqsa.pipeline.verify import TOLERANCE_RULE

    assert "u32" in TOLERANCE_RULE and "lse" in TOLERANCE_RULE and "M" in TOLERANCE_RULE


# --- item 1: non-finite values and lse --------------------------------------------


def test_nan_output_fails(tmp_path):
    path = _store(tmp_path / "s")
    g = zarr.open_group(path)
    g["out"][:] = np.full(g["out"].shape, np.nan, dtype=np.float32)
    res = verify(path, rows=16)
    assert not res["ok"]
    assert res["nonfinite_out"] == 16 * 2 and res["max_rel_error"] == math.inf
    assert any("NaN/Inf" in r for r in res["reasons"])


def test_one_nan_row_fails(tmp_path):
    path = _store(tmp_path / "s")
    row = int(_sampled(16)[5])
    g = zarr.open_group(path)
    g["out"][0, 1, row, 2] = np.nan
    res = verify(path, rows=16)
    assert not res["ok"] and res["nonfinite_out"] == 1 and res["worst"] == (0, 1, row)


def test_nan_lse_fails(tmp_path):
    path = _store(tmp_path / "s")
    row = int(_sampled(16)[3])
    g = zarr.open_group(path)
    g["lse"][0, 0, row] = np.inf
    res = verify(path, rows=16)
    assert not res["ok"] and res["nonfinite_lse"] == 1 and res["nonfinite_out"] == 0


def test_shifted_lse_fails(tmp_path):
    path = _store(tmp_path / "s")
    g = zarr.open_group(path)
    g["lse"][:] = np.asarray(g["lse"][:]) + 5
    res = verify(path, rows=16)
    assert not res["ok"]
    assert res["max_lse_error"] == pytest.approx(5, rel=1e-5)
    assert res["lse_tolerance"] < 1e-4
    assert res["max_rel_error"] <= res["tolerance"]  # out itself is right
    assert any("lse" in r for r in res["reasons"])


def test_one_lse_entry_slightly_off_fails(tmp_path):
    path = _store(tmp_path / "s")
    row = int(_sampled(16)[7])
    g = zarr.open_group(path)
    g["lse"][0, 1, row] = g["lse"][0, 1, row] + 1e-3
    res = verify(path, rows=16)
    assert not res["ok"] and res["rows_failed"] == 1 and res["worst"] == (0, 1, row)


def test_nonfinite_inputs_fail(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=gen) for _ in range(3))
    k[0, 0, 7] = math.nan
    path = tmp_path / "s"
    create(path, q, k, v, chunk_tokens=64, allow_nonfinite=True)
    run(path, itr=1, progress=False)
    res = verify(path, rows=8)
    assert not res["ok"]
    assert res["nonfinite_reference"] == 8  # every row of head 0 sees key 7
    assert math.isfinite(res["tolerance"]) and math.isfinite(res["lse_tolerance"])
    assert any("inputs hold NaN/Inf" in r for r in res["reasons"])


# --- item 3: a tolerance that scales with the scores --------------------------------


def _sdpa_error(path: Path, dtype: str, rows: np.ndarray) -> float:
    """Max relative row error of torch SDPA in the store's dtype vs float64."""
    g = zarr.open_group(path, mode="r")
    q, k, v = (to_torch(np.asarray(g[n][:]), dtype) for n in ("q", "k", "v"))
    k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    low = sdpa(q.float() if dtype == "float32" else q, k, v).double()
    ref = sdpa(q.double(), k.double(), v.double())
    err = (low - ref).norm(dim=-1) / ref.norm(dim=-1)
    return float(err[..., rows].max())


@pytest.mark.parametrize("std", [1.0, 5.0, 10.0, 20.0])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_correct_results_pass_at_any_scale(tmp_path, dtype, std):
    path = _store(tmp_path / "s", dtype=dtype, std=std, is_causal=std > 5)
    res = verify(path, rows=64)
    assert res["ok"], res
    # a result as good as SDPA's own (in the same dtype) is within the tolerance
    assert 1.5 * _sdpa_error(path, dtype, _sampled(64)) <= res["tolerance"]


@pytest.mark.parametrize("std", [1.0, 20.0])
def test_one_row_scaled_by_1_01_fails_in_fp32(tmp_path, std):
    path = _store(tmp_path / "s", std=std)
    row = int(_sampled(32)[11])
    g = zarr.open_group(path)
    g["out"][0, 0, row] = np.asarray(g["out"][0, 0, row]) * np.float32(1.01)
    res = verify(path, rows=32)
    assert not res["ok"] and res["rows_failed"] == 1 and res["worst"] == (0, 0, row)
    # judged against sum_j p_j |v_j|, at least |out|: at most the 1% itself
    assert res["tolerance"] < res["max_rel_error"] <= 0.01 * (1 + 1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("std", [1.0, 20.0])
def test_one_row_swapped_for_another_fails(tmp_path, dtype, std):
    path = _store(tmp_path / "s", dtype=dtype, std=std)
    a, b = (int(i) for i in _sampled(32)[[4, 20]])
    g = zarr.open_group(path)
    g["out"][0, 1, a] = g["out"][0, 1, b]
    res = verify(path, rows=32)
    assert not res["ok"] and res["rows_failed"] == 1 and res["worst"] == (0, 1, a)


def test_rounded_fp16_out_in_a_fp32_store_fails(tmp_path):
    """fp16-grade output is not fp32-exact, at modest input scale."""
    path = _store(tmp_path / "s")
    g = zarr.open_group(path)
    out = torch.from_numpy(np.asarray(g["out"][:]))
    g["out"][:] = to_stored(out.half().float(), "float32")
    assert not verify(path, rows=32)["ok"]


# --- item 4: only the chunks of the sampled rows are read ----------------------------


def _unsampled_chunks(rows: int) -> list[int]:
    used = {int(i) // CHUNK for i in _sampled(rows)}
    return [j for j in range(L // CHUNK) if j not in used]


@pytest.mark.parametrize("name", ["lse", "out"])
def test_damage_away_from_the_sampled_rows_is_not_read(tmp_path, name):
    path = _store(tmp_path / "s")
    assert zarr.open_group(path, mode="r")[name].chunks[2] == CHUNK
    free = _unsampled_chunks(4)
    assert len(free) >= 2
    base = path / name / "c" / "0" / "1"
    _flip(_leaf(base / str(free[0])))
    _leaf(base / str(free[1])).unlink()  # a missing chunk would read as zeros
    res = verify(path, rows=4)
    assert res["ok"], res


def test_damage_at_a_sampled_row_is_reported(tmp_path):
    path = _store(tmp_path / "s")
    j = int(_sampled(4)[0]) // CHUNK
    _flip(_leaf(path / "lse" / "c" / "0" / "0" / str(j)))
    with pytest.raises(CorruptChunkError, match=rf"array 'lse' chunk \(0, 0, {j}\)"):
        verify(path, rows=4)


def _leaf(p: Path) -> Path:
    """The chunk file at p: lse keys end at the L index, out keys have one more."""
    return p if p.is_file() else p / "0"


def test_bad_arguments_are_named(tmp_path):
    path = _store(tmp_path / "s")
    with pytest.raises(ValueError, match="rows must be a positive int"):
        verify(path, rows=0)
    with pytest.raises(ValueError, match=r"batch must be an int in \[0, 1\)"):
        verify(path, rows=4, batch=1)
    assert verify(path, rows=4, batch=0)["ok"]
