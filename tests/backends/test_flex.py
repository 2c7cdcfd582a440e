"""``flex`` (PyTorch FlexAttention) against the float64 oracle, its block masks against
``create_block_mask``, its compile bookkeeping, its declines, and where ``auto`` sends requests.

FlexAttention uncompiled (``compile=False``) gives breadth (every mask kind, score mod, GQA, ``Lq !=
Lk``, empty rows, drawn by hypothesis); the compiled CPU kernel is checked on a few shapes (each
compile takes 10-30 s on two cores)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import qkv
from oracle import check_backend
from qkv import backends
from qkv import masks as M
from qkv import scores as S
from qkv.backends import Request
from qkv.backends import flex as FX
from qkv.backends.plan import PLANS
from qkv.masks import Shape
from strategies import problems

EAGER = {"compile": False, "block_size": 16}


@pytest.fixture(autouse=True, scope="module")
def _forget_kernels():
    """Kernels compiled here must not make ``auto`` pick flex in other test modules."""
    yield
    FX.KERNELS.clear()


def _mask_kinds(Lq: int, Lk: int, B: int):
    """One mask of every kind (named, combined, custom), for ``Lq`` queries and ``Lk`` keys."""
    g = torch.Generator().manual_seed(Lq * 100 + Lk)
    return {
        "causal": M.causal(),
        "window": M.causal() & M.sliding_window(9),
        "window_two_sided": M.sliding_window(5, 3),
        "padding": M.padding([Lk, Lk // 3][:B]),
        "q_padding": M.padding(Lk, [Lq // 2, 0][:B]),  # row 1 of the batch sees nothing
        "document": M.document(torch.arange(Lq) * 5 // Lq, torch.arange(Lk) * 5 // Lk),
        "document_causal": M.document(torch.arange(Lq) * 3 // Lq, torch.arange(Lk) * 3 // Lk) & M.causal(),
        "prefix_lm": M.prefix_lm(7),
        "dilated": M.dilated(12, 2),
        "global": M.global_tokens(3) | (M.causal() & M.sliding_window(4)),
        "block_sparse": M.block_sparse(torch.rand(-(-Lq // 8), -(-Lk // 8), generator=g) > 0.5, 8),
        "random_blocks": M.random_blocks(2, 16, seed=3),
        "dense": M.from_dense(torch.rand(B, 1, Lq, Lk, generator=g) > 0.3),
        "fn": M.from_fn(lambda b, h, q, k: (q + k + h) % 3 != 0, "fn"),
        "varlen": M.from_cu_seqlens([0, Lq // 3, Lq], [0, Lk // 2, Lk], causal=True),
    }


def _score_mods(H: int):
    return [None, S.softcap(4.0), S.alibi(H), S.relative_bias(torch.randn(8, H), max_distance=16)]


# ------------------------------------------------------------------------------------------------
# forward against the float64 oracle


@pytest.mark.parametrize("kind", list(_mask_kinds(37, 45, 2)))
def test_every_mask_kind_meets_the_oracle(kind):
    """GQA (4 query heads on 2), Lq != Lk (bottom-right), Dv != D, B = 2, tiles that hang over the
    end; a score mod per mask kind in turn."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 37, 16), torch.randn(2, 2, 45, 16), torch.randn(2, 2, 45, 8)
    mask = _mask_kinds(37, 45, 2)[kind]
    sm = _score_mods(4)[list(_mask_kinds(37, 45, 2)).index(kind) % 4]
    check_backend("flex", q, k, v, grad=False, mask=mask, score_mod=sm, options=EAGER)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(problems(dtypes=[torch.float32, torch.float64, torch.bfloat16], max_len=40, max_window=9), st.integers(0, 3))
def test_drawn_problems_meet_the_oracle(p, which):
    q, k, v, mask = p
    check_backend("flex", q, k, v, grad=False, mask=mask, score_mod=_score_mods(q.shape[1])[which], options=EAGER)


def test_rows_that_see_nothing_are_zeros():
    q, k = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 30, 8)
    mask = M.padding([30, 0], [12, 20])  # batch row 1 sees no key; queries >= 12 of row 0 see none
    out = qkv.attention(q, k, k, mask=mask, backend="flex", **EAGER)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0, :, 12:] == 0).all()


