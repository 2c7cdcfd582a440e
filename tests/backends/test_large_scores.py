"""Scores of about 1e2, 1e4 and 1e8 on every exact backend and engine, and on ``merge``: finite, and
within the 2x rule against the float64 oracle, in float32 and bfloat16.

``exp`` overflows float32 past 88, so each softmax and each merge of partial results must subtract
a running maximum; these tests fail when one of them does not. The masks split every query tile's keys
into several runs (small ``block_q``/``block_k``), so ``tiled`` merges partial results in each row;
ALiBi sends ``tiled`` down its eager engine, and hiding PyTorch's fused CPU kernel does too.
Ring attention's large scores are checked in ``tests/distributed``.

The floor of the rule scales with each tensor's magnitude (``relative_floor``), and for gradients
also with the score size: a backward that recomputes ``P = exp(S - lse)`` from a float32 logsumexp
(FlashAttention's, PyTorch's fused CPU kernel's, ``tiled``'s) carries the logsumexp's rounding,
about ``eps · |S|`` relative, where the float32 reference's softmax backward rounds to an exact
one-hot. At 1e8 that rounding is ``ulp(1e8) = 8`` in the exponent, so gradients there are checked
finite only (see ``test_fused_backward_at_1e8_carries_the_logsumexp_rounding``)."""

from __future__ import annotations

import math

import pytest
import torch

import qkv
import qkv.backends.tiled as T
from oracle import check_backend
from qkv import masks as M
from qkv import scores as S
from qkv.masks import Shape

SIZES = [1e2, 1e4, 1e8]
DTYPES = [torch.float32, torch.bfloat16]
B, H, HKV, LQ, LK, D, DV = 1, 2, 1, 29, 37, 8, 6
BLOCKS = {"block_q": 4, "block_k": 3}


