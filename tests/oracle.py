"""The float64 oracle and FlashAttention's tolerance rule, for every backend's tests.

The rule: a backend's error against ``reference`` in float64 must be at most twice the error of the
same formula computed in the backend's dtype, plus a small floor (:data:`FLOOR`). The baseline
formula is:

* float32 / float64: ``reference`` computing in that dtype;
* float16 / bfloat16: the formula computed *entirely* in the low dtype, with no upcast anywhere
  (:func:`low_precision_formula`: ``Q Kᵀ``, the softmax and ``P V`` in bf16/fp16, and their
  gradients by autograd in bf16/fp16): flash-attn's ``attention_ref(upcast=False)``. Fused
  half-precision kernels round ``P`` to the low dtype before ``P V`` as that formula does, so the
  reference in float32 would be a baseline they could never meet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import qkv
from qkv.attention import _validate
from qkv.backends.reference import reference_attention

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
HALF = (torch.float16, torch.bfloat16)


NAMES = ("out", "dq", "dk", "dv", "dsinks")
"""What :func:`oracle` and :func:`errors` return, in order (``dsinks`` only for a request with sinks)."""


def _run(fn: Any, q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None, sinks: Tensor | None = None) -> tuple[Tensor, ...]:
    """``(out, [dq, dk, dv, [dsinks]])`` of ``fn(q, k, v, sinks)``: with sinks their gradient too."""
    ins = tuple(t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v) if t is not None)
    s = None if sinks is None else sinks.detach().clone().requires_grad_(dout is not None)
    out = fn(*ins, s)
    if dout is None:
        return (out.detach(),)
    wrt = ins if s is None else (*ins, s)
    grads = torch.autograd.grad(out, wrt, dout.to(out.dtype), allow_unused=True)
    return (out.detach(), *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)))


def oracle(q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None = None, **kw: Any) -> tuple[Tensor, ...]:
    """``(out, [dq, dk, dv, [dsinks]])`` from ``reference`` in float64 (sinks in float64 too)."""
    kw = {key: val for key, val in kw.items() if key != "backend"}
    sinks = kw.pop("sinks", None)
    return _run(
        lambda a, b, c, s: qkv.attention(a, b, c, backend="reference", sinks=s, **kw),
        q.double(),
        k.double(),
        v.double(),
        None if dout is None else dout.double(),
        None if sinks is None else sinks.double(),
    )


def low_precision_formula(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    """``softmax(Q Kᵀ · scale + mods, masked) V`` with every operation in the inputs' dtype: no upcast.

    Written here, apart from every backend: grouped-query K/V are repeated per query head (their
    gradients summed back by autograd, as flash-attn's reference does with ``repeat``), the score mod
    and the mask are applied to the low-precision scores, the softmax runs on them, and ``P`` is
    multiplied with ``V`` in the same dtype. A query row that may attend to nothing gives zeros (and
    zero gradient). Accepts what ``qkv.attention`` accepts (``mask``, ``score_mod``, ``scale``, ``sinks``:
    one more column of the low-precision scores, dropped after the softmax)."""
    sinks = kw.get("sinks")
    req, squeeze = _validate(q, k, v, kw.get("mask"), kw.get("score_mod"), kw.get("scale"), 0.0, False, {}, sinks)
    dt = q.dtype
    qq, kk, vv = req.q, req.k, req.v
    G = req.groups
    kk, vv = kk.repeat_interleave(G, dim=1), vv.repeat_interleave(G, dim=1)
    s = (qq @ kk.transpose(-1, -2)) * req.scale  # (B, H, Lq, Lk) in the low dtype
    shape = req.shape
    B, H, Lq, Lk = req.B, req.H, req.Lq, req.Lk
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    qi = torch.arange(Lq).view(1, 1, -1, 1)
    ki = torch.arange(Lk).view(1, 1, 1, -1)
    if req.score_mod is not None:
        s = req.score_mod.apply(shape, s, b, h, qi, ki).to(dt).expand(B, H, Lq, Lk)
    if req.mask is not None:
        s = s.masked_fill(~req.mask.to_dense(B, H, Lq, Lk), float("-inf"))
    if sinks is not None:
        s = torch.cat((s, sinks.to(dt).view(1, H, 1, 1).expand(B, H, Lq, 1)), dim=-1)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)  # rows that see nothing
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).to(dt).masked_fill(dead, 0.0)[..., :Lk]
    out = p @ vv
    for _ in range(squeeze):
        out = out.squeeze(0)
    return out


def low_precision_reference(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None = None, **kw: Any
) -> tuple[Tensor, ...]:
    """The baseline of the rule, ``(out, [dq, dk, dv])``: :func:`low_precision_formula` for
    float16/bfloat16, ``reference`` computing in the inputs' dtype for float32/float64."""
    kw = {key: val for key, val in kw.items() if key != "backend"}
    sinks = kw.pop("sinks", None)
    if q.dtype in HALF:
        return _run(lambda a, b, c, s: low_precision_formula(a, b, c, sinks=s, **kw), q, k, v, dout, sinks)

    def fn(a: Tensor, b: Tensor, c: Tensor, s: Tensor | None) -> Tensor:
        req, squeeze = _validate(a, b, c, kw.get("mask"), kw.get("score_mod"), kw.get("scale"), 0.0, False, {}, s)
        out = reference_attention(req, dtype=a.dtype)[0].to(a.dtype)
        for _ in range(squeeze):
            out = out.squeeze(0)
        return out

    return _run(fn, q, k, v, dout, sinks)


def errors(
    got: tuple[Tensor, ...], q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None = None, **kw: Any
) -> list[tuple[str, float, float, float]]:
    """``(name, error, baseline error, largest oracle magnitude)`` of ``got = (out, [dq, dk, dv,
    [dsinks]])`` against the float64 oracle."""
    ref = oracle(q, k, v, dout, **kw)
    base = low_precision_reference(q, k, v, dout, **kw)
    assert len(got) == len(ref), f"got {len(got)} results, the oracle {len(ref)}"
    res = []
    for name, g, r, b in zip(NAMES, got, ref, base):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - r).abs().max().item() if g.numel() else 0.0
        base_err = (b.double() - r).abs().max().item() if b.numel() else 0.0
        res.append((name, err, base_err, r.abs().max().item() if r.numel() else 0.0))
    return res


