"""Check sampled output rows of a store against float64 attention, streaming K/V.

Each sampled row costs O(L * D) per head: keys and values are read one store
chunk (one key/value head) at a time and folded with an online softmax, so
this works at any L. The sampled rows of q, out and lse are read chunk by
chunk for their own positions only: a chunk no sampled row lies in is never
read, and nothing larger than one chunk is held.

A row is judged on both results of the forward pass, because the backward
uses both: ``out`` and ``lse``. A non-finite value fails it, and so does a
non-finite reference (NaN/Inf in the inputs: nothing exact can be said).
"""

from __future__ import annotations

import math
from itertools import groupby
from typing import Any

import numpy as np
import torch

from streamcqsa.storage import chunkio
from streamcqsa.storage.layout import to_torch
from streamcqsa.storage.store import StoreError, open_group

# Unit roundoff (half an ulp of 1.0) of each storage dtype. Scores and lse
# are float32 in every kernel, whatever the storage dtype; a half-type kernel
# may sum probabilities rounded to that type (torch's CPU kernels on bf16
# hardware do), which moves the lse by up to u.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
U32 = UNIT_ROUNDOFF["float32"]
C_OUT = 4  # rounding the output (and, in half types, the probabilities)
C_SCORE = 8  # rounding the scores, in units of u32 * M

TOLERANCE_RULE = (
    "verify recomputes each sampled query row (every head) in float64 from the stored "
    "inputs. With u the unit roundoff of the store's dtype (2^-24 float32, 2^-11 float16, "
    "2^-8 bfloat16), u32 = 2^-24 and M = scale * max|q_i| * max|k_j| over the sampled "
    "rows and the keys they attend to (a bound on every score's magnitude), and |ref| = "
    "sum_j p_j |v_j| (the size of the terms the output sums), a row passes "
    f"when out and lse are finite, ||out - ref|| / |||ref||| <= {C_OUT}*u + {C_SCORE}*u32*M "
    f"and |lse - ref_lse| <= {C_SCORE}*u32*(1 + M + |ref_lse|) (+ u in half types). Why: a "
    "kernel rounds each score by about u32*M (scores are float32 in every kernel), which "
    "moves the output (relative to the terms it sums, not to their sum: those may cancel) "
    "and the lse by as much; rounding the output and, in half types, the probabilities "
    "costs a few u, and the lse up to u where a half-type kernel sums the rounded "
    "probabilities. So the tolerance follows the input scale, and an error above it is "
    "not rounding: a wrong, swapped or rescaled row."
)


