"""Every translation the "qkv" mask builder makes, against Hugging Face's own dense mask, elementwise.

Each case calls a ``masking_utils.create_*_mask`` function (or the builder itself) twice with the same
arguments: once for HF's ``eager`` builder (its additive mask read as bool) and once for ``"qkv"``; the qkv
mask's ``to_dense()`` must equal HF's mask at every (batch, query, key). The problems are chosen so that a
wrong translation would differ: windows that bind, padding on either side and with holes, a union that is
not the intersection, packed sequences whose remapped positions matter, cache offsets. Cases HF's
structure covers must come out as qkv structure (named masks, no fallback); the others (a static cache's
offsets, Llama 4's chunks, unknown functions) as HF's function on tiles, named with the reason.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, MistralConfig, StaticCache  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

import qkv  # noqa: E402
import qkv.hf  # noqa: E402
from qkv.hf import HFMask, build_mask  # noqa: E402

qkv.hf.register()


def _config(sliding: int | None = None, chunk: int | None = None) -> LlamaConfig:
    kw = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    if chunk:
        return transformers.Llama4TextConfig(attention_chunk_size=chunk, **kw)
    return MistralConfig(sliding_window=sliding, **kw) if sliding else LlamaConfig(**kw)


def both(create, cfg, Lq: int, am: torch.Tensor | None, B: int = 2, **kw) -> tuple[torch.Tensor, HFMask]:
    """(HF eager's mask as bool (B, 1, Lq, Lk), the qkv builder's HFMask) for the same call."""
    embeds = torch.zeros(B, Lq, cfg.hidden_size)
    cfg._attn_implementation = "eager"
    ref = create(config=cfg, inputs_embeds=embeds, attention_mask=am, **kw)
    cfg._attn_implementation = "qkv"
    got = create(config=cfg, inputs_embeds=embeds, attention_mask=am, **kw)
    if got is None or ref is None:  # nothing to mask: HF's builder says None, and so must qkv's
        assert got is None and ref is None, (got, ref)
        got = HFMask(None, Lq, am.shape[-1] if am is not None else Lq, batch_size=B)
    assert isinstance(got, HFMask)
    assert got._dense is None, "the builder built the dense mask"
    Lk = got.kv_length
    ref = torch.ones(B, 1, Lq, Lk, dtype=torch.bool) if ref is None else (ref == 0).expand(B, 1, Lq, Lk)
    return ref, got


def dense(hm: HFMask, B: int) -> torch.Tensor:
    if hm.mask is None:
        return torch.ones(B, 1, hm.q_length, hm.kv_length, dtype=torch.bool)
    return hm.mask.to_dense(B, 1, hm.q_length, hm.kv_length).expand(B, 1, hm.q_length, hm.kv_length)


def same(hm: HFMask, ref: torch.Tensor) -> None:
    """The qkv mask allows exactly HF's pairs, elementwise."""
    got = dense(hm, ref.shape[0])
    assert torch.equal(got, ref), f"{hm}: {int((got != ref).sum())} of {ref.numel()} pairs differ from HF's mask"


def structure(hm: HFMask) -> None:
    """All of the mask is qkv structure: no fallback, no dense tensor anywhere in it."""
    assert hm.fallbacks == (), hm
    assert "hf_mask_function" not in repr(hm.mask) and "dense" not in repr(hm.mask), hm


def padded(rows: list[tuple[int, int]], L: int) -> torch.Tensor:
    """A 2-D attention mask whose row b is real on [start, end)."""
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (s, e) in enumerate(rows):
        am[b, s:e] = 1
    return am


def with_holes(data, B: int, L: int) -> torch.Tensor:
    return torch.tensor([[data.draw(st.integers(0, 1)) for _ in range(L)] for _ in range(B)])


@given(data=st.data())
def test_causal_and_sliding_window_with_padding_left_right_both_and_holes(data):
    L = data.draw(st.integers(1, 12))
    kind = data.draw(st.sampled_from(["none", "run", "holes"]))
    if kind == "run":  # left, right or both: row b real on [s, e)
        rows = []
        for _ in range(2):
            s = data.draw(st.integers(0, L))
            rows.append((s, data.draw(st.integers(s, L))))
        am = padded(rows, L)
    else:
        am = with_holes(data, 2, L) if kind == "holes" else None
    w = data.draw(st.sampled_from([None, 1, 2, 3, 5]))
    create = mu.create_sliding_window_causal_mask if w else mu.create_causal_mask
    ref, got = both(create, _config(w), L, am, cache=None)
    same(got, ref)
    structure(got)


def test_the_window_binds_exactly_at_its_edge():
    """sliding_window_overlay(w) lets w keys in (the query's own and w - 1 before it): w - 1 back in qkv."""
    for w in (2, 3, 4):
        ref, got = both(mu.create_sliding_window_causal_mask, _config(w), 9, None, cache=None)
        same(got, ref)
        assert int(ref[0, 0, 8].sum()) == w and got.mask.window() == (w - 1, 0)


