"""KV caches: decoding token by token (or in chunks) gives what recomputing the whole prefix gives,
for every cache kind, with GQA, RoPE, ALiBi and sliding windows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from qkv.masks import Mask, causal, padding, sliding_window
from qkv.nn import (
    CrossAttentionKVCache,
    FixedKVCache,
    GrowingKVCache,
    KVCache,
    MultiHeadAttention,
    RotaryEmbedding,
    SlidingWindowKVCache,
)
from qkv.nn.cache import at_positions
from qkv.scores import ScoreMod, alibi

D64 = torch.float64
KINDS: dict[str, Callable[[int], KVCache]] = {
    "growing": lambda n: GrowingKVCache(),
    "fixed": lambda n: FixedKVCache(n),
}


def _decode(
    m: MultiHeadAttention, x: torch.Tensor, cache: KVCache, chunks: list[int], mask: Mask, mod: ScoreMod | None
) -> torch.Tensor:
    outs, t = [], 0
    for c in chunks:
        outs.append(m(x[:, t : t + c], mask=mask, score_mod=mod, cache=cache))
        t += c
    assert t == x.shape[1] and cache.seen == t
    return torch.cat(outs, dim=1)


CHUNKS = [[1] * 12, [5, 1, 1, 3, 1, 1], [12], [2, 7, 1, 1, 1]]


@pytest.mark.parametrize("kind", ["growing", "fixed"])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("pos", ["none", "rope", "alibi"])
@pytest.mark.parametrize("chunks", CHUNKS)
def test_cache_equals_recompute(kind: str, Hkv: int, pos: str, chunks: list[int]) -> None:
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, num_kv_heads=Hkv, rope=RotaryEmbedding(4) if pos == "rope" else None).double()
    m.eval()
    mod = alibi(4) if pos == "alibi" else None
    x = torch.randn(2, 12, 16, dtype=D64)
    with torch.no_grad():
        want = m(x, mask=causal(), score_mod=mod)
        got = _decode(m, x, KINDS[kind](12), chunks, causal(), mod)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [1, 3, 5, 20])
@pytest.mark.parametrize("Hkv", [4, 2])
@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("chunks", CHUNKS + [[4, 4, 4], [1, 9, 1, 1]])
def test_ring_buffer_equals_windowed_recompute(window: int, Hkv: int, pos: str, chunks: list[int]) -> None:
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, num_kv_heads=Hkv, rope=RotaryEmbedding(4) if pos == "rope" else None).double()
    m.eval()
    mod = alibi(4) if pos == "alibi" else None
    mask = sliding_window(window - 1)
    x = torch.randn(2, 12, 16, dtype=D64)
    cache = SlidingWindowKVCache(window)
    with torch.no_grad():
        want = m(x, mask=mask, score_mod=mod)
        got = _decode(m, x, cache, chunks, mask, mod)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert cache.k is not None and cache.k.shape[2] == window  # memory stays O(window)


@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("chunks", [[4, 2, 1, 1, 3, 1], [1, 1, 1, 1, 4, 4], [7, 1, 2, 1, 1], [2, 2, 2, 2]])
def test_ring_buffer_keeps_exactly_the_last_window_tokens(window: int, chunks: list[int]) -> None:
    """Each key holds its own position, so what an update returns can be read off: a multi-token update
    attends to the ``window`` stored tokens (down to the oldest, at the window's edge) then the new ones,
    in order; a one-token update to the last ``window`` tokens, with their positions once wrapped."""
    cache = SlidingWindowKVCache(window)
    seen = 0
    with torch.no_grad():
        for L in chunks:
            pos = torch.arange(seen, seen + L, dtype=D64)
            k = pos.view(1, 1, L, 1).expand(2, 3, L, 4)
            v = -pos.view(1, 1, L, 1).expand(2, 3, L, 2)
            kk, vv, positions = cache.update(k, v)
            first = max(0, seen - window) if L > 1 else max(0, seen + L - window)
            want = torch.arange(first, seen + L)
            got = torch.arange(kk.shape[2]) if positions is None else positions
            if L > 1:  # stored tokens then the new ones, in order
                assert got.tolist() == want.tolist(), (seen, L)
            else:  # the slots, out of order once wrapped
                assert sorted(got.tolist()) == want.tolist(), (seen, L)
            assert torch.equal(kk[0, 0, :, 0], got.to(D64)) and torch.equal(vv[1, 2, :, 1], -got.to(D64))
            assert (kk == kk[:1, :1, :, :1]).all() and (vv == vv[:1, :1, :, :1]).all()
            seen += L
    assert cache.seen == seen and cache.k is not None and cache.k.shape[2] == window


def test_ring_buffer_prompt_after_a_wrap_sees_the_token_at_the_window_edge() -> None:
    """A wider mask (every stored token) after the buffer has wrapped: the oldest stored token, at the
    window's edge, changes the answer, so a buffer that kept one token fewer gives a different output."""
    torch.manual_seed(0)
    window = 3
    m = MultiHeadAttention(8, 2).double().eval()
    x = torch.randn(1, 9, 8, dtype=D64)
    cache = SlidingWindowKVCache(window)
    with torch.no_grad():
        m(x[:, :5], mask=causal(), cache=cache)  # keeps tokens 2, 3, 4
        got = m(x[:, 5:9], mask=causal() & sliding_window(6), cache=cache)  # token 5 reaches back to 2 .. 5
        want = m(x[:, 2:9], mask=causal())[:, 3:]  # the same keys and values, recomputed
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ring_buffer_with_absolute_position_mask() -> None:
    """A mask on absolute key positions (the first two tokens hidden, as left padding would) is rebuilt
    on the positions the ring holds once it has wrapped around."""
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2).double().eval()
    mask = sliding_window(3) & ~padding(2)
    x = torch.randn(1, 10, 8, dtype=D64)
    with torch.no_grad():
        want = m(x, mask=mask)
        got = _decode(m, x, SlidingWindowKVCache(4), [2, 1, 1, 3, 1, 1, 1], mask, None)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_static_cache_for_cross_attention() -> None:
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2, kdim=6).double().eval()
    x, mem = torch.randn(2, 5, 8, dtype=D64), torch.randn(2, 7, 6, dtype=D64)
    sc = CrossAttentionKVCache()
    with torch.no_grad():
        want = m(x, mem)
        got = torch.cat([m(x[:, :1], mem, cache=sc)] + [m(x[:, t : t + 1], None, cache=sc) for t in range(1, 5)], 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_growing_cache_under_autograd_and_errors() -> None:
    m = MultiHeadAttention(8, 2).double()
    x = torch.randn(1, 4, 8, dtype=D64, requires_grad=True)
    c = GrowingKVCache()
    out = torch.cat([m(x[:, t : t + 1], mask=causal(), cache=c) for t in range(4)], 1)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(m(x, mask=causal()).sum(), x)
    torch.testing.assert_close(g, g_ref)
    f = FixedKVCache(3)
    with torch.no_grad():
        m(x[:, :3], mask=causal(), cache=f)
        with pytest.raises(ValueError, match="max_len=3"):
            m(x[:, 3:], mask=causal(), cache=f)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowKVCache(0)
    with pytest.raises(ValueError, match="KVCache is for self-attention"):
        m(x, x, cache=GrowingKVCache())


def test_a_ring_within_its_window_needs_no_mask() -> None:
    """``at_positions`` returns no mask where the mask allows every kept key at its position (a wrapped
    ring buffer under its own window: no dense mask per step), and the dense mask where it does not."""
    positions = torch.tensor([4, 5, 2, 3])  # a ring of 4 after token 5: slots out of order
    mask, _ = at_positions(causal() & sliding_window(3), None, 1, 2, 1, positions, 6)
    assert mask is None
    mask, _ = at_positions(causal() & sliding_window(2), None, 1, 2, 1, positions, 6)  # key 2 is out of it
    assert mask is not None
    assert mask.to_dense(1, 2, 1, 4)[0, 0, 0].tolist() == [True, True, False, True]
