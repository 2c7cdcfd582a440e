"""``nystrom``: Nyströmformer attention (Xiong et al. 2021).

With ``m`` landmarks ``q̃``, ``k̃`` (the means of ``m`` contiguous segments of the queries and of the
keys) the softmax matrix is approximated by the Nyström method::

    softmax(q kᵀ s) v  ≈  softmax(q k̃ᵀ s) · pinv(softmax(q̃ k̃ᵀ s)) · (softmax(q̃ kᵀ s) v)

at cost ``O(L · m · D)``. The pseudo-inverse is the paper's iterative one (Razavi et al. 2014, six
iterations by default) or, with ``pinv="exact"``, ``torch.linalg.pinv``. With as many landmarks as
tokens the landmarks are the tokens and the formula is exact (up to the pseudo-inverse).

Segment ``s`` of ``L`` tokens holds the positions ``i`` with ``floor(i · m / L) = s`` (segments differ
in length by at most one when ``m`` does not divide ``L``); ``m`` is capped at ``min(Lq, Lk)``. Only
unmasked attention without score mods or dropout is served (the method has no causal form).

Options:
    num_landmarks (int, default 64): ``m``.
    pinv_iterations (int, default 6): iterations of the iterative pseudo-inverse.
    pinv (str, default ``"iterative"``): ``"iterative"`` or ``"exact"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Backend, Request
from .kernels import compute_dtype
from .linear import expand_kv, is_causal_mask
from .registry import register

__all__ = ["iterative_pinv", "segment_means"]


def segment_means(x: Tensor, m: int) -> Tensor:
    """Means of ``m`` contiguous segments along dim ``-2``: ``(..., L, D) -> (..., m, D)``, ``1 <= m <= L``."""
    L = x.shape[-2]
    if not 1 <= m <= L:
        raise ValueError(f"segment_means: need 1 <= m <= L, got m={m} for x of shape {tuple(x.shape)}")
    if L % m == 0:
        return x.unflatten(-2, (m, L // m)).mean(-2)
    seg = torch.arange(L, device=x.device) * m // L
    counts = torch.bincount(seg, minlength=m).to(x.dtype)
    pool = (seg == torch.arange(m, device=x.device).unsqueeze(-1)).to(x.dtype) / counts.unsqueeze(-1)  # (m, L)
    return pool @ x


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """The Nyströmformer's iterative Moore-Penrose pseudo-inverse of square matrices ``(..., m, m)``.

    ``Z₀ = aᵀ / (‖a‖₁ ‖a‖∞)``, then ``Z ← ¼ Z (13 I - a Z (15 I - a Z (7 I - a Z)))``."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = a.transpose(-1, -2) / (
        a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1) * a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    )
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class Nystrom(Backend):
    name = "nystrom"
    options = frozenset({"num_landmarks", "pinv_iterations", "pinv"})
    automatic = False  # an approximation: only when asked for by name
    exact = False

    def supports(self, req: Request) -> str | None:
        if is_causal_mask(req.mask) is not False:
            return "Nystrom attention has no masked or causal form (its landmarks mix all positions)"
        if req.score_mod is not None:
            return "Nystrom attention cannot apply a score mod to the full score matrix it never forms"
        if req.dropout_p > 0:
            return f"Nystrom attention has no attention weights to drop out (dropout_p={req.dropout_p})"
        return None

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        o = req.options
        m = o.get("num_landmarks", 64)
        iters = o.get("pinv_iterations", 6)
        how = o.get("pinv", "iterative")
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"num_landmarks must be an int >= 1, got {m!r}")
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"pinv_iterations must be an int >= 0, got {iters!r}")
        if how not in ("iterative", "exact"):
            raise ValueError(f"pinv must be 'iterative' or 'exact', got {how!r}")
        m = min(m, req.Lq, req.Lk)
        dt = compute_dtype(req.dtype)
        q = req.q.to(dt) * req.scale
        k = expand_kv(req, req.k.to(dt))
        v = expand_kv(req, req.v.to(dt))
        ql, kl = segment_means(q, m), segment_means(k, m)
        k1 = torch.softmax(q @ kl.transpose(-1, -2), dim=-1)  # (B, H, Lq, m)
        k2 = torch.softmax(ql @ kl.transpose(-1, -2), dim=-1)  # (B, H, m, m)
        k3 = torch.softmax(ql @ k.transpose(-1, -2), dim=-1)  # (B, H, m, Lk)
        inv = torch.linalg.pinv(k2) if how == "exact" else iterative_pinv(k2, iters)
        left = k1 @ inv
        out = left @ (k3 @ v)
        if req.return_weights:
            return out.to(req.dtype), (left @ k3).to(req.dtype)
        return out.to(req.dtype)


register(Nystrom())
