"""``qkv train recsys``: a few steps make the loss fall; the generator's distribution is a distribution;
unknown tasks exit with code 2."""

from __future__ import annotations

import numpy as np

from qkv.apps.tasks import train_task
from qkv.apps.tasks.recsys import N_ITEMS, PER, generate_histories, next_item_distribution
from qkv.cli import main


def test_recsys_quick_loss_falls():
    r = train_task("recsys", quick=True, seed=0)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5
    assert 0 <= r.metric <= 1 and 0 <= r.baseline <= 1


def test_generator_structure():
    p = next_item_distribution(PER - 1, (0, 3))
    assert p.shape == (N_ITEMS,) and abs(p.sum() - 1) < 1e-12
    assert p.argmax() == 0  # the successor of the last item of genre 0 wraps to its first item
    users = generate_histories(50, seed=0)
    succ = np.mean([b == (a // PER) * PER + (a % PER + 1) % PER for s, _ in users for a, b in zip(s, s[1:])])
    assert 0.5 < succ < 0.75  # about P_NEXT plus chance


def test_unknown_task_exit_code(capsys):
    assert main(["train", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
