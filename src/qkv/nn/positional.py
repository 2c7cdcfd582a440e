"""Positional encodings: sinusoidal (Vaswani et al. 2017), learned absolute, rotary (RoPE, Su et al.
2021, with linear and NTK scaling), ALiBi (Press et al. 2022) and T5's relative bias (Raffel et al. 2020).

Absolute encodings (:class:`SinusoidalPositionalEncoding`, :class:`LearnedPositionalEmbedding`) are
added to token embeddings ``(B, L, E)``; ``offset`` gives the position of the first token (decoding
with a KV cache). :class:`RotaryEmbedding` rotates queries and keys ``(B, H, L, D)`` inside attention.
:class:`ALiBi` and :class:`T5RelativeBias` act on the scores through :mod:`qkv.scores`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..scores import ScoreMod, alibi, relative_bias

__all__ = [
    "ALiBi",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "T5RelativeBias",
    "sinusoidal_table",
]


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """Vaswani et al.'s table ``(length, dim)``: ``PE[p, 2i] = sin(p / base^(2i/dim))`` and
    ``PE[p, 2i+1] = cos(p / base^(2i/dim))`` (float32; ``dim`` must be even)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"sinusoidal_table: dim must be a positive even number, got {dim}")
    if length < 0:
        raise ValueError(f"sinusoidal_table: length must be >= 0, got {length}")
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe.float()


