"""``qkv train caption``: shapes, the metrics by hand, a seeded run repeats exactly, and a small run's
cross-attention captioner beats the same model decoding from one pooled vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.apps.tasks import train_task
from qkv.apps.tasks.caption import CaptionConfig, PatchEncoder, build_model, exact_accuracy, grounding, train

TINY = CaptionConfig(dim=32, heads=2, enc_layers=1, dec_layers=2, steps=12, batch=8, n_test=40)


def test_shapes():
    enc = PatchEncoder(32, 2, 1)
    assert enc.grid == (4, 8)
    x = torch.rand(3, 1, 32, 64)
    mem, lengths = enc(x)
    assert mem.shape == (3, 32, 32) and lengths is None
    for bottleneck, S in ((False, 32), (True, 1)):
        m = build_model(TINY, bottleneck)
        assert m.memory(x)[0].shape == (3, S, 32)
        tin = torch.zeros(3, 4, dtype=torch.long)
        assert m(x, None, tin).shape == (3, 4, 13)
    with pytest.raises(ValueError, match=r"images must be \(B, 1, 32, 64\)"):
        enc(torch.rand(3, 1, 32, 32))


def test_exact_accuracy_and_grounding_by_hand():
    assert exact_accuracy([(1, 2, 3), (4, 5, 6)], [[1, 2, 3], [4, 5]]) == 0.5
    # grid 4 x 8 of 8x8 patches; the digits' boxes are (top, left, bottom, right)
    boxes = [np.array([[0, 0, 8, 8], [16, 24, 24, 32]])]
    attn = torch.zeros(1, 3, 32)
    attn[0, 0, 0] = 1.0  # word 0 peaks on patch (0, 0): inside box 0
    attn[0, 1, 2 * 8 + 3] = 1.0  # word 1 peaks on patch (2, 3): centre (20, 28), inside box 1
    attn[0, 2, 5] = 1.0  # a third word has no digit: a miss
    assert grounding(attn, [3], boxes, (4, 8), 8) == (2, 3)
    attn[0, 1] = 0.0
    attn[0, 1, 2 * 8 + 4] = 1.0  # the next patch to the right: centre (20, 36), outside
    assert grounding(attn, [2], boxes, (4, 8), 8) == (1, 2)
    with pytest.raises(ValueError, match="attn must be"):
        grounding(attn[:, :, :5], [2], boxes, (4, 8), 8)


def test_seeded_runs_repeat_exactly():
    a = train(quick=True, seed=1, cfg=TINY)
    b = train(quick=True, seed=1, cfg=TINY)
    assert a.losses == b.losses and a.metric == b.metric and a.baseline == b.baseline
    assert a.model is not None and b.model is not None
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.losses != train(quick=True, seed=2, cfg=TINY).losses


@pytest.mark.slow
def test_quick_run_attention_beats_pooled_vector(tmp_path):
    r = train_task("caption", out=str(tmp_path), quick=True, seed=0)
    assert r.metric > r.baseline + 0.1, (r.metric, r.baseline)
    assert sum(r.losses[-20:]) < sum(r.losses[:20])
    ground = float(next(n for n in r.notes if n.startswith("grounding")).split()[2].rstrip("%")) / 100
    assert ground > 0.3  # the chance level is 1/32
    assert (tmp_path / "caption_attention.png").stat().st_size > 10_000
