"""``qkv inspect --syntax`` on a few sentences: the printed table and syntax.json against an independent
computation (Hugging Face's BERT, eager attention, on the same checkpoint; word-level attention and the
most-attended word written out in numpy), and its answers to bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from qkv.analysis.syntax import OFFSETS
from qkv.analysis.syntax_sentences import RELATIONS, template_sentences
from qkv.cli import build_parser, main
from qkv.models import minilm_path

N = 12


def _hf_accuracy(sentences) -> np.ndarray:
    """(relations, layers, heads) accuracies from transformers' BertModel, one unpadded sentence at a time."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    hf = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    hits = np.zeros((len(RELATIONS), 6, 12))
    count = np.zeros(len(RELATIONS))
    for s in sentences:
        enc = tok(s.text, return_tensors="pt")
        with torch.no_grad():
            att = np.stack([a[0].double().numpy() for a in hf(**enc, output_attentions=True).attentions])
        # word -> pieces, by tokenizing each word alone (Clark et al.'s tokenize_and_align)
        spans, t = [], 1
        for w in s.words:
            k = len(tok.tokenize(w))
            spans.append(list(range(t, t + k)))
            t += k
        assert t == enc["input_ids"].shape[1] - 1
        W = len(spans)
        wa = np.zeros((6, 12, W, W))
        for a, pa in enumerate(spans):
            for b, pb in enumerate(spans):
                wa[:, :, a, b] = att[:, :, pa][:, :, :, pb].sum(-1).mean(-1)
        for a, b, n in s.relations:
            row = wa[:, :, a].copy()
            row[:, :, a] = -1.0  # the word itself is no candidate
            r = RELATIONS.index(n)
            hits[r] += row.argmax(-1) == b
            count[r] += 1
    return hits / count[:, None, None]


def test_inspect_syntax_prints_the_table_of_an_independent_computation(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "syn"
    assert main(["inspect", "--syntax", "--sentences", str(N), "--seed", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads((out / "syntax.json").read_text())
    assert got["relations"] == list(RELATIONS) and got["offsets"] == list(OFFSETS) and got["sentences"] == N
    sents = template_sentences(N, seed=4)
    want = _hf_accuracy(sents)
    np.testing.assert_allclose(np.array(got["accuracy"]), want, atol=1e-12)
    assert "minilm: 6 layers x 12 heads on 12 template sentences (seed 4)" in printed
    for r, name in enumerate(RELATIONS):
        pairs = [(a, b) for s in sents for a, b, n in s.relations if n == name]
        flat = int(np.argmax(want[r]))
        head = f"L{flat // 12}H{flat % 12}"
        base = [sum(b - a == k for a, b in pairs) / len(pairs) for k in OFFSETS]
        k = int(np.argmax(base))
        line = next(ln for ln in printed.splitlines() if ln.strip().startswith(name + " "))
        assert re.split(r"\s+", line.strip()) == [
            name,
            str(len(pairs)),
            head,
            f"{100 * want[r].max():.1f}%",
            f"{OFFSETS[k]:+d}",
            f"{100 * base[k]:.1f}%",
        ], line
        assert got["best"][r]["name"] == head and got["best"][r]["n"] == len(pairs)


def test_inspect_syntax_on_a_hugging_face_folder_gives_the_same_table(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.set_num_threads(1)
    assert main(["inspect", "--syntax", "--sentences", "6", "--out", str(tmp_path / "a")]) == 0
    assert (
        main(["inspect", "--syntax", "--sentences", "6", "--model", minilm_path(), "--out", str(tmp_path / "b")]) == 0
    )
    a = json.loads((tmp_path / "a" / "syntax.json").read_text())
    b = json.loads((tmp_path / "b" / "syntax.json").read_text())
    assert a["best"] == b["best"] and np.abs(np.array(a["accuracy"]) - np.array(b["accuracy"])).max() == 0


def test_inspect_syntax_refuses_bad_input(tmp_path, capsys):
    assert main(["inspect", "some text", "--syntax", "--out", str(tmp_path / "x")]) == 2
    assert "give it no text" in capsys.readouterr().err
    assert main(["inspect", "--syntax", "--sentences", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--sentences must be >= 1" in capsys.readouterr().err
    assert main(["inspect", "--syntax", "--model", "gpt-17", "--out", str(tmp_path / "z")]) == 2
    assert "unknown model 'gpt-17'" in capsys.readouterr().err
    assert main(["inspect", "--out", str(tmp_path / "w")]) == 2  # neither a text nor --syntax
    assert "text is empty" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "xyzw")
    args = build_parser().parse_args(["inspect", "--syntax"])
    assert args.syntax and args.text is None and args.sentences == 500 and args.seed == 0
