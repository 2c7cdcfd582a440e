"""Every causal-LM architecture of the installed ``transformers`` on ``attn_implementation="qkv"``.

The sweep walks ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; every class that declares pluggable attention
(``is_backend_compatible()``: its layers call HF's attention interface) is built tiny from its config class
(a generic shrink of widths, layers, heads, vocabulary and experts, plus the reviewed per-model fixes in
``FIXES``) and runs a left-padded batch three ways:

* ``"eager"`` in float32: HF's reference implementation (in float64 its softmax runs in float32, where
  float64's mask value is ``-inf`` and the padded rows turn the whole batch to NaN);
* ``"qkv"`` in float64 with ``output_attentions`` (the weights, and the logits at every position);
* both greedy-generating two tokens: the prompt's forward without weights (qkv's main path; its last
  position's logits), then a step with the KV cache (the cache's offsets, the sliding-window layers'
  dropped keys), logits compared at each step.

The logits (at real tokens; at every step of the generation), the attention weights (at real query rows) and the tokens must match within
eager's own float32 rounding. Weights differ only where a learned sink's share is counted differently
(``SINK_SHARE``: the model's eager drops the sink from the weights it returns, qkv's weights keep it;
rescaled to sum to one they match). Models that cannot be built tiny, or that HF itself cannot run under
eager, are listed in ``CANNOT`` with the reason and skipped with it. The count is
``test_the_count_of_architectures_on_qkv``'s; ``python tests/hf/test_every_model.py`` runs the sweep
alone and prints it with timings.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import qkv.hf  # noqa: E402
from qkv.hf import masks as hf_masks  # noqa: E402

V, L, PAD, NEW = 128, 10, 3, 2  # vocabulary, prompt length, left padding of row 0, generated tokens
TOL = 1e-4  # relative to the largest logit: eager's float32 rounding is ~1e-6 of it

SIZES: dict[str, int] = dict(
    hidden_size=32, n_embd=32, d_model=32, num_attention_heads=4, n_head=4, n_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=32, ffn_dim=32, dff=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
    shared_experts_intermediate_size=16, shared_intermediate_size=16, intermediate_size_mlp=32,
    dense_intermediate_size=32, expert_ffn_hidden_size=16, ffn_hidden_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2,
    moe_k=2, zero_expert_num=2,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, qk_head_dim=8,
    index_head_dim=8, index_n_heads=2, index_num_heads=2, index_topk=4,
    o_lora_rank=16, o_groups=2, sliding_window=4, attention_chunk_size=4, vocab_size=V, query_pre_attn_scalar=8, rotary_dim=4,
    vocab_size_per_layer_input=V, hidden_size_per_layer_input=8, n_positions=64, n_ctx=64,
)  # fmt: skip
"""What the generic shrink sets wherever a config has the field as a larger int. ``sliding_window``, chunks and
the sparse indexer's ``index_topk`` are smaller than the prompt, so they bind."""

EVEN_IF_NONE = {"head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts"}
"""Fields set even where the default config leaves them ``None`` (then the model cannot be built)."""

