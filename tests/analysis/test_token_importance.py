"""Token importance on models whose truth is known by construction (tests/toys.py): the copy model's one
marked token must be the most important by every method; each method also against its own formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.analysis.attention_maps import capture
from qkv.analysis.measures import attention_rollout
from qkv.analysis.token_importance import (
    cosine_change,
    erasure,
    grad_x_input,
    integrated_gradients,
    leave_one_out,
    norm_weighted,
    replaced_embedding,
    token_importance_by_attention,
    token_importance_by_value_norm,
)
from toys import CopyModel, copy_inputs


@pytest.fixture(scope="module")
def copy():
    m = CopyModel()
    ids, pos = copy_inputs()
    return m, ids, pos


def test_every_method_finds_the_copied_token(copy):
    m, ids, pos = copy
    run = lambda: m(ids)  # noqa: E731
    maps = capture(m, ids)
    got = {
        "attention": token_importance_by_attention(maps, query=-1),
        "value_norm": token_importance_by_value_norm(m, ids, query=-1),
        "grad_x_input": grad_x_input(run, m.emb).abs(),
        "integrated_gradients": integrated_gradients(run, m.emb, steps=16).abs(),
        "leave_one_out": leave_one_out(run, m.emb),
    }
    for name, imp in got.items():
        assert imp.shape == ids.shape, name
        assert torch.equal(imp.argmax(-1), pos), name
        # the other tokens matter (almost) nothing: the model reads only the marked one (integrated gradients
        # walks from a zero embedding, where the mark is faint and attention still spreads: a little more)
        others = imp.clone()
        others[torch.arange(len(pos)), pos] = 0
        tol = 0.1 if name == "integrated_gradients" else 1e-3
        assert float(others.max()) < tol * float(imp.max(-1).values.min()), name


def test_grad_x_input_is_the_gradient_times_the_input(copy):
    m, ids, _ = copy
    x = m.emb(ids).detach().requires_grad_(True)
    y = (m.attn(x)[:, -1] @ m.u).sum()
    (g,) = torch.autograd.grad(y, x)
    torch.testing.assert_close(grad_x_input(lambda: m(ids), m.emb), (g * x).sum(-1).detach())


def test_integrated_gradients_is_complete_and_exact_for_a_linear_model(copy):
    m, ids, _ = copy
    ig = integrated_gradients(lambda: m(ids), m.emb, steps=64)
    with torch.no_grad(), replaced_embedding(m.emb, torch.zeros_like):
        base = m(ids)
    with torch.no_grad():
        full = m(ids)
    torch.testing.assert_close(ig.sum(-1), (full - base).double(), atol=2e-3, rtol=2e-3)
    # a linear model: IG with a zero baseline is gradient x input exactly
    emb = nn.Embedding(10, 4).double()
    w = torch.randn(4, dtype=torch.float64)
    lin = lambda: (emb(ids % 10) @ w).sum(-1)  # noqa: E731
    torch.testing.assert_close(integrated_gradients(lin, emb, steps=3), grad_x_input(lin, emb))
    torch.testing.assert_close(grad_x_input(lin, emb), (emb(ids % 10) @ w).detach())


def test_token_importance_by_attention_rows_and_rollout():
    g = torch.Generator().manual_seed(0)
    layers = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g), -1) for _ in range(2)]
    torch.testing.assert_close(token_importance_by_attention(layers, query=0), layers[-1].mean(1)[:, 0].double())
    torch.testing.assert_close(
        token_importance_by_attention(layers, layer=0, query=[1, 2]), layers[0].mean(1)[:, 1:3].mean(1).double()
    )
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = torch.stack([layers[-1].mean(1)[0, :3].mean(0), layers[-1].mean(1)[1].mean(0)]).double()
    torch.testing.assert_close(token_importance_by_attention(layers, valid=valid), want)
    torch.testing.assert_close(token_importance_by_attention(layers, "rollout", query=-1), attention_rollout(layers)[:, -1])
    flow = token_importance_by_attention(layers, "flow", query=-1)
    torch.testing.assert_close(flow.sum(-1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="method must be"):
        token_importance_by_attention(layers, "gradient")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="query must be"):
        token_importance_by_attention(layers, query=9)


def test_norm_weighted_matches_the_definition_and_sees_silent_tokens():
    g = torch.Generator().manual_seed(1)
    B, H, L, Dv, D = 1, 2, 4, 3, 5
    w = torch.softmax(torch.randn(B, H, L, L, generator=g, dtype=torch.float64), -1)
    v = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)
    wo = torch.randn(D, H * Dv, generator=g, dtype=torch.float64)
    want = torch.zeros(B, L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            c = sum(w[0, h, i, j] * (wo[:, h * Dv : (h + 1) * Dv] @ v[0, h, j]) for h in range(H))
            want[0, i, j] = c.norm()
    torch.testing.assert_close(norm_weighted(w, v, wo), want)
    ident = torch.stack(
        [torch.cat([w[0, h, i, j] * v[0, h, j] for h in range(H)]).norm() for i in range(L) for j in range(L)]
    )
    torch.testing.assert_close(norm_weighted(w, v).flatten(), ident)
    # a token with a large weight but a zero value sends nothing: Kobayashi's point
    v[:, :, 0] = 0
    assert float(norm_weighted(w, v, wo)[0, :, 0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="out_weight"):
        norm_weighted(w, v, wo[:, :4])


def test_token_importance_by_value_norm_sees_what_attention_does_not(copy):
    m, ids, pos = copy
    # a second marked token in row 0 whose content (value) is zero: attention splits between the two, the
    # norm-based importance gives the silent one nothing
    ids = ids.clone()
    j = (int(pos[0]) + 1) % ids.shape[1]
    silent = m.emb.weight.shape[0] - 1
    with torch.no_grad():
        m.emb.weight[silent, 1:] = 0
    ids[0, j] = silent
    a = token_importance_by_attention(capture(m, ids), query=-1)[0]
    n = token_importance_by_value_norm(m, ids, query=-1)[0]
    assert abs(float(a[j]) - 0.5) < 1e-3 and abs(float(a[pos[0]]) - 0.5) < 1e-3
    assert float(n[j]) < 1e-6 and float(n[pos[0]]) > 0.999


def test_erasure_measures_and_errors():
    f = lambda i: torch.tensor([[1.0, 2.0, 3.0]]) if i is None else torch.tensor([[1.0, 2.0, 3.0]]) * (1 + (i or 0))  # noqa: E731
    imp = erasure(f, 3)
    torch.testing.assert_close(imp, torch.tensor([[0.0, 6.0, 12.0]], dtype=torch.float64))
    torch.testing.assert_close(erasure(f, 3, cosine_change), torch.zeros(1, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        cosine_change(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])), torch.ones(1, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="length"):
        erasure(f, 0)
    emb = nn.Embedding(4, 2)
    with pytest.raises(ValueError, match=r"one scalar per batch row"):
        grad_x_input(lambda: emb(torch.zeros(2, 3, dtype=torch.long)), emb)
    with pytest.raises(ValueError, match="did not call the embedding"):
        grad_x_input(lambda: torch.zeros(2), emb)
    with pytest.raises(TypeError, match="embedding must be an nn.Module"):
        grad_x_input(lambda: torch.zeros(2), "emb")  # type: ignore[arg-type]
