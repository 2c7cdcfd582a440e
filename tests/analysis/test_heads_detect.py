"""Head detectors on a hand-built two-layer model (tests/toys.py: a previous-token head feeding an induction
head) and on hand-made patterns; the target masks by hand."""

from __future__ import annotations

import pytest
import torch

from qkv.analysis.heads_detect import detect_heads, head_scores, repeated_tokens, strong_heads, target_mask
from toys import InductionModel


def test_target_masks_by_hand():
    ids = torch.tensor([[5, 7, 5, 7, 9]])
    dup = target_mask(ids, "duplicate")[0]
    assert dup.nonzero().tolist() == [[2, 0], [3, 1]]
    ind = target_mask(ids, "induction")[0]
    # query 2 (token 5): token 5 came at 0, followed by position 1; query 3 (token 7): 7 at 1, then position 2
    assert ind.nonzero().tolist() == [[2, 1], [3, 2]]
    prev = target_mask(ids, "previous")[0]
    assert prev.nonzero().tolist() == [[1, 0], [2, 1], [3, 2], [4, 3]]
    with pytest.raises(ValueError, match="pattern must be"):
        target_mask(ids, "copying")


def test_repeated_tokens():
    x = repeated_tokens(50, 10, 3, prefix=(0,), low=1)
    assert x.shape == (3, 21) and bool((x[:, 0] == 0).all())
    assert torch.equal(x[:, 1:11], x[:, 11:]) and bool((x[:, 1:] >= 1).all())
    assert all(len(set(r[1:11].tolist())) == 10 for r in x)
    with pytest.raises(ValueError, match="length"):
        repeated_tokens(5, 6)


def test_the_hand_built_heads_are_found():
    m = InductionModel()
    ids = repeated_tokens(12, 10, 4, prefix=(0,), low=1)
    s = detect_heads(m, ids)
    assert s["previous"].shape == (2, 1)
    assert float(s["previous"][0, 0]) > 0.99 and float(s["previous"][1, 0]) < 0.3
    assert float(s["induction"][1, 0]) > 0.99 and float(s["induction"][0, 0]) < 0.01
    assert strong_heads(s["induction"]) == [(1, 0, pytest.approx(float(s["induction"][1, 0])))]
    # break the previous-token head (it now attends to itself): the induction head loses its input
    with torch.no_grad():
        m.l0.q_proj.weight.zero_()
    broken = detect_heads(m, ids)
    assert float(broken["induction"][1, 0]) < 0.6


def test_head_scores_on_hand_made_patterns():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3]])
    L = 6
    dup = target_mask(ids, "duplicate").double()
    rows = dup.sum(-1, keepdim=True)
    w_dup = torch.where(rows > 0, dup / rows.clamp(min=1), torch.eye(L, dtype=torch.float64)).unsqueeze(1)
    uni = (torch.ones(L, L).tril() / torch.arange(1, L + 1)[:, None]).double().view(1, 1, L, L)
    s = head_scores([torch.cat([w_dup, uni], 1)], ids, "duplicate")
    assert s.shape == (1, 2)
    assert float(s[0, 0]) == pytest.approx(1.0)
    # uniform causal attention: the duplicate at query 3, 4, 5 gets 1/4, 1/5, 1/6
    assert float(s[0, 1]) == pytest.approx((1 / 4 + 1 / 5 + 1 / 6) / 3)
    with pytest.raises(ValueError, match="self-attention"):
        head_scores([uni[..., :5]], ids, "previous")


