"""The ``Mask`` type (``qkv/masks/base.py``): the questions backends ask it and their defaults, its
algebra (``&``, ``|``, ``~``), cache keys, FlexAttention conventions, and the tracing rule."""

from __future__ import annotations

import itertools

import pytest
import torch

from mask_truth import brute, check_kinds, dense
from qkv import masks as M
from qkv.masks import EMPTY, FULL, PARTIAL, Shape


class _IdMask(M.Mask):
    """A user's mask that holds per-position data (token kinds) of whatever shard it was built with."""

    name = "same_kind"

    def __init__(self, kinds: torch.Tensor):
        self.kinds = kinds

    def evaluate(self, s, b, h, q, k):
        return self.kinds[q] == self.kinds[k]


def test_a_mask_that_does_not_say_how_to_shard_refuses():
    m = _IdMask(torch.tensor([0, 1, 0, 1]))
    assert "does not say how it maps to global positions" in m.shard_blocker()
    with pytest.raises(NotImplementedError, match="global positions"):
        m.globalize(lambda t: t)
    with pytest.raises(NotImplementedError, match="global positions"):
        (M.causal() & m).globalize(lambda t: t)  # composites ask their parts
    assert (M.causal() & M.sliding_window(3)).shard_blocker() is None
    assert "tied to a layout" in M.from_dense(torch.ones(4, 4, dtype=torch.bool)).shard_blocker()


def test_a_subclass_that_defines_only_evaluate_gets_safe_defaults():
    """No bounds: tiles are evaluated (exact); no key: no plan is shared; not a window; nothing to move."""
    kinds = torch.tensor([0, 1, 1, 0, 2, 2, 2])
    m = _IdMask(kinds)
    assert torch.equal(dense(m, 1, 1, 7, 7), brute(lambda b, h, i, j: kinds[i] == kinds[j], 1, 1, 7, 7))
    for bq, bk in itertools.product((1, 2, 3), (1, 2, 4)):
        check_kinds(m, 1, 1, 7, 7, bq, bk, exact=True)
    assert m.bounds(Shape(1, 1, 7, 7), *(torch.zeros(1, 1, dtype=torch.long),) * 4) is None
    assert m.cache_key() is None and "names no cache key" in m.cache_blocker()
    assert m.window() is None and not m.is_causal and not m.is_full
    assert m.to("cpu") is m
    anys, alls = m.tile_bounds(Shape(1, 1, 7, 7), 4, 4)  # the extension point, called as block_kinds calls it
    assert anys.shape[-2:] == alls.shape[-2:] == (2, 2) and not bool((alls & ~anys).any())


def test_or_is_not_an_and():
    """``|`` and ``&`` are siblings: code that asks one never mistakes the other."""
    a = M.causal() | M.global_tokens(2)
    b = M.causal() & M.global_tokens(2)
    assert type(a).__name__ == "_Or" and type(b).__name__ == "_And"
    assert not isinstance(a, type(b)) and not isinstance(b, type(a))
    x, y = dense(a, 1, 1, 6, 6), dense(b, 1, 1, 6, 6)
    assert not torch.equal(x, y)


def test_the_algebra_takes_tensors_and_mask_mods_and_combines_tile_answers():
    t = torch.ones(6, 6, dtype=torch.bool).triu()  # keys at or after the query
    both = M.causal() & t
    either = (lambda b, h, q, k: q == k) | ~M.causal()  # a mask_mod on the left: __ror__
    assert torch.equal(dense(both, 1, 1, 6, 6)[0, 0], torch.eye(6, dtype=torch.bool))
    assert torch.equal(dense(either, 1, 1, 6, 6)[0, 0], t)
    for m in (both, either, ~(M.causal() & M.sliding_window(2))):
        for bq, bk in ((2, 2), (3, 2), (4, 5)):
            check_kinds(m, 1, 1, 6, 6, bq, bk, exact=False)
    # ~ swaps the bounds: a full tile of the mask is an empty one of its complement
    kinds = (~M.causal()).block_kinds(Shape(1, 1, 8, 8), 4, 4)[0, 0]
    assert kinds.tolist() == [[PARTIAL, FULL], [EMPTY, PARTIAL]]
    with pytest.raises(TypeError, match="cannot combine a mask with None"):
        M.causal() & None  # type: ignore[operator]
    with pytest.raises(TypeError, match="mask must be"):
        M.causal() | 3  # type: ignore[operator]


def test_cache_keys_tell_equal_masks_apart_from_different_ones():
    key = lambda m: m.cache_key()  # noqa: E731
    assert key(M.causal() & M.sliding_window(4)) == key(M.causal() & M.sliding_window(4))
    assert key(M.causal() & M.sliding_window(4)) != key(M.causal() & M.sliding_window(5))
    assert key(M.causal() & M.sliding_window(4)) != key(M.causal() | M.sliding_window(4))
    assert key(M.document([0, 0, 1])) == key(M.document(torch.tensor([0, 0, 1])))
    assert key(M.document([0, 0, 1])) != key(M.document([0, 1, 1]))
    assert key(M.padding([3, 4])) != key(M.padding([4, 4]))
    assert key(M.dilated(4, 2)) != key(M.sliding_window(4))
    assert key(~M.causal()) != key(M.causal()) and key(M.causal() & _IdMask(torch.zeros(2))) is None


def test_tensor_key_is_by_contents_and_unknown_while_traced(monkeypatch):
    ids = torch.tensor([0, 0, 1, 1])
    assert M.tensor_key(ids) == M.tensor_key(ids.clone()) != M.tensor_key(ids.int())  # dtype counts
    big = torch.zeros(1 << 16, dtype=torch.long)  # 512 KiB: keyed by a digest, still by contents
    k = M.tensor_key(big)
    big[12345] = 1
    assert M.tensor_key(big) != k
    assert M.tensor_key(torch.empty(3, device="meta")) is None
    m = M.document(ids) & M.causal()
    assert m.cache_key() is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert M.tensor_key(ids) is None and m.cache_key() is None
    assert "not read while torch.compile traces" in m.cache_blocker()
    M.padding([9]).check(Shape(1, 1, 4, 4))  # value checks are skipped in a trace (they run eagerly)


def test_mask_mod_works_under_flex_attention_conventions():
    m = M.causal() & M.sliding_window(2)
    mod = m.mask_mod(4, 6)
    for i, j in itertools.product(range(4), range(6)):
        got = mod(torch.tensor(0), torch.tensor(0), torch.tensor(i), torch.tensor(j))
        assert bool(got) == (i + 2 - 2 <= j <= i + 2)


def test_to_flex_block_mask_agrees_with_dense():
    pytest.importorskip("torch.nn.attention.flex_attention")
    m = M.causal() & M.sliding_window(40)
    bm = m.to_flex_block_mask(1, 1, 256, 256, BLOCK_SIZE=128)
    dense_from_flex = bm.to_dense()  # (1, 1, nq, nk) block-level: 1 where any element may attend
    kinds = m.block_kinds(Shape(1, 1, 256, 256), 128, 128)
    assert torch.equal(dense_from_flex.bool(), kinds != EMPTY)


def test_to_moves_what_composites_hold():
    ids = torch.tensor([0, 0, 1])
    m = (M.document(ids) & M.causal()) | ~M.from_dense(torch.ones(3, 3, dtype=torch.bool))
    assert m.to("meta") is m
    assert m.a.a.q_ids.device.type == "meta" and m.b.a.t.device.type == "meta"
