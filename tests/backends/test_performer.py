"""``performer`` (FAVOR+): the kernel estimate is unbiased, attention converges to exact softmax attention
as features grow (fixed seed), causal form never sees the future, orthogonal draws are orthogonal."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.backends.performer import draw_projection
from qkv.masks import causal


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def inputs(L: int = 48, D: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # |q|, |k| ~ 1 after the 1/sqrt(D) scale: the regime where FAVOR+'s variance is moderate
    q = torch.randn(2, 2, L, D, generator=g, dtype=torch.float64) * 0.35
    k = torch.randn(2, 2, L, D, generator=g, dtype=torch.float64) * 0.35
    v = torch.randn(2, 2, L, 8, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
def test_converges_to_softmax_attention(is_causal: bool) -> None:
    q, k, v = inputs()
    mask = causal() if is_causal else None
    exact = qkv.attention(q, k, v, backend="reference", mask=mask)
    errs = []
    for m in (4, 32, 256, 2048):
        # average a few seeds so the trend is not one draw's luck
        errs.append(
            sum(
                rel(qkv.attention(q, k, v, backend="performer", mask=mask, num_features=m, seed=s), exact)
                for s in range(3)
            )
            / 3
        )
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.05, errs
    assert errs[0] > 3 * errs[-1], errs


def test_kernel_is_unbiased() -> None:
    """Mean of phi(q).phi(k) over many independent (i.i.d.) draws equals exp(q.k)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.4
    k = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.4
    w = draw_projection(200_000, 4, seed=3, orthogonal=False, dtype=torch.float64)
    f = lambda x: torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2)  # noqa: E731
    est = f(q) @ f(k).T / w.shape[0]
    torch.testing.assert_close(est, torch.exp(q @ k.T), rtol=0.02, atol=0)


def test_orthogonal_blocks() -> None:
    w = draw_projection(20, 8, seed=0)
    block = w[:8] / w[:8].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)
    assert not torch.equal(draw_projection(20, 8, seed=0), draw_projection(20, 8, seed=1))
    torch.testing.assert_close(draw_projection(20, 8, seed=5), draw_projection(20, 8, seed=5))


def test_projection_option_and_gqa() -> None:
    q, k, v = inputs(L=10)
    w = draw_projection(64, 16, seed=7, dtype=torch.float64)
    a = qkv.attention(q, k, v, backend="performer", projection=w)
    b = qkv.attention(q, k, v, backend="performer", num_features=64, seed=7)
    torch.testing.assert_close(a, b)
    # grouped-query: the same as repeating the kv heads
    out = qkv.attention(q, k[:, :1], v[:, :1], backend="performer", seed=2)
    ref = qkv.attention(q, k[:, :1].expand_as(k), v[:, :1].expand_as(v), backend="performer", seed=2)
    torch.testing.assert_close(out, ref)
    # a generator option draws new features at each call, reproducibly from the generator's seed
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a1 = qkv.attention(q, k, v, backend="performer", num_features=16, generator=g1)
    a2 = qkv.attention(q, k, v, backend="performer", num_features=16, generator=g1)
    assert not torch.allclose(a1, a2)
    torch.testing.assert_close(qkv.attention(q, k, v, backend="performer", num_features=16, generator=g2), a1)
    with pytest.raises(ValueError, match="projection"):
        qkv.attention(q, k, v, backend="performer", projection=torch.randn(4, 3))


def test_causal_never_sees_the_future() -> None:
    L = 10
    q, k, v = (t.clone().requires_grad_() for t in inputs(L=L))
    out = qkv.attention(q, k, v, backend="performer", mask=causal(), num_features=32, chunk_size=3)
    for t in range(L):
        grads = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True)
        assert all((g[:, :, t + 1 :] == 0).all() for g in grads), t
