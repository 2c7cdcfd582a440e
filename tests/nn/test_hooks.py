"""Hook points of the attention modules: what each one sees (against the formula written out in float64),
interventions on scores, weights, q/k/v and per-head outputs (against independent oracles: a score mod,
zeroed output-projection columns, closed forms), grouped-query heads, dropout, gradients, the fast path
untouched when nothing is hooked, and the ``hooked`` context manager."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import qkv
from qkv import masks, scores
from qkv.models import GPT
from qkv.nn import HOOK_POINTS, GrowingKVCache, HookPoint, MultiHeadAttention, hook_points, hooked
from qkv.nn.linear_attention import LinearSelfAttention

D64 = torch.float64
E, H, HKV, L = 12, 4, 2, 6  # grouped-query: query heads 0, 1 read kv head 0; 2, 3 read kv head 1


def _mha(seed: int = 0, **kw) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(E, H, num_kv_heads=HKV, **kw).double().eval()


def _heads(m: MultiHeadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, L, d), and k, v repeated to H heads (B, H, L, d), from the projections, by hand."""
    B, n, _ = x.shape
    d = E // H
    q = m.q_proj(x).view(B, n, H, d).transpose(1, 2)
    k = m.k_proj(x).view(B, n, HKV, d).transpose(1, 2).repeat_interleave(H // HKV, dim=1)
    v = m.v_proj(x).view(B, n, HKV, d).transpose(1, 2).repeat_interleave(H // HKV, dim=1)
    return q, k, v


def _merge(m: MultiHeadAttention, heads: torch.Tensor) -> torch.Tensor:
    B, _, n, d = heads.shape
    return m.out_proj(heads.transpose(1, 2).reshape(B, n, H * d))


def _causal_scores(m: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, _ = _heads(m, x)
    s = q @ k.transpose(-1, -2) / math.sqrt(E // H)
    return s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))


def test_every_attention_module_has_the_named_hook_points():
    m = GPT(20, 16, 2, 4, max_len=16)
    names = list(hook_points(m))
    assert names == [f"blocks.{i}.mixer.{p}" for i in range(2) for p in HOOK_POINTS]
    assert all(isinstance(h, HookPoint) for h in hook_points(m).values())
    assert not m.blocks[0].mixer.has_hooks


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference", "tiled"])
def test_no_hook_leaves_the_fast_path_as_it_was(backend, monkeypatch):
    m = _mha()
    m.backend = backend
    x = torch.randn(2, L, E, dtype=D64)
    seen = []
    real = qkv.nn.base.attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(qkv.nn.base, "attention", spy)
    monkeypatch.setattr(qkv.nn.base, "hooked_attention", None)  # calling it would raise
    out = m(x, mask=masks.causal())
    assert [k.get("backend") for k in seen] == [backend] and "return_weights" not in seen[0]
    q, k, v = _heads(m, x)
    want = _merge(m, real(q, k, v, mask=masks.causal(), backend="reference"))
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", ["sdpa", "reference", "tiled"])
def test_weights_hook_reads_the_softmax_whatever_the_backend(backend):
    m = _mha(1)
    m.backend = backend
    x = torch.randn(2, L, E, dtype=D64)
    got = []
    h = m.hook_weights.register_forward_hook(lambda mod, args, w: got.append(w))
    out = m(x, mask=masks.causal())
    h.remove()
    want = torch.softmax(_causal_scores(m, x), -1)
    assert len(got) == 1 and got[0].shape == (2, H, L, L)
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(out, m(x, mask=masks.causal()))  # a hook that only reads changes nothing
    assert m.backend == backend and not m.has_hooks


def test_scores_hook_sees_the_formula_and_adding_a_bias_equals_the_score_mod():
    m = _mha(2)
    x = torch.randn(2, L, E, dtype=D64)
    bias = torch.randn(1, H, L, L, dtype=D64)
    seen = []

    def add_bias(mod, args, s):
        seen.append(s.clone())
        return s + bias

    h = m.hook_scores.register_forward_hook(add_bias)
    got = m(x, mask=masks.causal())
    h.remove()
    torch.testing.assert_close(seen[0], _causal_scores(m, x))
    m.backend = "reference"
    torch.testing.assert_close(got, m(x, mask=masks.causal(), score_mod=scores.bias(bias)))


def test_replacing_the_weights_recomputes_the_output_with_grouped_query_heads():
    """Uniform weights over the causal keys: each head outputs the running mean of its kv head's values."""
    m = _mha(3)
    m.backend = "sdpa"
    x = torch.randn(2, L, E, dtype=D64)
    allowed = torch.ones(L, L, dtype=D64).tril()

    def uniform(mod, args, w):
        return (allowed / allowed.sum(-1, keepdim=True)).expand_as(w)

    with torch.no_grad():
        h = m.hook_weights.register_forward_hook(uniform)
        got = m(x, mask=masks.causal())
        h.remove()
        _, _, v = _heads(m, x)
        running_mean = v.cumsum(2) / torch.arange(1, L + 1, dtype=D64).view(1, 1, L, 1)
        torch.testing.assert_close(got, _merge(m, running_mean))


def test_changing_the_weights_in_place_counts_as_a_change():
    m = _mha(4)
    x = torch.randn(1, L, E, dtype=D64)
    h = m.hook_weights.register_forward_hook(lambda mod, args, w: w.zero_())
    with torch.no_grad():
        got = m(x)
    h.remove()
    torch.testing.assert_close(got, m.out_proj.bias.expand(1, L, E))


def test_dropout_falls_on_the_new_weights():
    """Training with dropout p: one-hot weights on key 0 give each head row either 0 or v_0 / (1 - p)."""
    p = 0.5
    m = _mha(5, dropout=p).train()
    x = torch.randn(4, L, E, dtype=D64)
    got = []

    def one_hot(mod, args, w):
        new = torch.zeros_like(w)
        new[..., 0] = 1.0
        return new

    h1 = m.hook_weights.register_forward_hook(one_hot)
    h2 = m.hook_heads.register_forward_hook(lambda mod, args, out: got.append(out))
    torch.manual_seed(0)
    with torch.no_grad():
        m(x)
    h1.remove()
    h2.remove()
    _, _, v = _heads(m, x)
    rows = got[0]  # (B, H, L, d)
    kept = (rows - v[:, :, :1] / (1 - p)).abs().amax(-1) < 1e-12
    dropped = rows.abs().amax(-1) == 0
    assert bool((kept | dropped).all()) and kept.any() and dropped.any()


def test_ablating_a_head_equals_zeroing_its_output_projection_columns():
    m = _mha(6)
    x = torch.randn(2, L, E, dtype=D64)
    d = E // H

    def zero_head_2(mod, args, out):
        out = out.clone()
        out[:, 2] = 0
        return out

    with torch.no_grad():
        h = m.hook_heads.register_forward_hook(zero_head_2)
        got = m(x, mask=masks.causal())
        h.remove()
        m.out_proj.weight[:, 2 * d : 3 * d] = 0
        torch.testing.assert_close(got, m(x, mask=masks.causal()))


def test_zero_keys_give_uniform_attention_and_zero_values_give_the_bias():
    m = _mha(7)
    x = torch.randn(2, L, E, dtype=D64)
    with torch.no_grad():
        _, _, v = _heads(m, x)
        with hooked(m, ("hook_k", lambda k, name: torch.zeros_like(k))):
            got = m(x)
        torch.testing.assert_close(got, _merge(m, v.mean(2, keepdim=True).expand_as(v)))
        with hooked(m, ("hook_v", lambda v, name: torch.zeros_like(v))):
            torch.testing.assert_close(m(x), m.out_proj.bias.expand(2, L, E))
        with hooked(m, ("hook_q", lambda q, name: torch.zeros_like(q))):
            torch.testing.assert_close(m(x), _merge(m, v.mean(2, keepdim=True).expand_as(v)))


def test_gradients_flow_to_the_weights_and_through_changed_weights():
    m = _mha(8)
    x = torch.randn(2, L, E, dtype=D64, requires_grad=True)
    leaf = []

    def as_leaf(mod, args, w):
        leaf.append(w.detach().requires_grad_())
        return leaf[0]

    h = m.hook_weights.register_forward_hook(as_leaf)
    m(x, mask=masks.causal()).pow(2).sum().backward()
    h.remove()
    # the oracle: the same loss written out from the weights by hand
    w0 = leaf[0].detach().requires_grad_()
    _, _, v = _heads(m, x)
    _merge(m, w0 @ v).pow(2).sum().backward()
    torch.testing.assert_close(leaf[0].grad, w0.grad)
    # a hook that scales the weights keeps the graph back to the input
    x.grad = None
    with hooked(m, ("hook_weights", lambda w, name: 2 * w)):
        m(x, mask=masks.causal()).sum().backward()
    g_hooked = x.grad.clone()
    x.grad = None
    q, k, v = _heads(m, x)
    w = torch.softmax(_causal_scores(m, x), -1)
    _merge(m, 2 * w @ v).sum().backward()
    torch.testing.assert_close(g_hooked, x.grad)


def test_a_cached_decoding_step_goes_through_the_hooks():
    torch.manual_seed(9)
    m = MultiHeadAttention(E, H, num_kv_heads=HKV).eval()
    x = torch.randn(1, 5, E)
    cache = GrowingKVCache()
    with torch.no_grad():
        m(x[:, :4], mask=masks.causal(), cache=cache)
        seen = []
        with hooked(m, ("hook_weights", lambda w, name: seen.append(w.shape))):
            m(x[:, 4:], mask=masks.causal(), cache=cache)
    assert seen == [(1, H, 1, 5)]


def test_hooks_context_manager_matches_names_and_cleans_up():
    m = GPT(20, 16, 2, 4, max_len=16)
    idx = torch.randint(0, 20, (1, 5))
    names = []
    with hooked(m, ("*.hook_weights", lambda w, name: names.append(name))) as points:
        with torch.no_grad():
            m(idx)
    assert names == ["blocks.0.mixer.hook_weights", "blocks.1.mixer.hook_weights"] == list(points)
    assert not any(hp.active for hp in hook_points(m).values())
    with pytest.raises(ValueError, match="matches no hook point.*blocks.0.mixer.hook_q"):
        with hooked(m, ("*.hook_pattern", lambda w, name: None)):
            pass
    with hooked(m, (lambda n: n.startswith("blocks.1") and n.endswith("heads"), lambda o, name: 0 * o)) as points:
        assert list(points) == ["blocks.1.mixer.hook_heads"]


def test_bad_hook_results_and_approximate_backends_are_refused():
    m = _mha(10)
    x = torch.randn(1, L, E, dtype=D64)
    with (
        hooked(m, ("hook_weights", lambda w, name: w[..., :-1])),
        pytest.raises(ValueError, match="hook_weights.*shape"),
    ):
        m(x)
    lin = LinearSelfAttention(E, H, "linear")
    with hooked(lin, ("hook_scores", lambda s, name: None)), pytest.raises(ValueError, match="no softmax scores"):
        lin(torch.randn(1, L, E))


def test_a_copied_module_checks_its_own_hook_points():
    m = _mha(11)
    c = copy.deepcopy(m)
    h = c.hook_weights.register_forward_hook(lambda mod, args, w: None)
    assert c.has_hooks and not m.has_hooks
    h.remove()
    assert not c.has_hooks
    m.hook_heads.register_forward_pre_hook(lambda mod, args: None)
    assert m.has_hooks


def test_weights_of_a_backend_with_its_own_options_are_not_taken_from_another(monkeypatch):
    """A sequence-parallel layer passes group=/layout= to ring, which returns no weights: computing them with
    another backend would see only this rank's shard, so the hook is refused instead."""

    def no_weights(q, k, v, *, backend, return_weights=False, **kw):
        raise NotImplementedError(f"{backend} returns no weights")

    monkeypatch.setattr(qkv.nn.hooks, "attention", no_weights)
    m = _mha(12)
    m.backend = "ring"
    q, k, v = (torch.randn(1, h, L, E // H, dtype=D64) for h in (H, HKV, HKV))
    with hooked(m, ("hook_weights", lambda w, name: None)):
        with pytest.raises(ValueError, match="ring.*returns no weights.*group, layout"):
            m.attend(q, k, v, group=None, layout="zigzag")


def test_every_hooked_path_is_a_call_of_qkv_attention(monkeypatch):
    """No second copy of the validation or of the formula: hook_scores is ``qkv.attention(...,
    backend="reference", scores_hook=...)``, replaced weights are recomputed by the reference's own second
    half (no second attention call), and bad inputs get qkv.attention's own errors."""
    calls = []
    real = qkv.nn.hooks.attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("backend"), sorted(k for k in kwargs if k.endswith("_hook"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(qkv.nn.hooks, "attention", spy)
    m = _mha(13)
    m.backend = "sdpa"
    x = torch.randn(1, L, E, dtype=D64)
    with hooked(m, ("hook_scores", lambda s, name: None), ("hook_weights", lambda w, name: None)):
        m(x, mask=masks.causal())
    assert calls == [("reference", ["scores_hook", "weights_hook"])]
    calls.clear()
    with torch.no_grad(), hooked(m, ("hook_weights", lambda w, name: torch.ones_like(w) / L)):
        m(x)
    assert calls == [("sdpa", []), ("auto", [])]  # sdpa returns no weights: auto's backend does
    q, k = torch.randn(1, H, L, E // H, dtype=D64), torch.randn(1, 3, L, E // H, dtype=D64)
    with hooked(m, ("hook_scores", lambda s, name: None)), pytest.raises(ValueError, match="H=4 must be a multiple"):
        m.attend(q, k, k)
