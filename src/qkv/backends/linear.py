"""``linear``: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"), feature map ``elu + 1``.

Softmax attention ``softmax(q kᵀ) v`` is replaced by a kernel ``φ(q)·φ(k)`` with ``φ(x) = elu(x) + 1``::

    out_i = φ(q_i) · Σ_j φ(k_j) v_jᵀ  /  φ(q_i) · Σ_j φ(k_j)

so the ``(Lq, Lk)`` matrix is never formed: cost ``O(L · D · Dv)`` instead of ``O(Lq · Lk · D)``.
The causal form (``mask=causal()``) sums over ``j <= i + Lk - Lq`` only (bottom-right aligned) and
is computed in chunks: exact quadratic attention inside a chunk of ``chunk_size`` tokens and a running
``(F, Dv)`` state between chunks, which trains fast and uses ``O(L/C · F · Dv)`` memory. :func:`step`
is the same causal attention as a recurrence with an ``O(1)`` state, for decoding.

``scale`` plays no role (there is no softmax to sharpen); ``mask`` must be ``None`` or ``causal()``;
score mods and dropout are declined. This module also holds the feature-space core shared with the
``performer`` backend.

Options: ``chunk_size`` (int, default 64): chunk length of the causal form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import Mask
from .base import Backend, Request
from .kernels import compute_dtype
from .registry import register

__all__ = ["LinearAttentionState", "elu_feature_map", "feature_attention", "is_causal_mask", "step"]


def elu_feature_map(x: Tensor) -> Tensor:
    """``φ(x) = elu(x) + 1``, positive everywhere: ``(..., D) -> (..., D)``."""
    return F.elu(x) + 1.0


def is_causal_mask(mask: Mask | None) -> bool | None:
    """``False`` for no mask (or ``full()``), ``True`` for exactly ``causal()``, ``None`` for anything else."""
    if mask is None or mask.is_full:
        return False
    if mask.is_causal:
        return True
    return None


def decline_reason(req: Request, what: str) -> str | None:
    """Why a kernelised backend (linear, performer) cannot serve ``req``, or ``None``."""
    if is_causal_mask(req.mask) is None:
        name = getattr(req.mask, "name", type(req.mask).__name__)
        return f"{what} supports only mask=None or mask=causal(), got mask {name}"
    if req.score_mod is not None:
        return f"{what} has no score matrix for a score mod to change"
    if req.dropout_p > 0:
        return f"{what} has no attention weights to drop out (dropout_p={req.dropout_p})"
    return None


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den[..., None]`` with rows of ``den == 0`` (nothing visible) giving zeros, not NaN."""
    den = den.unsqueeze(-1)
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def feature_attention(
    fq: Tensor, fk: Tensor, v: Tensor, causal: bool, chunk_size: int = 64, return_weights: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Attention with the kernel ``fq · fk`` on features already computed.

    Args:
        fq: query features ``(B, H, Lq, F)``, non-negative.
        fk: key features ``(B, H, Lk, F)``, non-negative (heads already matched to ``fq``).
        v: values ``(B, H, Lk, Dv)``.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` only (bottom-right aligned).
        chunk_size: chunk length of the causal form (``>= 1``).
        return_weights: also build the implied ``(B, H, Lq, Lk)`` weights (quadratic memory).

    Returns:
        ``out (B, H, Lq, Dv)`` and the weights or ``None``. A row that sees nothing gives zeros.
    """
    Lq, Lk = fq.shape[-2], fk.shape[-2]
    if not causal:
        kv = fk.transpose(-1, -2) @ v  # (B, H, F, Dv)
        out = _safe_div(fq @ kv, (fq @ fk.sum(-2).unsqueeze(-1)).squeeze(-1))
        w = None
        if return_weights:
            a = fq @ fk.transpose(-1, -2)
            w = _safe_div(a, a.sum(-1))
        return out, w
    # align bottom-right: query i stands at position i + Lk - Lq of a common length L = max(Lq, Lk);
    # zero features on the padding contribute nothing and see nothing
    L = max(Lq, Lk)
    fq_p = F.pad(fq, (0, 0, L - Lq, 0))
    fk_p = F.pad(fk, (0, 0, L - Lk, 0))
    v_p = F.pad(v, (0, 0, L - Lk, 0))
    C = max(1, min(chunk_size, L))
    n = -(-L // C)
    pad = n * C - L
    fq_c = F.pad(fq_p, (0, 0, 0, pad)).unflatten(-2, (n, C))  # (B, H, n, C, F)
    fk_c = F.pad(fk_p, (0, 0, 0, pad)).unflatten(-2, (n, C))
    v_c = F.pad(v_p, (0, 0, 0, pad)).unflatten(-2, (n, C))
    tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    a = (fq_c @ fk_c.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, H, n, C, C)
    kv = fk_c.transpose(-1, -2) @ v_c  # (B, H, n, F, Dv)
    z = fk_c.sum(-2)  # (B, H, n, F)
    kv_before = kv.cumsum(2) - kv  # state of all earlier chunks
    z_before = z.cumsum(2) - z
    num = a @ v_c + fq_c @ kv_before
    den = a.sum(-1) + (fq_c * z_before.unsqueeze(-2)).sum(-1)
    out = _safe_div(num, den).flatten(2, 3)[..., L - Lq : L, :]
    w = None
    if return_weights:
        full = (fq @ fk.transpose(-1, -2)).masked_fill(
            torch.arange(Lk, device=fq.device) > torch.arange(Lq, device=fq.device).unsqueeze(-1) + (Lk - Lq), 0.0
        )
        w = _safe_div(full, full.sum(-1))
    return out, w


def expand_kv(req: Request, t: Tensor) -> Tensor:
    """Repeat a ``(B, Hkv, L, X)`` tensor to ``(B, H, L, X)`` (grouped-query attention)."""
    return t if req.groups == 1 else t.repeat_interleave(req.groups, dim=1)


def _check_chunk(chunk_size: object) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


class Linear(Backend):
    name = "linear"
    options = frozenset({"chunk_size"})
    automatic = False  # an approximation: only when asked for by name
    exact = False

    def supports(self, req: Request) -> str | None:
        return decline_reason(req, "linear attention")

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        chunk = _check_chunk(req.options.get("chunk_size", 64))
        dt = compute_dtype(req.dtype)
        fq = elu_feature_map(req.q.to(dt))
        fk = expand_kv(req, elu_feature_map(req.k.to(dt)))
        v = expand_kv(req, req.v.to(dt))
        out, w = feature_attention(fq, fk, v, bool(is_causal_mask(req.mask)), chunk, req.return_weights)
        if w is not None:
            return out.to(req.dtype), w.to(req.dtype)
        return out.to(req.dtype)


@dataclass
class LinearAttentionState:
    """The ``O(1)`` state of causal linear attention after ``t`` tokens.

    Attributes:
        kv: ``Σ_j φ(k_j) v_jᵀ``, shape ``(B, H, F, Dv)``.
        z: ``Σ_j φ(k_j)``, shape ``(B, H, F)``.
        t: how many tokens have been consumed.
    """

    kv: Tensor
    z: Tensor
    t: int = 0


def step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    state: LinearAttentionState | None = None,
    feature_map: Callable[[Tensor], Tensor] = elu_feature_map,
) -> tuple[Tensor, LinearAttentionState]:
    """One decoding step of causal linear attention: add token ``t`` to the state, then attend.

    Equal to ``qkv.attention(q, k, v, mask=causal(), backend="linear")`` at position ``t`` (a test
    checks it), at ``O(F · Dv)`` cost per token whatever the length so far.

    Args:
        q_t: the new query ``(B, H, D)``.
        k_t: the new key ``(B, Hkv, D)``; ``H % Hkv == 0`` (grouped-query attention).
        v_t: the new value ``(B, Hkv, Dv)``.
        state: the state after the previous tokens, ``None`` at the first token.
        feature_map: ``φ``, ``(..., D) -> (..., F)``; ``elu(x) + 1`` by default.

    Returns:
        ``out_t (B, H, Dv)`` and the new state (the old one is not modified).
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, H, D) tensor for one token, got {got}")
    B, H, D = q_t.shape
    if k_t.shape[0] != B or v_t.shape[:2] != k_t.shape[:2] or k_t.shape[2] != D or H % k_t.shape[1]:
        raise ValueError(
            "step: q_t (B, H, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv) with H % Hkv == 0 expected, got "
            f"q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)}, v_t {tuple(v_t.shape)}"
        )
    g = H // k_t.shape[1]
    fq = feature_map(q_t)
    fk = feature_map(k_t).repeat_interleave(g, dim=1)
    v = v_t.repeat_interleave(g, dim=1)
    if state is None:
        state = LinearAttentionState(fq.new_zeros(B, H, fq.shape[-1], v.shape[-1]), fq.new_zeros(B, H, fq.shape[-1]))
    elif state.kv.shape != (B, H, fq.shape[-1], v.shape[-1]):
        raise ValueError(
            f"state.kv has shape {tuple(state.kv.shape)}, expected {(B, H, fq.shape[-1], v.shape[-1])} for "
            f"q_t {tuple(q_t.shape)} and v_t {tuple(v_t.shape)}"
        )
    kv = state.kv + fk.unsqueeze(-1) * v.unsqueeze(-2)
    z = state.z + fk
    out = _safe_div((fq.unsqueeze(-2) @ kv).squeeze(-2), (fq * z).sum(-1))
    return out, LinearAttentionState(kv, z, state.t + 1)


register(Linear())
