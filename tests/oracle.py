"""The float64 oracle and FlashAttention's tolerance rule, for every backend's tests.

The rule: a backend's error against ``reference`` in float64 must be at most twice the error that
the reference itself makes when run in the backend's dtype, plus a small floor. For float32 inputs
that baseline is the reference in float32; for float16/bfloat16 it is the reference computing in that
low dtype (as FlashAttention's tests compare with PyTorch in fp16/bf16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import qkv
from qkv.attention import _validate
from qkv.backends.reference import reference_attention

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _run(fn: Any, q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None) -> tuple[Tensor, ...]:
    q, k, v = (t.detach().clone().requires_grad_(dout is not None) for t in (q, k, v))
    out = fn(q, k, v)
    if dout is None:
        return (out.detach(),)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in ((dq, q), (dk, k), (dv, v)))
    return (out.detach(), *grads)


def oracle(q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None = None, **kw: Any) -> tuple[Tensor, ...]:
    """``(out, [dq, dk, dv])`` from ``reference`` in float64."""
    kw = {key: val for key, val in kw.items() if key != "backend"}
    return _run(
        lambda a, b, c: qkv.attention(a, b, c, backend="reference", **kw),
        q.double(),
        k.double(),
        v.double(),
        None if dout is None else dout.double(),
    )


def low_precision_reference(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor | None = None, **kw: Any
) -> tuple[Tensor, ...]:
    """The reference computed entirely in the inputs' dtype (no upcast): the error baseline."""
    kw = {key: val for key, val in kw.items() if key != "backend"}

    def fn(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        req, squeeze = _validate(a, b, c, kw.get("mask"), kw.get("score_mod"), kw.get("scale"), 0.0, False, {})
        out = reference_attention(req, dtype=a.dtype)[0].to(a.dtype)
        for _ in range(squeeze):
            out = out.squeeze(0)
        return out

    return _run(fn, q, k, v, dout)


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
    (with ``grad``) backward, against the float64 oracle. ``options`` go to the backend under test
    only (``block_q``, ``block_k`` of ``tiled``), not to the oracle. ``relative_floor`` scales the
    floor by the largest magnitude of each compared tensor (for inputs far from unit scale);
    ``grad_floor_scale`` multiplies the floor of the gradients."""
    dout = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype) if grad else None
    opts = options or {}
    got = _run(lambda a, b, c: qkv.attention(a, b, c, backend=backend, **kw, **opts), q, k, v, dout)
    ref = oracle(q, k, v, dout, **kw)
    base = low_precision_reference(q, k, v, dout, **kw)
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        floor = FLOOR[q.dtype] * (max(1.0, r.abs().max().item()) if relative_floor and r.numel() else 1.0)
        floor *= 1.0 if name == "out" else grad_floor_scale
        assert g.shape == r.shape, f"{backend} {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{backend} {name}: non-finite values"
        err = (g.double() - r).abs().max().item() if g.numel() else 0.0
        base_err = (b.double() - r).abs().max().item() if b.numel() else 0.0
        assert err <= 2 * base_err + floor, (
            f"{backend} {name} ({q.dtype}): error {err:.3g} > 2 x baseline {base_err:.3g} + {floor:g}"
        )