def check_backend(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    grad: bool = True,
    options: dict[str, Any] | None = None,
    relative_floor: bool = False,
    grad_floor_scale: float = 1.0,
    **kw: Any,
) -> None:
    """Assert ``qkv.attention(..., backend=backend, **kw)`` meets the tolerance rule, forward and
    (with ``grad``) backward, against the float64 oracle; with ``sinks=`` in ``kw`` their gradient is
    checked too. ``options`` go to the backend under test only (``block_q``, ``block_k`` of ``tiled``),
    not to the oracle. ``relative_floor`` scales the floor by the largest magnitude of each compared
    tensor (for inputs far from unit scale); ``grad_floor_scale`` multiplies the floor of the gradients."""
    dout = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype) if grad else None
    opts = options or {}
    rest = {key: val for key, val in kw.items() if key != "sinks"}
    got = _run(
        lambda a, b, c, s: qkv.attention(a, b, c, backend=backend, sinks=s, **rest, **opts), q, k, v, dout, kw.get("sinks")
    )
    for name, err, base_err, big in errors(got, q, k, v, dout, **kw):
        floor = FLOOR[q.dtype] * (max(1.0, big) if relative_floor else 1.0)
        floor *= 1.0 if name == "out" else grad_floor_scale
        assert err <= 2 * base_err + floor, (
            f"{backend} {name} ({q.dtype}): error {err:.3g} > 2 x baseline {base_err:.3g} + {floor:g}"
        )
