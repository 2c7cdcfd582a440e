import torch

import qkv
from oracle import check_backend
from qkv import masks


def test_sdpa_meets_tolerance_rule_on_gqa_causal_rectangular():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    check_backend("sdpa", q, k, v, mask=masks.causal())
    check_backend("reference", q, k, v, mask=masks.causal())
    assert qkv.attention(q, k, v).shape == (2, 4, 5, 6)
