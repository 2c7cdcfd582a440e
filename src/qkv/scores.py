"""Score mods: how a score ``q . k * scale`` is changed before the softmax.

Each score mod follows PyTorch FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``
convention and composes with :func:`compose` (or ``a.then(b)``)::

    qkv.attention(q, k, v, score_mod=compose(alibi(8), softcap(30.0)))

Positional score mods (``alibi``, ``relative_bias``) measure distance from the query's aligned
position ``p = i + Lk - Lq`` (bottom-right alignment, as the masks do). Additive score mods
(``alibi``, ``relative_bias``, ``bias``) can also be handed to kernels that take an additive mask
(:meth:`ScoreMod.additive_bias`); ``softcap`` cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .masks import Shape

__all__ = [
    "ScoreMod",
    "ScoreModFn",
    "alibi",
    "alibi_slopes",
    "as_score_mod",
    "bias",
    "compose",
    "relative_bias",
    "softcap",
    "t5_relative_bucket",
]

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``score_mod(score, b, h, q_idx, kv_idx) -> score``: PyTorch FlexAttention's convention."""


class ScoreMod:
    """A change to the attention scores; subclasses define ``apply``."""

    name: str = "score_mod"
    #: whether the mod only adds a bias that depends on indices (then ``additive_bias`` is not None)
    additive: bool = False

    def apply(self, s: Shape, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Return the new scores; ``score`` broadcasts with ``b (B,1,1,1)``, ``h``, ``q``, ``k``."""
        raise NotImplementedError

    def check(self, s: Shape) -> None:
        """Raise ``ValueError`` if this score mod cannot apply to a problem of shape ``s``."""

    def additive_bias(self, s: Shape) -> Tensor | None:
        """The score mod as an additive bias broadcastable to ``(B, H, Lq, Lk)``, or ``None`` when it
        is not additive. Kernels that take an additive float mask (SDPA) use it."""
        return None

    def score_mod(self, Lq: int, Lk: int, B: int = 1, H: int = 1) -> ScoreModFn:
        """A FlexAttention ``score_mod`` for a problem with these lengths."""
        s = Shape(B, H, Lq, Lk)

        def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self.apply(s, score, b, h, q_idx, kv_idx)

        return mod

    def to(self, device: torch.device | str) -> ScoreMod:
        """Move the constant tensors this score mod holds (ALiBi's slopes) to ``device`` in place and
        return it; tensors the caller passed in (a learned bias) stay where the caller keeps them.
        Kernels that capture them (a compiled FlexAttention ``score_mod``) need them on the device
        of the queries."""
        return self

    def then(self, other: ScoreMod | ScoreModFn) -> ScoreMod:
        """This score mod, then ``other``."""
        return _Compose(self, _need(other))

    def __repr__(self) -> str:
        return self.name


class _Compose(ScoreMod):
    def __init__(self, *mods: ScoreMod):
        self.mods = mods
        self.name = " -> ".join(m.name for m in mods)
        self.additive = all(m.additive for m in mods)

    def apply(self, s: Shape, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        for m in self.mods:
            score = m.apply(s, score, b, h, q, k)
        return score

    def check(self, s: Shape) -> None:
        for m in self.mods:
            m.check(s)

    def to(self, device: torch.device | str) -> ScoreMod:
        for m in self.mods:
            m.to(device)
        return self

    def additive_bias(self, s: Shape) -> Tensor | None:
        total: Tensor | None = None
        for m in self.mods:
            t = m.additive_bias(s)
            if t is None:
                return None
            total = t if total is None else total + t
        return total


def compose(*mods: ScoreMod | ScoreModFn) -> ScoreMod:
    """Apply score mods left to right: ``compose(alibi(8), softcap(30))``.

    >>> from qkv import scores
    >>> scores.compose(scores.alibi(8), scores.softcap(30.0))
    alibi(8) -> softcap(30)
    """
    if not mods:
        raise ValueError("compose: give at least one score mod")
    return _Compose(*(_need(m) for m in mods))


def _index_grid(s: Shape) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dev = s.device
    return (
        torch.arange(s.B, device=dev).view(-1, 1, 1, 1),
        torch.arange(s.H, device=dev).view(1, -1, 1, 1),
        torch.arange(s.Lq, device=dev).view(1, 1, -1, 1),
        torch.arange(s.Lk, device=dev).view(1, 1, 1, -1),
    )


class _Additive(ScoreMod):
    """A score mod that adds a bias computed from indices alone."""

    additive = True

    def _bias(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, s: Shape, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return score + self._bias(s, b, h, q, k).to(score.dtype)

    def additive_bias(self, s: Shape) -> Tensor | None:
        return self._bias(s, *_index_grid(s))


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes (Press et al. 2022): ``2^(-8/n), 2^(-16/n), ...`` for ``n`` a power of two;
    otherwise the slopes of the nearest smaller power of two, then every other slope of twice that.

    >>> from qkv import scores
    >>> scores.alibi_slopes(4)
    tensor([0.2500, 0.0625, 0.0156, 0.0039], dtype=torch.float64)
    """
    if num_heads < 1:
        raise ValueError(f"alibi: num_heads must be >= 1, got {num_heads}")

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(pow2(num_heads), dtype=torch.float64)
    n = 2 ** math.floor(math.log2(num_heads))
    return torch.tensor(pow2(n) + pow2(2 * n)[0::2][: num_heads - n], dtype=torch.float64)


class _Alibi(_Additive):
    def __init__(self, num_heads: int, symmetric: bool):
        self.slopes = alibi_slopes(num_heads)
        self.symmetric = symmetric
        self.name = f"alibi({num_heads})"

    def to(self, device: torch.device | str) -> ScoreMod:
        self.slopes = self.slopes.to(device)
        return self

    def check(self, s: Shape) -> None:
        if s.H != self.slopes.numel():
            raise ValueError(f"alibi: built for {self.slopes.numel()} heads but q has H={s.H} heads")

    def _bias(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        rel = (k - (q + s.offset)).to(torch.float32)  # <= 0 for keys in the past
        if self.symmetric:
            rel = -rel.abs()
        return self.slopes.to(device=h.device, dtype=torch.float32)[h] * rel


def alibi(num_heads: int, symmetric: bool = False) -> ScoreMod:
    """ALiBi (Press et al. 2022): add ``slope_h * (j - p)`` to the score of query position ``p`` and
    key ``j`` (a penalty growing with distance for past keys; use with a causal mask).

    Args:
        num_heads: the number of query heads ``H``; slopes per :func:`alibi_slopes`.
        symmetric: use ``-slope_h * |j - p|`` instead, for bidirectional encoders.

    Example:
        The bias of the first of two heads (slope ``2^-4``) on three queries and keys:

        >>> from qkv import masks, scores
        >>> scores.alibi(2).additive_bias(masks.Shape(B=1, H=2, Lq=3, Lk=3))[0, 0]
        tensor([[ 0.0000,  0.0625,  0.1250],
                [-0.0625,  0.0000,  0.0625],
                [-0.1250, -0.0625,  0.0000]])
    """
    return _Alibi(num_heads, symmetric)


class _Softcap(ScoreMod):
    def __init__(self, cap: float):
        self.cap = float(cap)
        self.name = f"softcap({cap:g})"

    def apply(self, s: Shape, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``; ``cap > 0``.

    Small scores pass almost unchanged, large ones approach ``cap``:

    >>> import torch
    >>> from qkv import scores
    >>> mod = scores.softcap(2.0).score_mod(Lq=1, Lk=1)   # as a FlexAttention score_mod
    >>> mod(torch.tensor([0.5, 10.0]), 0, 0, 0, 0)
    tensor([0.4898, 1.9998])
    """
    if not isinstance(cap, (int, float)) or not cap > 0 or math.isinf(cap):
        raise ValueError(f"softcap: cap must be a finite number > 0, got {cap!r}")
    return _Softcap(cap)


def t5_relative_bucket(
    rel: Tensor, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
) -> Tensor:
    """T5's bucket of a relative position ``rel = key - query``: exact buckets for small distances,
    logarithmic ones up to ``max_distance``, and a shared last bucket beyond."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    large = (
        max_exact
        + (
            torch.log(dist.clamp(min=1).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class _RelativeBias(_Additive):
    def __init__(self, weight: Tensor, num_buckets: int, max_distance: int, bidirectional: bool):
        self.weight, self.num_buckets = weight, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.name = f"relative_bias({num_buckets}, {max_distance})"

    def check(self, s: Shape) -> None:
        if self.weight.shape[1] != s.H:
            raise ValueError(f"relative_bias: weight has {self.weight.shape[1]} heads but q has H={s.H}")

    def _bias(self, s: Shape, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        bucket = t5_relative_bucket(k - (q + s.offset), self.num_buckets, self.max_distance, self.bidirectional)
        return self.weight.to(h.device)[bucket, h]


def relative_bias(weight: Tensor, *, max_distance: int = 128, bidirectional: bool = True) -> ScoreMod:
    """T5's bucketed relative position bias (Raffel et al. 2020): add ``weight[bucket(j - p), h]``.

    Args:
        weight: ``(num_buckets, H)`` learned bias table; gradients flow into it.
        max_distance: distances beyond it share the last bucket.
        bidirectional: separate buckets for keys before and after the query (encoders); ``False``
            for decoders.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"relative_bias: weight must be a (num_buckets, num_heads) tensor, got "
            f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}"
        )
    return _RelativeBias(weight, weight.shape[0], max_distance, bidirectional)


class _Bias(ScoreMod):
    additive = True

    def __init__(self, t: Tensor):
        self.t = t
        self.name = f"bias{tuple(t.shape)}"

    def check(self, s: Shape) -> None:
        want, got = (s.B, s.H, s.Lq, s.Lk), tuple(self.t.shape)
        if len(got) > 4 or any(g not in (1, w) for g, w in zip(reversed(got), reversed(want))):
            raise ValueError(f"bias of shape {got} does not broadcast to (B, H, Lq, Lk) = {want}")

    def apply(self, s: Shape, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        t = self.t
        while t.dim() < 4:
            t = t.unsqueeze(0)
        idx = [x if t.shape[i] > 1 else torch.zeros_like(x) for i, x in enumerate((b, h, q, k))]
        return score + t[idx[0], idx[1], idx[2], idx[3]].to(score.dtype)

    def additive_bias(self, s: Shape) -> Tensor | None:
        return self.t


def bias(t: Tensor) -> ScoreMod:
    """Add a tensor broadcastable to ``(B, H, Lq, Lk)`` to the scores (an additive float mask, a
    learned bias). Gradients flow into ``t`` when it requires grad. ``-inf`` entries mask."""
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(
            f"bias: expected a floating-point tensor, got {t.dtype if isinstance(t, Tensor) else type(t).__name__}"
        )
    if t.dim() > 4:
        raise ValueError(f"bias must have at most 4 dims (B, H, Lq, Lk), got shape {tuple(t.shape)}")
    return _Bias(t)


class _Fn(ScoreMod):
    def __init__(self, fn: ScoreModFn):
        self.fn = fn
        self.name = getattr(fn, "__name__", "score_mod")

    def apply(self, s: Shape, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = self.fn(score, b, h, q, k)
        if not isinstance(out, Tensor):
            raise TypeError(f"score_mod {self.name} must return a tensor, got {type(out).__name__}")
        return out


def _need(fn: ScoreMod | ScoreModFn) -> ScoreMod:
    m = as_score_mod(fn)
    if m is None:
        raise TypeError("cannot compose a score mod with None")
    return m


def as_score_mod(fn: ScoreMod | ScoreModFn | None) -> ScoreMod | None:
    """Turn a ``score_mod=`` argument (a :class:`ScoreMod` or a FlexAttention function) into a ScoreMod."""
    if fn is None or isinstance(fn, ScoreMod):
        return fn
    if callable(fn):
        return _Fn(fn)
    raise TypeError(
        f"score_mod must be a qkv.scores.ScoreMod or a function score_mod(score, b, h, q_idx, kv_idx), "
        f"got {type(fn).__name__}"
    )
