"""Hugging Face models on attn_implementation="qkv" against "eager" and the float64 oracle.

Every model is built with ``from_config`` at a tiny size (no download). The oracle is the same model in
float64 on "oracle64": the attention formula written out here in float64 over HF's own dense mask
(HF's "eager" is no float64 oracle: it takes the softmax in float32, where its float64 mask value
overflows to -inf and padded rows turn NaN). The rule is the one every backend meets: the qkv model's error against the oracle is
at most twice eager's own float32 error, plus a small floor. Batches are LEFT-padded; logits and weights
are compared at real tokens (a padded position's output is garbage in every implementation, and a padded
query that may see nothing gets zeros from qkv where eager spreads it over every key).

Two registrations run: "qkv" (``backend="auto"``) and "qkv-tiles" (``tiled`` with 4 x 4 tiles, so that
the tiny sequences have empty tiles to skip, full runs and partial tiles).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qkv.hf  # noqa: E402

qkv.hf.register()
qkv.hf.register("qkv-tiles", backend="tiled", block_q=4, block_k=4)


def _oracle_mask(*args, **kwargs):
    """HF's own mask, dense and boolean (True = may attend), never skipped."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return transformers.masking_utils.sdpa_mask(*args, **kwargs)


def _oracle_attention(
    module, q, k, v, attention_mask, dropout=0.0, scaling=None, softcap=None, s_aux=None, **kwargs
):
    """softmax(q kᵀ · scaling, soft-capped, masked) v in the inputs' dtype; a row that sees nothing gets zeros.
    With sinks (``s_aux``, GPT-OSS) one more column per head joins the softmax and is dropped."""
    assert dropout == 0.0
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        s = s.masked_fill(~attention_mask, float("-inf"))
    if s_aux is not None:
        sink = s_aux.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        w = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
    else:
        w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (w @ v).transpose(1, 2).contiguous(), w


transformers.AttentionInterface.register("oracle64", _oracle_attention)
transformers.AttentionMaskInterface.register("oracle64", _oracle_mask)
IMPLS = ("qkv", "qkv-tiles")
V, L, PAD = 97, 13, 3  # vocabulary, sequence length, left padding of row 0
FLOOR = 2e-5


@dataclass
class Case:
    name: str
    make: Callable[[], transformers.PreTrainedModel]
    decoder: bool = True
    sdpa: bool = True
    sinks: bool = False  # rows of weights sum to less than one (attention sinks)


def _common(**kw):
    return dict(vocab_size=V, initializer_range=0.2, **kw)


