"""StreamingLLM's cache (``SinkKVCache``): decoding with the first ``sinks`` tokens and the ``recent`` last
ones gives what attention restricted to exactly those tokens gives, at original positions (a mask over
the whole sequence) or at in-cache positions (the kept tokens re-run as a fresh sequence, which is what
StreamingLLM's position rule means for RoPE and ALiBi); and ``GPT.generate`` streams with it."""

from __future__ import annotations

import pytest
import torch

from qkv.masks import causal, from_dense, sliding_window
from qkv.models import GPT
from qkv.nn import MultiHeadAttention, RotaryEmbedding, SinkKVCache, SlidingWindowKVCache
from qkv.scores import alibi

D64 = torch.float64


def streaming_mask(chunks: list[int], sinks: int, recent: int):
    """Fed in ``chunks``, query ``i`` of a chunk that starts at ``c`` sees the first ``sinks`` tokens, the
    ``recent - 1`` before the chunk and the chunk's tokens up to itself (for one token: the sinks and
    the ``recent`` last tokens, itself included)."""
    L = sum(chunks)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    c = 0
    for n in chunks:
        kept = [j for j in range(c) if j < sinks or j >= c - (recent - 1)]
        for i in range(c, c + n):
            allowed[i, kept] = True
            allowed[i, c : i + 1] = True
        c += n
    return allowed


def decode(m, x, cache, chunks=None, mod=None):
    chunks = chunks or [1] * x.shape[1]
    outs, t = [], 0
    for n in chunks:
        outs.append(m(x[:, t : t + n], mask=causal(), score_mod=mod, cache=cache))
        t += n
    assert t == x.shape[1] == cache.seen
    return torch.cat(outs, 1)


CHUNKS = [[1] * 20, [9] + [1] * 11, [3, 1, 1, 6, 1, 1, 4, 1, 1, 1], [2, 7, 11]]


@pytest.mark.parametrize("sinks,recent", [(0, 3), (1, 3), (4, 5), (2, 1)])
@pytest.mark.parametrize("pos", ["none", "rope", "alibi"])
@pytest.mark.parametrize("chunks", CHUNKS)
def test_original_positions_equal_the_streaming_mask(sinks, recent, pos, chunks):
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, num_kv_heads=2, rope=RotaryEmbedding(4) if pos == "rope" else None).double().eval()
    mod = alibi(4) if pos == "alibi" else None
    x = torch.randn(2, 20, 16, dtype=D64)
    with torch.no_grad():
        got = decode(m, x, SinkKVCache(sinks, recent, rope=m.rope, positions="original"), chunks, mod)
        want = m(x, mask=from_dense(streaming_mask(chunks, sinks, recent)), score_mod=mod)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_no_sinks_is_the_sliding_window_cache():
    torch.manual_seed(1)
    m = MultiHeadAttention(16, 4, rope=True).double().eval()
    x = torch.randn(1, 15, 16, dtype=D64)
    with torch.no_grad():
        a = decode(m, x, SinkKVCache(0, 4, rope=m.rope))
        b = decode(m, x, SlidingWindowKVCache(4))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("sinks,recent", [(4, 5), (1, 2), (3, 1)])
def test_cache_positions_are_the_kept_tokens_rerun_as_a_fresh_sequence(pos, sinks, recent):
    """With positions="cache" the last token's output equals running attention over the kept tokens
    alone, as a sequence of their own (sinks at 0.., the recent tokens right after)."""
    torch.manual_seed(2)
    m = MultiHeadAttention(16, 4, rope=RotaryEmbedding(4) if pos == "rope" else None).double().eval()
    mod = alibi(4) if pos == "alibi" else None
    x = torch.randn(2, 17, 16, dtype=D64)
    cache = SinkKVCache(sinks, recent, rope=m.rope, positions="cache")
    with torch.no_grad():
        got = decode(m, x, cache, [1] * 17, mod)
        for t in range(sinks + recent, 17):
            kept = list(range(sinks)) + list(range(t - recent + 1, t + 1))
            want = m(x[:, kept], mask=causal(), score_mod=mod)[:, -1]
            torch.testing.assert_close(got[:, t], want, rtol=1e-9, atol=1e-9)
    assert cache.pos is not None and cache.pos[:sinks].tolist() == list(range(17 - sinks - recent, 17 - recent))


def test_one_layer_gpt_streams_like_the_kept_tokens_rerun():
    """A one-layer GPT's keys depend on their token alone, so its streaming logits can be checked exactly."""
    torch.manual_seed(3)
    g = GPT(32, 16, 1, 2, max_len=8, pos="rope").double().eval()
    ids = torch.randint(0, 32, (1, 30))
    cache = g.make_cache(recent=5, sinks=2)
    with torch.no_grad():
        g(ids[:, :7], cache=cache)
        for t in range(7, 30):
            logits = g(ids[:, t : t + 1], cache=cache)[:, -1]
            kept = [0, 1] + list(range(t - 4, t + 1))
            torch.testing.assert_close(logits, g(ids[:, kept])[:, -1], rtol=1e-9, atol=1e-9)


def test_generate_streams_beyond_max_len_and_checks_its_arguments():
    torch.manual_seed(4)
    g = GPT(32, 16, 2, 2, max_len=16, pos="rope").eval()
    prompt = torch.randint(0, 32, (2, 3))
    out = g.generate(prompt, 60, temperature=0, recent=8, sinks=2)
    assert out.shape == (2, 63) and torch.equal(out[:, :3], prompt)
    # the same greedy tokens from a manual loop over the same cache
    cache = g.make_cache(recent=8, sinks=2)
    seq = prompt
    with torch.no_grad():
        logits = g(prompt, cache=cache)[:, -1]
        for _ in range(60):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat((seq, nxt), 1)
            logits = g(nxt, cache=cache)[:, -1]
    assert torch.equal(out, seq)
    # a cache big enough to hold everything changes nothing
    torch.testing.assert_close(
        g.generate(prompt, 10, temperature=0, recent=13, sinks=0), g.generate(prompt, 10, temperature=0)
    )
    with pytest.raises(ValueError, match="use_cache=True"):
        g.generate(prompt, 2, recent=4, use_cache=False)
    with pytest.raises(ValueError, match="window of 4 tokens"):
        GPT(32, 16, 1, 2, max_len=16, window=4).make_cache(recent=4)
    with pytest.raises(ValueError, match="sinks >= 0 and recent >= 1"):
        SinkKVCache(2, 0)
    with pytest.raises(ValueError, match="'cache' or 'original'"):
        SinkKVCache(2, 2, positions="text")


@pytest.mark.parametrize("window", [5, 6, 9])
def test_original_positions_with_a_window_narrower_than_the_distance_to_the_sinks(window):
    """A sliding window over original positions hides the sinks once they fall out of it, even when the
    window is as wide as the cache (``sinks + recent`` keys): the step's mask is judged on the keys'
    positions, not on how many keys the cache returns (it was dropped for that, and the sinks attended)."""
    torch.manual_seed(0)
    sinks, recent, L = 2, 4, 20
    m = MultiHeadAttention(16, 4).double().eval()
    x = torch.randn(1, L, 16, dtype=D64)
    mask = causal() & sliding_window(window)
    with torch.no_grad():
        cache = SinkKVCache(sinks, recent, positions="original")
        got = torch.cat([m(x[:, t : t + 1], mask=mask, cache=cache) for t in range(L)], 1)
        allowed = streaming_mask([1] * L, sinks, recent) & mask.to_dense(1, 1, L, L)[0, 0]
        want = m(x, mask=from_dense(allowed))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
