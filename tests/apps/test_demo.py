"""``qkv demo --quick``: the report folder, its summary, the data's morphemes against num2words, determinism."""

from __future__ import annotations

import os
import re

import pytest
from num2words import num2words

from qkv.apps.demo.data import german_tokens, make_dataset
from qkv.cli import main


def test_german_morphemes_spell_num2words():
    # the split into morphemes is an independent re-spelling: joined, it must be num2words' German word
    for n in range(1, 1000):
        assert "".join(german_tokens(n)) == num2words(n, lang="de"), n
    assert german_tokens(21) == ["ein", "und", "zwanzig"]
    assert german_tokens(345) == ["drei", "hundert", "fünf", "und", "vierzig"]


def test_dataset_split_is_disjoint_and_seeded():
    tr, te, _, _ = make_dataset(500, 100, 4, seed=3)
    assert not {e.numbers for e in tr} & {e.numbers for e in te}
    tr2, te2, _, _ = make_dataset(500, 100, 4, seed=3)
    assert tr == tr2 and te == te2


@pytest.mark.slow
def test_quick_demo_writes_report(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--seed", "0"]) == 0
    files = set(os.listdir(out))
    assert {"summary.md", "training_curves.png", "viewer.html"} <= files
    assert any(re.fullmatch(r"alignment_\d\.png", f) for f in files)
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) > 500, f
    with open(os.path.join(out, "summary.md"), encoding="utf-8") as fh:
        summary = fh.read()
    for label in ("no attention", "Bahdanau attention", "Transformer"):
        assert label in summary
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and "%" in ln]
    assert len(rows) == 3
    accs = [float(x) for x in re.findall(r"(\d+\.\d)% \|$", "\n".join(rows), flags=re.M)]
    assert len(accs) == 3 and all(0 <= a <= 100 for a in accs)
    # even the quick run shows what attention buys (seed 0, 100 steps of 32: about 39% against 7%)
    assert accs[1] > accs[0] + 15
    html = open(os.path.join(out, "viewer.html"), encoding="utf-8").read()
    assert "dec.0.cross" in html and "enc.0.attn" in html
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "summary.md" in printed


def test_same_seed_same_training():
    from qkv.apps.demo import DemoConfig, train_models

    cfg = DemoConfig(
        n_train=200,
        n_test=20,
        steps={"rnn": 4, "rnn+attention": 4, "transformer": 4},
        eval_every=4,
        hidden=16,
        emb=8,
        dim=16,
    )
    a, *_ = train_models(cfg, seed=5)
    b, *_ = train_models(cfg, seed=5)
    c, *_ = train_models(cfg, seed=6)
    for name in a:
        assert a[name][1].losses == b[name][1].losses
        assert a[name][1].samples == b[name][1].samples
    assert a["rnn"][1].losses != c["rnn"][1].losses
