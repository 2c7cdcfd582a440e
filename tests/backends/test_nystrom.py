"""``nystrom``: exact with as many landmarks as tokens, error shrinking with landmarks, segment means and
the iterative pseudo-inverse against their definitions."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends.nystrom import iterative_pinv, segment_means
from qkv.masks import causal


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_exact_with_as_many_landmarks_as_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 24, 8, generator=g, dtype=torch.float64) for _ in range(3))
    exact = qkv.attention(q, k, v, backend="reference")
    got = qkv.attention(q, k, v, backend="nystrom", num_landmarks=24, pinv="exact")
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-9)
    # the paper's iterative pseudo-inverse converges to the same with enough iterations
    it = qkv.attention(q, k, v, backend="nystrom", num_landmarks=24, pinv_iterations=40)
    torch.testing.assert_close(it, exact, rtol=1e-8, atol=1e-8)
    # more landmarks than tokens are capped at the number of tokens
    torch.testing.assert_close(qkv.attention(q, k, v, backend="nystrom", num_landmarks=100, pinv="exact"), got)
    # weights reproduce the output
    out, w = qkv.attention(q, k, v, backend="nystrom", num_landmarks=24, pinv="exact", return_weights=True)
    torch.testing.assert_close(w @ v, out)


def test_error_shrinks_with_landmarks() -> None:
    g = torch.Generator().manual_seed(1)
    # smooth sequences (neighbouring tokens alike), where segment means are good landmarks
    base = torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64)
    q, k = (torch.nn.functional.interpolate(base, size=(64, 16), mode="bilinear") for _ in range(2))
    v = torch.randn(1, 2, 64, 16, generator=g, dtype=torch.float64)
    exact = qkv.attention(q, k, v, backend="reference")
    errs = [rel(qkv.attention(q, k, v, backend="nystrom", num_landmarks=m, pinv="exact"), exact) for m in (2, 8, 64)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6, errs


def test_segment_means_and_pinv() -> None:
    x = torch.arange(14, dtype=torch.float64).view(7, 2)
    got = segment_means(x, 3)  # segments floor(i*3/7): {0,1,2}, {3,4}, {5,6}
    want = torch.stack([x[0:3].mean(0), x[3:5].mean(0), x[5:7].mean(0)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(segment_means(x, 7), x)
    a = torch.softmax(torch.randn(3, 6, 6, dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), rtol=1e-7, atol=1e-7)


def test_declines() -> None:
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(NotImplementedError, match="causal"):
        qkv.attention(q, q, q, backend="nystrom", mask=causal())
    with pytest.raises(ValueError, match="num_landmarks"):
        qkv.attention(q, q, q, backend="nystrom", num_landmarks=0)
