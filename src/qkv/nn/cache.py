"""Key/value caches for decoding: one that grows, one preallocated to a fixed size, a sliding-window
ring buffer, StreamingLLM's attention-sink cache (the first tokens kept, then a ring buffer), and the
cross-attention cache (the encoder memory projected to keys and values once, reused at every step).

A cache belongs to one attention layer. :meth:`KVCache.update` takes the keys and values of the ``L``
new tokens ``(B, Hkv, L, D)`` / ``(B, Hkv, L, Dv)`` (already rotated by RoPE at their absolute
positions) and returns the keys and values to attend to, with their absolute positions:

- ``positions is None``: the keys are tokens ``0 .. seen + L - 1`` in order, so the query
  alignment of :func:`qkv.attention` (bottom-right, query ``i`` at key position ``i + Lk - Lq``) is
  exactly right and masks and score mods apply unchanged;
- otherwise ``positions`` is a ``(Lk,)`` integer tensor of each returned key's absolute position
  (the ring buffer stores keys out of order once it wraps around) and :func:`at_positions` rebuilds
  the mask and score mod on those positions.

Caches write in place into buffers, so they are for inference (``torch.no_grad()``); the growing
cache also works under autograd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..masks import Mask, Shape, from_dense
from ..scores import ScoreMod, bias

if TYPE_CHECKING:
    from .positional import RotaryEmbedding

__all__ = [
    "CrossAttentionKVCache",
    "FixedKVCache",
    "GrowingKVCache",
    "KVCache",
    "SinkKVCache",
    "SlidingWindowKVCache",
    "at_positions",
]


def _check_kv(k: Tensor, v: Tensor) -> None:
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"cache: k must be (B, Hkv, L, D) and v (B, Hkv, L, Dv) with the same B, Hkv, L; got k {tuple(k.shape)},"
            f" v {tuple(v.shape)}"
        )


class KVCache:
    """Base of the self-attention caches. ``seen`` counts the tokens stored so far (the absolute
    position of the next token)."""

    def __init__(self) -> None:
        self.seen = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store the new tokens' keys ``k (B, Hkv, L, D)`` and values ``v (B, Hkv, L, Dv)``; return the
        keys ``(B, Hkv, Lk, D)`` and values ``(B, Hkv, Lk, Dv)`` the new queries attend to and their
        absolute positions (``None`` when they are exactly ``0 .. seen + L - 1`` in order)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything stored."""
        self.seen = 0

    def _check_same(self, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor) -> None:
        if k.shape[:2] != ref_k.shape[:2] or k.shape[3] != ref_k.shape[3] or v.shape[3] != ref_v.shape[3]:
            raise ValueError(
                f"cache: new keys {tuple(k.shape)} / values {tuple(v.shape)} do not match the stored"
                f" {tuple(ref_k.shape)} / {tuple(ref_v.shape)} in B, Hkv or head dims"
            )


