"""The flex backend: lse through ``return_aux`` (``return_lse`` only on older
torch), and on CUDA only compiled, refused with a clear message otherwise."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as fa

from streamcqsa.kernels.backend import get_backend
from streamcqsa.kernels.flex import FlexBackend

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _reference(q, k, v, causal: bool, scale: float):  # noqa: ANN001, ANN202
    r = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(r, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse.unsqueeze(-1)).exp() @ v.repeat_interleave(r, 1), lse


def _inputs(m: int, n: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randn(1, 4, m, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _spy_kwargs(monkeypatch) -> list[dict]:  # noqa: ANN001
    seen: list[dict] = []
    real = fa.flex_attention

    def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(fa, "flex_attention", call)
    return seen


@pytest.mark.parametrize(("causal", "m", "n"), [(True, 96, 96), (False, 40, 72)])
def test_flex_asks_for_lse_with_return_aux(monkeypatch, causal, m, n):
    """No deprecated ``return_lse``; out and natural-log lse equal float64."""
    seen = _spy_kwargs(monkeypatch)
    q, k, v = _inputs(m, n)
    out, lse = FlexBackend().block_forward(q, k, v, causal=causal, scale=0.3)
    assert "return_lse" not in seen[0] and seen[0]["return_aux"].lse
    ref_out, ref_lse = _reference(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert lse.dtype == torch.float64  # float64 inputs keep a float64 lse
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_flex_uses_return_lse_where_torch_has_no_aux_request(monkeypatch):
    q, k, v = _inputs(64, 64)
    want = FlexBackend().block_forward(q, k, v, causal=True, scale=0.3)
    seen = _spy_kwargs(monkeypatch)
    monkeypatch.delattr(fa, "AuxRequest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # return_lse is deprecated where AuxRequest exists
        got = FlexBackend().block_forward(q, k, v, causal=True, scale=0.3)
    assert seen[0].get("return_lse") is True and "return_aux" not in seen[0]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_flex_on_cuda_runs_only_compiled():
    cuda = torch.device("cuda", 0)
    plain = FlexBackend()
    assert plain.available(torch.device("cpu"))
    assert not plain.available(cuda)
    assert "compile" in plain.unavailable_reason(cuda)
    with pytest.raises(ValueError, match="runs only compiled"):
        plain._functions(cuda)  # what block_forward calls first, with q.device
    with pytest.raises(ValueError, match="flex"):
        get_backend("flex", "cuda")
    compiled = FlexBackend(compile=True)
    assert compiled.available(cuda) and compiled.unavailable_reason(cuda) is None
    flex, _ = compiled._functions(torch.device("cpu"))
    assert flex is not fa.flex_attention  # wrapped by torch.compile, compiled on first call
