"""Transformer encoder/decoder stacks against torch.nn.TransformerEncoder/Decoder with copied weights;
the encoder-decoder model: cached decoding, causality, source padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.masks import causal, padding
from qkv.models import Transformer, TransformerDecoder, TransformerEncoder
from qkv.nn import DecoderBlock, TransformerBlock

D64 = torch.float64


def _perturb(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("norm_first", [False, True])
def test_stacks_equal_torch(norm_first: bool) -> None:
    torch.manual_seed(0)
    E, H, F, n = 16, 4, 24, 2
    enc_layer = nn.TransformerEncoderLayer(E, H, F, 0.0, batch_first=True, norm_first=norm_first, dtype=D64)
    dec_layer = nn.TransformerDecoderLayer(E, H, F, 0.0, batch_first=True, norm_first=norm_first, dtype=D64)
    t_enc = nn.TransformerEncoder(
        enc_layer, n, norm=nn.LayerNorm(E, dtype=D64) if norm_first else None, enable_nested_tensor=False
    )
    t_dec = nn.TransformerDecoder(dec_layer, n, norm=nn.LayerNorm(E, dtype=D64) if norm_first else None)
    _perturb(t_enc), _perturb(t_dec)
    t_enc.eval(), t_dec.eval()
    enc = TransformerEncoder(n, E, H, F, norm_first=norm_first, activation="relu").double()
    dec = TransformerDecoder(n, E, H, F, norm_first=norm_first, activation="relu").double()
    for i in range(n):
        enc.layers[i] = TransformerBlock.from_torch(t_enc.layers[i])
        dec.layers[i] = DecoderBlock.from_torch(t_dec.layers[i])
    with torch.no_grad():
        if norm_first:
            assert enc.norm is not None and dec.norm is not None and t_enc.norm is not None and t_dec.norm is not None
            enc.norm.load_state_dict(t_enc.norm.state_dict())
            dec.norm.load_state_dict(t_dec.norm.state_dict())
    enc.eval(), dec.eval()
    src, tgt = torch.randn(2, 7, E, dtype=D64), torch.randn(2, 5, E, dtype=D64)
    lengths = torch.tensor([7, 4])
    kpm = torch.arange(7)[None] >= lengths[:, None]
    with torch.no_grad():
        mem_t = t_enc(src, src_key_padding_mask=kpm)
        mem = enc(src, mask=padding(lengths))
        for b, n_ in enumerate(lengths.tolist()):
            torch.testing.assert_close(mem[b, :n_], mem_t[b, :n_], rtol=1e-10, atol=1e-10)
        blocked = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        want = t_dec(tgt, mem_t, tgt_mask=blocked, memory_key_padding_mask=kpm)
        got = dec(tgt, mem_t, mask=causal(), memory_mask=padding(lengths))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(23, 29, 32, 4, 2, 48, dropout=0.1, max_len=40).double().eval()
    _perturb(m)
    # an untied output layer: with tied weights a random model keeps predicting its input token
    m.generator.weight = nn.Parameter(torch.randn(29, 32, dtype=D64))
    return m


def test_cached_decoding_equals_teacher_forcing() -> None:
    m = _model()
    src, tgt = torch.randint(0, 23, (3, 8)), torch.randint(0, 29, (3, 6))
    lengths = torch.tensor([8, 5, 6])
    with torch.no_grad():
        want = m(src, tgt, lengths)
        mem = m.encode(src, lengths)
        caches = m.decoder.make_caches(6)
        steps = [
            m.decode(tgt[:, t : t + 1], mem if t == 0 else None, lengths, caches=caches, offset=t) for t in range(6)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-9, atol=1e-9)
    a = m.greedy_decode(src, 1, 10, src_lengths=lengths)
    b = m.greedy_decode(src, 1, 10, src_lengths=lengths, use_cache=False)
    assert a.shape == (3, 11) and torch.equal(a, b)
    assert len(set(a[:, 1:].flatten().tolist())) > 2


def test_causal_and_padding() -> None:
    m = _model()
    src, tgt = torch.randint(0, 23, (1, 6)), torch.randint(0, 29, (1, 7))
    with torch.no_grad():
        base = m(src, tgt)
        changed = tgt.clone()
        changed[0, 4:] = (changed[0, 4:] + 1) % 29
        torch.testing.assert_close(m(src, changed)[0, :4], base[0, :4], rtol=0, atol=1e-12)
        assert not torch.allclose(m(src, changed)[0, 4:], base[0, 4:])
        # a right-padded source with its length gives the logits of the unpadded source
        padded = torch.cat([src, torch.randint(0, 23, (1, 3))], 1)
        torch.testing.assert_close(m(padded, tgt, torch.tensor([6])), base, rtol=1e-10, atol=1e-10)
        m.set_backend("reference")
        torch.testing.assert_close(m(src, tgt), base, rtol=1e-10, atol=1e-10)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="unexpected block argument"):
        TransformerEncoder(1, 8, 2, colour="red")
    m = Transformer(5, 5, 8, 2, 1, 16, max_len=10)
    with pytest.raises(ValueError, match="src_lengths"):
        m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.tensor([3]))
