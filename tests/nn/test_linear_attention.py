"""LinearSelfAttention: equals the projections + backend written out, recurrent step equals the causal
forward, Performer redraws its features on schedule, weight capture records the implied weights."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.masks import causal
from qkv.nn import capture_weights
from qkv.nn.linear_attention import LinearSelfAttention


@pytest.mark.parametrize("kind", ["linear", "performer", "nystrom"])
def test_matches_backend_call(kind: str) -> None:
    torch.manual_seed(0)
    m = LinearSelfAttention(12, 3, kind, num_features=16, num_landmarks=4).double().eval()
    x = torch.randn(2, 8, 12, dtype=torch.float64)
    mask = None if kind == "nystrom" else causal()
    opts = {"linear": {}, "performer": {"projection": m.projection}, "nystrom": {"num_landmarks": 4}}[kind]
    q, k, v = (p(x).view(2, 8, 3, 4).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    o = qkv.attention(q, k, v, mask=mask, backend=kind, **opts)
    want = m.out_proj(o.transpose(1, 2).reshape(2, 8, 12))
    torch.testing.assert_close(m(x, mask=mask), want)
    with capture_weights(m) as maps:
        m(x, mask=mask)
    assert len(maps) == 1 and maps[0][1].shape == (2, 3, 8, 8)
    # switched to exact attention, the same weights give softmax attention
    qkv.nn.set_backend(m, "reference")
    exact = m.out_proj(qkv.attention(q, k, v, mask=mask).transpose(1, 2).reshape(2, 8, 12))
    torch.testing.assert_close(m(x, mask=mask), exact)


def test_step_equals_causal_forward() -> None:
    torch.manual_seed(0)
    m = LinearSelfAttention(12, 3, "linear").double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    full = m(x, mask=causal())
    state = None
    for t in range(9):
        o, state = m.step(x[:, t], state)
        torch.testing.assert_close(o, full[:, t])


def test_performer_redraws_in_training_only() -> None:
    m = LinearSelfAttention(8, 2, "performer", num_features=8, redraw_interval=2)
    x = torch.randn(1, 5, 8)
    p0 = m.projection.clone()
    m.train()
    m(x)
    m(x)
    assert torch.equal(m.projection, p0)
    m(x)  # the third training call redraws
    assert not torch.equal(m.projection, p0)
    p1 = m.projection.clone()
    m.eval()
    for _ in range(5):
        m(x)
    assert torch.equal(m.projection, p1)
    with pytest.raises(ValueError, match="kind"):
        LinearSelfAttention(8, 2, "cosine")
