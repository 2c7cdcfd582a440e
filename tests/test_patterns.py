"""Sparse patterns against their dense definitions written as loops, tile kinds consistent with the dense
mask, and attention with a pattern on the exact backends equal to the dense-mask reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv import patterns
from qkv.masks import EMPTY, FULL, Mask, Shape


def dense(fn, Lq: int, Lk: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    off = Lk - Lq
    return torch.tensor([[bool(fn(i + off, j)) for j in range(Lk)] for i in range(Lq)])


def check(mask: Mask, fn, Lq: int, Lk: int, bq: int = 4, bk: int = 3) -> None:  # type: ignore[no-untyped-def]
    want = dense(fn, Lq, Lk)
    got = mask.to_dense(1, 1, Lq, Lk)[0, 0]
    assert torch.equal(got, want), (mask, Lq, Lk)
    kinds = mask.block_kinds(Shape(1, 1, Lq, Lk), bq, bk)[0, 0]
    for a in range(kinds.shape[0]):
        for b in range(kinds.shape[1]):
            t = want[a * bq : (a + 1) * bq, b * bk : (b + 1) * bk]
            if kinds[a, b] == EMPTY:
                assert not t.any(), (mask, a, b)
            if kinds[a, b] == FULL:
                assert t.all(), (mask, a, b)


lengths = st.tuples(st.integers(1, 23), st.integers(1, 23))


@given(L=lengths, w=st.integers(0, 5), g=st.integers(0, 3))
def test_longformer(L: tuple[int, int], w: int, g: int) -> None:
    Lq, Lk = L
    g = min(g, Lk)  # global_tokens rejects positions beyond Lk
    check(patterns.longformer(w, g), lambda p, j: abs(p - j) <= w or j < g or 0 <= p < g, Lq, Lk)


@given(L=lengths, stride=st.integers(1, 6))
def test_strided(L: tuple[int, int], stride: int) -> None:
    Lq, Lk = L
    check(patterns.strided(stride), lambda p, j: j <= p and ((p - j) < stride or (p - j) % stride == 0), Lq, Lk)


@given(L=lengths, stride=st.integers(1, 6), c=st.integers(1, 6))
def test_fixed(L: tuple[int, int], stride: int, c: int) -> None:
    c = min(c, stride)
    Lq, Lk = L
    check(
        patterns.fixed(stride, c),
        lambda p, j: j <= p and (p // stride == j // stride or j % stride >= stride - c),
        Lq,
        Lk,
    )


@given(L=st.integers(1, 40), w=st.integers(0, 4), g=st.integers(0, 2), r=st.integers(0, 3), seed=st.integers(0, 9))
def test_bigbird(L: int, w: int, g: int, r: int, seed: int) -> None:
    bs = 4
    g = min(g, L)
    nb = -(-L // bs)
    gen = torch.Generator().manual_seed(seed)  # random_blocks' documented draw
    lay = torch.zeros(nb, nb, dtype=torch.bool)
    if min(r, nb):
        lay.scatter_(1, torch.rand(nb, nb, generator=gen).argsort(dim=-1)[:, : min(r, nb)], True)
    check(
        patterns.bigbird(w, g, r, bs, seed),
        lambda p, j: abs(p - j) <= w or j < g or p < g or bool(lay[p // bs, j // bs]),
        L,
        L,
    )
    # each query block sees min(r, nb) random blocks
    assert int(lay.sum()) == nb * min(r, nb)


@pytest.mark.parametrize(
    "mask", [patterns.longformer(3, 2), patterns.bigbird(2, 1, 1, 8, 0), patterns.strided(5), patterns.fixed(6, 2)]
)
def test_attention_with_patterns(mask: Mask) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = qkv.attention(q, k, v, mask=mask.to_dense(1, 1, 40, 40), backend="reference")
    for backend in ("reference", "sdpa", *(["tiled"] if "tiled" in qkv.backends.registered() else [])):
        got = qkv.attention(q.float(), k.float(), v.float(), mask=mask, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="window"):
        patterns.longformer(-1)
    with pytest.raises(ValueError, match="c must be <= stride"):
        patterns.fixed(4, 5)
    with pytest.raises(ValueError, match="stride"):
        patterns.strided(0)
