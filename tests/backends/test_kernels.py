"""The kernel core (qkv.backends.kernels): spans with their logsumexp, the merge, the backward."""

from __future__ import annotations

import pytest
import torch

from qkv.backends import kernels as K

from ..oracle import oracle


def _problem():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 6)
    allowed = torch.rand(2, 1, 9, 20) > 0.5
    allowed[:, :, 3] = False  # a row that sees nothing
    allowed[:, :, 4, 7:] = False  # a row that sees nothing in the second half
    return q, k, v, allowed


@pytest.mark.parametrize("engine", ["fused", "eager"])
def test_merge_of_spans_split_keys_exactly(engine):
    q, k, v, allowed = _problem()
    mod = (lambda s: s) if engine == "eager" else None  # any score mod forces the eager engine
    a = K.span_forward(q, k[:, :, :7], v[:, :, :7], 0.3, allowed[..., :7], mod=mod)
    b = K.span_forward(q, k[:, :, 7:], v[:, :, 7:], 0.3, allowed[..., 7:], mod=mod)
    out, lse = K.merge(*a, *b)
    s = (q.double().reshape(2, 2, 2, 9, 8) @ k.double().unsqueeze(2).transpose(-1, -2)).reshape(2, 4, 9, 20) * 0.3
    s = s.masked_fill(~allowed, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    torch.testing.assert_close(lse.double(), ref_lse)
    ref = oracle(q, k, v, scale=0.3, mask=allowed)[0]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()
    acc_o, acc_l = a[0].clone(), a[1].clone()
    K.merge_into(acc_o, acc_l, *b)
    torch.testing.assert_close(acc_o, out)
    torch.testing.assert_close(acc_l, lse)
    with pytest.raises(ValueError, match="merge"):
        K.merge(a[0], a[1], b[0][..., :3], b[1])
    with pytest.raises(ValueError, match="merge"):  # the logsumexps agree with each other, not with the outputs
        K.merge(a[0], a[1][..., :3], b[0], b[1][..., :3])


@pytest.mark.parametrize("engine", ["fused", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_span_backward_sums_to_the_exact_gradient(dtype, causal, engine, monkeypatch):
    """Per-span backward with the final output and logsumexp, summed over spans, equals autograd of
    the whole attention, on the fused CPU kernel and on the eager engine (other devices)."""
    if engine == "eager":
        monkeypatch.setattr(K, "fused_ok", lambda t: False)
    q, k, v, allowed = _problem()
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if causal:
        k, v, allowed = k[:, :, :9], v[:, :, :9], None
    qa, ka, va = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = oracle(
        qa, ka, va, torch.ones(2, 4, 9, 6), scale=0.3, mask=allowed if not causal else torch.ones(9, 9).tril().bool()
    )
    out, lse = K.span_forward(q, k, v, 0.3, allowed, causal)
    dout = torch.ones_like(out)
    n = k.shape[2]
    halves = [(0, n // 2), (n // 2, n)] if not causal else [(0, n)]
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for a, b in halves:
        m = None if allowed is None else allowed[..., a:b]
        gq, gk, gv = K.span_backward(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse, 0.3, m, causal)
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(dq.double(), ref[1], **tol)
    torch.testing.assert_close(torch.cat(dks, 2).double(), ref[2], **tol)
    torch.testing.assert_close(torch.cat(dvs, 2).double(), ref[3], **tol)


def test_safe_softmax_gives_zero_rows_and_zero_gradient():
    s = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]], requires_grad=True)
    p = K.safe_softmax(s)
    assert torch.equal(p[1], torch.zeros(2))
    p.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()


def test_half_speed_is_measured_once_and_picks_the_compute_dtype(monkeypatch):
    monkeypatch.setattr(K, "_HALF_SPEED", {})
    fwd, bwd = K.half_speed(torch.bfloat16), K.half_speed(torch.bfloat16, backward=True)
    assert 0 < fwd < 100 and 0 < bwd < 100
    assert set(K._HALF_SPEED) == {(torch.bfloat16, False), (torch.bfloat16, True)}
    K._HALF_SPEED[torch.bfloat16, False] = 0.5
    assert K.half_speed(torch.bfloat16) == 0.5  # cached: not measured again
    assert K.compute_dtype(torch.bfloat16, fused=True) == torch.float32  # clearly slower: float32
    K._HALF_SPEED[torch.bfloat16, False] = K._HALF_SPEED[torch.bfloat16, True] = 0.9
    assert K.compute_dtype(torch.bfloat16, fused=True) == torch.bfloat16
    assert K.compute_dtype(torch.bfloat16, fused=True, backward=True) == torch.bfloat16
    assert K.compute_dtype(torch.bfloat16) == torch.float32  # the eager engine computes in float32
    K._HALF_SPEED[torch.bfloat16, True] = 0.2
    assert K.compute_dtype(torch.bfloat16, fused=True, backward=True) == torch.float32
    assert K.compute_dtype(torch.float64, fused=True) == torch.float64
    assert K.half_speed(torch.float32) == 1.0


def _errors(fn, q, k, v, dout):
    """Max errors of ``fn``'s (dq, dk, dv) and of the formula computed in the low dtype, against float64."""
    from oracle import errors

    return {name: (e, b) for name, e, b, _ in errors(fn(), q, k, v, dout, mask=torch.ones(512, 512).tril().bool())}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_backward_with_grouped_heads_holds_where_the_kernel_alone_does_not(dtype):
    """PyTorch's CPU flash backward, called once with grouped heads (B=2, H=8, Hkv=2, 512 tokens,
    D=128, causal), adds the 4 heads of a group and every 64-row block into one low-precision dV row:
    its dV error exceeds twice that of the formula computed in the low dtype (the rule, floor included).
    span_backward (one head per key head per call, sums in float32) meets the rule."""
    from ..oracle import FLOOR

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 512, 128, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 512, 128, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(2, 8, 512, 128, generator=g).to(dtype)
    scale = 128**-0.5
    out, lse = K.span_forward(q, k, v, scale, causal=True)

    def ours():
        return (out, *K.span_backward(dout, q, k, v, out, lse, scale, causal=True))

    def kernel_alone():
        return (out, *K._fused_backward(dout, q, k, v, out, lse, scale, None, True))

    floor = FLOOR[dtype]
    good, bad = _errors(ours, q, k, v, dout), _errors(kernel_alone, q, k, v, dout)
    assert all(e <= 2 * b + floor for e, b in good.values()), good
    e, b = bad["dv"]
    assert e > 2 * b + floor, bad


def test_half_backward_in_row_chunks_sums_to_the_one_call(monkeypatch):
    """Chunks of BWD_ROWS query rows (under a causal flag: a full part and a triangle each), with a mask
    sliced per chunk, sum to what one call gives, up to bf16 rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8).to(torch.bfloat16) for _ in range(3))
    allowed = torch.rand(1, 1, 40, 40) > 0.3
    for mask, causal in ((None, True), (allowed, False), (allowed, True)):
        out, lse = K.span_forward(q, k, v, 0.3, mask, causal)
        dout = torch.randn_like(out)
        one = K._fused_backward(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.3, mask, causal)
        monkeypatch.setattr(K, "BWD_ROWS", 7)
        chunks = K.span_backward(dout, q, k, v, out, lse, 0.3, mask, causal)
        monkeypatch.setattr(K, "BWD_ROWS", 1024)
        for a, b in zip(chunks, one):
            torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)
