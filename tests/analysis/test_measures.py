"""Each measure against values computed by hand on small matrices, or against an independent computation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qkv.analysis import measures as M
from qkv.models import BertConfig, BertEncoder


def _w(*rows_per_head):
    """(1, H, L, Lk) float64 from per-head lists of rows."""
    return torch.tensor([list(rows_per_head)], dtype=torch.float64)


# head 0: one-hot on the previous token (first row on itself); head 1: uniform
PREV = [[1, 0, 0], [1, 0, 0], [0, 1, 0]]
UNIF = [[1 / 3] * 3] * 3
W = _w(PREV, UNIF)


def test_entropy_by_hand():
    assert torch.allclose(M.head_entropy(W), torch.tensor([0.0, math.log(3)], dtype=torch.float64))
    half = _w([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    expected = (math.log(2) + (2 * 0.25 * math.log(4) + 0.5 * math.log(2)) + 0.0) / 3
    assert math.isclose(float(M.head_entropy(half)[0]), expected, rel_tol=1e-12)
    # a padded query row is left out of the mean
    valid = torch.tensor([[True, True, False]])
    assert math.isclose(float(M.head_entropy(half, valid)[0]), (math.log(2) + 1.5 * math.log(2)) / 2, rel_tol=1e-12)


def test_mean_distance_by_hand():
    # head 0: |0-0|, |1-0|, |2-1| -> 2/3 ; head 1: row i: mean_j |i-j| = (1, 2/3, 1)
    assert torch.allclose(M.mean_distance(W), torch.tensor([2 / 3, (1 + 2 / 3 + 1) / 3], dtype=torch.float64))
    # Lq < Lk: the single query stands at the last key position (bottom-right)
    w = _w([[0.5, 0.0, 0.5]])
    assert math.isclose(float(M.mean_distance(w)[0]), 0.5 * 2, rel_tol=1e-12)


def test_mass_on_positions_by_hand():
    assert torch.allclose(M.mass_on(W, [0]), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert torch.allclose(M.mass_on(W, torch.tensor([False, True, True])), torch.tensor([1 / 3, 2 / 3]).double())
    assert torch.allclose(M.mass_on(W, [-1]), torch.tensor([0.0, 1 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="positions"):
        M.mass_on(W, [3])


def test_self_previous_next_by_hand():
    assert torch.allclose(M.offset_mass(W, 0), torch.tensor([1 / 3, 1 / 3], dtype=torch.float64))
    # previous: rows 1 and 2 only (row 0 has no previous token)
    assert torch.allclose(M.offset_mass(W, -1), torch.tensor([1.0, 1 / 3], dtype=torch.float64))
    assert torch.allclose(M.offset_mass(W, 1), torch.tensor([0.0, 1 / 3], dtype=torch.float64))
    # with the last token padded, row 1's "next" target is padding and row 2 is not a real query
    valid = torch.tensor([[True, True, False]])
    w = _w([[0.2, 0.8, 0.0], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
    assert math.isclose(float(M.offset_mass(w, 1, valid)[0]), 0.8, rel_tol=1e-12)


# Lq = 2 queries over Lk = 4 keys: bottom-right, the queries stand at key positions 2 and 3
RECT = _w(
    [[0.0, 0.0, 0.0, 1.0], [0.25, 0.0, 0.75, 0.0]],
    [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]],
)


def test_mean_distance_when_lq_differs_from_lk_by_hand():
    # head 0: |2-3| = 1 and 0.25|3-0| + 0.75|3-2| = 1.5; head 1: 0.1*2 + 0.2*1 + 0.4*1 = 0.8 and
    # 0.4*3 + 0.3*2 + 0.2*1 = 2.0 (top-left alignment would give 2.0 and 1.6)
    assert torch.allclose(M.mean_distance(RECT), torch.tensor([1.25, 1.4], dtype=torch.float64))
    assert torch.allclose(M.mean_distance(RECT, torch.tensor([[False, True]])), torch.tensor([1.5, 2.0]).double())
    # Lq > Lk: three queries over two keys stand at positions -1, 0 and 1
    w = _w([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert math.isclose(float(M.mean_distance(w)[0]), (1 + 1 + 0.5) / 3, rel_tol=1e-12)


def test_offset_mass_when_lq_differs_from_lk_by_hand():
    f64 = torch.float64
    assert torch.allclose(M.offset_mass(RECT, 0), torch.tensor([0.0, 0.2], dtype=f64))  # keys 2 and 3
    assert torch.allclose(M.offset_mass(RECT, -1), torch.tensor([0.375, 0.2], dtype=f64))  # keys 1 and 2
    # next: query 0 -> key 3; query 1's next (key 4) is outside and left out
    assert torch.allclose(M.offset_mass(RECT, 1), torch.tensor([1.0, 0.4], dtype=f64))
    assert torch.allclose(M.offset_mass(RECT, -3), torch.tensor([0.25, 0.4], dtype=f64))  # only query 1 -> key 0
    assert torch.equal(M.offset_mass(RECT, 2), torch.zeros(2, dtype=f64))  # no query has a key 2 ahead
    # valid speaks of queries only: with query 0 padded, "prev" is query 1's key 2
    assert torch.allclose(M.offset_mass(RECT, -1, torch.tensor([[False, True]])), torch.tensor([0.75, 0.2]).double())
    # Lq > Lk: queries at -1, 0, 1; "self" of query 0 is outside
    w = _w([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert math.isclose(float(M.offset_mass(w, 0)[0]), (0.0 + 0.5) / 2, rel_tol=1e-12)
    # two batch rows, only the second row's query 0 padded
    w2 = torch.cat([RECT, RECT.flip(-1)])
    valid = torch.tensor([[True, True], [False, True]])
    # row 0: 0.0/0.3 and 0.0/0.1 (self); row 1 (keys reversed): query 1 -> key 3 holds 0.25 / 0.4
    want = torch.tensor([(0.0 + 0.0 + 0.25) / 3, (0.3 + 0.1 + 0.4) / 3], dtype=f64)
    assert torch.allclose(M.offset_mass(w2, 0, valid), want)


def test_entropy_and_mass_on_when_lq_differs_from_lk_by_hand():
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h1 = [-sum(p * math.log(p) for p in row) for row in ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])]
    assert torch.allclose(M.head_entropy(RECT), torch.tensor([h / 2, sum(h1) / 2], dtype=torch.float64))
    valid = torch.tensor([[False, True]])
    assert torch.allclose(M.head_entropy(RECT, valid), torch.tensor([h, h1[1]], dtype=torch.float64))
    assert torch.allclose(M.mass_on(RECT, [3]), torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert torch.allclose(M.mass_on(RECT, [3], valid), torch.tensor([0.0, 0.1], dtype=torch.float64))
    assert torch.allclose(M.mass_on(RECT, [0, 2]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_token_masks():
    toks = ["[CLS]", "hello", ",", "world", "##!", "...", "[SEP]", "#"]
    assert M.special_positions(toks).tolist() == [1, 0, 0, 0, 0, 0, 1, 0]
    assert M.punctuation_positions(toks).tolist() == [0, 0, 1, 0, 1, 1, 0, 1]
    assert M.special_positions([["[CLS]", "a"], ["b", "[SEP]"]]).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="equally long"):
        M.special_positions([["a"], ["b", "c"]])


def test_js_divergence_by_hand():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    m = [0.75, 0.25]
    expected = 0.5 * math.log2(1 / m[0]) + 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1]))
    assert math.isclose(float(M.js_divergence(p, q)), expected, rel_tol=1e-12)
    assert float(M.js_divergence(p, p)) == 0.0
    assert math.isclose(float(M.js_divergence(p, torch.tensor([0.0, 1.0]))), 1.0, rel_tol=1e-12)


def test_head_distances_are_mean_row_js():
    torch.manual_seed(0)
    layers = [torch.rand(2, 3, 4, 4).softmax(-1) for _ in range(2)]
    D = M.head_distances(layers, dtype=torch.float64)
    assert D.shape == (6, 6) and torch.allclose(D, D.T) and torch.all(D.diagonal() == 0)
    a, b = layers[0][:, 1], layers[1][:, 2]  # head 1 and head 5
    by_hand = np.mean([float(M.js_divergence(a[i, r], b[i, r])) for i in range(2) for r in range(4)])
    assert math.isclose(float(D[1, 5]), by_hand, rel_tol=1e-9)
    assert torch.allclose(M.head_distances(layers), D, atol=1e-5)  # float32 by default
    # padded query rows are left out; with a small budget only evenly spaced rows are compared
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    by_hand = np.mean([float(M.js_divergence(a[i, r], b[i, r])) for i, r in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]])
    assert math.isclose(float(M.head_distances(layers, valid, dtype=torch.float64)[1, 5]), by_hand, rel_tol=1e-9)
    sub = M.head_distances(layers, valid, max_cells=3 * 4, dtype=torch.float64)  # 3 of the 5 rows: 0, 2, 4
    by_hand = np.mean([float(M.js_divergence(a[i, r], b[i, r])) for i, r in [(0, 0), (0, 2), (1, 1)]])
    assert math.isclose(float(sub[1, 5]), by_hand, rel_tol=1e-9)


def test_mds_recovers_planar_distances():
    torch.manual_seed(1)
    pts = torch.randn(7, 2, dtype=torch.float64)
    D = torch.cdist(pts, pts)
    X = M.mds(D)
    assert X.shape == (7, 2)
    assert torch.allclose(torch.cdist(X, X), D, atol=1e-9)
    with pytest.raises(ValueError, match="square"):
        M.mds(torch.zeros(2, 3))


def _layers(n=3, B=1, H=2, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, H, L, L, generator=g).softmax(-1).double() for _ in range(n)]


def test_rollout_against_its_formula():
    layers = _layers()
    L = 4
    R = None
    for w in layers:
        a = 0.5 * w[0].mean(0).numpy() + 0.5 * np.eye(L)  # rows already sum to 1
        R = a if R is None else a @ R
    got = M.attention_rollout(layers)
    assert got.shape == (1, L, L)
    assert np.allclose(got[0].numpy(), R, atol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(1, L, dtype=torch.float64))
    plain = M.attention_rollout(layers, residual=False)
    expected = layers[2][0].mean(0) @ layers[1][0].mean(0) @ layers[0][0].mean(0)
    assert torch.allclose(plain[0], expected)
    assert len(M.attention_rollout(layers, all_layers=True)) == 3


def test_attention_flow_one_layer_is_the_augmented_attention():
    (w,) = _layers(n=1)
    flow = M.attention_flow([w])
    expected = 0.5 * w[0].mean(0) + 0.5 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(flow, expected, atol=1e-9)


def test_attention_flow_against_networkx_max_flow():
    nx = pytest.importorskip("networkx")
    layers = _layers(n=3, L=4, seed=3)
    cap = M.flow_graph(layers)
    G = nx.from_numpy_array(cap, create_using=nx.DiGraph)
    L, n = 4, 3
    expected = np.array(
        [[nx.maximum_flow_value(G, n * L + i, j, capacity="weight") for j in range(L)] for i in range(L)]
    )
    expected /= expected.sum(1, keepdims=True)
    assert np.allclose(M.attention_flow(layers).numpy(), expected, atol=1e-9)
    # a two-layer chain by hand: token 0 passes everything to token 1, then 1 to 0
    swap = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=torch.float64)
    assert torch.allclose(M.attention_flow([swap, swap], residual=False), torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_len"):
        M.attention_flow(layers, max_len=3)


def test_collapse_by_hand():
    L = 5
    uniform = torch.full((1, 2, L, L), 1 / L, dtype=torch.float64)
    ident = torch.eye(L, dtype=torch.float64).expand(1, 2, L, L)
    out = M.collapse([ident, uniform])
    assert out["entropy"] == pytest.approx([0.0, math.log(L)])
    assert out["entropy_max"] == pytest.approx([math.log(L)] * 2)
    # ||I - 11ᵀ/L||_F / ||I||_F = sqrt((L-1)/L); after the uniform layer every row is the same
    assert out["rank1_attention"] == pytest.approx([math.sqrt((L - 1) / L), 0.0], abs=1e-12)
    h = torch.randn(1, L, 3, dtype=torch.float64)
    same = torch.ones(1, L, 3, dtype=torch.float64) * torch.randn(3, dtype=torch.float64)
    got = M.collapse([ident], hidden_states=[h, same])["rank1_hidden"]
    by_hand = float((h[0] - h[0].mean(0)).norm() / h[0].norm())
    assert got == pytest.approx([by_hand, 0.0], abs=1e-12)


def _tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=16)
    return BertEncoder(cfg).double().eval()


def _loss(model, batch):
    ids, target = batch
    return ((model(ids) - target) ** 2).mean()


def test_head_importance_equals_finite_differences_of_scaled_values():
    """The oracle scales head h's value projection by (1 ± eps): the head's output scales the same way."""
    model = _tiny_bert()
    torch.manual_seed(1)
    batches = [(torch.randint(0, 30, (2, 5)), torch.randn(2, 5, 12, dtype=torch.float64)) for _ in range(2)]
    imp = M.head_importance(model, _loss, batches, normalize=False)
    assert imp.shape == (2, 3)
    eps = 1e-6
    expected = torch.zeros(2, 3, dtype=torch.float64)
    with torch.no_grad():
        for l, layer in enumerate(model.encoder.layer):
            v = layer.attention.self.v_proj
            for h in range(3):
                rows = slice(4 * h, 4 * h + 4)
                w0, b0 = v.weight[rows].clone(), v.bias[rows].clone()
                for batch in batches:
                    vals = []
                    for s in (1 + eps, 1 - eps):
                        v.weight[rows], v.bias[rows] = w0 * s, b0 * s
                        vals.append(float(_loss(model, batch)))
                    expected[l, h] += abs(vals[0] - vals[1]) / (2 * eps) / len(batches)
                v.weight[rows], v.bias[rows] = w0, b0
    assert torch.allclose(imp, expected, rtol=1e-5, atol=1e-10)
    normed = M.head_importance(model, _loss, batches)
    assert torch.allclose(normed, expected / expected.norm(dim=1, keepdim=True), rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert "attend" not in vars(model.encoder.layer[0].attention.self)  # the mask hook is gone


def test_head_ablation_equals_zeroing_the_heads_values():
    model = _tiny_bert(seed=4)
    batch = (torch.randint(0, 30, (1, 6)), torch.randn(1, 6, 12, dtype=torch.float64))
    got = M.head_ablation(model, _loss, batch)
    with torch.no_grad():
        base = float(_loss(model, batch))
        for l, layer in enumerate(model.encoder.layer):
            v = layer.attention.self.v_proj
            rows = slice(4, 8)  # head 1
            w0, b0 = v.weight[rows].clone(), v.bias[rows].clone()
            v.weight[rows], v.bias[rows] = 0.0, 0.0
            assert math.isclose(float(got[l, 1]), float(_loss(model, batch)) - base, rel_tol=1e-9, abs_tol=1e-12)
            v.weight[rows], v.bias[rows] = w0, b0
    with pytest.raises(ValueError, match="AttentionModule"):
        M.head_ablation(nn.Linear(2, 2), _loss, batch)


def test_head_table_and_best_head_per_column():
    tokens = ["[CLS]", "a", ",", "[SEP]"]
    sep_head = [[0, 0, 0, 1.0]] * 4
    prev_head = [[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]
    w = _w(sep_head, prev_head)
    table = M.head_table([w, w], tokens)
    assert [r["name"] for r in table] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    r0, r1 = table[0], table[1]
    assert r0["sep"] == 1.0 and r0["cls"] == 0.0 and r0["entropy"] == 0.0
    assert r1["prev"] == 1.0 and r1["cls"] == 0.5 and r1["punct"] == 0.25 and r1["self"] == 0.25
    assert set(M.TABLE_COLUMNS) <= set(r0)
    best = M.best_head_per_column(table)
    assert best["sep"]["name"] == "L0H0" and best["prev"]["name"] == "L0H1"
    no_tokens = M.head_table([w])
    assert math.isnan(no_tokens[0]["sep"]) and "sep" not in M.best_head_per_column(no_tokens)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"\(B, H, Lq, Lk\)"):
        M.head_entropy(torch.rand(3, 3))
    with pytest.raises(ValueError, match="valid"):
        M.head_entropy(W, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="self-attention"):
        M.attention_rollout([torch.rand(1, 1, 2, 3)])


@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    L=st.integers(2, 6),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25)
def test_invariants_on_random_attention(B, H, L, n, seed):
    g = torch.Generator().manual_seed(seed)
    layers = [(3 * torch.randn(B, H, L, L, generator=g, dtype=torch.float64)).softmax(-1) for _ in range(n)]
    w = layers[0]
    ent = M.head_entropy(w)
    assert torch.all(ent >= -1e-12) and torch.all(ent <= math.log(L) + 1e-12)
    assert torch.allclose(M.mass_on(w, list(range(L))), torch.ones(H, dtype=torch.float64))
    parts = M.mass_on(w, [0]) + M.mass_on(w, list(range(1, L)))
    assert torch.allclose(parts, torch.ones(H, dtype=torch.float64))
    assert torch.all(M.mean_distance(w) <= L - 1 + 1e-12)
    R = M.attention_rollout(layers)
    assert torch.allclose(R.sum(-1), torch.ones(B, L, dtype=torch.float64))
    F = M.attention_flow(layers, b=B - 1)
    assert torch.all(F >= 0) and torch.allclose(F.sum(-1), torch.ones(L, dtype=torch.float64))
    D = M.head_distances(layers, dtype=torch.float64)
    assert torch.all(D >= 0) and torch.all(D <= 1 + 1e-9)
