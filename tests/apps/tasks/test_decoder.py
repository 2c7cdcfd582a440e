"""The word decoder shared by ``qkv train speech`` and ``caption``: teacher-forcing targets by hand, the
one-vector bottleneck is the masked mean (so the baseline cannot tell where anything is), padding is
invisible, greedy decoding agrees with teacher forcing on its own output, and captured cross-attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.apps.tasks.decoder import BOS, EOS, PAD, VOCAB, EncoderDecoder, WordDecoder, seq_loss, targets


class Identity(nn.Module):
    """An 'encoder' that hands its input on as the memory."""

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return x, lengths


def _model(bottleneck: bool, seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    return EncoderDecoder(Identity(), WordDecoder(16, 2, 2, max_len=8), bottleneck=bottleneck).eval()


def test_targets_by_hand():
    tin, tout = targets([(4, 7), (0,), (1, 2, 3)])
    assert VOCAB[4 + 3] == "four" and VOCAB[BOS] == "<bos>"
    assert tin.tolist() == [[BOS, 7, 10, PAD], [BOS, 3, PAD, PAD], [BOS, 4, 5, 6]]
    assert tout.tolist() == [[7, 10, EOS, PAD], [3, EOS, PAD, PAD], [4, 5, 6, EOS]]
    logits = torch.zeros(3, 4, len(VOCAB))
    # uniform logits: the loss is log |V| over the 9 real targets, padding ignored
    assert abs(float(seq_loss(logits, tout)) - torch.log(torch.tensor(float(len(VOCAB))))) < 1e-6


def test_bottleneck_is_the_masked_mean_and_sees_nothing_else():
    x = torch.randn(2, 6, 16)
    lengths = torch.tensor([6, 4])
    mem, mlen = _model(True).memory(x, lengths)
    assert mem.shape == (2, 1, 16) and mlen is None
    torch.testing.assert_close(mem[0, 0], x[0].mean(0))
    torch.testing.assert_close(mem[1, 0], x[1, :4].mean(0))
    tin, _ = targets([(1, 2, 3), (4, 5, 6)])
    d = torch.randn(2, 6, 16)
    d[1, 4:] = 0
    d[0] -= d[0].mean(0)
    d[1, :4] -= d[1, :4].mean(0)  # another memory with the same mean over the real frames
    for bottleneck, same in ((True, True), (False, False)):
        m = _model(bottleneck)
        a, b = m(x, lengths, tin), m(x + d, lengths, tin)
        assert torch.allclose(a, b, atol=1e-5) == same


def test_padding_is_invisible():
    m = _model(False)
    x = torch.randn(1, 5, 16)
    tin, _ = targets([(3, 1)])
    padded = torch.cat([x, 100 * torch.randn(1, 3, 16)], 1)
    torch.testing.assert_close(m(x, torch.tensor([5]), tin), m(padded, torch.tensor([5]), tin))


def test_greedy_agrees_with_teacher_forcing_and_cross_attention_shapes():
    m = _model(False, seed=3)
    x = torch.randn(4, 7, 16)
    lengths = torch.tensor([7, 5, 3, 6])
    hyps = m.greedy(x, lengths, max_words=5)
    assert len(hyps) == 4 and all(len(h) <= 5 and all(0 <= d <= 9 for d in h) for h in hyps)
    assert sorted(len(h) for h in hyps)[-1] >= 2, hyps  # (this seed writes words)
    for b, h in enumerate(hyps):
        tin, _ = targets([h])
        pred = m(x[b : b + 1, : int(lengths[b])], None, tin)[0].argmax(-1).tolist()
        assert pred[: len(h)] == [d + 3 for d in h]  # each word is the argmax given the words before it
        if len(h) < 5:
            assert pred[len(h)] < 3  # it stopped at a token that is not a word (<eos>, or <pad>/<bos>)
    maps = m.cross_attention(x, lengths, hyps)
    T = max(len(h) for h in hyps) + 1
    assert len(maps) == 2 and all(w.shape == (4, 2, T, 7) for w in maps)
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 2, T))
        assert float(w[1, :, :, 5:].abs().max()) == 0.0 and float(w[2, :, :, 3:].abs().max()) == 0.0
