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