def _check_x(x: Tensor, dim: int, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{who}: x must be (B, L, {dim}), got shape {tuple(x.shape)}")


class SinusoidalPositionalEncoding(nn.Module):
    """Adds Vaswani et al.'s fixed sinusoidal encoding to embeddings.

    Args:
        dim: embedding size ``E`` (even).
        max_len: longest sequence (positions ``0 .. max_len - 1``).
        base: the wavelength base, 10000 in the paper.
    """

    pe: Tensor

    def __init__(self, dim: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.register_buffer("pe", sinusoidal_table(max_len, dim, base), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x (B, L, E)`` plus the encoding of positions ``offset .. offset + L - 1``."""
        _check_x(x, self.dim, "SinusoidalPositionalEncoding")
        end = offset + x.shape[1]
        if offset < 0 or end > self.max_len:
            raise ValueError(f"SinusoidalPositionalEncoding: positions [{offset}, {end}) exceed max_len={self.max_len}")
        return x + self.pe[offset:end].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """Adds a learned embedding per absolute position (GPT-2, BERT).

    Args:
        max_len: number of positions.
        dim: embedding size ``E``.
    """

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x (B, L, E)`` plus the embedding of positions ``offset .. offset + L - 1``."""
        _check_x(x, self.dim, "LearnedPositionalEmbedding")
        end = offset + x.shape[1]
        if offset < 0 or end > self.max_len:
            raise ValueError(f"LearnedPositionalEmbedding: positions [{offset}, {end}) exceed max_len={self.max_len}")
        return x + self.weight[offset:end]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021): rotates each pair of channels of queries and
    keys by the angle ``p * theta_i``, ``theta_i = base^(-2i/dim)``, so that ``q_m . k_n`` depends on
    ``m - n`` only.

    Args:
        dim: the rotated head dim ``D`` (even; channels beyond ``dim`` pass unchanged).
        base: ``10000`` in the paper.
        scaling: ``None``; ``("linear", f)`` divides positions by ``f`` (position interpolation,
            Chen et al. 2023); ``("ntk", f)`` raises the base to ``base * f^(dim / (dim - 2))``
            ("NTK-aware" scaling), both for contexts ``f`` times longer than trained.
        interleaved: pair channels ``(2i, 2i+1)`` as in the paper; the default ``False`` pairs
            ``(i, i + dim/2)`` (GPT-NeoX, Llama), which is the same rotation on permuted channels.
    """

    inv_freq: Tensor

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        scaling: tuple[str, float] | None = None,
        *,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even number, got {dim}")
        self.dim, self.interleaved = dim, interleaved
        self.pos_scale = 1.0
        if scaling is not None:
            if not (isinstance(scaling, tuple) and len(scaling) == 2 and scaling[0] in ("linear", "ntk")):
                raise ValueError(f"RotaryEmbedding: scaling must be None, ('linear', f) or ('ntk', f), got {scaling!r}")
            kind, f = scaling
            if not f > 0:
                raise ValueError(f"RotaryEmbedding: the scaling factor must be > 0, got {f}")
            if kind == "linear":
                self.pos_scale = 1.0 / f
            else:
                base = base * f ** (dim / (dim - 2)) if dim > 2 else base * f
        self.base, self.scaling = base, scaling
        inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def angles(self, positions: Tensor) -> Tensor:
        """The angles ``p * theta_i`` for integer ``positions`` (any shape): shape ``(*positions, dim/2)``."""
        return (positions.to(torch.float32) * self.pos_scale)[..., None] * self.inv_freq.to(positions.device)

    def _cos_sin(self, end: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin tables ``(n, dim)`` in the channel layout, for positions ``0 .. n-1`` with ``n >= end``."""
        if torch.compiler.is_compiling():  # computed in the graph: a cache written there would be a guard
            a = self.angles(torch.arange(end, device=device))
            a = a.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([a, a], dim=-1)
            return a.cos(), a.sin()
        c = self._cache
        if c is None or c[0] < end or c[1] != device:
            n = max(end, 2 * (c[0] if c is not None else 0), 256)
            a = self.angles(torch.arange(n, device=device))
            a = a.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([a, a], dim=-1)
            self._cache = c = (n, device, a.cos(), a.sin())
        return c[2], c[3]

    def _rotate(self, x: Tensor) -> Tensor:
        """The "rotate by 90 degrees" partner of each channel: ``(-x2, x1)`` per pair."""
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)
        half = self.dim // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rotate(self, x: Tensor, positions: int | Tensor = 0) -> Tensor:
        """Rotate ``x (B, H, L, D)`` (``D >= dim``).

        Args:
            x: queries or keys.
            positions: an int offset (token ``t`` stands at ``offset + t``), or a ``(L,)`` or
                ``(B, L)`` integer tensor of absolute positions.
        """
        if x.dim() != 4 or x.shape[-1] < self.dim:
            raise ValueError(f"RotaryEmbedding: x must be (B, H, L, D) with D >= {self.dim}, got {tuple(x.shape)}")
        L = x.shape[2]
        if isinstance(positions, int):
            cos, sin = self._cos_sin(positions + L, x.device)
            cos, sin = cos[positions : positions + L], sin[positions : positions + L]
        else:
            if positions.shape[-1] != L or positions.dim() > 2:
                raise ValueError(
                    f"RotaryEmbedding: positions must be (L,) or (B, L) with L={L}, got {tuple(positions.shape)}"
                )
            a = self.angles(positions)
            a = a.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([a, a], dim=-1)
            cos, sin = a.cos(), a.sin()
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if x.shape[-1] == self.dim:
            return x * cos + self._rotate(x) * sin
        xr, rest = x[..., : self.dim], x[..., self.dim :]
        return torch.cat((xr * cos + self._rotate(xr) * sin, rest), dim=-1)

    def forward(self, q: Tensor, k: Tensor, positions: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        """Rotate queries ``(B, H, L, D)`` and keys ``(B, Hkv, L, D)`` standing at the same positions."""
        return self.rotate(q, positions), self.rotate(k, positions)


class ALiBi(nn.Module):
    """ALiBi (Press et al. 2022) as a module holding nothing learned: ``score_mod()`` gives
    :func:`qkv.scores.alibi`, which adds ``slope_h * (j - p)`` to each score.

    Args:
        num_heads: query heads ``H``.
        symmetric: ``-slope_h * |j - p|`` for bidirectional encoders.
    """

    def __init__(self, num_heads: int, symmetric: bool = False) -> None:
        super().__init__()
        self.num_heads, self.symmetric = num_heads, symmetric
        self._mod = alibi(num_heads, symmetric)

    def score_mod(self) -> ScoreMod:
        """The score mod to pass to ``qkv.attention`` / ``MultiHeadAttention``."""
        return self._mod


class T5RelativeBias(nn.Module):
    """T5's learned, bucketed relative position bias: a ``(num_buckets, num_heads)`` parameter used
    through :func:`qkv.scores.relative_bias`.

    Args:
        num_heads: query heads ``H``.
        num_buckets: size of the table (32 in T5).
        max_distance: distances beyond it share the last bucket (128 in T5).
        bidirectional: ``True`` for encoders, ``False`` for causal decoders.
    """

    def __init__(
        self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
    ) -> None:
        super().__init__()
        self.num_heads, self.max_distance, self.bidirectional = num_heads, max_distance, bidirectional
        self.weight = nn.Parameter(torch.randn(num_buckets, num_heads) * 0.02)

    def score_mod(self) -> ScoreMod:
        """The score mod (gradients flow into ``weight``)."""
        return relative_bias(self.weight, max_distance=self.max_distance, bidirectional=self.bidirectional)