@given(data=st.data())
def test_bidirectional_and_bidirectional_sliding_window_with_padding(data):
    L = data.draw(st.integers(2, 11))
    am = with_holes(data, 2, L) if data.draw(st.booleans()) else padded([(0, L), (0, L - 1)], L)
    ref, got = both(mu.create_bidirectional_mask, _config(), L, am)
    same(got, ref)
    structure(got)
    w = data.draw(st.integers(1, 3))  # ModernBERT's local layers: |q - k| <= sliding_window
    ref, got = both(mu.create_bidirectional_sliding_window_mask, _config(w), L, am)
    same(got, ref)
    structure(got)
    if L > w + 1:  # the window binds: it is in the structure
        assert f"sliding_window({w}, {w})" in repr(got.mask)


def test_nothing_to_mask_is_none_where_hf_says_none():
    cfg = _config()
    embeds = torch.zeros(2, 9, cfg.hidden_size)
    for impl in ("eager", "qkv"):  # a bidirectional mask with nothing to mask: HF gives None, so does qkv
        cfg._attn_implementation = impl
        assert mu.create_bidirectional_mask(config=cfg, inputs_embeds=embeds, attention_mask=None) is None
    # a causal mask with nothing padded is not None under eager, so it is an HFMask here
    ref, got = both(mu.create_causal_mask, cfg, 9, None, cache=None)
    same(got, ref)
    assert repr(got.mask) == "causal"


def _direct(fn, Lq: int, Lk: int, am: torch.Tensor | None = None, B: int = 2, q_offset: int = 0, kv_offset: int = 0):
    """(HF sdpa_mask's bool mask, never skipped; the qkv builder's HFMask) for one mask function."""
    args = dict(batch_size=B, q_length=Lq, kv_length=Lk, q_offset=q_offset, kv_offset=kv_offset, mask_function=fn)
    ref = mu.sdpa_mask(**args, attention_mask=am, allow_is_causal_skip=False)
    got = build_mask(**args, attention_mask=am, dtype=torch.float32)
    return ref.expand(B, 1, Lq, Lk), got


def test_and_masks_is_the_intersection():
    fn = mu.and_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(2))
    ref, got = _direct(fn, 8, 8, padded([(2, 8), (0, 8)], 8))
    same(got, ref)
    structure(got)
    union = mu.or_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(2))
    assert not torch.equal(ref, _direct(union, 8, 8, padded([(2, 8), (0, 8)], 8))[0]), "the case must tell & from |"


def test_or_masks_is_the_union_not_the_intersection():
    """Causal OR |q - k| <= 2: two future keys become visible. An intersection would be the window alone."""
    am = padded([(1, 9), (0, 7)], 9)
    fn = mu.or_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(2))
    ref, got = _direct(fn, 9, 9, am)
    inter, _ = _direct(mu.and_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(2)), 9, 9, am)
    assert not torch.equal(ref, inter)
    same(got, ref)
    structure(got)
    assert "|" in repr(got.mask)


def test_gemma3_style_bidirectional_image_overlay_is_a_union():
    """PaliGemma / Gemma 3: the tokens of one image see each other both ways (``block_sequence_ids``,
    HF's ``blockwise_overlay``, OR-ed onto causal); text stays causal. The overlay is HF's function on tiles,
    the causal part stays structure, and the union differs from the intersection."""
    blocks = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1, -1], [-1, -1, -1, 2, 2, 2, 2, -1, -1, -1]])
    am = padded([(1, 10), (0, 10)], 10)
    ref, got = both(mu.create_causal_mask, _config(), 10, am, cache=None, block_sequence_ids=blocks)
    assert bool(ref[0, 0, 1, 3]) and not bool(ref[0, 0, 4, 5]), "image tokens look ahead, text does not"
    same(got, ref)
    assert "causal" in repr(got.mask) and "|" in repr(got.mask) and "blockwise_overlay" in got.describe()

    def image(b, h, q, kv):  # Gemma 3's token-type or_mask_function: a model's own, vmap-evaluated
        t = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]])
        return (t[b, q] == 1) & (t[b, kv] == 1)

    ref, got = both(mu.create_causal_mask, _config(), 10, am, cache=None, or_mask_function=image)
    inter = ref & torch.ones_like(ref).tril()
    assert not torch.equal(ref, inter)
    same(got, ref)
    assert "image" in got.describe()


