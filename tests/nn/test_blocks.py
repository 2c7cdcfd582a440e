"""Transformer blocks against torch.nn.TransformerEncoderLayer / TransformerDecoderLayer with copied
weights, and RMSNorm / SwiGLU against their formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.masks import causal, padding
from qkv.nn import DecoderBlock, FeedForward, TransformerBlock

D64 = torch.float64


def _perturb(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_block_equals_torch(norm_first: bool, activation: str, batch_first: bool) -> None:
    B, L, E, H = 3, 7, 16, 4
    tl = _perturb(
        nn.TransformerEncoderLayer(
            E, H, 32, dropout=0.1, activation=activation, norm_first=norm_first, batch_first=batch_first, dtype=D64
        )
    )
    assert isinstance(tl, nn.TransformerEncoderLayer)
    ours = TransformerBlock.from_torch(tl)
    x = torch.randn(B, L, E, dtype=D64)
    lengths = torch.tensor([7, 4, 5])
    kpm = torch.arange(L)[None] >= lengths[:, None]
    blocked = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    xt = x if batch_first else x.transpose(0, 1)

    def back(t: torch.Tensor) -> torch.Tensor:
        return t if batch_first else t.transpose(0, 1)

    torch.testing.assert_close(ours(x), back(tl(xt)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x, mask=causal()), back(tl(xt, src_mask=blocked)), rtol=1e-10, atol=1e-10)
    want = back(tl(xt, src_key_padding_mask=kpm))
    got = ours(x, mask=padding(lengths))
    for b, n in enumerate(lengths.tolist()):  # torch's fast path may leave padded rows as anything
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_block_equals_torch(norm_first: bool) -> None:
    B, T, S, E, H = 2, 5, 6, 16, 4
    tl = _perturb(nn.TransformerDecoderLayer(E, H, 24, dropout=0.1, norm_first=norm_first, batch_first=True, dtype=D64))
    assert isinstance(tl, nn.TransformerDecoderLayer)
    ours = DecoderBlock.from_torch(tl)
    x, mem = torch.randn(B, T, E, dtype=D64), torch.randn(B, S, E, dtype=D64)
    lengths = torch.tensor([6, 3])
    mkpm = torch.arange(S)[None] >= lengths[:, None]
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    want = tl(x, mem, tgt_mask=blocked, memory_key_padding_mask=mkpm)
    got = ours(x, mem, mask=causal(), memory_mask=padding(lengths))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_rmsnorm_swiglu_block_by_hand() -> None:
    torch.manual_seed(0)
    blk = _perturb(TransformerBlock(8, 2, 12, norm="rms", norm_first=True, activation="swiglu", bias=False).double())
    x = torch.randn(2, 4, 8, dtype=D64)

    def rms(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w

    h = x + blk.mixer(rms(x, blk.norm1.weight), mask=causal())
    z = rms(h, blk.norm2.weight)
    ff = blk.ff
    hid = torch.nn.functional.silu(z @ ff.w_gate.weight.T) * (z @ ff.w_up.weight.T)
    want = h + hid @ ff.w_down.weight.T
    torch.testing.assert_close(blk(x, mask=causal()), want, rtol=1e-10, atol=1e-10)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 16, activation="tanh")
    with pytest.raises(ValueError, match="norm"):
        TransformerBlock(8, 2, norm="batch")
