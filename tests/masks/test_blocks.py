"""Block-sparse masks (``qkv/masks/blocks.py``: ``block_sparse``, ``random_blocks``) against their
layouts, tiles exact on the layout's own grid and conservative on others."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mask_truth import brute, check_kinds, dense
from qkv import masks as M

dims = st.integers(1, 13)


@given(data=st.data())
def test_block_sparse_and_random_blocks(data):
    bs = data.draw(st.integers(1, 4))
    Lq, Lk = data.draw(dims), data.draw(dims)
    nqb, nkb = -(-Lq // bs), -(-Lk // bs)
    layout = torch.tensor(data.draw(st.lists(st.booleans(), min_size=nqb * nkb, max_size=nqb * nkb))).view(nqb, nkb)
    m = M.block_sparse(layout, bs)
    assert torch.equal(dense(m, 1, 1, Lq, Lk), brute(lambda b, h, i, j: layout[i // bs, j // bs], 1, 1, Lq, Lk))
    check_kinds(m, 1, 1, Lq, Lk, bs, bs, exact=True)
    check_kinds(m, 1, 1, Lq, Lk, bs + 1, bs * 2, exact=False)
    r = M.random_blocks(2, bs, seed=3)
    d1, d2 = dense(r, 1, 1, Lq, Lk), dense(M.random_blocks(2, bs, seed=3), 1, 1, Lq, Lk)
    assert torch.equal(d1, d2), "same seed, same blocks"
    per_row_blocks = d1[0, 0, ::bs].view(-1, Lk)[:, ::bs].sum(-1)
    assert bool((per_row_blocks == min(2, nkb)).all())
    check_kinds(r, 1, 1, Lq, Lk, bs, bs, exact=True)


def test_block_masks_key_on_their_layout_and_follow_the_device():
    lay = torch.eye(3, dtype=torch.bool)
    m = M.block_sparse(lay, 2)
    k = m.cache_key()
    assert M.block_sparse(lay.clone(), 2).cache_key() == k and M.block_sparse(lay, 3).cache_key() != k
    assert M.random_blocks(1, 4, seed=0).cache_key() != M.random_blocks(1, 4, seed=1).cache_key()
    r = M.random_blocks(1, 4)
    r.check(M.Shape(1, 1, 8, 8))
    assert r.to("meta") is r and all(t.device.type == "meta" for t in r._cache.values())
    assert "tied to a layout" in m.shard_blocker()


def test_block_sparse_errors_name_the_argument():
    with pytest.raises(ValueError, match="does not fit"):
        M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 2).to_dense(1, 1, 8, 4)
    with pytest.raises(ValueError, match="block_size"):
        M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="random_blocks"):
        M.random_blocks(-1, 2)