class GrowingKVCache(KVCache):
    """Concatenates the new keys and values to the stored ones (``torch.cat``; simple, any length,
    works under autograd; copies the whole cache each step)."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        _check_kv(k, v)
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self._check_same(k, v, self.k, self.v)
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.seen += k.shape[2]
        return self.k, self.v, None

    def reset(self) -> None:
        super().reset()
        self.k = self.v = None


class FixedKVCache(KVCache):
    """A buffer of ``max_len`` positions, allocated at the first update (with the dtype, device, batch
    and head sizes of the keys it receives); each update copies only the new tokens.

    Args:
        max_len: the most tokens it will hold; more raise ``ValueError``.
    """

    def __init__(self, max_len: int) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"FixedKVCache: max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.k is None or self.v is None:
            _check_kv(k, v)
            B, Hkv, _, D = k.shape
            self.k = k.new_empty(B, Hkv, self.max_len, D)
            self.v = v.new_empty(B, Hkv, self.max_len, v.shape[3])
        L = k.shape[2]
        start, end = self.seen, self.seen + L
        if end > self.max_len:
            raise ValueError(f"FixedKVCache: {end} tokens exceed max_len={self.max_len}")
        if L == 1:  # the decoding fast path: no shape checks beyond what copy_ does
            self.k[:, :, start].copy_(k[:, :, 0])
            self.v[:, :, start].copy_(v[:, :, 0])
        else:
            _check_kv(k, v)
            self._check_same(k, v, self.k, self.v)
            self.k[:, :, start:end].copy_(k)
            self.v[:, :, start:end].copy_(v)
        self.seen = end
        return self.k[:, :, :end], self.v[:, :, :end], None

    def reset(self) -> None:
        super().reset()
        self.k = self.v = None


class SlidingWindowKVCache(KVCache):
    """A ring buffer keeping the keys and values of the last ``window`` tokens: memory ``O(window)``
    however long the generation. For use with a mask that lets each query see at most its ``window``
    most recent keys, itself included (``causal() & sliding_window(window - 1)``); older keys are gone.

    Token at position ``p`` lives in slot ``p % window``, so after wrapping around the slots are out of
    order and :meth:`update` returns their positions. A multi-token update (a prompt) attends to the
    stored tokens followed by the new ones, in order.

    Args:
        window: how many of the most recent tokens to keep (``>= 1``).
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"SlidingWindowKVCache: window must be >= 1, got {window}")
        self.window = window
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.pos: Tensor | None = None  # (window,) absolute position held by each slot

    def _ordered(self) -> tuple[Tensor, Tensor]:
        """The stored keys and values in chronological order."""
        assert self.k is not None and self.v is not None
        n = min(self.seen, self.window)
        if self.seen <= self.window:
            return self.k[:, :, :n], self.v[:, :, :n]
        s = self.seen % self.window  # slot of the oldest token
        return (torch.cat((self.k[:, :, s:], self.k[:, :, :s]), 2), torch.cat((self.v[:, :, s:], self.v[:, :, :s]), 2))

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        W = self.window
        if self.k is None or self.v is None or self.pos is None:
            _check_kv(k, v)
            B, Hkv, _, D = k.shape
            self.k = k.new_zeros(B, Hkv, W, D)
            self.v = v.new_zeros(B, Hkv, W, v.shape[3])
            self.pos = torch.zeros(W, dtype=torch.long, device=k.device)
        L, seen = k.shape[2], self.seen
        if L == 1:  # decoding: write one slot, attend to the filled slots
            slot = seen % W
            self.k[:, :, slot].copy_(k[:, :, 0])
            self.v[:, :, slot].copy_(v[:, :, 0])
            self.pos[slot] = seen
            self.seen = seen + 1
            if self.seen <= W:
                return self.k[:, :, : self.seen], self.v[:, :, : self.seen], None
            return self.k, self.v, self.pos
        _check_kv(k, v)
        self._check_same(k, v, self.k, self.v)
        old_k, old_v = self._ordered()
        k_all, v_all = torch.cat((old_k, k), 2), torch.cat((old_v, v), 2)
        end = seen + L
        first = end - k_all.shape[2]
        keep = min(W, k_all.shape[2])
        positions = torch.arange(end - keep, end, device=k.device)
        slots = positions % W
        self.k[:, :, slots] = k_all[:, :, -keep:]
        self.v[:, :, slots] = v_all[:, :, -keep:]
        self.pos[slots] = positions
        self.seen = end
        return k_all, v_all, (None if first == 0 else torch.arange(first, end, device=k.device))

    def reset(self) -> None:
        super().reset()
        self.k = self.v = self.pos = None


