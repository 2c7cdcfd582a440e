"""``qkv train lm``: a few steps make the loss fall; the baseline and text loader against hand computations."""

from __future__ import annotations

import math
import os

import torch

from qkv.apps.tasks import train_task
from qkv.apps.tasks.lm import load_stdlib_text, unigram_bits


def test_lm_quick_loss_falls(tmp_path):
    r = train_task("lm", out=str(tmp_path), quick=True, seed=0)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.3
    assert 0 < r.metric < 8 and 0 < r.baseline < 8
    assert os.path.exists(tmp_path / "sample.txt")


def test_text_is_stdlib_and_unigram_bits_by_hand():
    tr, va = load_stdlib_text(20_000, seed=1)
    assert len(tr) == 18_000 and len(va) == 2_000
    # real standard-library source: each part starts with a whole top-level *.py file of the folder of
    # os.py, byte for byte, and the held-out part starts with a different file
    root = os.path.dirname(os.__file__)
    sources = {}
    for f in sorted(os.listdir(root)):
        if f.endswith(".py"):
            with open(os.path.join(root, f), "rb") as fh:
                sources[f] = fh.read()

    def first_file(part: bytes) -> str:
        hits = [f for f, b in sources.items() if b and (part.startswith(b) or b.startswith(part))]
        assert hits, f"{part[:60]!r}... starts no standard-library file"
        return hits[0]

    assert first_file(tr) != first_file(va)
    t = torch.tensor([0, 0, 1, 2])
    v = torch.tensor([0, 3])
    # add-one smoothing over 256 bytes: p(0) = 3/260, p(3) = 1/260
    want = -(math.log2(3 / 260) + math.log2(1 / 260)) / 2
    assert abs(unigram_bits(t, v) - want) < 1e-12
