"""``qkv train vit``: a few steps make the loss fall and the rollout picture is written."""

from __future__ import annotations

import os

import pytest

from qkv.apps.tasks import train_task
from qkv.apps.tasks.vit import load_digits_split


@pytest.mark.slow
def test_vit_quick_loss_falls(tmp_path):
    r = train_task("vit", out=str(tmp_path), quick=True, seed=0)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5
    assert 0 <= r.metric <= 1 and 0.05 < r.baseline < 0.2
    assert os.path.getsize(tmp_path / "rollout.png") > 1000


def test_digits_split_is_disjoint_and_complete():
    xtr, ytr, xte, yte = load_digits_split(0)
    assert xtr.shape[1:] == (1, 8, 8) and len(ytr) + len(yte) == 1797
    assert float(xtr.max()) == 1.0 and float(xtr.min()) == 0.0
