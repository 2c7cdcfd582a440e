"""run_inspect (the `qkv inspect` command) on a short text, and its answers to bad input."""

import csv
import json
import re

import numpy as np
import pytest
import torch

from qkv.apps.inspect import run_inspect
from qkv.cli import main
from qkv.models import minilm_path

TEXT = "The cat sat on the mat, and the dog watched it."


def _hf_head_table(text: str) -> tuple[list[str], list[dict[str, float]]]:
    """The measures of every head computed independently: Hugging Face's BERT (eager attention,
    ``output_attentions``) on the same checkpoint, and each measure written out with numpy."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    hf = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        atts = hf(**enc, output_attentions=True).attentions
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    L = len(tokens)
    idx = np.arange(L)
    punct = np.array([t in {",", "."} for t in tokens])
    rows = []
    for l, a in enumerate(atts):
        for h in range(a.shape[1]):
            p = a[0, h].double().numpy()
            rows.append(
                {
                    "name": f"L{l}H{h}",
                    "entropy": float(np.mean(-(p * np.log(np.maximum(p, 1e-300))).sum(1))),
                    "distance": float(np.mean((p * np.abs(idx[:, None] - idx[None, :])).sum(1))),
                    "cls": float(np.mean(p[:, 0])),
                    "sep": float(np.mean(p[:, L - 1])),
                    "punct": float(np.mean(p[:, punct].sum(1))),
                    "self": float(np.mean(np.diag(p))),
                    "prev": float(np.mean([p[i, i - 1] for i in range(1, L)])),
                    "next": float(np.mean([p[i, i + 1] for i in range(L - 1)])),
                }
            )
    return tokens, rows


def test_inspect_writes_its_files_and_prints_the_strongest_heads(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "insp"
    assert run_inspect(TEXT, out=str(out)) == 0
    for name in ("viewer.html", "grid.png", "rollout.png", "heads.csv", "heads.json", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "heads.csv")))
    assert len(rows) == 6 * 12 and rows[0]["name"] == "L0H0"
    table = json.loads((out / "heads.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["head_map"]) == 72 and len(summary["collapse"]["entropy"]) == 6
    # every measure of every head against Hugging Face's attention and the formulas written out here
    tokens, ref = _hf_head_table(TEXT)
    assert summary["tokens"] == tokens and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert [r["name"] for r in ref] == [r["name"] for r in table]
    for col in ("entropy", "distance", "cls", "sep", "punct", "self", "prev", "next"):
        err = max(abs(a[col] - b[col]) for a, b in zip(ref, table))
        assert err < 1e-4, f"{col}: off by {err:.3g} from the independent computation"
        assert max(abs(float(a[col]) - b[col]) for a, b in zip(rows, ref)) < 1e-4, f"heads.csv {col}"
    # the printed heads are the independent table's maxima
    printed = capsys.readouterr().out
    best_sep = max(ref, key=lambda r: r["sep"])
    assert re.search(rf"{best_sep['name']} -> \[SEP\] {best_sep['sep']:.2f}", printed)
    best_prev = max(ref, key=lambda r: r["prev"])
    assert re.search(rf"{best_prev['name']} -> previous token {best_prev['prev']:.2f}", printed)
    assert summary["strongest"]["sep"]["head"] == best_sep["name"]
    assert (out / f"head_{best_sep['name']}.png").exists()
    sr = summary["sink_rate"]  # Gu et al.'s rate, from the first-token column of the same weights
    cls = torch.tensor([r["cls"] for r in ref]).view(6, 12)
    assert sr["of"] == 72 and sr["heads"] == int((cls > 0.3).sum()) and sr["rate"] == pytest.approx(sr["heads"] / 72)
    assert f"sink rate {sr['rate']:.2f}: {sr['heads']} of 72 heads" in printed
    html = (out / "viewer.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "L0H0" in html


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused(tmp_path, capsys, text):
    assert run_inspect(text, out=str(tmp_path / "x")) == 2
    assert "text is empty" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_model_is_refused_through_the_cli(tmp_path, capsys):
    assert main(["inspect", "hello", "--model", "gpt-17", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "minilm" in err


@pytest.mark.slow
def test_inspect_runs_a_hugging_face_checkpoint_folder_on_qkv(tmp_path, capsys):
    """``--model DIR``: MiniLM's own folder through transformers on "qkv" gives the heads of the default run."""
    from qkv.models import minilm_path

    torch.set_num_threads(1)
    assert main(["inspect", TEXT, "--out", str(tmp_path / "a")]) == 0
    assert main(["inspect", TEXT, "--model", minilm_path(), "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert f"{minilm_path()}: 6 layers x 12 heads" in printed
    a = json.loads((tmp_path / "a" / "heads.json").read_text())
    b = json.loads((tmp_path / "b" / "heads.json").read_text())
    assert [r["name"] for r in a] == [r["name"] for r in b]
    assert max(abs(x[c] - y[c]) for x, y in zip(a, b) for c in ("sep", "cls", "prev", "entropy")) < 1e-4
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["tokens"] == json.loads((tmp_path / "a" / "summary.json").read_text())["tokens"]
    assert len(summary["collapse"]["rank1_hidden"]) == 7


def test_inspect_runs_any_decoder_checkpoint_folder(tmp_path, capsys):
    """A tiny Llama (grouped-query heads) saved as safetensors with a tokenizer: written and read offline."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from qkv.models import minilm_path

    folder = tmp_path / "tiny-llama"
    cfg = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaModel(cfg).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm_path()}/{name}", folder / name)
    assert main(["inspect", TEXT, "--model", str(folder), "--out", str(tmp_path / "o"), "--faithfulness"]) == 0
    assert "2 layers x 4 heads" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "o" / "heads.csv")))
    assert len(rows) == 8 and (tmp_path / "o" / "viewer.html").stat().st_size > 0
    # no qkv attention module in a transformers model: every method but value_norm, 6 methods -> 15 pairs
    pairs = list(csv.DictReader(open(tmp_path / "o" / "faithfulness.csv")))
    assert len(pairs) == 15 and not any("value_norm" in (r["method_a"], r["method_b"]) for r in pairs)
    (folder / "model.safetensors").unlink()
    assert main(["inspect", TEXT, "--model", str(folder), "--out", str(tmp_path / "p")]) == 2
    assert "no .safetensors weights" in capsys.readouterr().err
