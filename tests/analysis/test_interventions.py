"""scale_heads: the head mask of Michel et al. through the hook_heads points; equal to scaling each head's
value projection (an independent oracle), gone after the block, refusing a mask of the wrong shape."""

from __future__ import annotations

import pytest
import torch

from qkv.analysis.interventions import attention_modules, scale_heads
from qkv.models import GPT


def test_scale_heads_equals_scaling_the_value_projection_and_cleans_up():
    torch.manual_seed(0)
    m = GPT(30, 16, 2, 4, max_len=16).double().eval()
    idx = torch.randint(0, 30, (2, 7))
    xi = torch.tensor([[1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    assert [n for n, _ in attention_modules(m)] == ["blocks.0.mixer", "blocks.1.mixer"]
    with torch.no_grad():
        with scale_heads(m, xi) as mods:
            got = m(idx)
        assert len(mods) == 2 and not any(a.has_hooks for _, a in mods)
        # the oracle: a head's output is linear in its values, so scale the value projection's rows instead
        for (_, a), row in zip(attention_modules(m), xi):
            s = row.repeat_interleave(4)  # head_dim 4
            a.v_proj.weight.mul_(s[:, None])
            a.v_proj.bias.mul_(s)
        torch.testing.assert_close(got, m(idx))


def test_scale_heads_refuses_a_mask_of_the_wrong_shape():
    m = GPT(30, 16, 2, 4, max_len=16)
    with pytest.raises(ValueError, match=r"xi must be \(layers=2, H\)"):
        with scale_heads(m, torch.ones(3, 4)):
            pass
    with pytest.raises(ValueError, match="4 heads, xi has 3 columns"):
        with scale_heads(m, torch.ones(2, 3)), torch.no_grad():
            m(torch.randint(0, 30, (1, 3)))
    assert not any(a.has_hooks for _, a in attention_modules(m))
