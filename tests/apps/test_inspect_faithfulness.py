"""``qkv inspect "text" --faithfulness`` (qkv.apps.inspect_faithfulness): faithfulness.csv, importance.png and the
token-importance rows of the viewer, against an independent computation (Hugging Face's BERT on the same
checkpoint, scipy's Kendall tau)."""

import csv
import json
import re

import numpy as np
import pytest
import torch

from qkv.cli import main
from qkv.models import minilm_path

SHORT = "The cat sat on the mat."


@pytest.mark.slow
def test_inspect_faithfulness_against_an_independent_computation(tmp_path, capsys):
    """--faithfulness: faithfulness.csv has one row per pair of methods; the leave-one-out and attention rows the
    viewer shows equal Hugging Face's BERT on the same checkpoint (token dropped, mean-pooled, cosine), and the
    csv's tau equals scipy's on those rows."""
    transformers = pytest.importorskip("transformers")
    stats = pytest.importorskip("scipy.stats")
    torch.set_num_threads(1)
    out = tmp_path / "f"
    assert main(["inspect", SHORT, "--faithfulness", "--out", str(out)]) == 0
    assert "agreement of token importances" in capsys.readouterr().out
    pairs = list(csv.DictReader(open(out / "faithfulness.csv")))
    assert list(pairs[0]) == ["method_a", "method_b", "kendall_tau", "topk_overlap", "k", "tokens"]
    methods = ["attention", "rollout", "flow", "value_norm", "grad_x_input", "integrated_gradients", "leave_one_out"]
    assert len(pairs) == 21 and {r["method_a"] for r in pairs} | {r["method_b"] for r in pairs} == set(methods)
    assert all(-1 <= float(r["kendall_tau"]) <= 1 and 0 <= float(r["topk_overlap"]) <= 1 for r in pairs)
    assert (out / "importance.png").stat().st_size > 5_000
    html = (out / "viewer.html").read_text()
    meta = json.loads(re.search(r'id="qkv-meta">(.*?)</script>', html, re.S).group(1))
    imp = {r["name"]: np.array(r["values"]) for r in meta["importance"]["rows"]}
    assert list(imp) == methods
    # the oracle: transformers' BertModel, eager attention, on the same checkpoint
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    hf = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    ids = tok(SHORT, return_tensors="pt")["input_ids"]
    L = ids.shape[1]
    assert meta["importance"]["tokens"] == tok.convert_ids_to_tokens(ids[0])

    def emb(x):
        with torch.no_grad():
            return hf(input_ids=x, output_attentions=True)

    full = emb(ids)
    e0 = full.last_hidden_state.mean(1)[0]
    loo = [
        1 - float(torch.cosine_similarity(e0, emb(ids[:, torch.arange(L) != i]).last_hidden_state.mean(1)[0], 0))
        for i in range(L)
    ]
    np.testing.assert_allclose(imp["leave_one_out"], loo, atol=2e-5)
    np.testing.assert_allclose(imp["attention"], full.attentions[-1][0].mean(0).mean(0).double().numpy(), atol=1e-5)
    words = slice(1, L - 1)
    row = next(r for r in pairs if (r["method_a"], r["method_b"]) == ("attention", "leave_one_out"))
    want = stats.kendalltau(imp["attention"][words], imp["leave_one_out"][words]).statistic
    assert float(row["kendall_tau"]) == pytest.approx(want, abs=1e-5) and row["tokens"] == str(L - 2)


def test_faithfulness_flag_is_parsed():
    from qkv.cli import build_parser

    assert build_parser().parse_args(["inspect", "x", "--faithfulness"]).faithfulness is True
    assert build_parser().parse_args(["inspect", "x"]).faithfulness is False