class _MhaLM(torch.nn.Module):
    """Embedding + one torch TransformerEncoderLayer (causal): a torch.nn.MultiheadAttention tree."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        return self.layer(self.emb(ids), src_mask=torch.nn.Transformer.generate_square_subsequent_mask(L))


def test_detect_heads_on_torch_and_hugging_face_models():
    torch.manual_seed(0)
    ids = repeated_tokens(30, 6, 2)
    m = _MhaLM().eval()
    s = detect_heads(m, ids, patterns=("previous",))
    # the oracle: torch's own per-head weights of the same attention call
    x = m.emb(ids)
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(12)
    with torch.no_grad():
        _, w = m.layer.self_attn(x, x, x, attn_mask=causal_mask, need_weights=True, average_attn_weights=False)
    want = torch.stack([w[:, h].diagonal(-1, -2, -1).mean() for h in range(2)]).double()
    torch.testing.assert_close(s["previous"][0], want)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    s = detect_heads(hf, ids)
    assert set(s) == {"previous", "duplicate", "induction"} and s["induction"].shape == (2, 2)
    assert bool(((s["induction"] >= 0) & (s["induction"] <= 1)).all())


# --- exact scores against the definitions written out as loops, on inputs where near-miss patterns differ ---


def _targets_by_loops(ids: list[int], pattern: str) -> set[tuple[int, int]]:
    """(query, key) pairs from the definitions: previous j = i - 1; duplicate j < i with the same token;
    induction 1 <= j < i with ids[j - 1] == ids[i]."""
    L = len(ids)
    out = set()
    for i in range(L):
        for j in range(L):
            if pattern == "previous":
                ok = j == i - 1
            elif pattern == "duplicate":
                ok = j < i and ids[j] == ids[i]
            else:
                ok = 1 <= j < i and ids[j - 1] == ids[i]
            if ok:
                out.add((i, j))
    return out


# tokens that repeat their predecessor (4 4, 7 7 7), a token followed by itself later, and the first position
# holding the query's token: where "j <= i", "j != i", a shifted predecessor or "j = i + 1" all differ
_TRICKY = [
    [4, 4, 9, 4, 4, 7, 7, 7, 9, 4],
    [7, 7, 7, 2, 7, 2, 2, 5, 2, 7],
    [1, 2, 1, 2, 2, 1, 1, 3, 3, 1],
]


def test_target_masks_equal_the_definitions_where_near_misses_differ():
    ids = torch.tensor([[4, 4, 4]])
    assert target_mask(ids, "induction")[0].nonzero().tolist() == [[2, 1]]  # not [2, 2]: a key before the query
    assert target_mask(ids, "duplicate")[0].nonzero().tolist() == [[1, 0], [2, 0], [2, 1]]  # never itself
    assert target_mask(ids, "previous")[0].nonzero().tolist() == [[1, 0], [2, 1]]
    g = torch.Generator().manual_seed(0)
    rows = _TRICKY + torch.randint(0, 3, (20, 10), generator=g).tolist()
    ids = torch.tensor(rows)
    for pattern in ("previous", "duplicate", "induction"):
        m = target_mask(ids, pattern)
        for b, row in enumerate(rows):
            got = {tuple(p) for p in m[b].nonzero().tolist()}
            assert got == _targets_by_loops(row, pattern), (pattern, row)


def _random_weights(B: int, H: int, L: int, seed: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, L, L, generator=g, dtype=torch.float64) * 2
    if valid is not None:
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return s.softmax(-1)


@pytest.mark.parametrize("pattern", ["previous", "duplicate", "induction"])
def test_head_scores_equal_the_definitions_with_padding(pattern):
    """Each head's score is the mean, over the real query rows that have a real target, of the mass on the
    targets: computed here pair by pair. Padding (right and left) is neither query nor target, and for induction
    not the earlier occurrence either; the padding repeats real tokens' ids so that it would count if it were
    read."""
    rows = [r + [4, 4] for r in _TRICKY] + [[4, 4, 7, 4, 4, 7, 4, 4, 7, 4, 4, 7], [7, 7, 7, 4, 7, 4, 4, 7, 2, 7, 4, 7]]
    ids = torch.tensor(rows)
    valid = torch.ones(5, 12, dtype=torch.bool)
    valid[0, 10:] = valid[1, 8:] = False  # right padding
    valid[4, :3] = False  # left padding with the ids of real tokens (7, as GPT-2 pads with its EOS)
    layers = [_random_weights(5, 3, 12, seed, valid) for seed in (1, 2)]
    got = head_scores(layers, ids, pattern, valid)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    for li, w in enumerate(layers):
        for h in range(3):
            masses = []
            for b, row in enumerate(rows):
                real = valid[b].tolist()
                tg = {
                    (i, j)
                    for i, j in _targets_by_loops(row, pattern)
                    if real[i] and real[j] and (pattern != "induction" or real[j - 1])
                }
                for i in range(12):
                    js = [j for (q, j) in tg if q == i]
                    if js:
                        masses.append(sum(float(w[b, h, i, j]) for j in js))
            assert float(got[li, h]) == pytest.approx(sum(masses) / len(masses), abs=1e-12), (pattern, li, h)
    with pytest.raises(ValueError, match="valid must be"):
        head_scores(layers, ids, pattern, valid[:, :5])


def test_a_head_on_exactly_the_targets_scores_one_and_a_near_miss_head_does_not():
    """Weights put only on the defined targets score exactly 1; weights on the near-miss patterns (itself,
    the next token, the key one step off the induction target) score what the loops say, below 1."""
    ids = torch.tensor(_TRICKY)
    B, L = ids.shape
    for pattern in ("previous", "duplicate", "induction"):
        exact = torch.zeros(B, 1, L, L, dtype=torch.float64)
        miss = torch.zeros(B, 1, L, L, dtype=torch.float64)
        for b, row in enumerate(_TRICKY):
            tg = _targets_by_loops(row, pattern)
            for i in range(L):
                js = [j for (q, j) in tg if q == i]
                for j in js:
                    exact[b, 0, i, j] = 1 / len(js)
                # near miss: one step later than the target (for duplicate/induction: itself or the next key)
                for j in js:
                    miss[b, 0, i, min(j + 1, L - 1)] += 1 / len(js)
                if not js:
                    exact[b, 0, i, i] = miss[b, 0, i, i] = 1.0
        assert float(head_scores([exact], ids, pattern)[0, 0]) == pytest.approx(1.0, abs=1e-12)
        want = []
        for b, row in enumerate(_TRICKY):
            tg = _targets_by_loops(row, pattern)
            for i in range(L):
                js = [j for (q, j) in tg if q == i]
                if js:
                    want.append(sum(float(miss[b, 0, i, j]) for j in js))
        s = float(head_scores([miss], ids, pattern)[0, 0])
        assert s == pytest.approx(sum(want) / len(want), abs=1e-12) and s < 0.9, (pattern, s)