FIXES: dict[str, dict[str, Any]] = {
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "dots1": dict(n_shared_experts=1),
    "dots3_note": dict(head_dim=8),  # its sliding layers' head_dim is qk_nope_head_dim + qk_rope_head_dim
    "dots3_note_text": dict(head_dim=8),
    "granitemoehybrid": dict(
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8,
        layer_types=["linear_attention", "attention"], num_hidden_layers=2,
    ),
    "kolibri1_1": dict(head_dim=16),  # its keys and values are rounded to NVFP4 in blocks of 16
    "zamba": dict(  # two hybrid layers: the second shares the first's transformer block
        num_hidden_layers=8, attention_hidden_size=64, attention_head_dim=16, mamba_dt_rank=4,
        layers_block_type=["linear_attention"] * 2 + ["hybrid"] + ["linear_attention"] * 4 + ["hybrid"],
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_hidden_layers=2, num_dense_layers=1),
    "recurrent_gemma": dict(
        num_hidden_layers=3, block_types=["recurrent", "recurrent", "attention"], attention_window_size=4, lru_width=32
    ),
    "dory": dict(
        num_hidden_layers=4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    "gemma3n_text": dict(num_kv_shared_layers=0, altup_num_inputs=2, laurel_rank=4),
}  # fmt: skip
"""Reviewed per-model fields the generic shrink cannot know (a default config that cannot build a model;
a validation that ties two fields; a layer pattern that holds no attention layer in its first layers)."""

CANNOT: dict[str, str] = {
    "gemma3n": "its vision tower is a timm model and timm is not installed (the text model, gemma3n_text, runs)",
    "gemma4_assistant": "an assistant head: its forward needs the shared K/V states of a target model",
    "gemma4_unified_assistant": "an assistant head: its forward needs the shared K/V states of a target model",
    "dbrx": "HF cannot build it from its own config: DbrxAttention reads attn_config.rope_theta, which"
    " DbrxAttentionConfig does not define (HF's documented example fails the same way)",
}
"""Architectures that declare pluggable attention but cannot run tiny here, with the reason (reviewed)."""

SINK_SHARE: dict[str, str] = {
    "granite_swa": "eager returns the softmax over the keys and scales the output by the sink's complement",
    "granitemoe_swa": "eager returns the softmax over the keys and scales the output by the sink's complement",
}
"""Architectures whose eager weights leave out a learned sink's share that qkv's weights keep (rows that
sum to less than one, as GPT-OSS's eager returns them); rescaled to sum to one they must match."""

READS_MASK: dict[str, str] = {
    **dict.fromkeys(
        ["deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4", "dots3_note", "dots3_note_text", "kolibri1_1"],
        "a sparse-attention indexer scores the keys under the mask (mask[:, 0]) and picks the top ones",
    ),
    "deepseek_v4": "extends the mask by the compressed keys it appends (torch.cat / F.pad)",
    "doge": "builds its dynamic mask from the mask (mask != 0) and passes that on",
}
"""Architectures whose own code reads the attention mask, and what it does with it (reviewed): they get HF's
eager mask, built on first use. Every other architecture must run without building an ``Lq x Lk`` mask."""

HOOKS: dict[str, Callable[[Any], None]] = {
    "xmod": lambda model: model.set_default_language("en_XX"),
}
"""A call some models need before a forward (X-MOD picks its language adapter)."""


def _architectures() -> list[str]:
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _class(model_type: str) -> Any:
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _pluggable(model_type: str) -> bool:
    """Whether HF's causal-LM class of ``model_type`` declares pluggable attention."""
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    return cls is not None and bool(cls.is_backend_compatible())


def _sizes(fields: dict[str, Any], only: dict[str, Any] | None = None) -> dict[str, Any]:
    """The generic shrink of one config's ``fields`` (restricted to the keys of ``only`` when given)."""
    d: dict[str, Any] = {}
    for k, v in SIZES.items():
        if k in fields and (
            (isinstance(fields[k], int) and not isinstance(fields[k], bool) and fields[k] > v)
            or (fields[k] is None and k in EVEN_IF_NONE)
        ):
            d[k] = v
    if isinstance(fields.get("n_group"), int) and isinstance(fields.get("topk_group"), int):
        d.update(n_group=1, topk_group=1)  # grouped expert routing: one group of the few experts
    if fields.get("kv_lora_rank") is not None:  # multi-head latent attention: a K/V head per query head,
        hd, rope, nope = (fields.get(k) for k in ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim"))
        new_rope, new_nope = d.get("qk_rope_head_dim", rope), d.get("qk_nope_head_dim", nope)
        if isinstance(hd, int) and isinstance(rope, int) and isinstance(nope, int) and hd == rope + nope:
            d["head_dim"] = new_rope + new_nope  # head_dim kept as the sum of its parts, or as the rope part
        elif "head_dim" in fields or "head_dim" in d:
            d["head_dim"] = new_rope
        if "num_key_value_heads" in fields:
            d["num_key_value_heads"] = d.get("num_attention_heads", fields.get("num_attention_heads"))
    return d if only is None else {k: v for k, v in d.items() if k in only}


def _shrink(cfg: Any, fixes: dict[str, Any] | None = None) -> Any:
    """``cfg``'s class built again with every size in ``SIZES`` it has, its layer pattern cut to the first
    layer of each kind, special token ids moved into the small vocabulary, sub-configs shrunk likewise."""
    defaults = cfg.to_dict()
    subs = getattr(cfg, "sub_configs", None) or {}
    d = _sizes(defaults)
    if "initializer_range" in defaults:
        d["initializer_range"] = 0.2  # weights that make attention peaked, so that a wrong mask shows
    n = defaults.get("num_hidden_layers", defaults.get("num_layers"))
    n_key = "num_hidden_layers" if "num_hidden_layers" in defaults else "num_layers"
    if isinstance(n, int):
        per_layer = {k: v for k, v in defaults.items() if isinstance(v, list) and len(v) == n and n > 2}
        patterns = [v for v in per_layer.values() if all(isinstance(x, str) for x in v)]
        keep = max([min(2, n)] + [v.index(kind) + 1 for v in patterns for kind in dict.fromkeys(v)])
        d[n_key] = keep
        for k, v in per_layer.items():
            d[k] = [SIZES.get(k, x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v[:keep]]
        if isinstance(defaults.get("per_layer_config"), dict):  # layers that differ from the rest (heterogeneity)
            d["per_layer_config"] = {
                i: {**layer, **_sizes({**defaults, **layer}, only=layer)}
                for i, layer in defaults["per_layer_config"].items()
                if int(i) < keep
            }
    for k, v in defaults.items():
        if (k.endswith("_token_id") or k.endswith("_token_index")) and isinstance(v, int) and v >= V - 8:
            d[k] = V - 1 - sum(map(ord, k)) % 6
        elif k.endswith("_token_id") and isinstance(v, list):
            d[k] = [x if x < V - 8 else V - 2 for x in v]
    for s in subs:
        sc = getattr(cfg, s, None)
        if sc is not None and hasattr(sc, "to_dict"):
            d[s] = _shrink(sc)
    d.update({k: v for k, v in (fixes or {}).items() if k not in subs})
    return type(cfg)(**d)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V - 16, (2, L), generator=g)
    am = torch.ones_like(ids)
    am[0, :PAD] = 0
    return ids, am


CALLS = {"attention": 0, "dense": 0}


def _counting(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        CALLS[what] += 1
        return fn(*args, **kwargs)

    return wrapped


NAME = qkv.hf.register()
_fn = transformers.AttentionInterface._global_mapping[NAME]
transformers.AttentionInterface.register("qkv-sweep", _counting(_fn, "attention"))
transformers.AttentionMaskInterface.register("qkv-sweep", qkv.hf.build_mask)


def check(model_type: str) -> dict[str, Any]:
    """Build ``model_type`` tiny and compare ``"qkv"`` with ``"eager"``; returns what was measured, raises
    ``AssertionError`` on a mismatch."""
    cls = _class(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixes = {k: v() if callable(v) else v for k, v in FIXES.get(model_type, {}).items()}
        try:
            default = cls.config_class()
        except Exception:  # noqa: BLE001 - a default config HF cannot build: its fixes make it
            default = cls.config_class(**fixes)
        cfg = _shrink(default, fixes)
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager", experts_implementation="eager").eval()
    HOOKS.get(model_type, lambda m: None)(model)
    ids, am = _batch()
    real = am.bool()
    pad = cfg.pad_token_id if isinstance(getattr(cfg, "pad_token_id", None), int) else 0
    gen_kw = dict(
        max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=pad, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, output_attentions=True)
        ref_gen = model.generate(input_ids=ids, attention_mask=am, **gen_kw)
        model.double().set_attn_implementation("qkv-sweep")
        CALLS.update(attention=0, dense=0)
        dense = hf_masks.HFMask.dense
        hf_masks.HFMask.dense = _counting(dense, "dense")  # type: ignore[method-assign]
        try:
            outw = model(input_ids=ids, attention_mask=am, output_attentions=True)
            gen = model.generate(input_ids=ids, attention_mask=am, **gen_kw)
        finally:
            hf_masks.HFMask.dense = dense  # type: ignore[method-assign]
        calls, read = CALLS["attention"], CALLS["dense"]
    assert calls > 0, f"{model_type}: the qkv attention function was never called"
    assert (read > 0) == (model_type in READS_MASK), (
        f"{model_type}: the dense mask was {'built' if read else 'not built'}; READS_MASK says"
        f" {'it reads the mask' if model_type in READS_MASK else 'it does not read the mask'}"
    )
    scale = float(ref.logits[real].abs().max())
    tol = TOL * max(scale, 1.0)
    err = float((outw.logits[real] - ref.logits[real].double()).abs().max())
    assert err <= tol, f"{model_type}: logits differ from eager by {err:.3g} (tolerance {tol:.3g})"
    # generating: the prompt's forward without weights (qkv's main path), then decoding with the cache
    for step, (a, b) in enumerate(zip(ref_gen.logits, gen.logits)):
        e = float((a.double() - b).abs().max())
        assert e <= tol, f"{model_type}: generation step {step}'s logits differ from eager by {e:.3g} (tolerance {tol:.3g})"
        err = max(err, e)
    gen, ref_gen = gen.sequences, ref_gen.sequences
    werr, shared = _weights(model_type, ref.attentions, outw.attentions, real)
    assert torch.equal(gen, ref_gen), f"{model_type}: greedy tokens {gen[:, L:].tolist()}, eager's {ref_gen[:, L:].tolist()}"
    return dict(logits=err, weights=werr, sink_share=shared, attention_calls=calls, model_read_mask=read > 0)


def _weights(model_type: str, ref: Any, got: Any, real: torch.Tensor) -> tuple[float, bool]:
    """The largest weight difference at real query rows (after rescaling rows to one where the model counts
    a sink's share differently), and whether that rescaling was needed."""
    assert (ref is None) == (got is None), f"{model_type}: weights from only one implementation"
    if ref is None:
        return 0.0, False
    assert len(ref) == len(got), f"{model_type}: {len(ref)} eager layers of weights, {len(got)} from qkv"
    worst, shared = 0.0, False
    for a, b in zip(ref, got):
        assert (a is None) == (b is None), f"{model_type}: a layer's weights from only one implementation"
        if a is None:
            continue
        assert a.shape == b.shape, f"{model_type}: weights {tuple(a.shape)} from eager, {tuple(b.shape)} from qkv"
        rows = real[:, None, :, None].expand_as(a) if a.shape[-2] == real.shape[1] else torch.ones_like(a, dtype=torch.bool)
        a, b = a.double(), b.double()
        err = float((a - b)[rows].abs().max())
        if err > TOL and model_type in SINK_SHARE:
            shared = True
            b = b / b.sum(-1, keepdim=True).clamp_min(1e-300)
            err = float((a - b)[rows].abs().max())
        assert err <= TOL, f"{model_type}: attention weights differ from eager by {err:.3g}"
        worst = max(worst, err)
    if model_type in SINK_SHARE:
        assert shared, f"{model_type} is listed in SINK_SHARE but its weights match without rescaling"
    return worst, shared


@pytest.mark.parametrize("model_type", _architectures())
def test_architecture_runs_on_qkv_as_on_eager(model_type):
    if model_type in CANNOT:
        pytest.skip(f"listed: {CANNOT[model_type]}")
    if not _pluggable(model_type):
        pytest.skip("does not declare pluggable attention (is_backend_compatible() is False): not on qkv")
    check(model_type)


def test_the_count_of_architectures_on_qkv(capsys):
    """The count the README states: every pluggable architecture not listed in ``CANNOT`` has its own test
    above that must pass. Entries of the reviewed lists that this release's mapping lacks (the lists serve
    every supported ``transformers``) are named, not counted."""
    names = _architectures()
    pluggable = [n for n in names if _pluggable(n)]
    listed = [n for n in CANNOT if n in names]
    assert all(n in pluggable for n in listed), "CANNOT lists an architecture that is not pluggable"
    runs = [n for n in pluggable if n not in CANNOT]
    assert len(runs) + len(listed) == len(pluggable) and len(runs) >= 100
    unused = sorted({n for table in (CANNOT, SINK_SHARE, FIXES, HOOKS, READS_MASK) for n in table} - set(names))
    with capsys.disabled():
        print(
            f"\ntransformers {transformers.__version__}: {len(runs)} of {len(pluggable)} causal-LM architectures that"
            f" declare pluggable attention run on qkv as on eager ({len(names)} in the mapping); listed, not run:"
            f" {'; '.join(f'{n}: {CANNOT[n]}' for n in listed)}"
            + (f"; fixes for architectures this release lacks: {', '.join(unused)}" if unused else "")
        )


if __name__ == "__main__":  # the sweep alone, with timings: python tests/hf/test_every_model.py [model_type ...]
    import sys

    transformers.logging.set_verbosity_error()
    chosen = sys.argv[1:] or [n for n in _architectures() if n not in CANNOT and _pluggable(n)]
    t0, ok = time.perf_counter(), 0
    for n in chosen:
        t = time.perf_counter()
        try:
            r = check(n)
            ok += 1
            print(f"ok   {n:28s} {time.perf_counter() - t:5.2f}s {r}", flush=True)
        except Exception as e:  # noqa: BLE001 - a report, not a test
            print(f"FAIL {n:28s} {time.perf_counter() - t:5.2f}s {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"{ok} of {len(chosen)} in {time.perf_counter() - t0:.1f}s (transformers {transformers.__version__})")
