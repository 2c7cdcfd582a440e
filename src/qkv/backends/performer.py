"""``performer``: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

The softmax kernel ``exp(q·k · scale)`` is estimated without bias by positive random features::

    φ(x) = exp(W x' - |x'|² / 2) / sqrt(m),   x' = x · scale^½,   W (m, D) with rows ~ N(0, I)

and attention is then linear attention on those features (see :mod:`qkv.backends.linear`, whose
chunked causal form serves ``mask=causal()``). The rows of ``W`` are drawn in orthogonal blocks
(QR of Gaussian matrices, rows rescaled to chi-distributed norms), which lowers the variance. The
error shrinks like ``1/sqrt(m)``: more features, closer to exact softmax attention.

For numerical safety each query's features are divided by their own maximum and all keys' features
by one maximum per (batch, head); both factors cancel between numerator and denominator.

Options:
    num_features (int, default 256): ``m``, the number of random features.
    seed (int, default 0): draws ``W`` reproducibly (ignored when ``projection`` is given).
    generator (torch.Generator): draw ``W`` from this generator instead (advancing it: a new draw
        per call, i.e. redrawing features at every call).
    projection (Tensor ``(m, D)``): use these feature directions instead of drawing them; a module
        that redraws its features passes its current matrix here (see :func:`draw_projection`).
    orthogonal (bool, default True): orthogonal blocks (FAVOR+) or plain i.i.d. Gaussian rows.
    chunk_size (int, default 64): chunk length of the causal form.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Backend, Request
from .kernels import compute_dtype
from .linear import _check_chunk, decline_reason, expand_kv, feature_attention, is_causal_mask
from .registry import register

__all__ = ["draw_projection", "favor_features"]


def draw_projection(
    num_features: int,
    dim: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random feature directions ``W (num_features, dim)`` for FAVOR+.

    Args:
        num_features: ``m >= 1``, the number of rows.
        dim: ``D >= 1``, the head dim of queries and keys.
        seed: seeds a fresh CPU generator (reproducible draws); ignored when ``generator`` is given.
        generator: draw from this generator (advancing it), e.g. to redraw features during training.
        orthogonal: rows in blocks of ``D`` mutually orthogonal vectors with chi-distributed norms
            (FAVOR+); ``False`` gives i.i.d. ``N(0, I)`` rows.
    """
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
    if not orthogonal:
        w = torch.randn(num_features, dim, generator=g, dtype=torch.float64)
    else:
        blocks = []
        for _ in range(-(-num_features // dim)):
            qm, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
            blocks.append(qm.T)  # rows orthonormal
        w = torch.cat(blocks)[:num_features]
        norms = torch.randn(num_features, dim, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
        w = w * norms
    return w.to(dtype=dtype, device=device)


def favor_features(x: Tensor, projection: Tensor, is_query: bool) -> Tensor:
    """Positive random features ``φ(x) = exp(W x - |x|²/2 - c) / sqrt(m)``.

    Args:
        x: queries or keys ``(B, H, L, D)``, already multiplied by ``scale^½``.
        projection: ``W (m, D)``.
        is_query: the stabiliser ``c`` is each row's own maximum for queries and one maximum per
            ``(B, H)`` for keys, so that it cancels in attention's ratio.

    Returns:
        ``(B, H, L, m)`` non-negative features.
    """
    wx = x @ projection.T - (x * x).sum(-1, keepdim=True) / 2
    if is_query:
        c = wx.detach().amax(dim=-1, keepdim=True)
    else:
        c = wx.detach().amax(dim=(-1, -2), keepdim=True)
    return torch.exp(wx - (c + 0.5 * math.log(projection.shape[0])))  # the 1/sqrt(m) folded into exp


class Performer(Backend):
    name = "performer"
    options = frozenset({"num_features", "seed", "generator", "projection", "orthogonal", "chunk_size"})
    automatic = False  # an approximation: only when asked for by name
    exact = False

    def supports(self, req: Request) -> str | None:
        return decline_reason(req, "Performer attention")

    def run(self, req: Request, plan: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        o = req.options
        dt = compute_dtype(req.dtype)
        proj = o.get("projection")
        if proj is not None:
            if not isinstance(proj, Tensor) or proj.dim() != 2 or proj.shape[1] != req.D:
                got = tuple(proj.shape) if isinstance(proj, Tensor) else type(proj).__name__
                raise ValueError(f"projection must be a (num_features, D={req.D}) tensor, got {got}")
            proj = proj.to(device=req.device, dtype=dt)
        else:
            proj = draw_projection(
                o.get("num_features", 256),
                req.D,
                seed=o.get("seed", 0),
                generator=o.get("generator"),
                orthogonal=bool(o.get("orthogonal", True)),
                dtype=dt,
                device=req.device,
            )
        chunk = _check_chunk(o.get("chunk_size", 64))
        s = math.sqrt(abs(req.scale))  # q·k·scale = (q·s)·(k·s·sign(scale))
        fq = favor_features(req.q.to(dt) * s, proj, True)
        fk = expand_kv(req, favor_features(req.k.to(dt) * math.copysign(s, req.scale), proj, False))
        v = expand_kv(req, req.v.to(dt))
        out, w = feature_attention(fq, fk, v, bool(is_causal_mask(req.mask)), chunk, req.return_weights)
        if w is not None:
            return out.to(req.dtype), w.to(req.dtype)
        return out.to(req.dtype)


register(Performer())
