"""LinformerSelfAttention against its formula written out in float64."""

from __future__ import annotations

import pytest
import torch

from qkv.nn.linformer import LinformerSelfAttention


@pytest.mark.parametrize("share_kv", [False, True])
def test_matches_formula(share_kv: bool) -> None:
    torch.manual_seed(0)
    m = LinformerSelfAttention(8, 2, max_len=20, k=5, share_kv=share_kv).double()
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    E = m.E[:, :11]
    Fm = E if m.F is None else m.F[:, :11]
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        q, k, v = m.q_proj(x)[..., sl], m.k_proj(x)[..., sl], m.v_proj(x)[..., sl]
        w = torch.softmax(q @ (E @ k).transpose(-1, -2) / 2.0, dim=-1)  # scale 1/sqrt(4)
        outs.append(w @ (Fm @ v))
    want = m.out_proj(torch.cat(outs, -1))
    torch.testing.assert_close(m(x), want)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randn(1, 21, 8, dtype=torch.float64))
