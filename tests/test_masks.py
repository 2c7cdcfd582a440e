"""Every mask against its dense definition written out element by element, and tile classification
against the dense mask reduced per tile."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv import masks as M
from qkv.masks import EMPTY, FULL, PARTIAL, Shape


def brute(fn, B: int, H: int, Lq: int, Lk: int) -> torch.Tensor:
    """The definition, one (b, h, i, j) at a time with Python ints."""
    out = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b, h, i, j in itertools.product(range(B), range(H), range(Lq), range(Lk)):
        out[b, h, i, j] = bool(fn(b, h, i, j))
    return out


def dense(m: M.Mask, B: int, H: int, Lq: int, Lk: int) -> torch.Tensor:
    return m.to_dense(B, H, Lq, Lk).expand(B, H, Lq, Lk)


def check_kinds(m: M.Mask, B: int, H: int, Lq: int, Lk: int, bq: int, bk: int, exact: bool) -> None:
    """FULL tiles are full and EMPTY tiles empty; for formula masks every tile is classified exactly."""
    d = dense(m, B, H, Lq, Lk)
    kinds = m.block_kinds(Shape(B, H, Lq, Lk), bq, bk).expand(B, H, -1, -1)
    assert kinds.shape[-2:] == (-(-Lq // bq), -(-Lk // bk))
    for b, h, qi, ki in itertools.product(range(B), range(H), range(kinds.shape[2]), range(kinds.shape[3])):
        t = d[b, h, qi * bq : (qi + 1) * bq, ki * bk : (ki + 1) * bk]
        truth = FULL if bool(t.all()) else EMPTY if not bool(t.any()) else PARTIAL
        got = int(kinds[b, h, qi, ki])
        if exact:
            assert got == truth, (m, b, h, qi, ki, got, truth)
        else:
            assert got == truth or got == PARTIAL, (m, b, h, qi, ki, got, truth)


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
    ]
    for m, fn in cases:
        assert torch.equal(dense(m, 1, 1, Lq, Lk), brute(fn, 1, 1, Lq, Lk)), m
        check_kinds(m, 1, 1, Lq, Lk, bq, bk, exact=not isinstance(m, type(M.dilated(1, 2))))


@given(data=st.data(), Lk=dims, bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_padding_and_global_tokens(data, Lk, bq, bk):
    B, Lq = 2, data.draw(dims)
    lens = data.draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B))
    qlens = data.draw(st.lists(st.integers(0, Lq), min_size=B, max_size=B))
    g = data.draw(st.lists(st.integers(0, Lk - 1), max_size=3))
    off = Lk - Lq
    cases = [
        (M.padding(lens), lambda b, h, i, j: j < lens[b], True),
        (M.padding(lens, qlens), lambda b, h, i, j: j < lens[b] and i < qlens[b], False),
        (M.global_tokens(g), lambda b, h, i, j: j in g or (i + off) in g, True),
        (M.global_tokens(g) | M.causal(), lambda b, h, i, j: j in g or (i + off) in g or j <= i + off, False),
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


def test_from_dense_from_fn_and_bare_mask_mod_agree():
    torch.manual_seed(0)
    t = torch.rand(2, 3, 5, 6) > 0.5
    m1 = M.from_dense(t)

    def mod(b, h, q_idx, kv_idx):
        return t[b, h, q_idx, kv_idx]

    m2 = M.from_fn(mod)
    m3 = M.as_mask(mod)
    for m in (m1, m2, m3):
        assert torch.equal(dense(m, 2, 3, 5, 6), t)
        check_kinds(m, 2, 3, 5, 6, 2, 4, exact=True)
    assert torch.equal(dense(m1 & ~m2, 2, 3, 5, 6), torch.zeros_like(t))
    assert torch.equal(dense(m1 | ~m2, 2, 3, 5, 6), torch.ones_like(t))
    # broadcast dense masks keep their singleton dims
    assert M.from_dense(torch.ones(5, 6, dtype=torch.bool)).to_dense(2, 3, 5, 6).shape == (1, 1, 5, 6)


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


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="left must be >= 0"):
        M.sliding_window(-1)
    with pytest.raises(ValueError, match="right must be >= 0"):
        M.sliding_window(3, -2)
    with pytest.raises(TypeError, match="left must be an int"):
        M.sliding_window(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, 4\]"):
        M.padding([5]).to_dense(1, 1, 3, 4)
    with pytest.raises(ValueError, match="one length per batch row"):
        M.padding([1, 2, 3]).to_dense(2, 1, 3, 4)
    with pytest.raises(ValueError, match="q_ids has length 3 but the sequence has Lq=4"):
        M.document([0, 0, 1]).to_dense(1, 1, 4, 4)
    with pytest.raises(ValueError, match="batch 3 but B=2"):
        M.document(torch.zeros(3, 4, dtype=torch.long)).to_dense(2, 1, 4, 4)
    with pytest.raises(TypeError, match="integers"):
        M.document(torch.zeros(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        M.from_dense(torch.ones(3, 5, dtype=torch.bool)).to_dense(1, 1, 4, 5)
    with pytest.raises(TypeError, match="bool tensor"):
        M.from_dense(torch.ones(4, 5))
    with pytest.raises(ValueError, match="does not fit"):
        M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 2).to_dense(1, 1, 8, 4)
    with pytest.raises(ValueError, match="dilation"):
        M.dilated(4, 0)
    with pytest.raises(ValueError, match="global_tokens"):
        M.global_tokens([9]).to_dense(1, 1, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        M.from_cu_seqlens([1, 3])
    with pytest.raises(TypeError, match="mask must be"):
        M.as_mask(3)  # type: ignore[arg-type]


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


def test_or_is_not_an_and():
    """``|`` and ``&`` are siblings: code that asks one never mistakes the other."""
    a = M.causal() | M.global_tokens(2)
    b = M.causal() & M.global_tokens(2)
    assert type(a).__name__ == "_Or" and type(b).__name__ == "_And"
    assert not isinstance(a, type(b)) and not isinstance(b, type(a))
    x, y = dense(a, 1, 1, 6, 6), dense(b, 1, 1, 6, 6)
    assert not torch.equal(x, y)


def test_cache_keys_tell_equal_masks_apart_from_different_ones():
    key = lambda m: m.cache_key()  # noqa: E731
    assert key(M.causal() & M.sliding_window(4)) == key(M.causal() & M.sliding_window(4))
    assert key(M.causal() & M.sliding_window(4)) != key(M.causal() & M.sliding_window(5))
    assert key(M.causal() & M.sliding_window(4)) != key(M.causal() | M.sliding_window(4))
    assert key(M.document([0, 0, 1])) == key(M.document(torch.tensor([0, 0, 1])))
    assert key(M.document([0, 0, 1])) != key(M.document([0, 1, 1]))
    assert key(M.padding([3, 4])) != key(M.padding([4, 4]))
    assert key(M.dilated(4, 2)) != key(M.sliding_window(4))


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


def test_document_masks_gather_their_ids_when_globalized():
    local = M.document(torch.tensor([0, 0, 1]))
    g = (M.causal() & local).globalize(lambda t: torch.cat([t, t + 2]))
    expect = M.causal() & M.document(torch.tensor([0, 0, 1, 2, 2, 3]))
    assert torch.equal(g.to_dense(1, 1, 6, 6), expect.to_dense(1, 1, 6, 6))
