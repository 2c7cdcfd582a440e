"""A selective state-space layer in the style of Mamba (Gu & Dao 2023), and hybrid stacks that mix it
with attention.

The layer (:class:`SelectiveSSM`) maps ``x (B, L, E)`` to ``(B, L, E)``::

    x, z  = in_proj(x).chunk(2)                       # (B, L, Di) each, Di = expand * E
    x     = silu(causal_depthwise_conv(x))            # optional short convolution (d_conv taps)
    Δ, B, C = softplus(dt_proj(x W_Δ)), x W_B, x W_C  # input-dependent step (B, L, Di), B, C (B, L, N)
    h_t   = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t   # diagonal A = -exp(A_log) (Di, N), h (B, Di, N)
    y_t   = h_t C_t + D ⊙ x_t
    out   = out_proj(y ⊙ silu(z))

The recurrence is computed by :func:`selective_scan`, a chunked parallel scan in plain PyTorch: a
sequential scan inside each chunk of ``T`` steps, run for all chunks at once, then ``L / T`` steps
that carry the state from chunk to chunk; every exponent is ``<= 0`` so nothing overflows.
:func:`selective_scan_sequential` is the recurrence step by step (the tests' oracle), and
:meth:`SelectiveSSM.step` decodes one token with an ``O(1)`` state (:class:`SSMState`).

:class:`HybridStack` stacks pre-norm residual blocks whose token mixers follow a pattern string such as
``"AMAM"``: ``A`` multi-head attention, ``M`` the state-space layer, ``L`` linear attention, ``P``
Performer attention. Each block is a :class:`qkv.nn.blocks.TransformerBlock` with that mixer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.linear import is_causal_mask
from ..masks import MaskLike, as_mask
from ..scores import ScoreMod, ScoreModFn

__all__ = [
    "HybridStack",
    "SSMState",
    "SelectiveSSM",
    "hybrid_mixers",
    "selective_scan",
    "selective_scan_sequential",
]


def _check_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, L, Di), got u {tuple(u.shape)}, delta {tuple(delta.shape)}")
    b, L, d = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (Di={d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, L, n):
            raise ValueError(f"{name} must be (B, L, N) = {(b, L, n)}, got {tuple(t.shape)}")


def selective_scan_sequential(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The selective recurrence one step at a time (the oracle for :func:`selective_scan`).

    Args:
        u: inputs ``(B, L, Di)``.
        delta: steps ``Δ > 0``, ``(B, L, Di)``.
        A: diagonal state matrix ``(Di, N)``, entries ``<= 0``.
        B: input matrices ``(B, L, N)``.
        C: output matrices ``(B, L, N)``.
        h0: the state before the first step ``(B, Di, N)``; zeros by default.

    Returns:
        ``y (B, L, Di)`` with ``y_t = Σ_n h_t[:, :, n] C_t[:, n]`` and the last state ``(B, Di, N)``.
    """
    _check_scan(u, delta, A, B, C)
    b, L, d = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(L):
        dt = delta[:, t].unsqueeze(-1)  # (B, Di, 1)
        h = torch.exp(dt * A) * h + dt * u[:, t].unsqueeze(-1) * B[:, t].unsqueeze(1)
        ys.append((h * C[:, t].unsqueeze(1)).sum(-1))
    y = torch.stack(ys, 1) if ys else u.new_zeros(b, 0, d)
    return y, h


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None, chunk_size: int = 32
) -> tuple[Tensor, Tensor]:
    """The selective recurrence of :func:`selective_scan_sequential` as a chunked parallel scan.

    Same arguments and result; ``chunk_size`` (``T >= 1``) trades the ``T`` sequential steps inside the
    chunks (run for all chunks at once) against the ``L / T`` steps between chunks; ``~sqrt(L)`` is best.
    Memory is ``O(B · L · Di · N)``.
    """
    _check_scan(u, delta, A, B, C)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    b, L, d = u.shape
    n_state = A.shape[1]
    if L == 0:
        return u.new_zeros(b, 0, d), (u.new_zeros(b, d, n_state) if h0 is None else h0)
    T = min(chunk_size, L)
    nc = -(-L // T)
    pad = nc * T - L
    # padded steps have delta = 0: no decay, no input, so the state passes through unchanged
    dl = F.pad(delta, (0, 0, 0, pad)).view(b, nc, T, d, 1)
    uu = F.pad(u, (0, 0, 0, pad)).view(b, nc, T, d, 1)
    Bp = F.pad(B, (0, 0, 0, pad)).view(b, nc, T, 1, n_state)
    Cp = F.pad(C, (0, 0, 0, pad)).view(b, nc, T, 1, n_state)
    # exponents are clamped where exp() would give a subnormal number: those are 10^-37 of the
    # state (float32) and cost up to 100x in CPU time, as subnormal arithmetic is slow
    floor = math.log(torch.finfo(u.dtype).tiny) + 2.0
    log_a = (dl * A).clamp(min=floor)  # (b, nc, T, d, N), <= 0
    x = dl * uu * Bp  # (b, nc, T, d, N)
    # 1. every chunk from a zero state, all chunks at once
    # (unbind, not indexing in the loops: the backward of each index would write a full-size tensor)
    a_steps, x_steps = torch.exp(log_a).unbind(2), x.unbind(2)
    h = torch.zeros_like(x_steps[0])
    local = []
    for t in range(T):
        h = a_steps[t] * h + x_steps[t]
        local.append(h)
    hl = torch.stack(local, 2)  # (b, nc, T, d, N)
    decay = torch.exp(log_a.cumsum(2).clamp(min=floor))  # decay from the chunk's start to step t, in (0, 1]
    # 2. carry the state across chunks
    carry = u.new_zeros(b, d, n_state) if h0 is None else h0
    carries = []
    for h_end, a_end in zip(hl[:, :, -1].unbind(1), decay[:, :, -1].unbind(1)):
        carries.append(carry)
        carry = h_end + a_end * carry
    cin = torch.stack(carries, 1).unsqueeze(2)  # (b, nc, 1, d, N)
    # 3. every step's state = its chunk-local state + the decayed carry
    y = ((hl + decay * cin) * Cp).sum(-1).view(b, nc * T, d)[:, :L]
    return y, carry


@dataclass
class SSMState:
    """What :class:`SelectiveSSM` carries between tokens when decoding.

    Attributes:
        conv: the last ``d_conv - 1`` inputs of the short convolution ``(B, Di, d_conv - 1)``;
            ``None`` (zeros, sized on first use) in a fresh state from :meth:`SelectiveSSM.init_cache`.
        h: the state ``(B, Di, N)``; ``None`` likewise.
        seen: tokens consumed so far.
    """

    conv: Tensor | None = None
    h: Tensor | None = None
    seen: int = 0


class SelectiveSSM(nn.Module):
    """A Mamba-style selective state-space layer, ``(B, L, E) -> (B, L, E)``, causal by construction.

    Args:
        d_model: width ``E``.
        d_state: ``N``, the state size per channel (16 in Mamba).
        expand: inner width ``Di = expand * E``.
        d_conv: taps of the causal depthwise convolution before the SSM; ``0`` for none.
        dt_rank: rank of the projection that makes ``Δ``; default ``ceil(E / 16)``.
        dt_min: smallest initial ``Δ`` (initial steps are log-uniform in ``[dt_min, dt_max]``).
        dt_max: largest initial ``Δ``.
        chunk_size: chunk length of the parallel scan.

    Called as a :class:`qkv.nn.blocks.TransformerBlock` mixer: ``mask`` may be ``None`` or ``causal()``
    (the layer is causal either way), ``score_mod`` must be ``None`` and ``cache`` may be an
    :class:`SSMState` (from :meth:`init_state`) that the call continues from and updates in place.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        chunk_size: int = 32,
    ) -> None:
        super().__init__()
        for name, val, lo in (("d_model", d_model, 1), ("d_state", d_state, 1), ("expand", expand, 1)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"SelectiveSSM: {name} must be an int >= {lo}, got {val!r}")
        if d_conv < 0:
            raise ValueError(f"SelectiveSSM: d_conv must be >= 0, got {d_conv}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"SelectiveSSM: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        di = expand * d_model
        self.d_model, self.d_state, self.d_inner, self.d_conv = d_model, d_state, di, d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * di)
        self.conv: nn.Conv1d | None = nn.Conv1d(di, di, d_conv, groups=di) if d_conv else None
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di)
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model)

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SSMState:
        """A zero :class:`SSMState` for ``batch`` sequences (for :meth:`step` or ``cache=``)."""
        p = self.A_log
        dev, dt = device or p.device, dtype or p.dtype
        return SSMState(
            torch.zeros(batch, self.d_inner, max(self.d_conv - 1, 0), device=dev, dtype=dt),
            torch.zeros(batch, self.d_inner, self.d_state, device=dev, dtype=dt),
        )

    def init_cache(self, max_len: int | None = None) -> SSMState:
        """An empty :class:`SSMState` (sized on first use): the hook ``qkv.models.GPT`` calls to decode
        with a cache. ``max_len`` is ignored: the state does not grow."""
        return SSMState()

    def _ssm_params(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dbc = self.x_proj(xc)
        dt_low, Bm, Cm = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt_low))
        return delta, -torch.exp(self.A_log), Bm, Cm

    def forward(
        self,
        x: Tensor,
        *,
        mask: MaskLike | None = None,
        score_mod: ScoreMod | ScoreModFn | None = None,
        cache: Any = None,
        sequential: bool = False,
    ) -> Tensor:
        """``x (B, L, E) -> (B, L, E)``.

        Args:
            x: the input sequence.
            mask: ``None`` or ``causal()`` (the layer is causal by construction); others are refused.
            score_mod: must be ``None`` (there are no scores).
            cache: an :class:`SSMState` to continue from; it is updated in place.
            sequential: use :func:`selective_scan_sequential` instead of the chunked scan.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SelectiveSSM: x must be (B, L, {self.d_model}), got {tuple(x.shape)}")
        m = as_mask(mask)
        if is_causal_mask(m) is None:
            raise ValueError(f"SelectiveSSM: is causal and takes no other mask, got mask {m!r}")
        if score_mod is not None:
            raise ValueError("SelectiveSSM: has no attention scores; score_mod must be None")
        if cache is not None and not isinstance(cache, SSMState):
            raise TypeError(f"SelectiveSSM: cache must be an SSMState, got {type(cache).__name__}")
        Bsz, L, _ = x.shape
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, Di)
        if self.conv is not None:
            xt = xi.transpose(1, 2)  # (B, Di, L)
            prev = cache.conv if cache is not None and cache.conv is not None else None
            if prev is None:
                prev = xt.new_zeros(Bsz, self.d_inner, self.d_conv - 1)
            xt = torch.cat([prev.to(xt.dtype), xt], dim=-1)
            if cache is not None:
                cache.conv = xt[:, :, xt.shape[-1] - (self.d_conv - 1) :].detach()
            xi = self.conv(xt).transpose(1, 2)
        xc = F.silu(xi)
        delta, A, Bm, Cm = self._ssm_params(xc)
        h0 = cache.h if cache is not None else None
        if sequential:
            y, h = selective_scan_sequential(xc, delta, A, Bm, Cm, h0)
        else:
            y, h = selective_scan(xc, delta, A, Bm, Cm, h0, self.chunk_size)
        if cache is not None:
            cache.h, cache.seen = h.detach(), cache.seen + L
        y = y + self.D * xc
        return self.out_proj(y * F.silu(z))

    def step(self, x_t: Tensor, state: SSMState) -> tuple[Tensor, SSMState]:
        """Decode one token: ``x_t (B, E)`` -> ``(B, E)`` and the new state (``state`` is not changed).

        Equal to position ``t`` of :meth:`forward` on the whole sequence (a test checks it)."""
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"SelectiveSSM.step: x_t must be (B, {self.d_model}), got {tuple(x_t.shape)}")
        xi, z = self.in_proj(x_t).chunk(2, dim=-1)  # (B, Di)
        B = x_t.shape[0]
        conv = state.conv if state.conv is not None else xi.new_zeros(B, self.d_inner, max(self.d_conv - 1, 0))
        h0 = state.h if state.h is not None else xi.new_zeros(B, self.d_inner, self.d_state)
        if self.conv is not None:
            window = torch.cat([conv, xi.unsqueeze(-1)], dim=-1)  # (B, Di, d_conv)
            xi = (window * self.conv.weight[:, 0]).sum(-1) + (self.conv.bias if self.conv.bias is not None else 0.0)
            conv = window[:, :, 1:]
        xc = F.silu(xi)
        delta, A, Bm, Cm = self._ssm_params(xc)
        dt = delta.unsqueeze(-1)
        h = torch.exp(dt * A) * h0 + dt * xc.unsqueeze(-1) * Bm.unsqueeze(1)
        y = (h * Cm.unsqueeze(1)).sum(-1) + self.D * xc
        return self.out_proj(y * F.silu(z)), SSMState(conv, h, state.seen + 1)


