"""Kendall's tau against scipy (an independent implementation, ties included) and hand-counted cases;
top-k overlap and the pairwise agreement table by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv.analysis.rank_agreement import agreement, kendall_tau, topk_overlap


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # pairs: (1,2)+ (1,3)+ (2,3)- : (2 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="one length"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        kendall_tau([1, float("nan")], [1, 2])


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=30))
def test_kendall_tau_b_equals_scipy_with_ties(pairs):
    stats = pytest.importorskip("scipy.stats")
    a, b = zip(*pairs)
    want = stats.kendalltau(a, b).statistic
    got = kendall_tau(list(a), list(b))
    assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)


def test_topk_overlap_by_hand():
    assert topk_overlap([5, 4, 3, 2, 1], [1, 2, 3, 4, 5], 2) == 0.0
    assert topk_overlap([5, 4, 3, 2, 1], [5, 4, 1, 2, 3], 2) == 1.0
    assert topk_overlap([5, 4, 3, 2, 1], [5, 1, 4, 4, 3], 3) == pytest.approx(2 / 3)
    assert topk_overlap([1, 2], [2, 1], 10) == 1.0  # k clipped to the length
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap([1, 2], [1, 2], 0)


def test_agreement_rows_mean_over_examples_and_respect_valid():
    a = torch.tensor([[1.0, 2.0, 3.0, 9.0], [3.0, 2.0, 1.0, 9.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, -9.0], [1.0, 2.0, 3.0, -9.0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    (row,) = agreement({"a": a, "b": b}, valid=valid, k=1)
    assert (row["method_a"], row["method_b"], row["examples"]) == ("a", "b", 2)
    assert row["kendall_tau"] == pytest.approx(0.0)  # +1 and -1
    assert row["kendall_tau_std"] == pytest.approx(1.0)
    assert row["topk_overlap"] == pytest.approx(0.5)
    # without valid the 4th token counts; by magnitude it is the largest in both
    (row,) = agreement({"a": a, "b": b}, k=1)
    assert row["topk_overlap"] == 1.0
    rows = agreement({"x": a, "y": b, "z": a}, valid=valid)
    assert [(r["method_a"], r["method_b"]) for r in rows] == [("x", "y"), ("x", "z"), ("y", "z")]
    assert rows[1]["kendall_tau"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two"):
        agreement({"a": a})
    with pytest.raises(ValueError, match="one shape"):
        agreement({"a": a, "b": b[:, :3]})
