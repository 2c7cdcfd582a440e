"""Selective state-space layer: the chunked scan equals its sequential recurrence, decoding step by step
(and from a prefilled cache) equals the parallel forward, causality by gradients; hybrid stacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv.masks import causal, sliding_window
from qkv.nn.ssm import HybridStack, SelectiveSSM, selective_scan, selective_scan_sequential


def scan_inputs(b: int, L: int, d: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, d, generator=g, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(b, L, d, generator=g, dtype=torch.float64))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 4
    B = torch.randn(b, L, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, L, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, d, n, generator=g, dtype=torch.float64)
    return u, delta, A, B, C, h0


@given(L=st.integers(0, 40), chunk=st.integers(1, 12), seed=st.integers(0, 50), with_h0=st.booleans())
def test_chunked_scan_equals_recurrence(L: int, chunk: int, seed: int, with_h0: bool) -> None:
    u, delta, A, B, C, h0 = scan_inputs(2, L, 3, 4, seed)
    h = h0 if with_h0 else None
    y, hl = selective_scan(u, delta, A, B, C, h, chunk_size=chunk)
    y_ref, hl_ref = selective_scan_sequential(u, delta, A, B, C, h)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hl, hl_ref, rtol=1e-10, atol=1e-10)


def test_recurrence_against_hand_formula() -> None:
    """One channel, one state: h_t = exp(d_t a) h_{t-1} + d_t u_t b_t, y_t = c_t h_t, by hand."""
    u, delta, A, B, C, _ = scan_inputs(1, 5, 1, 1, 3)
    h, want = 0.0, []
    for t in range(5):
        d = float(delta[0, t, 0])
        h = torch.exp(torch.tensor(d * float(A[0, 0]))).item() * h + d * float(u[0, t, 0]) * float(B[0, t, 0])
        want.append(float(C[0, t, 0]) * h)
    y, _ = selective_scan(u, delta, A, B, C, chunk_size=2)
    torch.testing.assert_close(y[0, :, 0], torch.tensor(want, dtype=torch.float64))


def layer(d_conv: int = 4) -> SelectiveSSM:
    torch.manual_seed(0)
    m = SelectiveSSM(8, d_state=4, expand=2, d_conv=d_conv, chunk_size=5).double()
    with torch.no_grad():  # larger steps than the default init, so the state really decays
        m.dt_proj.bias.add_(1.0)
    return m


@pytest.mark.parametrize("d_conv", [0, 4])
def test_layer_chunked_equals_sequential_and_step(d_conv: int) -> None:
    m = layer(d_conv)
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(y, m(x, sequential=True), rtol=1e-10, atol=1e-10)
    state = m.init_state(2)
    outs = []
    for t in range(13):
        o, state = m.step(x[:, t], state)
        outs.append(o)
    assert state.seen == 13
    torch.testing.assert_close(torch.stack(outs, 1), y, rtol=1e-10, atol=1e-10)
    # prefill 7 tokens through forward(cache=...), then continue with step
    cache = m.init_state(2)
    head = m(x[:, :7], cache=cache)
    o8, _ = m.step(x[:, 7], cache)
    torch.testing.assert_close(head, y[:, :7])
    torch.testing.assert_close(o8, y[:, 7])


def test_layer_is_causal() -> None:
    m = layer()
    x = torch.randn(1, 10, 8, dtype=torch.float64, requires_grad=True)
    y = m(x, mask=causal())
    for t in range(10):
        (g,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert (g[:, t + 1 :] == 0).all() and g[:, t].abs().sum() > 0, t


def test_layer_errors() -> None:
    m = layer()
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="causal"):
        m(torch.randn(2, 3, 8, dtype=torch.float64), mask=sliding_window(2))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(*scan_inputs(1, 3, 1, 1, 0)[:5], chunk_size=0)


def test_hybrid_stack_is_causal_and_trains() -> None:
    torch.manual_seed(0)
    stack = HybridStack(16, 2, "AMLP", d_ff=32, d_state=4, num_features=16).double()
    assert [type(b.mixer).__name__ for b in stack.blocks] == [
        "MultiHeadAttention",
        "SelectiveSSM",
        "LinearSelfAttention",
        "LinearSelfAttention",
    ]
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    y = stack(x, mask=causal())
    assert y.shape == (2, 9, 16)
    for t in range(9):
        (g,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        assert (g[:, t + 1 :] == 0).all(), t
    with pytest.raises(ValueError, match="pattern"):
        HybridStack(16, 2, "AXM")


def test_gpt_hybrid_decodes_with_cache() -> None:
    from qkv.models import GPT
    from qkv.nn.ssm import hybrid_mixers

    torch.manual_seed(0)
    gpt = GPT(50, 16, 4, 2, max_len=32, d_ff=32, mixer_factory=hybrid_mixers("AMLM", 16, 2, d_state=4)).double()
    kinds = [type(b.mixer).__name__ for b in gpt.blocks]
    assert kinds == ["MultiHeadAttention", "SelectiveSSM", "LinearSelfAttention", "SelectiveSSM"]
    idx = torch.randint(0, 50, (2, 12))
    full = gpt(idx)
    cache = gpt.make_cache(12)
    parts = [gpt(idx[:, :7], cache=cache)] + [gpt(idx[:, t : t + 1], cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)
    prompt = idx[:, :3]
    torch.testing.assert_close(
        gpt.generate(prompt, 6, temperature=0), gpt.generate(prompt, 6, temperature=0, use_cache=False)
    )
