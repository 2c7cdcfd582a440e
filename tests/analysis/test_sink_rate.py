"""The attention-sink rate of Gu et al. (ICLR 2025) on weights whose answer is worked out by hand."""

import pytest
import torch

from qkv.analysis import sink_rate, sink_scores


def _w(*heads):
    return torch.tensor([list(heads)], dtype=torch.float64)  # (1, H, L, Lk)


# mean weight on the first token, by hand: (1 + 1 + 0)/3 = 2/3, 1/3; (1 + 0.2 + 0)/3 = 0.4, 0.5/3 = 1/6
L0 = _w([[1, 0, 0], [1, 0, 0], [0, 1, 0]], [[1 / 3] * 3] * 3)
L1 = _w([[1, 0, 0], [0.2, 0.8, 0], [0, 0.5, 0.5]], [[0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5]])


def test_sink_scores_and_rate_by_hand():
    a = sink_scores([L0, L1])
    torch.testing.assert_close(a, torch.tensor([[2 / 3, 1 / 3], [0.4, 1 / 6]], dtype=torch.float64))
    assert sink_rate([L0, L1]) == 0.75  # three of four heads above 0.3
    assert sink_rate([L0, L1], threshold=0.5) == 0.25  # only L0H0
    assert sink_rate(torch.stack([L0, L1])) == 0.75  # a stacked (layers, B, H, L, L) tensor


def test_padded_queries_are_left_out():
    valid = torch.tensor([[False, True, True]])
    # without row 0: (1 + 0)/2 = 0.5, (1/3 + 1/3)/2 = 1/3, (0.2 + 0)/2 = 0.1, (0 + 0)/2 = 0
    torch.testing.assert_close(
        sink_scores([L0, L1], valid), torch.tensor([[0.5, 1 / 3], [0.1, 0.0]], dtype=torch.float64)
    )
    assert sink_rate([L0, L1], valid=valid) == 0.5


def test_the_threshold_is_strict_and_checked():
    w = torch.tensor([[[[0.3, 0.7]]]], dtype=torch.float64)
    assert sink_rate([w]) == 0.0 and sink_rate([w], threshold=0.29) == 1.0
    with pytest.raises(ValueError, match="threshold must be in"):
        sink_rate([w], threshold=1.0)
    with pytest.raises(ValueError, match="no attention layers"):
        sink_rate([])
