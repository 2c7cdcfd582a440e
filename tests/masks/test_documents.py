"""Packed sequences (``qkv/masks/documents.py``: ``document``, ``from_cu_seqlens``) against their
definitions; tiles classified from each block's min and max id; ids gathered over ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mask_truth import brute, check_kinds, dense
from qkv import masks as M
from qkv.masks import Shape


@given(data=st.data(), bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_document_sorted_ids_classify_exactly(data, bq, bk):
    L = data.draw(st.integers(1, 16))
    ids = sorted(data.draw(st.lists(st.integers(0, 3), min_size=L, max_size=L)))
    m = M.document(torch.tensor(ids))
    assert torch.equal(dense(m, 1, 1, L, L), brute(lambda b, h, i, j: ids[i] == ids[j], 1, 1, L, L))
    check_kinds(m, 1, 1, L, L, bq, bk, exact=True)
    mc = M.document(torch.tensor(ids)) & M.causal()
    check_kinds(mc, 1, 1, L, L, bq, bk, exact=False)


def test_document_batched_cross_ids_unsorted():
    q_ids = torch.tensor([[0, 1, 0, 2], [1, 1, 0, 0]])
    kv_ids = torch.tensor([[2, 0, 1], [0, 0, 1]])
    m = M.document(q_ids, kv_ids)
    want = brute(lambda b, h, i, j: q_ids[b, i] == kv_ids[b, j], 2, 1, 4, 3)
    assert torch.equal(dense(m, 2, 1, 4, 3), want)
    check_kinds(m, 2, 1, 4, 3, 2, 2, exact=False)


def test_document_classifies_from_its_ids_without_evaluating(monkeypatch):
    """The tiles come from the ids reduced per block (no element evaluated), on any grid."""
    m = M.document(torch.arange(1 << 16) // 1000)
    monkeypatch.setattr(type(m), "evaluate", lambda *a: (_ for _ in ()).throw(AssertionError("evaluated")))
    kinds = m.block_kinds(Shape(1, 1, 1 << 16, 1 << 16), 512, 256)
    assert kinds.shape == (1, 1, 128, 256) and int((kinds != 0).sum()) < 128 * 8


def test_from_cu_seqlens_matches_flash_attn_varlen_semantics():
    cu_q, cu_k = [0, 2, 5], [0, 3, 7]  # q lens 2, 3; k lens 3, 4
    m = M.from_cu_seqlens(cu_q, cu_k, causal=True)

    def fn(b, h, i, j):
        dq = 0 if i < 2 else 1
        dk = 0 if j < 3 else 1
        if dq != dk:
            return False
        qi, kj = i - cu_q[dq], j - cu_k[dk]
        nq, nk = cu_q[dq + 1] - cu_q[dq], cu_k[dk + 1] - cu_k[dk]
        return kj <= qi + nk - nq  # bottom-right within each sequence

    assert torch.equal(dense(m, 1, 1, 5, 7), brute(fn, 1, 1, 5, 7))
    plain = M.from_cu_seqlens([0, 2, 5])
    assert torch.equal(dense(plain, 1, 1, 5, 5), brute(lambda b, h, i, j: (i < 2) == (j < 2), 1, 1, 5, 5))


def test_document_masks_gather_their_ids_when_globalized():
    local = M.document(torch.tensor([0, 0, 1]))
    g = (M.causal() & local).globalize(lambda t: torch.cat([t, t + 2]))
    expect = M.causal() & M.document(torch.tensor([0, 0, 1, 2, 2, 3]))
    assert torch.equal(g.to_dense(1, 1, 6, 6), expect.to_dense(1, 1, 6, 6))
    assert "tied to a layout" in M.from_cu_seqlens([0, 2, 5], causal=True).shard_blocker()


def test_document_errors_name_the_argument():
    with pytest.raises(ValueError, match="q_ids has length 3 but the sequence has Lq=4"):
        M.document([0, 0, 1]).to_dense(1, 1, 4, 4)
    with pytest.raises(ValueError, match="batch 3 but B=2"):
        M.document(torch.zeros(3, 4, dtype=torch.long)).to_dense(2, 1, 4, 4)
    with pytest.raises(TypeError, match="integers"):
        M.document(torch.zeros(4))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        M.from_cu_seqlens([1, 3])
