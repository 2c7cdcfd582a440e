"""capture() on MiniLM (vs Hugging Face output_attentions), on torch.nn.MultiheadAttention trees, on qkv models."""

import math

import pytest
import torch
from torch import nn

from qkv.analysis import AttentionMaps, capture
from qkv.models import BertConfig, BertEncoder, minilm, minilm_path
from qkv.nn import set_backend

transformers = pytest.importorskip("transformers")

TEXTS = ["Clark et al. looked at BERT's heads.", "Short one."]


@pytest.fixture(scope="module")
def minilm_and_batch():
    torch.set_num_threads(1)
    m = minilm()
    return m, m.encode(TEXTS)


def _softmax_weights(q, k, num_heads, key_padding=None):
    """Per-head softmax(q kᵀ / sqrt(d)) from projected (B, L, E) queries and keys, by the formula."""
    B, L, E = q.shape
    d = E // num_heads
    qh = q.view(B, L, num_heads, d).transpose(1, 2)
    kh = k.view(B, -1, num_heads, d).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if key_padding is not None:  # True = padding (torch convention)
        s = s.masked_fill(key_padding[:, None, None, :], float("-inf"))
    return s.softmax(-1)


def _switches(hf, monkeypatch) -> list[str]:
    """Record the attention implementations capture() switches the model to."""
    seen: list[str] = []
    original = hf.set_attn_implementation

    def spy(name, *a, **k):
        seen.append(name)
        return original(name, *a, **k)

    monkeypatch.setattr(hf, "set_attn_implementation", spy)
    return seen


def test_capture_on_minilm_equals_hugging_face_output_attentions(minilm_and_batch, monkeypatch):
    model, batch = minilm_and_batch
    hf = transformers.BertModel.from_pretrained(minilm_path()).eval()  # default (sdpa) attention
    before = hf.config._attn_implementation
    ours = capture(model, **batch)
    switches = _switches(hf, monkeypatch)
    theirs = capture(hf, **batch, return_dict=False)  # capture asks for a dict anyway
    assert switches == ["qkv", before]  # the pass ran on qkv (qkv.hf), not on eager
    assert hf.config._attn_implementation == before
    monkeypatch.undo()
    with torch.no_grad():
        hf.set_attn_implementation("eager")
        ref = hf(**batch, output_attentions=True).attentions
    assert len(ours) == len(theirs) == len(ref) == 6
    for a, b, r in zip(ours.weights, theirs.weights, ref):
        assert a.shape == r.shape == (2, 12, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        assert (a - r).abs().max() < 1e-5
        assert (b - r).abs().max() < 1e-5
    assert ours.names == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert theirs.names == [f"attentions.{i}" for i in range(6)]
    assert ours.tokens is not None and ours.tokens[1][:4] == ["[CLS]", "short", "one", "."]
    assert torch.equal(ours.attention_mask, batch["attention_mask"].bool())
    assert ours.output.shape == (2, batch["input_ids"].shape[1], 384)
    assert ours.num_heads == [12] * 6 and ours.stack().shape[:3] == (6, 2, 12)


def test_capture_keeps_eager_as_the_fallback_for_models_off_the_attention_interface(minilm_and_batch, monkeypatch):
    _, batch = minilm_and_batch
    hf = transformers.BertModel.from_pretrained(minilm_path()).eval()
    monkeypatch.setattr(type(hf), "is_backend_compatible", classmethod(lambda cls: False))
    switches = _switches(hf, monkeypatch)
    got = capture(hf, **batch)
    assert switches == ["eager", "sdpa"]
    with torch.no_grad():
        hf.set_attn_implementation("eager")
        ref = hf(**batch, output_attentions=True).attentions
    assert all((g - r).abs().max() < 1e-7 for g, r in zip(got.weights, ref))


def test_capture_on_torch_transformer_encoder_matches_the_formula():
    torch.manual_seed(0)
    E, H, B, L = 16, 4, 2, 7
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(B, L, E)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 5:] = True
    fast_before = torch.backends.mha.get_fastpath_enabled()
    maps = capture(enc, x, src_key_padding_mask=pad)
    assert torch.backends.mha.get_fastpath_enabled() == fast_before
    assert maps.names == ["layers.0.self_attn", "layers.1.self_attn"]
    with torch.no_grad():
        h = x
        for i, lay in enumerate(enc.layers):
            W, b = lay.self_attn.in_proj_weight, lay.self_attn.in_proj_bias
            q = h @ W[:E].T + b[:E]
            k = h @ W[E : 2 * E].T + b[E : 2 * E]
            expected = _softmax_weights(q, k, H, pad)
            assert maps.weights[i].shape == (B, H, L, L)
            assert (maps.weights[i] - expected).abs().max() < 1e-5
            h = lay(h, src_key_padding_mask=pad)
        assert (maps.output - enc(x, src_key_padding_mask=pad)).abs().max() < 1e-5