_MIXERS = "AMLP"


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern or any(c not in _MIXERS for c in pattern):
        raise ValueError(f"pattern must be a non-empty string of the letters {_MIXERS}, got {pattern!r}")


def _mixer(c: str, d_model: int, n_heads: int, d_state: int, expand: int, num_features: int) -> nn.Module | None:
    if c == "M":
        return SelectiveSSM(d_model, d_state=d_state, expand=expand)
    if c in "LP":
        from .linear_attention import LinearSelfAttention

        kind = "linear" if c == "L" else "performer"
        return LinearSelfAttention(d_model, n_heads, kind, num_features=num_features)
    return None


def hybrid_mixers(
    pattern: str, d_model: int, n_heads: int, *, d_state: int = 16, expand: int = 2, num_features: int = 64
) -> Callable[[int], nn.Module | None]:
    """A ``mixer_factory`` for :class:`qkv.models.GPT` that makes a hybrid language model::

        GPT(vocab, 128, n_layers=4, n_heads=4, max_len=512, mixer_factory=hybrid_mixers("AMAM", 128, 4))

    Layer ``i`` gets the mixer of letter ``pattern[i % len(pattern)]``: ``A`` keeps GPT's attention,
    ``M`` a :class:`SelectiveSSM`, ``L`` linear and ``P`` Performer attention. All of them decode with
    GPT's cache (``GPT.generate(use_cache=True)``). GPT must use full causal attention (``window=None``)
    and no ALiBi (``pos != "alibi"``) when the pattern holds ``M``, ``L`` or ``P``.
    """
    _check_pattern(pattern)

    def factory(i: int) -> nn.Module | None:
        return _mixer(pattern[i % len(pattern)], d_model, n_heads, d_state, expand, num_features)

    return factory