class SinkKVCache(KVCache):
    """StreamingLLM's cache (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks"): the first ``sinks`` tokens are kept for good (the attention sinks), then a ring buffer of
    the ``recent`` most recent tokens. Memory ``O(sinks + recent)`` however long the stream; with
    ``sinks=0`` it is a plain window (as :class:`SlidingWindowKVCache`).

    Positions (what RoPE, ALiBi and masks see once tokens have been evicted):

    - ``positions="cache"`` (StreamingLLM): positions *within the cache*. The query stands at in-cache
      position ``n - 1`` for ``n`` cached keys, the sinks at ``0 .. sinks - 1`` and the recent tokens
      right after them, so no distance exceeds the cache size and none is longer than what the model saw
      in training. RoPE only sees distances, and the recent tokens' distances are the same in the cache
      as in the text; only the sinks move: their keys (rotated at ``0 .. sinks - 1`` when they came in)
      are rotated on by ``shift = seen - n`` at each step, which puts them right before the oldest
      recent token (pass the layer's ``rope``; rotations compose, so no unrotated copy is kept). The
      returned positions are the same effective ones (sink ``i`` at ``shift + i``), so score mods such
      as ALiBi and masks see in-cache distances too.
    - ``positions="original"``: every key keeps its position in the text; the distance to the sinks
      grows without bound.

    A single-token update (decoding) attends to exactly the kept tokens: the sinks and the ``recent``
    last tokens, itself included. A multi-token update (a prompt) attends to the sinks, the
    ``recent - 1`` tokens before it and all the new ones at their original positions, under the model's
    own mask (the prompt itself is not windowed; one token is the decoding case), and then keeps the
    sinks and the ``recent`` last tokens. Keys and values are written in place, for inference.

    Args:
        sinks: how many first tokens to keep (``>= 0``; StreamingLLM uses 4).
        recent: how many most recent tokens to keep (``>= 1``).
        rope: the layer's :class:`~qkv.nn.RotaryEmbedding` when its keys are rotated (needed by
            ``positions="cache"``; the attention module passes keys already rotated at their absolute
            positions).
        positions: ``"cache"`` or ``"original"`` (see above).
    """

    def __init__(
        self, sinks: int, recent: int, *, rope: RotaryEmbedding | None = None, positions: str = "cache"
    ) -> None:
        super().__init__()
        if sinks < 0 or recent < 1:
            raise ValueError(f"SinkKVCache: need sinks >= 0 and recent >= 1, got sinks={sinks}, recent={recent}")
        if positions not in ("cache", "original"):
            raise ValueError(f"SinkKVCache: positions must be 'cache' or 'original', got {positions!r}")
        self.sinks, self.recent, self.rope, self.positions = sinks, recent, rope, positions
        self.k: Tensor | None = None  # (B, Hkv, sinks + recent, D): sink slots, then the ring
        self.v: Tensor | None = None
        self.pos: Tensor | None = None  # (sinks + recent,) the position each slot stands at
        self.sink_k: Tensor | None = None  # (B, Hkv, sinks, D) the sinks' keys as they came in

    @property
    def capacity(self) -> int:
        """The most tokens held: ``sinks + recent``."""
        return self.sinks + self.recent

    def _slot(self, p: int) -> int:
        return p if p < self.sinks else self.sinks + (p - self.sinks) % self.recent

    def _kept(self, seen: int, recent: int) -> list[int]:
        """The first ``sinks`` and the ``recent`` last of ``seen`` tokens, in order."""
        n = self.sinks
        return list(range(min(seen, n))) + list(range(max(n, seen - recent), seen))

    def _shift(self) -> int:
        """How far the sinks move up in ``positions="cache"`` mode: tokens evicted so far."""
        return max(0, self.seen - self.capacity) if self.positions == "cache" else 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        n, C = self.sinks, self.capacity
        if self.k is None or self.v is None or self.pos is None or self.sink_k is None:
            _check_kv(k, v)
            B, Hkv, _, D = k.shape
            self.k, self.v = k.new_zeros(B, Hkv, C, D), v.new_zeros(B, Hkv, C, v.shape[3])
            self.pos = torch.zeros(C, dtype=torch.long, device=k.device)
            self.sink_k = k.new_zeros(B, Hkv, n, D)
        L, seen = k.shape[2], self.seen
        if L == 1:  # decoding: write one slot, attend to the kept tokens
            slot = self._slot(seen)
            self.k[:, :, slot].copy_(k[:, :, 0])
            self.v[:, :, slot].copy_(v[:, :, 0])
            self.pos[slot] = seen
            if seen < n:
                self.sink_k[:, :, seen].copy_(k[:, :, 0])
            self.seen = seen + 1
            if self.seen <= C:  # nothing evicted yet: slots are in order
                return self.k[:, :, : self.seen], self.v[:, :, : self.seen], None
            shift = self._shift()
            if shift and n:
                self.pos[:n] = torch.arange(shift, shift + n, device=k.device)
                if self.rope is not None:
                    at = torch.full((n,), shift, dtype=torch.long, device=k.device)
                    self.k[:, :, :n] = self.rope.rotate(self.sink_k, at)
            return self.k, self.v, self.pos
        _check_kv(k, v)
        self._check_same(k, v, self.k, self.v)
        kept = self._kept(seen, self.recent - 1)  # as decoding would: the new token takes the oldest one's slot
        ns = min(seen, n)
        ring = torch.tensor([self._slot(p) for p in kept[ns:]], dtype=torch.long, device=k.device)
        k_all = torch.cat((self.sink_k[:, :, :ns], self.k[:, :, ring], k), 2)
        v_all = torch.cat((self.v[:, :, :ns], self.v[:, :, ring], v), 2)
        positions = torch.tensor(kept + list(range(seen, seen + L)), dtype=torch.long, device=k.device)
        end = seen + L
        for p in range(seen, min(end, n)):  # new tokens that are sinks
            self.sink_k[:, :, p] = k[:, :, p - seen]
        store = [p for p in self._kept(end, self.recent) if p >= seen]
        slots = torch.tensor([self._slot(p) for p in store], dtype=torch.long, device=k.device)
        new = torch.tensor(store, dtype=torch.long, device=k.device) - seen
        self.k[:, :, slots] = k[:, :, new]
        self.v[:, :, slots] = v[:, :, new]
        self.pos[slots] = new + seen
        self.seen = end
        in_order = len(kept) == seen
        return k_all, v_all, (None if in_order else positions)

    def reset(self) -> None:
        super().reset()
        self.k = self.v = self.pos = self.sink_k = None


