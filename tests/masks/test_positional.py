"""Masks that compare positions (``qkv/masks/positional.py``) against their definitions written out element
by element, bottom-right aligned, and their tiles against the dense mask reduced per tile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mask_truth import brute, check_kinds, dense
from qkv import masks as M
from qkv.masks import EMPTY, Shape

dims = st.integers(1, 13)


@given(Lq=dims, Lk=dims, left=st.integers(0, 6), right=st.integers(0, 6), bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_positional_masks_bottom_right(Lq, Lk, left, right, bq, bk):
    off = Lk - Lq
    cases = [
        (M.causal(), lambda b, h, i, j: j <= i + off),
        (M.sliding_window(left, right), lambda b, h, i, j: i + off - left <= j <= i + off + right),
        (M.prefix_lm(left), lambda b, h, i, j: j < left or j <= i + off),
        (
            M.dilated(left, 2, right),
            lambda b, h, i, j: i + off - left <= j <= i + off + right and (i + off - j) % 2 == 0,
        ),
        (~M.causal(), lambda b, h, i, j: j > i + off),
        (M.causal() & M.sliding_window(left), lambda b, h, i, j: i + off - left <= j <= i + off),
        (M.full(), lambda b, h, i, j: True),
    ]
    for m, fn in cases:
        assert torch.equal(dense(m, 1, 1, Lq, Lk), brute(fn, 1, 1, Lq, Lk)), m
        check_kinds(m, 1, 1, Lq, Lk, bq, bk, exact=not isinstance(m, type(M.dilated(1, 2))))


@given(data=st.data(), Lk=dims, bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_global_tokens(data, Lk, bq, bk):
    B, Lq = 2, data.draw(dims)
    g = data.draw(st.lists(st.integers(0, Lk - 1), max_size=3))
    off = Lk - Lq
    cases = [
        (M.global_tokens(g), lambda b, h, i, j: j in g or (i + off) in g, True),
        (M.global_tokens(g) | M.causal(), lambda b, h, i, j: j in g or (i + off) in g or j <= i + off, False),
    ]
    for m, fn, exact in cases:
        assert torch.equal(dense(m, B, 1, Lq, Lk), brute(fn, B, 1, Lq, Lk)), m
        check_kinds(m, B, 1, Lq, Lk, bq, bk, exact=exact)


def test_named_masks_classify_without_dense_work(monkeypatch):
    """Formula masks never evaluate elements to classify tiles: 1M x 1M tokens classify instantly."""

    def boom(*a, **k):
        raise AssertionError("evaluated elements")

    m = (M.causal() & M.sliding_window(4096)) | M.global_tokens(16)
    for cls in (type(M.causal()), type(M.global_tokens(1))):
        monkeypatch.setattr(cls, "evaluate", boom)
    kinds = m.block_kinds(Shape(1, 1, 1 << 20, 1 << 20), 1024, 1024)
    assert kinds.shape == (1, 1, 1024, 1024)
    assert int((kinds != EMPTY).sum()) < 1024 * 8


def test_masks_say_whether_they_are_windows():
    assert M.causal().window() == (None, 0) and M.causal().is_causal
    assert M.full().window() == (None, None) and M.full().is_full
    assert (M.causal() & M.sliding_window(256)).window() == (256, 0)
    assert (M.sliding_window(8, 3) & M.sliding_window(5, 9)).window() == (5, 3)
    assert (M.causal() & M.causal()).is_causal
    for m in (M.dilated(8, 2), M.causal() | M.sliding_window(3), ~M.causal(), M.document([0, 1]), M.prefix_lm(3)):
        assert m.window() is None and not m.is_causal
    assert M.dilated(8, 1).window() == (8, 0)  # dilation 1 is a plain window


def test_positional_masks_shard_as_they_are_and_key_on_their_parameters():
    for m in (M.causal(), M.sliding_window(3, 1), M.dilated(4, 2), M.global_tokens([1, 5]), M.full()):
        assert m.shard_blocker() is None and m.globalize(lambda t: t) is m
    assert M.dilated(4, 2).cache_key() != M.sliding_window(4).cache_key()
    assert M.global_tokens([1, 5]).cache_key() == M.global_tokens([5, 1, 1]).cache_key()  # the same set
    assert M.global_tokens([1, 5]).cache_key() != M.global_tokens([1, 6]).cache_key()


def test_positional_errors_name_the_argument():
    with pytest.raises(ValueError, match="left must be >= 0"):
        M.sliding_window(-1)
    with pytest.raises(ValueError, match="right must be >= 0"):
        M.sliding_window(3, -2)
    with pytest.raises(TypeError, match="left must be an int"):
        M.sliding_window(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dilation"):
        M.dilated(4, 0)
    with pytest.raises(ValueError, match="global_tokens"):
        M.global_tokens([9]).to_dense(1, 1, 4, 4)