class HybridStack(nn.Module):
    """Pre-norm residual blocks whose token mixers follow ``pattern``, e.g. ``"AMAM"`` or ``"MMMA"``.

    Letters: ``A`` multi-head attention (:class:`qkv.nn.attention.MultiHeadAttention`), ``M``
    :class:`SelectiveSSM`, ``L`` linear attention and ``P`` Performer attention
    (:class:`qkv.nn.linear_attention.LinearSelfAttention`). Every block is a
    :class:`qkv.nn.blocks.TransformerBlock` (mixer + feed-forward) with ``norm_first=True``.

    Args:
        d_model: width ``E``.
        n_heads: attention heads of the ``A``/``L``/``P`` layers.
        pattern: one letter per layer, in order.
        d_ff: feed-forward width (default ``4 * E``).
        d_state: state size of the ``M`` layers.
        expand: inner expansion of the ``M`` layers.
        dropout: dropout of the blocks.
        num_features: random features of ``P`` layers.

    ``forward(x, mask=None)`` hands ``mask`` to the attention layers; the ``M`` layers are causal by
    construction and take no mask, so pass ``causal()`` for a language model.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        pattern: str = "AMAM",
        *,
        d_ff: int | None = None,
        d_state: int = 16,
        expand: int = 2,
        dropout: float = 0.0,
        num_features: int = 64,
    ) -> None:
        super().__init__()
        from .blocks import TransformerBlock

        _check_pattern(pattern)
        self.pattern = pattern
        blocks = []
        for c in pattern:
            mixer = _mixer(c, d_model, n_heads, d_state, expand, num_features)
            blocks.append(TransformerBlock(d_model, n_heads, d_ff, dropout=dropout, norm_first=True, mixer=mixer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: MaskLike | None = None) -> Tensor:
        """``x (B, L, E) -> (B, L, E)`` (final LayerNorm applied)."""
        for c, blk in zip(self.pattern, self.blocks):
            blk_mask = mask if c != "M" else None
            x = blk(x, mask=blk_mask)
        return self.norm(x)