def test_packed_sequences_with_remapped_positions_become_documents():
    """Positions restart per sequence; HF remaps them inside the mask function. Within a sequence the
    relative positions are those of the row, so the window is the same; across sequences the ids cut."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    for w, create in ((None, mu.create_causal_mask), (2, mu.create_sliding_window_causal_mask)):
        ref, got = both(create, _config(w), 12, None, cache=None, position_ids=pos)
        assert not bool(ref[0, 0, 3, :3].any()), "HF separates the sequences"
        same(got, ref)
        structure(got)
        assert "document" in repr(got.mask)


def test_packed_sequences_whose_ids_do_not_match_the_remap_fall_back():
    """A remapped function with another and's packed-sequence ids (not HF's own composition): kept as HF's."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    other = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    fn = mu.and_masks(
        mu.remap_positions_for_packed_sequence(mu.sliding_window_overlay(2), pos),
        mu.causal_mask_function,
        mu.packed_sequence_mask_function(other),
    )
    ref, got = _direct(fn, 8, 8, B=1)
    same(got, ref)
    assert got.fallbacks and "packed-sequence" in got.fallbacks[0]


def _filled(cache, past: int, B: int = 2):
    cache.update(torch.zeros(B, 1, past, 4), torch.zeros(B, 1, past, 4), 0)
    return cache


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("Lq", [1, 3])
def test_decoding_with_a_dynamic_cache_offsets_queries_and_keys(window, Lq):
    """DynamicCache: the queries stand after the cached keys; the sliding-window layer also drops keys."""
    past = 9
    cfg = _config(window)
    cache = _filled(DynamicCache(config=cfg), past)
    am = padded([(3, past + Lq), (0, past + Lq)], past + Lq)  # row 0 was left-padded by 3
    create = mu.create_sliding_window_causal_mask if window else mu.create_causal_mask
    ref, got = both(create, cfg, Lq, am, cache=cache)
    assert (got.q_length, got.kv_length) == (Lq, past + Lq if window is None else window - 1 + Lq)
    same(got, ref)
    structure(got)


def test_a_static_cache_falls_back_to_hf_function_with_the_reason_in_explain():
    cfg = _config()
    cache = _filled(StaticCache(config=cfg, max_cache_len=16), 5)
    am = padded([(2, 6), (0, 6)], 6)
    ref, got = both(mu.create_causal_mask, cfg, 1, am, cache=cache)
    assert got.kv_length == 16
    same(got, ref)
    assert got.fallbacks and "static cache" in got.fallbacks[0]
    assert "static cache" in got.describe()
    # the padding part is still structure; the fallback is only the causal part
    assert "left_padding" in repr(got.mask) and "padding" in repr(got.mask)
    q, k = torch.randn(2, 2, 1, 4), torch.randn(2, 1, 16, 4)
    assert "static cache" in str(qkv.explain(q, k, k, mask=got.mask))


@pytest.mark.parametrize("am", [None, padded([(3, 11), (0, 11)], 11)], ids=["unpadded", "left-padded"])
def test_llama4_chunks_fall_back_with_the_reason(am):
    """Llama 4's chunked attention (chunks counted from each row's first real token): HF's function on tiles."""
    ref, got = both(mu.create_chunked_causal_mask, _config(chunk=4), 11, am, cache=None)
    same(got, ref)
    assert got.fallbacks and "chunked_overlay" in got.describe()
    assert "causal" in repr(got.mask)  # the causal half of the and stays structure
    q = torch.randn(2, 2, 11, 4)
    assert "chunked_overlay" in str(qkv.explain(q, q[:, :1], q[:, :1], mask=got.mask))


def test_unknown_mask_functions_are_kept_as_hf_functions_beside_the_structure():
    """A model's own ``and_mask_function`` (vmap-evaluated, as HF does) and ``or_mask_function``."""
    cfg = _config()
    am = padded([(1, 8), (0, 8)], 8)

    def first_two(b, h, q, kv):
        return kv < 2

    ref, got = both(mu.create_causal_mask, cfg, 8, am, cache=None, or_mask_function=first_two)
    same(got, ref)
    assert got.fallbacks and "first_two" in got.fallbacks[0]

    def even_keys(b, h, q, kv):
        return kv % 2 == 0

    ref, got = both(mu.create_causal_mask, cfg, 8, am, cache=None, and_mask_function=even_keys)
    same(got, ref)
    assert "causal" in repr(got.mask) and "even_keys" in repr(got.mask)  # causal stays structure
    assert "even_keys" in got.describe()


def test_the_builder_mask_makes_tiled_skip_tiles():
    """Mistral-shaped prefill: the builder's mask leaves the window's tiles only, and auto says so."""
    cfg = _config(256)
    L = 4096
    _, got = both(mu.create_sliding_window_causal_mask, cfg, L, None, B=1, cache=None)
    structure(got)
    assert got.mask is not None and got.mask.window() == (255, 0)  # tiled's triangle-and-band plan
    q = torch.randn(1, 4, L, 32)
    e = qkv.explain(q, q, q, mask=got.mask)
    assert e.backend == "tiled" and "non-empty" in e.reason
    am = torch.ones(1, L, dtype=torch.long)
    am[0, :100] = 0  # left-padded
    _, got = both(mu.create_sliding_window_causal_mask, cfg, L, am, B=1, cache=None)
    structure(got)
    assert qkv.explain(q, q, q, mask=got.mask).backend == "tiled"
    assert got._dense is None  # 4096 x 4096 never built
