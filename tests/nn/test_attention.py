"""MultiHeadAttention against torch.nn.MultiheadAttention with copied weights, and GQA / QK-norm against
the formula written out by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qkv.masks import causal, padding
from qkv.nn import MultiHeadAttention, masks_from_torch

D64 = torch.float64


def _torch_mha(E: int, H: int, batch_first: bool, **kw: object) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=D64, **kw).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # non-zero biases so that they are checked too
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _run_torch(
    m: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object
) -> torch.Tensor:
    if not m.batch_first:  # torch takes (L, B, E) then
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, _ = m(q, k, v, need_weights=False, **kw)
    return out.transpose(0, 1) if not m.batch_first else out


@settings(max_examples=15)
@given(
    B=st.integers(1, 3),
    L=st.integers(1, 7),
    S=st.integers(1, 7),
    H=st.sampled_from([1, 2, 4]),
    hd=st.integers(1, 4),
    batch_first=st.booleans(),
    bias=st.booleans(),
    cross=st.booleans(),
)
def test_equals_torch_self_and_cross(
    B: int, L: int, S: int, H: int, hd: int, batch_first: bool, bias: bool, cross: bool
) -> None:
    E = H * hd
    tm = _torch_mha(E, H, batch_first, bias=bias)
    ours = MultiHeadAttention.from_torch(tm)
    x = torch.randn(B, L, E, dtype=D64)
    ctx = torch.randn(B, S, E, dtype=D64) if cross else x
    want = _run_torch(tm, x, ctx, ctx)
    got = ours(x, ctx if cross else None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_causal_equals_torch(batch_first: bool) -> None:
    B, L, E, H = 2, 9, 12, 3
    tm = _torch_mha(E, H, batch_first)
    ours = MultiHeadAttention.from_torch(tm)
    x = torch.randn(B, L, E, dtype=D64)
    blocked = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    want = _run_torch(tm, x, x, x, attn_mask=blocked)
    torch.testing.assert_close(ours(x, mask=causal()), want, rtol=1e-10, atol=1e-10)
    # the converted torch mask gives the same
    conv = masks_from_torch(attn_mask=blocked)
    torch.testing.assert_close(ours(x, mask=conv.mask), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_key_padding_equals_torch(batch_first: bool) -> None:
    B, L, S, E, H = 3, 5, 8, 8, 2
    tm = _torch_mha(E, H, batch_first)
    ours = MultiHeadAttention.from_torch(tm)
    x, ctx = torch.randn(B, L, E, dtype=D64), torch.randn(B, S, E, dtype=D64)
    lengths = torch.tensor([8, 3, 6])
    kpm = torch.arange(S)[None, :] >= lengths[:, None]  # True = padding
    want = _run_torch(tm, x, ctx, ctx, key_padding_mask=kpm)
    torch.testing.assert_close(ours(x, ctx, mask=padding(lengths)), want, rtol=1e-10, atol=1e-10)
    conv = masks_from_torch(key_padding_mask=kpm)
    torch.testing.assert_close(ours(x, ctx, mask=conv.mask), want, rtol=1e-10, atol=1e-10)


def test_float_and_3d_masks_equal_torch() -> None:
    B, L, E, H = 2, 6, 8, 2
    tm = _torch_mha(E, H, True)
    ours = MultiHeadAttention.from_torch(tm)
    x = torch.randn(B, L, E, dtype=D64)
    add = torch.randn(B * H, L, L, dtype=D64)
    kpm = torch.zeros(B, L, dtype=D64)
    kpm[1, 4:] = float("-inf")
    want = _run_torch(tm, x, x, x, attn_mask=add, key_padding_mask=kpm)
    conv = masks_from_torch(attn_mask=add, key_padding_mask=kpm, num_heads=H)
    got = ours(x, mask=conv.mask, score_mod=conv.score_mod)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_kdim_vdim_equal_torch(batch_first: bool) -> None:
    B, L, S, E, H = 2, 4, 6, 8, 2
    tm = _torch_mha(E, H, batch_first, kdim=5, vdim=7)
    ours = MultiHeadAttention.from_torch(tm)
    assert (ours.kdim, ours.vdim) == (5, 7)
    x, key, val = torch.randn(B, L, E, dtype=D64), torch.randn(B, S, 5, dtype=D64), torch.randn(B, S, 7, dtype=D64)
    want = _run_torch(tm, x, key, val)
    torch.testing.assert_close(ours(x, key, value=val), want, rtol=1e-10, atol=1e-10)


def _by_hand(m: MultiHeadAttention, x: torch.Tensor, causal_: bool = False) -> torch.Tensor:
    """The formula with K/V heads repeated per group, written out with plain tensor ops."""
    B, L, E = x.shape
    H, Hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).view(B, L, H, d).transpose(1, 2)
    k = (x @ m.k_proj.weight.T + m.k_proj.bias).view(B, L, Hkv, d).transpose(1, 2)
    v = (x @ m.v_proj.weight.T + m.v_proj.bias).view(B, L, Hkv, d).transpose(1, 2)
    if m.q_norm is not None and m.k_norm is not None:
        q = q / q.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * m.q_norm.weight
        k = k / k.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * m.k_norm.weight
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / d**0.5
    if causal_:
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, E)
    return o @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gqa_mqa_and_qk_norm_by_hand(Hkv: int, qk_norm: bool) -> None:
    torch.manual_seed(1)
    m = MultiHeadAttention(16, 4, num_kv_heads=Hkv, qk_norm=qk_norm).double()
    if qk_norm:
        with torch.no_grad():
            m.q_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr,operator]
            m.k_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr,operator]
    assert m.k_proj.weight.shape == (Hkv * 4, 16)
    x = torch.randn(2, 7, 16, dtype=D64)
    torch.testing.assert_close(m(x, mask=causal()), _by_hand(m, x, True), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x), _by_hand(m, x), rtol=1e-10, atol=1e-10)


def test_dropout_only_in_training_and_backend_switch() -> None:
    m = MultiHeadAttention(8, 2, dropout=0.5).double()
    x = torch.randn(2, 5, 8, dtype=D64)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    ref = _by_hand(m, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    m.backend = "reference"
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


def test_errors_name_the_argument() -> None:
    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="context must be"):
        m(torch.randn(2, 5, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(8, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_a_decoding_step_goes_through_qkv_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """No module-level fast path: one new token with a KV cache is a call of ``qkv.attention`` with the
    module's backend (``auto`` makes the choice, and ``set_backend`` is obeyed), equal to recomputing."""
    import qkv.nn.base
    from qkv.nn import GrowingKVCache

    calls: list[tuple[str, tuple[int, ...]]] = []
    real = qkv.nn.base.attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append((str(kw["backend"]), tuple(q.shape)))
        return real(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(qkv.nn.base, "attention", spy)
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, num_kv_heads=2).eval()
    x = torch.randn(1, 6, 16)
    for backend in ("auto", "reference"):
        m.backend = backend
        cache = GrowingKVCache()
        with torch.no_grad():
            m(x[:, :5], mask=causal(), cache=cache)
            calls.clear()
            step = m(x[:, 5:], mask=causal(), cache=cache)
            full = m(x, mask=causal())
        assert calls[0] == (backend, (1, 4, 1, 4))
        torch.testing.assert_close(step, full[:, 5:])