class CrossAttentionKVCache:
    """Cross-attention keys and values, projected from the encoder output (the memory) once and reused at
    every decoding step: ``MultiHeadAttention`` fills it from ``context`` on first use, after which
    ``context`` may be ``None``. It does not grow with the decoded tokens (the memory is fixed), and it is
    not a preallocated, fixed-shape self-attention cache (what Hugging Face calls a static cache: here
    :class:`FixedKVCache`)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reset(self) -> None:
        """Forget the stored keys and values."""
        self.k = self.v = None


def at_positions(
    mask: Mask | None, score_mod: ScoreMod | None, B: int, H: int, Lq: int, positions: Tensor, end: int
) -> tuple[Mask | None, ScoreMod | None]:
    """Re-express a mask and a score mod written for the whole sequence on keys held out of order.

    The mask and score mod are defined on queries ``0 .. Lq-1`` standing at absolute positions
    ``end - Lq .. end - 1`` and keys ``0 .. end - 1`` (bottom-right alignment with ``Lk = end``).
    ``positions (Lk',)`` says which absolute key each cached key is; the result is a dense mask
    ``(B|1, H|1, Lq, Lk')`` (``None`` when it allows every pair: the keys a sliding-window cache keeps
    under its window) and, for a score mod, an additive bias of that shape (or a function that looks
    positions up, for non-additive mods).
    """
    s = Shape(B, H, Lq, end, positions.device)
    dev = positions.device
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, -1, 1, 1)
    q = torch.arange(Lq, device=dev).view(1, 1, -1, 1)
    kpos = positions.view(1, 1, 1, -1)
    new_mask: Mask | None = None
    if mask is not None:
        mask.check(s)
        m = mask.evaluate(s, b, h, q, kpos)
        m = torch.as_tensor(m, device=dev, dtype=torch.bool)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        # a mask that allows every kept key at its position (a ring buffer within its window) is no
        # mask: read from the values just computed, so exact (not while traced: no value is read there)
        if torch.compiler.is_compiling() or not bool(m.all()):
            new_mask = from_dense(m.expand(*m.shape[:2], Lq, positions.numel()))
    new_mod: ScoreMod | None = None
    if score_mod is not None:
        score_mod.check(s)
        if score_mod.additive:
            zero = torch.zeros((), dtype=torch.float32, device=dev)
            t = score_mod.apply(s, zero, b, h, q, kpos)
            while t.dim() < 4:
                t = t.unsqueeze(0)
            new_mod = bias(t.expand(*t.shape[:2], Lq, positions.numel()))
        else:
            from ..scores import as_score_mod

            sm = score_mod

            def remapped(score: Tensor, bb: Tensor, hh: Tensor, qq: Tensor, kk: Tensor) -> Tensor:
                return sm.apply(s, score, bb, hh, qq, positions[kk])

            new_mod = as_score_mod(remapped)
    return new_mask, new_mod