def verify(
    store_path: Any,
    rows: int = 64,
    *,
    seed: int = 0,
    batch: int | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Check ``rows`` sampled query rows (all heads) of a finished forward pass.

    The positions are drawn without replacement by
    ``numpy.random.default_rng(seed)`` and are the same for every batch.

    Rule (also ``TOLERANCE_RULE``): with u the unit roundoff of the store's
    dtype, u32 that of float32 and M = scale * max|q_i| * max|k_j| over the
    sampled rows and the keys they attend to, a row passes when its out and
    lse are finite, ``||out - ref|| / ||sum_j p_j |v_j| || <= C_OUT*u + C_SCORE*u32*M``
    (relative to the terms the row sums: a row whose terms cancel is judged
    by the rounding they carry) and
    ``|lse - ref_lse| <= C_SCORE*u32*(1 + M + |ref_lse|)``, plus u in half
    types (whose kernels may sum probabilities rounded to u). The tolerance
    scales with M because a kernel's score rounding does: a fixed tolerance
    fails correct results on large inputs, or passes wrong ones on small.

    Returns a dict: ``ok``; ``max_rel_error`` and ``tolerance`` (out);
    ``max_lse_error`` and ``lse_tolerance``; ``score_magnitude`` (M); counts
    of (row, head) pairs that failed (``rows_failed``), whose out or lse is
    non-finite (``nonfinite_out``, ``nonfinite_lse``) or whose reference is
    (``nonfinite_reference``); ``worst`` (batch, head, position) of the row
    whose error is largest relative to its tolerance; and ``reasons``, one line per failure kind.
    Errors are ``inf`` where a value is non-finite.
    """
    group, p, meta = open_group(store_path, mode="r", storage_options=storage_options)
    if not meta.get("fwd") or meta["fwd"].get("status") != "done":
        raise StoreError("verify needs a finished forward pass: run it first")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    if batch is not None and (
        isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < p.batch
    ):
        raise ValueError(f"batch must be an int in [0, {p.batch}), got {batch!r}")
    rng = np.random.default_rng(seed)
    n = min(rows, p.seq_len)
    pos = np.sort(rng.choice(p.seq_len, size=n, replace=False))
    batches = [batch] if batch is not None else list(range(p.batch))
    found = [_batch(group, p, b, pos) for b in batches]
    ref = torch.cat([f["ref"] for f in found], dim=1)  # [H, rows, D]
    size = torch.cat([f["size"] for f in found], dim=1)
    ref_lse = torch.cat([f["ref_lse"] for f in found], dim=1)
    got = torch.cat([f["got"] for f in found], dim=1)
    got_lse = torch.cat([f["got_lse"] for f in found], dim=1)
    m = max(f["m"] for f in found)
    return _judge(ref, size, ref_lse, got, got_lse, m, p.dtype, pos, batches, p.heads)


def _batch(group: Any, p: Any, b: int, pos: np.ndarray) -> dict:
    """Reference and stored rows of one batch, streaming one kv head at a time."""
    r, n = p.group_ratio, len(pos)
    pos_t = torch.from_numpy(pos)
    stop = int(pos.max()) + 1 if p.is_causal else p.seq_len
    q = _rows(group["q"], b, pos, p.dtype)  # [H, n, D] float64
    ref = torch.empty((p.heads, n, p.head_dim), dtype=torch.float64)
    size = torch.empty((p.heads, n, p.head_dim), dtype=torch.float64)  # sum_j p_j |v_j|
    ref_lse = torch.empty((p.heads, n), dtype=torch.float64)
    kmax = 0.0
    for g in range(p.kv_heads):
        qg = q[g * r : (g + 1) * r]  # [r, n, D]
        mx = torch.full((r, n), -math.inf, dtype=torch.float64)
        s = torch.zeros((r, n), dtype=torch.float64)
        acc = torch.zeros((r, n, p.head_dim), dtype=torch.float64)
        acc_abs = torch.zeros((r, n, p.head_dim), dtype=torch.float64)
        for a in range(0, stop, group["k"].chunks[2]):
            z = min(a + group["k"].chunks[2], stop)
            k = _block(group["k"], b, g, a, z, p.dtype)  # [c, D]
            v = _block(group["v"], b, g, a, z, p.dtype)
            kmax = max(kmax, _finite_max(k.norm(dim=-1)))
            sc = torch.einsum("hnd,kd->hnk", qg, k) * p.scale
            if p.is_causal:
                keys = torch.arange(a, z)
                sc = sc.masked_fill(keys[None, None, :] > pos_t[None, :, None], -math.inf)
            m_new = torch.maximum(mx, sc.amax(-1))
            safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            alpha = torch.exp(mx - safe)
            pexp = torch.exp(sc - safe[..., None])
            s = s * alpha + pexp.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("hnk,kd->hnd", pexp, v)
            acc_abs = acc_abs * alpha[..., None] + torch.einsum("hnk,kd->hnd", pexp, v.abs())
            mx = m_new
        ref[g * r : (g + 1) * r] = acc / s[..., None]
        size[g * r : (g + 1) * r] = acc_abs / s[..., None]
        ref_lse[g * r : (g + 1) * r] = mx + torch.log(s)
    qmax = _finite_max(q.norm(dim=-1))
    return {
        "ref": ref,
        "size": size,
        "ref_lse": ref_lse,
        "got": _rows(group["out"], b, pos, p.dtype),
        "got_lse": _rows(group["lse"], b, pos, "float32"),
        "m": p.scale * qmax * kmax,
    }


def _judge(ref, size, ref_lse, got, got_lse, m, dtype, pos, batches, heads) -> dict:  # noqa: ANN001
    u = UNIT_ROUNDOFF[dtype]
    tol = C_OUT * u + C_SCORE * U32 * m
    ref_ok = torch.isfinite(ref).all(-1) & torch.isfinite(ref_lse)  # [H, rows]
    out_ok = torch.isfinite(got).all(-1)
    lse_ok = torch.isfinite(got_lse)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    rel = (got - ref).norm(dim=-1) / size.norm(dim=-1).clamp_min(1e-300)
    rel = torch.where(ref_ok & out_ok, rel, inf)
    lse_err = torch.where(ref_ok & lse_ok, (got_lse - ref_lse).abs(), inf)
    finite_lse = torch.where(ref_ok, ref_lse.abs(), 0.0)
    lse_tol = C_SCORE * U32 * (1 + m + float(finite_lse.max())) + (u if u > U32 else 0.0)
    bad_out, bad_lse = rel > tol, lse_err > lse_tol
    ratio = torch.maximum(rel / tol, lse_err / lse_tol)
    worst = int(ratio.flatten().argmax())
    h, j = divmod(worst, ratio.shape[1])
    reasons = []
    counts = {
        "nonfinite_reference": int((~ref_ok).sum()),
        "nonfinite_out": int((ref_ok & ~out_ok).sum()),
        "nonfinite_lse": int((ref_ok & ~lse_ok).sum()),
    }
    if counts["nonfinite_reference"]:
        reasons.append(
            f"{counts['nonfinite_reference']} (row, head) references are not finite: "
            "the inputs hold NaN/Inf"
        )
    if counts["nonfinite_out"]:
        reasons.append(f"{counts['nonfinite_out']} (row, head) outputs hold NaN/Inf")
    if counts["nonfinite_lse"]:
        reasons.append(f"{counts['nonfinite_lse']} (row, head) lse values are NaN/Inf")
    finite = ref_ok & out_ok & lse_ok
    if int((bad_out & finite).sum()):
        reasons.append(
            f"{int((bad_out & finite).sum())} (row, head) outputs are off by more than "
            f"the tolerance {tol:.2e}"
        )
    if int((bad_lse & finite).sum()):
        reasons.append(
            f"{int((bad_lse & finite).sum())} (row, head) lse values are off by more "
            f"than the lse tolerance {lse_tol:.2e}"
        )
    n = len(pos)
    return {
        "rows": n * len(batches),
        "heads": heads,
        "max_rel_error": float(rel.max()),
        "tolerance": tol,
        "max_lse_error": float(lse_err.max()),
        "lse_tolerance": lse_tol,
        "score_magnitude": m,
        "rows_failed": int((bad_out | bad_lse).sum()),
        **counts,
        "worst": (batches[j // n], h, int(pos[j % n])),
        "reasons": reasons,
        "ok": not reasons,
    }


def _rows(arr: Any, b: int, pos: np.ndarray, dtype: str) -> torch.Tensor:
    """Rows ``pos`` (sorted) of arr [B, H, L, ...] for batch b, every head, as
    float64 [H, len(pos), ...]: one read per (head, chunk holding a sampled
    row), each no larger than a chunk."""
    c = arr.chunks[2]
    heads = []
    for h in range(arr.shape[1]):
        parts = []
        for _, grp in groupby(pos.tolist(), key=lambda i: i // c):
            idx = np.asarray(list(grp))
            a, z = int(idx[0]), int(idx[-1]) + 1
            data = chunkio.read(arr, (b, h, slice(a, z)))
            parts.append(to_torch(data, dtype)[torch.from_numpy(idx - a)])
        heads.append(torch.cat(parts).double())
    return torch.stack(heads)


def _finite_max(t: torch.Tensor) -> float:
    """Largest finite entry (0 if none): NaN/Inf inputs are reported as a
    non-finite reference, not allowed to make the tolerance NaN."""
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else 0.0


def _block(arr: Any, b: int, h: int, a: int, z: int, dtype: str) -> torch.Tensor:
    return to_torch(chunkio.read(arr, (b, h, slice(a, z))), dtype).double()