def _masks() -> dict[str, M.Mask]:
    """Masks under which the query tiles of ``BLOCKS`` visit several key runs (checked below)."""
    return {
        "document-causal": M.document(torch.arange(LQ) * 2 // LQ, torch.arange(LK) * 2 // LK) & M.causal(),
        "causal-window": M.causal() & M.sliding_window(6),
        "window-both-sides": M.sliding_window(4, 3),
        "causal-rectangular": M.causal(),
        "global-and-window": M.global_tokens(2) | M.sliding_window(2, 1),
    }


MASKS = list(_masks())


def _inputs(size: float, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v whose scores ``q kᵀ / sqrt(D)`` are of order ``size``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LQ, D, generator=g) * size
    k = torch.randn(B, HKV, LK, D, generator=g)
    v = torch.randn(B, HKV, LK, DV, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_the_masks_split_rows_into_several_key_runs():
    for name, mask in _masks().items():
        tiles = T.plan_tiles(mask, Shape(B, H, LQ, LK), BLOCKS["block_q"], BLOCKS["block_k"])
        assert max(len(t.segments) for t in tiles) >= 2, name
        dense = mask.to_dense(B, H, LQ, LK)
        assert dense.any(-1).all(), f"{name}: every row sees a key, so the scores stay large"


def test_the_inputs_give_scores_of_the_asked_size():
    for size in SIZES:
        q, k, _ = _inputs(size, torch.float32)
        s = (q.double() @ k.double().transpose(-1, -2)).abs() / math.sqrt(D)
        assert size / 10 < float(s.median()) < size * 10


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_reference_and_sdpa(backend, mask, dtype, size):
    _check(backend, size, dtype, mask=_masks()[mask])


def _check(backend: str, size: float, dtype: torch.dtype, options: dict | None = None, **kw) -> None:
    """The 2x rule forward, and backward up to 1e4; at 1e8, finite gradients."""
    q, k, v = _inputs(size, dtype)
    grad = size <= 1e4
    check_backend(backend, q, k, v, grad=grad, options=options, relative_floor=True, grad_floor_scale=size, **kw)
    if not grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = qkv.attention(q, k, v, backend=backend, **kw, **(options or {}))
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for name, g in zip(("dq", "dk", "dv"), grads):
            assert torch.isfinite(g).all(), f"{backend} {name}: non-finite gradient at scores {size:g}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_tiled(monkeypatch, engine, mask, dtype, size):
    if engine == "eager":  # as on a torch without the private fused op, or on another device
        _hide_fused_kernel(monkeypatch)
    calls = _count_eager(monkeypatch)
    _check("tiled", size, dtype, options=BLOCKS, mask=_masks()[mask])
    assert (calls[0] > 0) == (engine == "eager")


def _hide_fused_kernel(monkeypatch) -> None:
    """As on a torch without PyTorch's private fused CPU op: every module that holds it sees None."""
    import importlib

    for name in ("qkv.backends.tiled", "qkv.backends.kernels"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ("_FLASH", "FLASH"):
            if hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, None)


def _span(q, k, v, scale, mask):
    """One key span's output and logsumexp (``attention_with_lse``, later ``kernels.span_forward``)."""
    if hasattr(T, "attention_with_lse"):
        return T.attention_with_lse(q, k, v, scale, mask)
    from qkv.backends import kernels

    with torch.no_grad():
        return kernels.span_forward(q, k, v, scale, mask)


def _count_eager(monkeypatch) -> list[int]:
    """Counts the calls of ``tiled``'s eager engine (to be sure which engine a test ran)."""
    calls = [0]
    eager = T._eager_forward

    def counted(*a, **kw):
        calls[0] += 1
        return eager(*a, **kw)

    monkeypatch.setattr(T, "_eager_forward", counted)
    return calls


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["document-causal", "causal-window"])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled"])
def test_alibi_on_every_backend(monkeypatch, backend, mask, dtype, size):
    """A score mod: ``tiled`` computes it on its eager engine, tile by tile, merging the runs."""
    calls = _count_eager(monkeypatch)
    opts = BLOCKS if backend == "tiled" else None
    _check(backend, size, dtype, options=opts, mask=_masks()[mask], score_mod=S.alibi(H))
    assert (calls[0] > 0) == (backend == "tiled")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge_of_large_logsumexps(size, dtype):
    """``merge`` against the formula written without large numbers: the first part's weight is
    ``sigmoid(lse1 - lse2)`` (the difference of two close floats is exact), and the merged logsumexp
    is ``max + log1p(exp(-|lse1 - lse2|))``, in float64. Rows where either part dominates, where
    both weigh the same, where one part saw no key; both signs of the logsumexp."""
    g = torch.Generator().manual_seed(1)
    n, dv = 64, 5
    out1, out2 = torch.randn(n, dv, generator=g), torch.randn(n, dv, generator=g)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    lse1 = sign * size * (1 + torch.rand(n, generator=g))
    lse2 = lse1 + torch.randn(n, generator=g) * torch.tensor([0.0, 1.0, 30.0, 1e3]).repeat(n // 4)
    lse2[::7] = -math.inf  # the row saw no key of the second set
    out2[::7] = 0.0
    out1, lse1, out2, lse2 = (t.to(dtype) for t in (out1, lse1, out2, lse2))
    out, lse = T.merge(out1, lse1, out2, lse2)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(lse).all()
    a, b = lse1.double(), lse2.double()
    w1 = torch.sigmoid(a - b)[:, None]
    want = out1.double() * w1 + out2.double() * (1 - w1)
    want_lse = torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
    eps = torch.finfo(dtype).eps
    assert (out.double() - want).abs().max().item() <= 8 * eps * want.abs().max().item()
    assert ((lse.double() - want_lse).abs() <= 4 * eps * want_lse.abs()).all()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_attention_with_lse_and_merge_split_keys(monkeypatch, engine, dtype, size):
    """The building block of ring attention: spans of keys computed apart and merged equal the whole."""
    if engine == "eager":
        _hide_fused_kernel(monkeypatch)
    q, k, v = (t.float() for t in _inputs(size, dtype))  # bf16-exact values, computed in float32
    allowed = _masks()["window-both-sides"].to_dense(B, H, LQ, LK)
    acc = None
    for k0, k1 in ((0, 5), (5, 11), (11, LK)):
        part = _span(q, k[:, :, k0:k1], v[:, :, k0:k1], D**-0.5, allowed[..., k0:k1])
        acc = part if acc is None else T.merge(*acc, *part)
    assert acc is not None
    out, lse = acc
    s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    s = s.masked_fill(~allowed, -math.inf)
    want = torch.softmax(s, -1) @ v.double()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # inputs are bf16-exact; the compute is float32
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)


@pytest.mark.xfail(strict=True, reason="FlashAttention's backward recomputes P = exp(S - lse) from a float32 lse")
def test_fused_backward_at_1e8_carries_the_logsumexp_rounding():
    """Known limit, kept visible: at scores of 1e8 the float32 logsumexp is off by up to its ulp (8),
    so the fused engine's ``dv`` (PyTorch's own CPU flash backward does the same) is off by ``e^8``
    and more, while the reference's softmax backward is exact. Passing here means it was fixed:
    then fold gradients at 1e4 and 1e8 into the 2x rule above."""
    q, k, v = _inputs(1e8, torch.float32)
    check_backend("tiled", q, k, v, mask=_masks()["causal-rectangular"], options=BLOCKS, relative_floor=True)
