"""``Mask.allows_all(shape)``: True only when the mask lets every query of the problem see every key, the
rule by which ``qkv.attention`` drops a mask (a decoding step under ``causal()``). Held against the
definition written out element by element (``mask_truth.brute``) and against ``to_dense``."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mask_truth import brute
from qkv import masks as M
from qkv.masks import Shape

lengths = st.integers(0, 12)


def _near(n: int) -> st.SearchStrategy[int | None]:
    """A window side: unbounded, any reach, or one within 2 of ``n`` (the boundary the rule draws)."""
    return st.one_of(st.none(), st.integers(0, 13), st.integers(-2, 2).map(lambda d: max(0, n + d)))


@given(data=st.data(), Lq=lengths, Lk=lengths)
def test_a_window_allows_all_exactly_when_every_pair_is_in_it(data, Lq, Lk):
    """For every window ``(left, right)`` (``None`` unbounded) under bottom-right alignment, on every
    shape: ``allows_all`` is True exactly when the definition allows every pair (both ways: it is the
    whole rule for windows, not only a safe one). Sides are drawn near ``Lk - 1`` and ``Lq - 1``."""
    left, right = data.draw(_near(Lk - 1)), data.draw(_near(Lq - 1))
    off = Lk - Lq

    def allowed(b, h, i, j):
        p = i + off
        return (right is None or j <= p + right) and (left is None or j >= p - left)

    m = M.sliding_window(left, right) if left is not None and right is not None else None
    if m is None:  # the unbounded sides come from causal() (None, 0) and full() (None, None)
        if right == 0 and left is None:
            m = M.causal()
        elif right is None and left is None:
            m = M.full()
        else:
            return  # no public mask is this window
    assert m.window() == (left, right)
    truth = bool(brute(allowed, 1, 1, Lq, Lk).all())
    s = Shape(1, 1, Lq, Lk)
    assert m.allows_all(s) == truth, (m, Lq, Lk)
    assert bool(m.to_dense(1, 1, Lq, Lk).all()) == truth


@given(Lq=lengths, Lk=lengths, left=st.integers(0, 13), right=st.integers(0, 13), n=st.integers(0, 4))
def test_every_mask_that_claims_all_pairs_allows_them(Lq, Lk, left, right, n):
    """Soundness for every kind of mask (the algebra, dilated windows, data masks, functions): where
    ``allows_all`` says True, ``to_dense`` is all True. A False is always safe (the mask is applied)."""
    masks = [
        M.causal(),
        M.full(),
        M.sliding_window(left, right),
        M.causal() & M.sliding_window(left),
        M.causal() | M.sliding_window(left, right),
        M.full() & M.causal(),
        ~M.causal(),
        ~M.full(),
        M.dilated(left, 1, right),
        M.dilated(left, 2, right),
        M.global_tokens(min(n, Lk)),
        M.global_tokens(min(n, Lk)) | M.causal(),
        M.prefix_lm(n),
        M.padding(min(n, Lk)),
        M.from_fn(lambda b, h, q, k: k >= 0),  # allows every pair, but a function says nothing: False
        M.from_dense(torch.ones(1, 1, Lq, Lk, dtype=torch.bool)),
    ]
    s = Shape(2, 3, Lq, Lk)
    for m in masks:
        if m.allows_all(s):
            assert bool(m.to_dense(2, 3, Lq, Lk).all()), (m, Lq, Lk)


def test_the_boundary_of_the_rule():
    """causal() allows every pair of one query (a decoding step) and of no longer block; a causal window
    needs ``left >= Lk - 1``; ``right >= Lq - 1`` on the other side; empty problems have no pair."""
    c = M.causal()
    assert c.allows_all(Shape(1, 8, 1, 128)) and c.allows_all(Shape(1, 1, 1, 1))
    assert not c.allows_all(Shape(1, 8, 2, 128))
    assert not c.allows_all(Shape(1, 1, 2, 1))  # more queries than keys: the first sees nothing
    w = M.causal() & M.sliding_window(127)
    assert w.allows_all(Shape(1, 1, 1, 128)) and not w.allows_all(Shape(1, 1, 1, 129))
    assert M.sliding_window(0, 3).allows_all(Shape(1, 1, 4, 1)) and not M.sliding_window(0, 2).allows_all(
        Shape(1, 1, 4, 1)
    )
    assert c.allows_all(Shape(1, 1, 0, 5)) and c.allows_all(Shape(1, 1, 5, 0))
    assert M.full().allows_all(Shape(2, 2, 7, 9))
    assert not M.dilated(None, 2).allows_all(Shape(1, 1, 1, 2))  # a gap at distance 1
    assert not M.padding(3).allows_all(Shape(1, 1, 1, 3))  # data masks do not say (reading data costs)
