"""Seq2Seq (GRU, none/Bahdanau/Luong) and TransformerSeq2Seq: shapes, masking of padding, alignments,
greedy decoding consistent with teacher forcing, weight capture."""

from __future__ import annotations

import pytest
import torch

from qkv.models import Seq2Seq, TransformerSeq2Seq
from qkv.nn import capture_weights


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 12, (3, 6), generator=g)
    lengths = torch.tensor([6, 4, 2])
    for i, n in enumerate(lengths.tolist()):
        src[i, n:] = 0
    tin = torch.randint(3, 9, (3, 5), generator=g)
    tin[:, 0] = 1
    return src, lengths, tin


@pytest.mark.parametrize("kind", ["none", "bahdanau", "luong"])
def test_rnn_shapes_alignments_and_padding(kind):
    torch.manual_seed(0)
    m = Seq2Seq(12, 9, emb=8, hidden=16, attention=kind).eval()
    src, lengths, tin = _batch()
    logits, align = m(src, lengths, tin)
    assert logits.shape == (3, 5, 9)
    if kind == "none":
        assert align is None
    else:
        assert align is not None and align.shape == (3, 5, 6)
        torch.testing.assert_close(align.sum(-1), torch.ones(3, 5))
        assert (align[1, :, 4:] == 0).all() and (align[2, :, 2:] == 0).all()
    # more padding on the right changes nothing
    wide = torch.cat([src, torch.zeros(3, 3, dtype=torch.long)], 1)
    logits2, _ = m(wide, lengths, tin)
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-5)
    # greedy decoding agrees with teacher forcing on its own output
    toks, galign = m.greedy(src, lengths, 5)
    tf_in = torch.cat([torch.ones(3, 1, dtype=torch.long), toks[:, :-1]], 1)
    tf_logits, tf_align = m(src, lengths, tf_in)
    first_eos = [(row == 2).nonzero()[0].item() if (row == 2).any() else toks.shape[1] - 1 for row in toks]
    for b in range(3):
        n = int(first_eos[b]) + 1
        assert torch.equal(tf_logits[b, :n].argmax(-1), toks[b, :n])
        if kind != "none":
            torch.testing.assert_close(galign[b, :n], tf_align[b, :n], rtol=1e-5, atol=1e-6)


def test_rnn_errors():
    m = Seq2Seq(12, 9, emb=8, hidden=16)
    src, lengths, tin = _batch()
    with pytest.raises(ValueError, match="src_lengths"):
        m(src, torch.tensor([6, 4]), tin)
    with pytest.raises(ValueError, match="src_lengths"):
        m(src, torch.tensor([7, 4, 2]), tin)
    with pytest.raises(ValueError, match="attention"):
        Seq2Seq(12, 9, attention="dot")  # type: ignore[arg-type]


def test_transformer_masks_capture_and_greedy():
    torch.manual_seed(0)
    m = TransformerSeq2Seq(12, 9, dim=16, heads=2, layers=2, max_len=16).eval()
    src, lengths, tin = _batch()
    logits = m(src, lengths, tin)
    assert logits.shape == (3, 5, 9)
    wide = torch.cat([src, torch.zeros(3, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(m(wide, lengths, tin), logits, rtol=1e-5, atol=1e-5)
    with capture_weights(m) as maps:
        m(src, lengths, tin)
    names = [n for n, _ in maps]
    assert names == [
        "enc.0.mixer",
        "enc.1.mixer",
        "dec.0.self_attn",
        "dec.0.cross_attn",
        "dec.1.self_attn",
        "dec.1.cross_attn",
    ]
    w = dict(maps)
    assert (w["dec.0.cross_attn"][2, :, :, 2:] == 0).all()  # padding of source 2 is never attended
    assert (w["enc.0.mixer"][1, :, :, 4:] == 0).all()
    assert (w["dec.1.self_attn"][0].triu(1) == 0).all()  # causal decoder self-attention
    toks = m.greedy(src, lengths, 4)
    tf_in = torch.cat([torch.ones(3, 1, dtype=torch.long), toks[:, :-1]], 1)
    pred = m(src, lengths, tf_in).argmax(-1)
    for b in range(3):
        row = toks[b]
        n = int((row == 2).nonzero()[0]) + 1 if (row == 2).any() else len(row)
        assert torch.equal(pred[b, :n], row[:n])
