"""The permutation test and the uniform-attention baseline: each row's weights are a permutation of its own
allowed weights (masked keys stay 0), the uniform output equals the mean of the allowed values (computed from
the projections, an independent oracle), for qkv modules and Bahdanau attention alike."""

from __future__ import annotations

import pytest
import torch

from qkv.analysis.counterfactual_attention import (
    permute_rows,
    permuted_attention,
    total_variation,
    uniform_attention,
    uniform_rows,
)
from qkv.masks import causal
from qkv.models import GPT
from qkv.models.seq2seq import Seq2Seq
from qkv.nn import MultiHeadAttention, hooked
from toys import CopyModel, copy_inputs


def test_permute_rows_shuffles_only_allowed_keys():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(3, 2, 6, 6, generator=g), -1)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    w = torch.where(allowed, w, 0.0)
    changed = 0
    for _ in range(5):
        p = permute_rows(w, allowed, g)
        assert torch.equal(p[..., ~allowed], torch.zeros_like(p[..., ~allowed]))
        for r in range(6):
            n = r + 1
            torch.testing.assert_close(p[..., r, :n].sort(-1).values, w[..., r, :n].sort(-1).values)
        changed += int(not torch.equal(p, w))
    assert changed == 5
    u = uniform_rows(w, allowed)
    torch.testing.assert_close(u[0, 0, 3], torch.tensor([0.25] * 4 + [0.0] * 2))


def test_uniform_attention_is_the_mean_of_the_allowed_values():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with uniform_attention(mha), torch.no_grad():
        got = mha(x, mask=causal())
    v = mha.v_proj(x).detach()
    want = mha.out_proj(torch.cumsum(v, 1) / torch.arange(1, 6, dtype=torch.float64)[None, :, None]).detach()
    torch.testing.assert_close(got, want)
    assert not mha.has_hooks


def test_permutation_keeps_the_mask_and_changes_what_depends_on_attention():
    m = CopyModel()
    ids, _ = copy_inputs(batch=8)
    with torch.no_grad():
        base = m(ids)
        with permuted_attention(m, generator=torch.Generator().manual_seed(3)):
            perm = m(ids)
    # the copy model reads one token through attention: moving its weight changes the output
    assert float((perm - base).abs().mean()) > 0.3
    # a model whose tokens all carry the same value cannot tell: same output under any permutation
    same = torch.full_like(ids, 3)
    with torch.no_grad():
        want = m(same)
        with permuted_attention(m):
            torch.testing.assert_close(m(same), want)
    gpt = GPT(20, 16, 1, 2, max_len=8).double().eval()
    idx = torch.randint(0, 20, (2, 6))
    rec: list[torch.Tensor] = []
    with torch.no_grad(), permuted_attention(gpt), hooked(gpt, ("*.hook_weights", lambda w, n: rec.append(w.clone()))):
        gpt(idx)
    # hooks registered after the permutation see the permuted weights: still causal, rows still sum to 1
    (w,) = rec
    assert float(w.triu(1).abs().max()) == 0.0
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    with pytest.raises(ValueError, match="matches no attention layer"):
        with permuted_attention(gpt, "dec.*"):
            pass


def test_bahdanau_attention_has_hook_points_and_uniform_and_permuted_respect_lengths():
    torch.manual_seed(0)
    s2s = Seq2Seq(12, 10, emb=8, hidden=8).double().eval()
    src = torch.randint(3, 12, (2, 5))
    lengths = torch.tensor([5, 3])
    tin = torch.randint(3, 10, (2, 4))
    att = s2s.bahdanau
    assert att is not None
    states, _, key_mask = s2s.encode(src, lengths)
    q = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad(), uniform_attention(s2s):
        ctx, w = att(q, states, mask=key_mask)
    torch.testing.assert_close(w, key_mask.double() / key_mask.sum(-1, keepdim=True))
    torch.testing.assert_close(ctx, (states * w[..., None]).sum(1))
    with torch.no_grad():
        _, w0 = att(q, states, mask=key_mask)
        with permuted_attention(s2s, "bahdanau"):
            _, wp = att(q, states, mask=key_mask)
            logits, align = s2s(src, lengths, tin)
    assert float(wp[1, 3:].abs().max()) == 0.0
    torch.testing.assert_close(wp.sort(-1).values, w0.sort(-1).values)
    assert align is not None and float(align[1, :, 3:].abs().max()) == 0.0
    with torch.no_grad():
        logits0, _ = s2s(src, lengths, tin)
    tv = total_variation(logits0, logits)
    assert tv.shape == (2, 4) and float(tv.min()) >= 0 and float(tv.max()) <= 1 and float(tv.max()) > 0
    torch.testing.assert_close(total_variation(logits0, logits0), torch.zeros(2, 4, dtype=torch.float64))


def test_models_without_hook_points_are_refused():
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match="no hookable attention"):
        with uniform_attention(layer):
            pass
