"""Masks from one number per batch row (``qkv/masks/lengths.py``: ``padding``, ``left_padding``,
``prefix_lm``) against their definitions, and their tiles classified from the numbers alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mask_truth import brute, check_kinds, dense
from qkv import masks as M
from qkv.masks import EMPTY, Shape

dims = st.integers(1, 13)


@given(data=st.data(), Lk=dims, bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_padding(data, Lk, bq, bk):
    B, Lq = 2, data.draw(dims)
    lens = data.draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B))
    qlens = data.draw(st.lists(st.integers(0, Lq), min_size=B, max_size=B))
    cases = [
        (M.padding(lens), lambda b, h, i, j: j < lens[b], True),
        (M.padding(lens, qlens), lambda b, h, i, j: j < lens[b] and i < qlens[b], False),
    ]
    for m, fn, exact in cases:
        assert torch.equal(dense(m, B, 1, Lq, Lk), brute(fn, B, 1, Lq, Lk)), m
        check_kinds(m, B, 1, Lq, Lk, bq, bk, exact=exact)


@given(data=st.data(), Lk=dims, bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_left_padding_alone_and_with_causal_windows_and_right_padding(data, Lk, bq, bk):
    B, Lq = 3, data.draw(dims)
    starts = data.draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B))
    ends = [data.draw(st.integers(s, Lk)) for s in starts]
    w = data.draw(st.integers(0, 5))
    off = Lk - Lq
    cases = [
        (M.left_padding(starts), lambda b, h, i, j: j >= starts[b]),
        (M.left_padding(starts) & M.causal(), lambda b, h, i, j: starts[b] <= j <= i + off),
        (
            M.causal() & M.sliding_window(w) & M.left_padding(starts),
            lambda b, h, i, j: max(starts[b], i + off - w) <= j <= i + off,
        ),
        (M.left_padding(starts) & M.padding(ends), lambda b, h, i, j: starts[b] <= j < ends[b]),
        (M.left_padding(starts[0]), lambda b, h, i, j: j >= starts[0]),
    ]
    for n, (m, fn) in enumerate(cases):
        assert torch.equal(dense(m, B, 1, Lq, Lk), brute(fn, B, 1, Lq, Lk)), m
        # alone the mask classifies exactly; an intersection of two masks' answers is conservative
        check_kinds(m, B, 1, Lq, Lk, bq, bk, exact=n in (0, 4))


def test_left_padding_classifies_from_its_starts_and_refuses_bad_starts(monkeypatch):
    m = M.left_padding(torch.tensor([0, 4096, 1 << 19]))
    monkeypatch.setattr(type(m), "evaluate", lambda *a: (_ for _ in ()).throw(AssertionError("evaluated")))
    kinds = m.block_kinds(Shape(3, 1, 1 << 20, 1 << 20), 1024, 1024)
    assert kinds.shape == (3, 1, 1024, 1024)
    assert [int((kinds[b] == EMPTY).sum()) for b in range(3)] == [0, 4 * 1024, 512 * 1024]
    assert M.left_padding([1, 2]).cache_key() != M.left_padding([1, 3]).cache_key()
    assert M.left_padding([1, 2]).cache_key() == M.left_padding(torch.tensor([1, 2])).cache_key()
    assert M.left_padding([1, 2]).shard_blocker() is None
    with pytest.raises(ValueError, match=r"starts must lie in \[0, 4\]"):
        M.left_padding([5]).to_dense(1, 1, 3, 4)
    with pytest.raises(ValueError, match="one start per batch row"):
        M.left_padding([1, 2, 3]).to_dense(2, 1, 3, 4)
    with pytest.raises(TypeError, match="left_padding: starts must hold integers"):
        M.left_padding(torch.zeros(2))


def test_padding_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, 4\]"):
        M.padding([5]).to_dense(1, 1, 3, 4)
    with pytest.raises(ValueError, match="one length per batch row"):
        M.padding([1, 2, 3]).to_dense(2, 1, 3, 4)


def test_lengths_follow_the_device_and_their_contents():
    lens = torch.tensor([3, 4])
    m = M.padding(lens) & M.left_padding(torch.tensor([0, 1]))
    k1 = m.cache_key()
    lens[0] = 2  # in place: the key follows the contents
    assert m.cache_key() != k1 and M.padding([3, 4]).cache_key() != M.padding([4, 4]).cache_key()
    assert m.to("meta") is m and m.a.n.device.type == "meta" and m.b.start.device.type == "meta"
    assert m.cache_key() is None  # a meta tensor has no contents to key
