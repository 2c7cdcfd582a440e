"""ViT: shapes, weight capture through qkv.nn.AttentionModule, backends agree, rollout against hand loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.analysis import attention_rollout, capture
from qkv.models import ViT
from qkv.nn import capture_weights, set_backend


def test_vit_forward_capture_and_backends():
    torch.manual_seed(0)
    m = ViT(8, 2, 10, dim=16, depth=3, heads=2).eval()
    x = torch.rand(4, 1, 8, 8)
    out = m(x)
    assert out.shape == (4, 10)
    with capture_weights(m) as maps:
        m(x)
    assert len(maps) == 3 and all(w.shape == (4, 2, 17, 17) for _, w in maps)
    set_backend(m, "reference")
    torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)
    r = attention_rollout(capture(m, x))[:, 0, 1:].reshape(-1, m.grid, m.grid)  # the class token's map
    assert r.shape == (4, 4, 4) and (r >= 0).all() and (r.sum((1, 2)) <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        m(torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match="divide"):
        ViT(8, 3, 10)


def test_rollout_matches_hand_loops():
    g = torch.Generator().manual_seed(0)
    ws = [torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    got = attention_rollout(ws, residual=0.5).numpy()
    for b in range(2):
        R = np.eye(5)
        for w in ws:
            A = np.zeros((5, 5))
            for i in range(5):
                for j in range(5):
                    A[i, j] = 0.5 * (i == j) + 0.5 * sum(float(w[b, h, i, j]) for h in range(3)) / 3
            A = A / A.sum(1, keepdims=True)
            R = A @ R
        np.testing.assert_allclose(got[b], R, rtol=1e-12)
    with pytest.raises(ValueError, match="empty"):
        attention_rollout([])