class _TwoMHA(nn.Module):
    """Self- then cross-attention with torch.nn.MultiheadAttention, calling it with need_weights=False."""

    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2)  # sequence-first
        self.b = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

    def forward(self, x, ctx):
        y = self.a(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), None, False)[0].transpose(0, 1)
        return self.b(y, ctx, ctx, need_weights=False)[0]


def test_capture_on_multihead_attention_forces_per_head_weights():
    torch.manual_seed(1)
    m = _TwoMHA().eval()
    x, ctx = torch.randn(3, 5, 8), torch.randn(3, 4, 6)
    maps = capture(m, x, ctx)
    assert maps.names == ["a", "b"]
    assert [tuple(w.shape) for w in maps.weights] == [(3, 2, 5, 5), (3, 2, 5, 4)]
    with torch.no_grad():
        xs = x.transpose(0, 1)
        _, wa = m.a(xs, xs, xs, average_attn_weights=False)
        y = m.a(xs, xs, xs)[0].transpose(0, 1)
        _, wb = m.b(y, ctx, ctx, average_attn_weights=False)
    assert torch.allclose(maps.weights[0], wa, atol=1e-6)
    assert torch.allclose(maps.weights[1], wb, atol=1e-6)
    assert maps.tokens is None and maps.attention_mask is None


class _UsesWeights(nn.Module):
    """A model whose output is the averaged weights MultiheadAttention returns by default."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 4, batch_first=True)

    def forward(self, x):
        out, w = self.mha(x, x, x)
        none = self.mha(x, x, x, need_weights=False)[1]
        return w, none


def test_capture_leaves_the_callers_outputs_unchanged():
    torch.manual_seed(5)
    m = _UsesWeights().eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        w_avg, none = m(x)
    maps = capture(m, x)
    assert none is None and maps.output[1] is None
    assert torch.allclose(maps.output[0], w_avg, atol=1e-6)
    assert len(maps) == 2 and maps.weights[0].shape == (2, 4, 3, 3)
    assert torch.allclose(maps.weights[0].mean(1), w_avg, atol=1e-6)
    assert "_qkv_capture_asked" not in vars(m.mha)


def test_capture_on_qkv_models_whatever_the_backend():
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)
    model = BertEncoder(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    am = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    set_backend(model, "sdpa")  # a backend that returns no weights
    maps = capture(model, ids, am, tokens=[list("abcdef"), list("ghij") + ["[PAD]"] * 2])
    assert maps.tokens[1][0] == "g" and torch.equal(maps.attention_mask, am.bool())
    with torch.no_grad():
        hs = model.hidden_states(ids, am)
    for i, lay in enumerate(model.encoder.layer):
        sa = lay.attention.self
        expected = _softmax_weights(sa.q_proj(hs[i]), sa.k_proj(hs[i]), 4, am == 0)
        assert (maps.weights[i] - expected).abs().max() < 1e-5
    assert all(m.backend == "sdpa" for m in model.modules() if hasattr(m, "backend"))


def test_capture_on_qkv_multihead_attention_equals_torch():
    from qkv.nn.attention import MultiHeadAttention

    torch.manual_seed(3)
    ref = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    x = torch.randn(2, 5, 12)
    maps = capture(ours, x)
    with torch.no_grad():
        _, w = ref(x, x, x, average_attn_weights=False)
    assert isinstance(maps, AttentionMaps) and len(maps) == 1
    assert (maps.weights[0] - w).abs().max() < 1e-5


def test_capture_refuses_models_without_attention():
    with pytest.raises(ValueError, match="no attention layer"):
        capture(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        capture(lambda x: x, 1)  # type: ignore[arg-type]
