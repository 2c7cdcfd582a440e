"""Masks from a bool tensor or a ``mask_mod`` (``qkv/masks/custom.py``: ``from_dense``, ``from_fn``,
``as_mask``): they agree with the tensor they came from and classify their tiles by evaluating them."""

from __future__ import annotations

import pytest
import torch

from mask_truth import check_kinds, dense
from qkv import masks as M


def test_from_dense_from_fn_and_bare_mask_mod_agree():
    torch.manual_seed(0)
    t = torch.rand(2, 3, 5, 6) > 0.5

    def mod(b, h, q_idx, kv_idx):
        return t[b, h, q_idx, kv_idx]

    m1 = M.from_dense(t)
    m2 = M.from_fn(mod)
    m3 = M.as_mask(mod)
    for m in (m1, m2, m3):
        assert torch.equal(dense(m, 2, 3, 5, 6), t)
        check_kinds(m, 2, 3, 5, 6, 2, 4, exact=True)
    assert torch.equal(dense(m1 & ~m2, 2, 3, 5, 6), torch.zeros_like(t))
    assert torch.equal(dense(m1 | ~m2, 2, 3, 5, 6), torch.ones_like(t))
    # broadcast dense masks keep their singleton dims
    assert M.from_dense(torch.ones(5, 6, dtype=torch.bool)).to_dense(2, 3, 5, 6).shape == (1, 1, 5, 6)


def test_as_mask_reads_what_mask_takes():
    t = torch.ones(3, 3, dtype=torch.bool).tril()
    assert M.as_mask(None) is None
    m = M.causal()
    assert M.as_mask(m) is m
    assert torch.equal(M.as_mask(t).to_dense(1, 1, 3, 3)[0, 0], t)
    assert M.as_mask(lambda b, h, q, k: q >= k).name == "<lambda>"


def test_custom_errors_name_the_argument():
    with pytest.raises(ValueError, match="does not broadcast"):
        M.from_dense(torch.ones(3, 5, dtype=torch.bool)).to_dense(1, 1, 4, 5)
    with pytest.raises(TypeError, match="bool tensor"):
        M.from_dense(torch.ones(4, 5))
    with pytest.raises(TypeError, match="mask must be"):
        M.as_mask(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must return a bool tensor"):
        M.from_fn(lambda b, h, q, k: q - k).to_dense(1, 1, 2, 2)
    with pytest.raises(TypeError, match="from_fn: mask_mod must be callable"):
        M.from_fn(3)  # type: ignore[arg-type]