def _llama():
    cfg = transformers.LlamaConfig(
        **_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


def _mistral():
    cfg = transformers.MistralConfig(
        **_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        intermediate_size=64,
        sliding_window=5,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.MistralForCausalLM._from_config(cfg, attn_implementation="eager")


def _gemma2():
    cfg = transformers.Gemma2Config(
        **_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        head_dim=8,
        intermediate_size=64,
        sliding_window=5,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=0.5,
        final_logit_softcapping=None,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    return transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")


def _qwen2():
    cfg = transformers.Qwen2Config(
        **_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager")


def _gpt2():
    cfg = transformers.GPT2Config(
        **_common(n_embd=32, n_layer=2, n_head=4),
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")


def _bert():
    cfg = transformers.BertConfig(
        **_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM._from_config(cfg, attn_implementation="eager")


def _modernbert():
    cfg = transformers.ModernBertConfig(
        **_common(hidden_size=32, num_hidden_layers=3, num_attention_heads=4),
        intermediate_size=64,
        local_attention=4,  # |q - k| <= 2 on the local layers
        global_attn_every_n_layers=3,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    return transformers.ModernBertForMaskedLM._from_config(cfg, attn_implementation="eager")


def _gpt_oss():
    """GPT-OSS: learned attention sinks (s_aux, one logit per head), alternating sliding/full layers."""
    cfg = transformers.GptOssConfig(
        **_common(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=32,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = transformers.GptOssForCausalLM._from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that matter
    return model


CASES = [
    Case("llama", _llama),
    Case("mistral", _mistral),
    Case("gemma2", _gemma2, sdpa=False),
    Case("qwen2", _qwen2),
    Case("gpt2", _gpt2),
    Case("bert", _bert, decoder=False),
    Case("modernbert", _modernbert, decoder=False),
    *([Case("gpt_oss", _gpt_oss, sdpa=False, sinks=True)] if hasattr(transformers, "GptOssConfig") else []),
]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, L), generator=g)
    am = torch.ones(2, L, dtype=torch.long)
    am[0, :PAD] = 0
    ids[0, :PAD] = 0
    return ids, am


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case(request):
    torch.set_num_threads(1)  # as the other model tests: tiny models, and no OpenMP barriers on a busy machine
    torch.manual_seed(0)
    model = request.param.make().eval()
    oracle = copy.deepcopy(model).double()
    return request.param, model, oracle


def _assert_rule(name: str, got: torch.Tensor, base: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    floor = FLOOR * max(1.0, ref.abs().max().item())
    assert err <= 2 * base_err + floor, f"{name}: error {err:.3g} > 2 x eager's {base_err:.3g} + {floor:.3g}"


def _run(model, impl: str, ids, am, **kw):
    model.set_attn_implementation(impl)
    return model(input_ids=ids, attention_mask=am, **kw)


def test_logits_and_weights_follow_the_float64_oracle(case):
    c, model, oracle = case
    ids, am = _batch()
    real = am.bool()
    with torch.no_grad():
        ref = _run(oracle, "oracle64", ids, am, output_attentions=True)
        base = _run(model, "eager", ids, am, output_attentions=True)
        for impl in IMPLS:
            got = _run(model, impl, ids, am, output_attentions=True)
            _assert_rule(f"{c.name} {impl} logits", got.logits[real], base.logits[real], ref.logits[real])
            assert len(got.attentions) == len(ref.attentions) == model.config.num_hidden_layers
            for i, (g, b, r) in enumerate(zip(got.attentions, base.attentions, ref.attentions)):
                assert g is not None and g.shape == r.shape == (2, 4, L, L), (impl, i)
                # weights of real queries; a padded query of a decoder sees nothing: zeros from qkv
                rows = real[:, None, :].expand(-1, 4, -1)
                _assert_rule(f"{c.name} {impl} weights {i}", g[rows], b[rows], r[rows])
                if c.sinks:  # the unpadded row: the weights and each head's sink share one
                    assert bool((g.sum(-1)[1] < 1).all())
                else:  # the unpadded row: every query sums to one
                    assert (g.sum(-1)[1] - 1).abs().max() < 1e-5
                if c.decoder:
                    assert bool((g[0, :, :PAD] == 0).all())
            without = _run(model, impl, ids, am)
            assert without.attentions is None or all(a is None for a in without.attentions)
            assert torch.equal(without.logits, got.logits)


def test_gradients_of_a_loss_follow_the_float64_oracle(case):
    c, model, oracle = case
    ids, am = _batch()
    real = am.bool()
    w = torch.randn(int(real.sum()), V, generator=torch.Generator().manual_seed(2))

    def grads(m, impl):
        m.zero_grad()
        out = _run(m, impl, ids, am)
        (out.logits[real] * w.to(out.logits.dtype)).sum().backward()
        return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref, base = grads(oracle, "oracle64"), grads(model, "eager")
    for impl in IMPLS:
        got = grads(model, impl)
        assert got.keys() == base.keys()
        for n in base:
            _assert_rule(f"{c.name} {impl} d{n}", got[n], base[n], ref[n])
    model.zero_grad()


def test_generate_gives_the_same_tokens_as_eager_and_sdpa(case):
    c, model, _ = case
    if not c.decoder:
        pytest.skip("an encoder does not generate")
    ids, am = _batch()
    outs = {}
    for impl in ("eager", *(("sdpa",) if c.sdpa else ()), *IMPLS):
        model.set_attn_implementation(impl)
        outs[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for impl, toks in outs.items():
        assert toks.shape == (2, L + 8)
        assert torch.equal(toks, outs["eager"]), impl


def test_gemma2_softcap_is_applied():
    """Switching Gemma 2's attention softcap off moves the logits far beyond the tolerance."""
    torch.manual_seed(0)
    model = _gemma2().eval()
    ids, am = _batch()
    with torch.no_grad():
        on = _run(model, "qkv", ids, am).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        off = _run(model, "qkv", ids, am).logits
        eager_off = _run(model, "eager", ids, am).logits
    real = am.bool()
    assert (on - off)[real].abs().max() > 1e-2
    assert (off - eager_off)[real].abs().max() < 1e-4


@pytest.mark.parametrize("make", [_llama, _mistral], ids=["llama", "mistral"])
def test_packed_sequences_from_position_ids(make):
    """Two sequences packed in one row, told apart by position_ids only (no attention mask, no cache: when
    HF looks for packed sequences)."""
    torch.manual_seed(0)
    model = make().eval()
    oracle = copy.deepcopy(model).double()
    ids = torch.randint(3, V, (1, L), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(5), torch.arange(L - 5)])[None]
    with torch.no_grad():
        ref = _run(oracle, "oracle64", ids, None, position_ids=pos, use_cache=False).logits
        base = _run(model, "eager", ids, None, position_ids=pos, use_cache=False).logits
        alone = _run(model, "eager", ids[:, 5:], None, use_cache=False).logits  # the second sequence alone
        assert (base[:, 5:] - alone).abs().max() < 1e-4  # HF separates them
        for impl in IMPLS:
            got = _run(model, impl, ids, None, position_ids=pos, use_cache=False).logits
            _assert_rule(f"packed {impl}", got, base, ref)