def test_logsumexp_is_returned():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 24, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    mask = (M.causal() & M.sliding_window(6)) & M.padding(40, 20)
    out, lse = qkv.attention(q, k, v, mask=mask, score_mod=S.alibi(4), backend="flex", return_lse=True, **EAGER)
    req = Request(q.double(), k.double(), v.double(), mask, S.alibi(4), 8**-0.5, 0.0, False)
    from qkv.backends.reference import scores

    want = scores(req).logsumexp(-1)  # -inf for rows that see nothing
    assert lse.shape == (1, 4, 24) and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want)) and torch.isneginf(lse[..., 20:]).all()
    live = ~torch.isneginf(want)
    torch.testing.assert_close(lse[live].double(), want[live], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, qkv.attention(q, k, v, mask=mask, score_mod=S.alibi(4), backend="reference"))


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_weights_on_demand_match_the_reference(compile):
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    mask, sm = M.causal() & M.sliding_window(10), S.softcap(5.0)
    opts = {"compile": compile, "block_size": 16}
    ref_out, ref_w = qkv.attention(q, k, v, mask=mask, score_mod=sm, backend="reference", return_weights=True)
    out, w = qkv.attention(q, k, v, mask=mask, score_mod=sm, backend="flex", return_weights=True, **opts)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    _, w2 = qkv.attention(
        q, k, v, mask=mask, score_mod=sm, backend="flex", return_weights=True, weights_heads=[3, 0],
        weights_rows=slice(5, 45, 3), **opts,
    )  # fmt: skip
    torch.testing.assert_close(w2, ref_w[:, [3, 0], 5:45:3], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the compiled kernel (CPU inference)


@pytest.fixture(scope="module")
def compiled_window():
    """One compiled call: causal window 64, GQA 4 on 2, Dv != D, Lq != Lk, lengths not multiples of
    the 128 block. Returns the inputs, the mask and the stats after it."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 200, 32), torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 16)
    mask = M.causal() & M.sliding_window(64)
    check_backend("flex", q, k, v, grad=False, mask=mask)
    return q, k, v, mask


@pytest.mark.slow
def test_compiled_kernel_meets_the_oracle_and_is_reused(compiled_window):
    q, k, v, _ = compiled_window
    built, compiles, calls, graphs = FX.STATS.block_masks, FX.STATS.compiles, FX.STATS.calls, FX._graphs()
    for _ in range(2):  # a new, equal mask object each call, as the next step of a loop makes
        qkv.attention(q, k, v, mask=M.causal() & M.sliding_window(64), backend="flex")
    assert FX.STATS.block_masks == built, "the BlockMask was rebuilt"
    assert FX.STATS.compiles == compiles and FX._graphs() == graphs, "the kernel was compiled again"
    assert FX.STATS.calls == calls + 2


@pytest.mark.slow
def test_compiled_half_precision_scores_and_empty_rows():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 150, 16).to(torch.bfloat16) for _ in range(3))
    ids = torch.arange(150) // 40
    mask = M.document(ids) & M.padding(150, [150, 70])  # queries >= 70 of batch row 1 see nothing
    check_backend("flex", q, k, v, grad=False, mask=mask, score_mod=S.alibi(2))
    built, compiles = FX.STATS.block_masks, FX.STATS.compiles
    out = qkv.attention(q, k, v, mask=M.document(ids.flip(0)) & M.padding(150, [150, 70]), score_mod=S.alibi(2),
                        backend="flex")  # fmt: skip
    assert FX.STATS.block_masks == built + 1 and FX.STATS.compiles == compiles, "new ids: new BlockMask, same kernel"
    assert (out[1, :, 70:] == 0).all()


def test_explain_says_when_a_call_will_compile(compiled_window):
    q, k, v, mask = compiled_window
    assert "kernel ready" in backends.get("flex").describe(_req(q, k, v, mask))
    wider = M.causal() & M.sliding_window(65)  # another structure: another kernel
    assert "WILL COMPILE" in backends.get("flex").describe(_req(q, k, v, wider))


def test_auto_compiles_on_the_cpu_only_when_allowed(compiled_window):
    q, k, v, mask = compiled_window
    old = FX.allow_compile(False)
    try:
        e = qkv.explain(q, k, v, mask=mask)
        assert "flex" in e.costs, "a kernel that already ran may be picked"
        e = qkv.explain(q[:, :, :100], k, v, mask=mask)  # a new shape would compile
        assert "flex" not in e.costs and "allow_compile" in e.declined["flex"]
        FX.allow_compile(True)
        assert "flex" in qkv.explain(q[:, :, :100], k, v, mask=mask).costs
    finally:
        FX.allow_compile(old)
    with pytest.raises(TypeError, match="bool"):
        FX.allow_compile(1)  # type: ignore[arg-type]


def _req(q, k, v, mask=None, score_mod=None, **options) -> Request:
    return Request(q, k, v, mask, score_mod, q.shape[-1] ** -0.5, 0.0, False, options)


# ------------------------------------------------------------------------------------------------
# block masks


def _blocks(num, idx, nk: int):
    """The dense (..., nq, nk) bool matrix of the blocks an ordered (num_blocks, indices) pair lists."""
    keep = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
    out = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool)
    return out.scatter_(-1, idx.long(), keep) if nk else out


#: masks whose tiles are classified from the operands' answers (``a & b``): where both operands have
#: live pairs in a tile but never the same ones, the tile is called partial though it is empty
CONSERVATIVE = {"document_causal"}


@pytest.mark.parametrize("Lq,Lk", [(64, 64), (40, 56), (57, 23)])
@pytest.mark.parametrize("kind", list(_mask_kinds(64, 64, 2)))
def test_block_mask_equals_create_block_mask(kind, Lq, Lk):
    """Built from the mask's own tile classification, the BlockMask has the structure that
    ``create_block_mask``'s dense evaluation gives. Where a combination classifies conservatively, it
    may visit an empty block with the mask_mod, but it never skips a live one nor calls a block full
    that is not."""
    mask = _mask_kinds(Lq, Lk, 2)[kind]
    shape = Shape(2, 3, Lq, Lk)
    mask.check(shape)
    ours = FX.block_mask(mask, shape, 16)
    B, H = ours.kv_num_blocks.shape[:2]
    theirs = create_block_mask(mask.mask_mod(Lq, Lk, 2, 3), B, H, Lq, Lk, device="cpu", BLOCK_SIZE=16)
    assert tuple(ours.seq_lengths) == tuple(theirs.seq_lengths) and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
    nk = -(-Lk // 16)
    our_full = _blocks(ours.full_kv_num_blocks, ours.full_kv_indices, nk)
    their_full = _blocks(theirs.full_kv_num_blocks, theirs.full_kv_indices, nk)
    our_live = our_full | _blocks(ours.kv_num_blocks, ours.kv_indices, nk)
    their_live = their_full | _blocks(theirs.kv_num_blocks, theirs.kv_indices, nk)
    assert not (their_live & ~our_live).any(), "a live block was skipped"
    assert not (our_full & ~their_full).any(), "a block that is not full was called full"
    if kind in CONSERVATIVE:
        return
    for name in (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    ):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert torch.equal(a, b), f"{name} differs:\n{a}\n{b}"


def test_named_masks_build_their_block_mask_without_evaluating_elements(monkeypatch):
    def no_tiles(*a, **k):
        raise AssertionError("a named mask evaluated its elements")

    monkeypatch.setattr(M.Mask, "tile", no_tiles)
    shape = Shape(1, 1, 65536, 65536)
    bm = FX.block_mask(M.causal() & M.sliding_window(1024), shape)
    assert bm.kv_num_blocks.shape == (1, 1, 512)  # per query block: the diagonal and the far edge partial,
    assert int(bm.kv_num_blocks.max()) == 2 and int(bm.full_kv_num_blocks.max()) == 7  # the 7 between full
    ids = torch.arange(65536) // 8192
    assert int(FX.block_mask(M.document(ids), shape).full_kv_num_blocks.sum()) == 512 * 64


def test_plans_are_cached_per_mask_shape_and_block():
    PLANS.clear()
    q = torch.randn(1, 2, 96, 8)
    flex = backends.get("flex")
    mask = M.causal() & M.sliding_window(20)
    p1 = flex.plan(_req(q, q, q, mask, block_size=16))
    assert flex.plan(_req(q, q, q, mask, block_size=16)) is p1 and p1.block_mask is not None
    p2 = flex.plan(_req(q, q, q, M.causal() & M.sliding_window(20), block_size=16))  # an equal mask
    assert p2.block_mask.kv_indices is p1.block_mask.kv_indices and PLANS.builds == 1  # its blocks: cached
    assert p2.block_mask.mask_mod is not p1.block_mask.mask_mod  # its mask_mod: the request's own mask's
    assert flex.plan(_req(q, q, q, M.causal() & M.sliding_window(20), block_size=32)) is not p1
    assert flex.plan(_req(q[:, :, :64], q, q, M.causal() & M.sliding_window(20), block_size=16)) is not p1
    assert flex.plan(_req(q, q, q)).block_mask is None and flex.plan(_req(q, q, q, M.full())).block_mask is None


# ------------------------------------------------------------------------------------------------
# what flex declines, with its reasons


def test_declines_with_reasons():
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(NotImplementedError, match="no backward on the CPU.*tiled"):
        qkv.attention(q.requires_grad_(), q, q, mask=M.causal(), backend="flex")
    q = q.detach()
    with torch.no_grad():  # inference with inputs that require grad is served (FlexAttention would refuse)
        out = qkv.attention(q.clone().requires_grad_(), q, q, mask=M.causal(), backend="flex", **EAGER)
    torch.testing.assert_close(out, qkv.attention(q, q, q, mask=M.causal(), backend="reference"))
    cases = [
        ({"dropout_p": 0.1}, "no dropout"),
        ({"return_weights": False, "weights_heads": [0]}, "need return_weights"),
        ({"return_weights": True, "return_lse": True}, "ask for one"),
        ({"return_lse": True}, "computes no logsumexp.*compile=False"),
        ({"score_mod": S.relative_bias(torch.randn(8, 2, requires_grad=True))}, "require grad.*tiled"),
    ]
    for kw, why in cases:
        with pytest.raises(NotImplementedError, match=why):
            qkv.attention(q, q, q, mask=M.causal(), backend="flex", **kw)
    with pytest.raises(NotImplementedError, match="float32, bfloat16 and float16.*compile=False"):
        qkv.attention(q.double(), q.double(), q.double(), backend="flex")
    with pytest.raises(ValueError, match="block_size"):
        qkv.attention(q, q, q, backend="flex", block_size=100)
    with pytest.raises(TypeError, match="compile must be a bool"):
        qkv.attention(q, q, q, backend="flex", compile="no")


# ------------------------------------------------------------------------------------------------
# where auto sends requests on CUDA (decided from supports and cost alone, so checkable here)


@pytest.mark.parametrize(
    "what,expect",
    [
        ("dense", "sdpa"),
        ("causal", "sdpa"),
        ("window", "flex"),
        ("documents", "flex"),
        ("padding", "flex"),
        ("alibi", "flex"),
        ("softcap_causal", "flex"),
        ("window_grad", "flex"),
        ("causal_grad", "sdpa"),
        ("window_dropout", "sdpa"),
    ],
)
def test_auto_on_cuda(monkeypatch, what, expect):
    """With the request's device taken for CUDA: dense or plain causal go to sdpa (flash), any
    other mask or score mod to flex, dropout to what applies it; through cost() and supports()."""
    monkeypatch.setattr(Request, "device", property(lambda self: torch.device("cuda")))
    L, H = 4096, 8
    q = torch.randn(1, H, L, 64, dtype=torch.float16)
    kw: dict = {
        "dense": {},
        "causal": {"mask": M.causal()},
        "window": {"mask": M.causal() & M.sliding_window(256)},
        "documents": {"mask": M.document(torch.arange(L) // 512)},
        "padding": {"mask": M.padding(3000)},
        "alibi": {"score_mod": S.alibi(H)},
        "softcap_causal": {"mask": M.causal(), "score_mod": S.softcap(30.0)},
        "window_grad": {"mask": M.causal() & M.sliding_window(256)},
        "causal_grad": {"mask": M.causal()},
        "window_dropout": {"mask": M.causal() & M.sliding_window(256), "dropout_p": 0.1},
    }[what]
    qq = q.requires_grad_() if what.endswith("_grad") else q
    assert qkv.explain(qq, q, q, **kw).backend == expect


def test_auto_asks_for_no_kernel_key_where_no_kernel_of_the_shape_ran(monkeypatch):
    """On the CPU, with compiling not allowed, flex is declined to ``auto`` before its kernel key (the
    mask's and score mod's structure) is computed, unless a kernel of that shape (or a dynamic one of
    its kind) ran; ``maybe_ready`` never says no where ``ready`` would say yes."""
    kernels = FX._Kernels()
    monkeypatch.setattr(FX, "KERNELS", kernels)
    old = FX.allow_compile(False)
    try:
        fx = backends.get("flex")
        q = torch.randn(1, 2, 4, 8)
        req = _req(q, q, q, M.causal() & M.sliding_window(2))
        keyed = []
        real = FX.Flex.kernel_key
        monkeypatch.setattr(FX.Flex, "kernel_key", lambda self, r: keyed.append(1) or real(self, r))
        assert "would compile" in (fx.auto_blocker(req) or "") and keyed == []
        kernels.record(real(fx, req), fx._sig(req), True)  # as if its kernel had run
        assert fx.auto_blocker(req) is None and keyed == [1]
        other = _req(torch.randn(1, 2, 5, 8), q, q, M.causal())
        assert fx.auto_blocker(other) is not None and keyed == [1]  # another shape: no key computed
        for sig in [(1, 4, 4), (2, 4, 4), (1, 1, 9)]:  # the unions over-state, never under-state
            assert kernels.maybe_ready(sig) or not any(kernels.ready(key, sig) for key in kernels.shapes)
        kernels.record("k2", (2, 6, 6), True)
        kernels.record("k2", (2, 7, 7), False)  # a new shape without a compile: dynamic kernel
        assert kernels.ready("k2", (3, 8, 8)) and kernels.maybe_ready((3, 8, 8))
        kernels.clear()
        assert not kernels.maybe_ready((1, 4, 4)) and not kernels.maybe_ready((3, 8, 8))
    finally:
        FX.allow_compile(old)
