"""Check sampled output rows of a store against float64 attention, streaming K/V.

Each sampled row costs O(L * D) per head: keys and values are read one store
chunk at a time and folded with an online softmax, so this works at any L.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from streamcqsa.storage.integrity import checked_read
from streamcqsa.storage.layout import to_torch
from streamcqsa.storage.store import StoreError, open_group

# Relative row error allowed: a few units of the storage dtype's roundoff.
TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def verify(store_path: Any, rows: int = 64, *, seed: int = 0, batch: int | None = None) -> dict:
    """Max relative error of ``rows`` sampled query rows (all heads) vs float64."""
    group, p, meta = open_group(store_path, mode="r")
    if not meta.get("fwd") or meta["fwd"].get("status") != "done":
        raise StoreError("verify needs a finished forward pass: run it first")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    rng = np.random.default_rng(seed)
    n = min(rows, p.seq_len)
    pos = np.sort(rng.choice(p.seq_len, size=n, replace=False))
    batches = [batch] if batch is not None else list(range(p.batch))
    worst_rel = worst_lse = 0.0
    r = p.group_ratio
    for b in batches:
        q = torch.stack([_row(group, "q", b, i, p) for i in pos], dim=1).double()  # [H, n, D]
        m = torch.full((p.heads, n), -torch.inf, dtype=torch.float64)
        s = torch.zeros((p.heads, n), dtype=torch.float64)
        acc = torch.zeros((p.heads, n, p.head_dim), dtype=torch.float64)
        pos_t = torch.from_numpy(pos)
        stop = int(pos.max()) + 1 if p.is_causal else p.seq_len
        for a in range(0, stop, p.chunk_tokens):
            z = min(a + p.chunk_tokens, stop)
            k = _block(group, "k", b, a, z, p).repeat_interleave(r, dim=0)
            v = _block(group, "v", b, a, z, p).repeat_interleave(r, dim=0)
            sc = torch.einsum("hnd,hkd->hnk", q, k) * p.scale
            if p.is_causal:
                keys = torch.arange(a, z)
                sc = sc.masked_fill(keys[None, None, :] > pos_t[None, :, None], -torch.inf)
            m_new = torch.maximum(m, sc.amax(-1))
            safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            alpha = torch.exp(m - safe)
            pexp = torch.exp(sc - safe[..., None])
            s = s * alpha + pexp.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("hnk,hkd->hnd", pexp, v)
            m = m_new
        ref = acc / s[..., None]
        ref_lse = m + torch.log(s)
        got = torch.stack([_row(group, "out", b, i, p) for i in pos], dim=1).double()
        lse_rows = checked_read(group["lse"], (b, slice(None), slice(None)))
        got_lse = torch.from_numpy(np.asarray(lse_rows)[:, pos]).double()
        rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
        worst_rel = max(worst_rel, float(rel.max()))
        worst_lse = max(worst_lse, float((got_lse - ref_lse).abs().max()))
    tol = TOLERANCE[p.dtype]
    return {
        "rows": int(n) * len(batches),
        "heads": p.heads,
        "max_rel_error": worst_rel,
        "max_lse_error": worst_lse,
        "tolerance": tol,
        "ok": worst_rel <= tol,
    }


def _row(group: Any, name: str, b: int, i: int, p: Any) -> torch.Tensor:
    data = checked_read(group[name], (b, slice(None), i, slice(None)))
    return to_torch(np.asarray(data), p.dtype).float()


def _block(group: Any, name: str, b: int, a: int, z: int, p: Any) -> torch.Tensor:
    data = checked_read(group[name], (b, slice(None), slice(a, z), slice(None)))
    return to_torch(np.asarray(data), p.dtype).double()
