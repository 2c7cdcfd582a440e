"""The "qkv" attention function called as HF's attention modules call it: masks it may receive, HF's
extras (scaling, softcap, dropout, sinks), weights on request, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import qkv.hf  # noqa: E402
from qkv import masks as M  # noqa: E402
from qkv.hf import HFMask, attention_forward  # noqa: E402

B, H, HKV, L, D = 2, 4, 2, 9, 8


class _Layer(nn.Module):
    def __init__(self, causal: bool = True, output_attentions: bool = False):
        super().__init__()
        self.is_causal = causal
        self.config = transformers.PretrainedConfig(output_attentions=output_attentions)


def _qkv(seed: int = 0, Lq: int = L, Lk: int = L):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Lq, D, generator=g),
        torch.randn(B, HKV, Lk, D, generator=g),
        torch.randn(B, HKV, Lk, D, generator=g),
    )


def formula(q, k, v, allowed, scale=None, cap=None):
    """float64 softmax(q kᵀ · scale [softcapped], masked) v, (B, Lq, H, D), and its weights."""
    q, k, v = q.double(), k.double().repeat_interleave(H // HKV, 1), v.double().repeat_interleave(H // HKV, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if cap:
        s = cap * torch.tanh(s / cap)
    w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (w @ v).transpose(1, 2), w


def tril(Lq: int, Lk: int, left: int | None = None, right: int = 0) -> torch.Tensor:
    i = torch.arange(Lq)[:, None] + Lk - Lq
    j = torch.arange(Lk)[None, :]
    ok = j <= i + right
    return ok if left is None else ok & (j >= i - left)


def test_output_layout_gqa_scaling_softcap_and_weights_on_request():
    q, k, v = _qkv()
    hm = HFMask(M.causal() & M.left_padding([3, 0]), L, L)
    allowed = tril(L, L) & (torch.arange(L) >= torch.tensor([3, 0])[:, None])[:, None, None, :]
    out, w = attention_forward(_Layer(), q, k, v, hm, scaling=0.3, softcap=0.7)
    want, want_w = formula(q, k, v, allowed, 0.3, 0.7)
    assert w is None and out.shape == (B, L, H, D) and out.is_contiguous()
    assert (out - want).abs().max() < 1e-5
    out2, w2 = attention_forward(_Layer(), q, k, v, hm, scaling=0.3, softcap=0.7, output_attentions=True)
    assert torch.equal(out2, out) and w2.shape == (B, H, L, L) and (w2 - want_w).abs().max() < 1e-5
    _, w3 = attention_forward(_Layer(output_attentions=True), q, k, v, hm, scaling=0.3, softcap=0.7)
    assert w3 is not None and torch.equal(w3, w2)
    out4, _ = attention_forward(_Layer(), q, k, v, hm, scaling=0.3)
    assert (out4 - out).abs().max() > 1e-3  # the softcap was applied


@pytest.mark.parametrize("causal", [True, False])
def test_without_a_builder_mask_the_module_and_its_window_decide(causal):
    q, k, v = _qkv(1, Lq=3)
    out, _ = attention_forward(_Layer(causal), q, k, v, None)
    want, _ = formula(q, k, v, tril(3, L) if causal else torch.ones(3, L, dtype=torch.bool))
    assert (out - want).abs().max() < 1e-5
    # HF's sliding_window argument in flash-attn's convention: window - 1 keys back (and forward)
    out, _ = attention_forward(_Layer(causal), q, k, v, None, sliding_window=3)
    allowed = tril(3, L, 2) if causal else tril(3, L, 2, 2)
    assert (out - formula(q, k, v, allowed)[0]).abs().max() < 1e-5
    out, _ = attention_forward(_Layer(True), q, k, v, None, is_causal=False)
    assert (out - formula(q, k, v, torch.ones(3, L, dtype=torch.bool))[0]).abs().max() < 1e-5


def test_a_four_d_tensor_mask_is_taken_as_a_dense_mask_or_bias():
    q, k, v = _qkv(2)
    allowed = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(3)) > 0.3
    want, _ = formula(q, k, v, allowed)
    out, _ = attention_forward(_Layer(), q, k, v, allowed)
    assert (out - want).abs().max() < 1e-5
    additive = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)  # eager's kind
    out, _ = attention_forward(_Layer(), q, k, v, additive)  # read back as a mask: rows that see nothing give 0
    assert (out - want).abs().max() < 1e-5
    bias = torch.randn(B, 1, L, L)
    out, _ = attention_forward(_Layer(), q, k, v, bias)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D) + bias
    ref = (torch.softmax(s, -1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-5


def test_dropout_only_while_training():
    q, k, v = _qkv(4)
    hm = HFMask(M.causal(), L, L)
    layer = _Layer()
    eval_out, _ = attention_forward(layer.eval(), q, k, v, hm, dropout=0.5)
    assert (eval_out - attention_forward(layer, q, k, v, hm)[0]).abs().max() == 0
    torch.manual_seed(0)
    train_out, _ = attention_forward(layer.train(), q, k, v, hm, dropout=0.5)
    assert torch.isfinite(train_out).all() and (train_out - eval_out).abs().max() > 1e-2


def test_unmapped_extras_are_refused_clearly():
    q, k, v = _qkv()
    hm = HFMask(M.causal(), L, L)
    assert qkv.hf.sinks_to_qkv(torch.zeros(H))["sinks"].shape == (H,)  # GPT-OSS's s_aux: qkv's sinks=
    with pytest.raises(ValueError, match=r"sinks must be \(H,\)"):
        attention_forward(_Layer(), q, k, v, hm, s_aux=torch.zeros(H + 1))
    with pytest.raises(NotImplementedError, match="position_bias"):
        attention_forward(_Layer(), q, k, v, hm, position_bias=torch.zeros(1, H, L, L))
    with pytest.raises(ValueError, match=r"built for Lq=9, Lk=10"):
        attention_forward(_Layer(), q, k, v, HFMask(M.causal(), L, L + 1))
    with pytest.raises(TypeError, match=r"qkv.hf.register\(\)"):
        attention_forward(_Layer(), q, k, v, {"mask": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4-D"):
        attention_forward(_Layer(), q, k, v, torch.ones(B, L, dtype=torch.bool))


def test_register_names_and_backends():
    assert qkv.hf.register() == "qkv"
    assert "qkv" in transformers.AttentionInterface._global_mapping
    assert "qkv" in transformers.AttentionMaskInterface._global_mapping
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        qkv.hf.register("qkv-x", backend="nope")
    with pytest.raises(ValueError, match="new implementation name"):
        qkv.hf.register("eager")
    name = qkv.hf.register("qkv-reference", backend="reference")
    fn = transformers.AttentionInterface._global_mapping[name]
    q, k, v = _qkv(5)
    out, _ = fn(_Layer(), q, k, v, HFMask(M.causal(), L, L))
    assert (out - formula(q, k, v, tril(L, L))[0]).abs().max() < 1e-5
