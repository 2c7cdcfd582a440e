"""The "qkv" mask builder against Hugging Face's own eager builder, through transformers' public mask
functions: every case gives the same pairs, and the ones HF's structure covers are qkv structure (named
masks, no fallback, nothing of Lq x Lk)."""

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
from qkv.hf import HFMask  # noqa: E402

qkv.hf.register()


def _config(sliding: int | None = None) -> LlamaConfig:
    kw = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    return MistralConfig(sliding_window=sliding, **kw) if sliding else LlamaConfig(**kw)


def both(create, cfg, Lq: int, am: torch.Tensor | None, B: int = 2, **kw) -> tuple[torch.Tensor, HFMask]:
    """(HF eager's mask as bool (B, 1, Lq, Lk), the qkv builder's HFMask) for the same call."""
    embeds = torch.zeros(B, Lq, cfg.hidden_size)
    cfg._attn_implementation = "eager"
    ref = create(config=cfg, inputs_embeds=embeds, attention_mask=am, **kw)
    cfg._attn_implementation = "qkv"
    got = create(config=cfg, inputs_embeds=embeds, attention_mask=am, **kw)
    assert isinstance(got, HFMask)
    Lk = got.kv_length
    ref = torch.ones(B, 1, Lq, Lk, dtype=torch.bool) if ref is None else (ref == 0).expand(B, 1, Lq, Lk)
    return ref, got


def dense(hm: HFMask, B: int) -> torch.Tensor:
    if hm.mask is None:
        return torch.ones(B, 1, hm.q_length, hm.kv_length, dtype=torch.bool)
    return hm.mask.to_dense(B, 1, hm.q_length, hm.kv_length).expand(B, 1, hm.q_length, hm.kv_length)


def structure(hm: HFMask) -> None:
    """All of the mask is qkv structure: no fallback, no dense tensor anywhere in it."""
    assert hm.fallbacks == (), hm
    assert "hf_mask_function" not in repr(hm) and "dense" not in repr(hm), hm


def padded(rows: list[tuple[int, int]], L: int) -> torch.Tensor:
    """A 2-D attention mask whose row b is real on [start, end)."""
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (s, e) in enumerate(rows):
        am[b, s:e] = 1
    return am


@given(data=st.data())
def test_causal_and_sliding_window_with_padding_on_either_side(data):
    L = data.draw(st.integers(1, 12))
    rows = []
    for _ in range(2):
        s = data.draw(st.integers(0, L))
        rows.append((s, data.draw(st.integers(s, L))))
    am = padded(rows, L) if data.draw(st.booleans()) else None
    w = data.draw(st.sampled_from([None, 1, 3, 5]))
    cfg = _config(w)
    create = mu.create_sliding_window_causal_mask if w else mu.create_causal_mask
    ref, got = both(create, cfg, L, am, cache=None)
    assert torch.equal(dense(got, 2), ref), (rows, w, got)
    structure(got)


def test_holes_in_the_padding_become_per_key_ids_not_a_dense_mask():
    am = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])
    ref, got = both(mu.create_causal_mask, _config(), 8, am, cache=None)
    assert torch.equal(dense(got, 2), ref)
    structure(got)
    assert "document" in repr(got.mask)


def test_bidirectional_encoders_with_padding_and_local_windows():
    am = padded([(0, 9), (0, 5)], 9)
    ref, got = both(mu.create_bidirectional_mask, _config(), 9, am)
    assert torch.equal(dense(got, 2), ref)
    structure(got)
    cfg = _config()
    embeds = torch.zeros(2, 9, cfg.hidden_size)
    for impl in ("eager", "qkv"):  # nothing to mask: HF's builder gives None, and so does qkv's
        cfg._attn_implementation = impl
        assert mu.create_bidirectional_mask(config=cfg, inputs_embeds=embeds, attention_mask=None) is None
    cfg = _config(2)  # ModernBERT's local layers: |q - k| <= sliding_window
    ref, got = both(mu.create_bidirectional_sliding_window_mask, cfg, 9, am)
    assert torch.equal(dense(got, 2), ref)
    structure(got)
    assert got.mask is not None and "sliding_window(2, 2)" in repr(got.mask)


def _filled(cache, past: int, B: int = 2):
    cache.update(torch.zeros(B, 1, past, 4), torch.zeros(B, 1, past, 4), 0)
    return cache


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("Lq", [1, 3])
def test_decoding_with_a_cache_offsets_queries_and_keys(window, Lq):
    """DynamicCache: the queries stand after the cached keys; the sliding-window layer also drops keys."""
    past = 9
    cfg = _config(window)
    cache = _filled(DynamicCache(config=cfg), past)
    am = padded([(3, past + Lq), (0, past + Lq)], past + Lq)  # row 0 was left-padded by 3
    create = mu.create_sliding_window_causal_mask if window else mu.create_causal_mask
    ref, got = both(create, cfg, Lq, am, cache=cache)
    assert (got.q_length, got.kv_length) == (Lq, past + Lq if window is None else window - 1 + Lq)
    assert torch.equal(dense(got, 2), ref)
    structure(got)


def test_packed_sequences_from_position_ids_become_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])
    for w, create in ((None, mu.create_causal_mask), (2, mu.create_sliding_window_causal_mask)):
        ref, got = both(create, _config(w), 10, None, B=1, cache=None, position_ids=pos)
        assert not bool(ref[0, 0, 3, :3].any()), "HF separates the sequences"
        assert torch.equal(dense(got, 1), ref)
        structure(got)
        assert "document" in repr(got.mask)


def test_a_static_cache_falls_back_to_hf_function_with_the_reason_in_explain():
    cfg = _config()
    cache = _filled(StaticCache(config=cfg, max_cache_len=16), 5)
    am = padded([(2, 6), (0, 6)], 6)
    ref, got = both(mu.create_causal_mask, cfg, 1, am, cache=cache)
    assert got.kv_length == 16
    assert torch.equal(dense(got, 2), ref)
    assert got.fallbacks and "static cache" in got.fallbacks[0]
    assert "static cache" in got.describe()
    # the padding part is still structure; the fallback is only the causal part
    assert "left_padding" in repr(got.mask) and "padding" in repr(got.mask)
    q, k = torch.randn(2, 2, 1, 4), torch.randn(2, 1, 16, 4)
    assert "static cache" in str(qkv.explain(q, k, k, mask=got.mask))


def test_unknown_mask_functions_are_kept_as_hf_functions_beside_the_structure():
    """A model's own ``and_mask_function`` (vmap-evaluated, as HF does) and ``or_mask_function``."""
    cfg = _config()
    am = padded([(1, 8), (0, 8)], 8)

    def first_two(b, h, q, kv):
        return kv < 2

    ref, got = both(mu.create_causal_mask, cfg, 8, am, cache=None, or_mask_function=first_two)
    assert torch.equal(dense(got, 2), ref)
    assert got.fallbacks and "first_two" in got.fallbacks[0]

    def even_keys(b, h, q, kv):
        return kv % 2 == 0

    ref, got = both(mu.create_causal_mask, cfg, 8, am, cache=None, and_mask_function=even_keys)
    assert torch.equal(dense(got, 2), ref)
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
