"""run_inspect (the `qkv inspect` command) on a short text, and its answers to bad input."""

import csv
import json
import re

import pytest
import torch

from qkv.analysis import capture, head_table
from qkv.analysis.inspect import run_inspect
from qkv.cli import main
from qkv.models import minilm

TEXT = "The cat sat on the mat, and the dog watched it."


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
    assert summary["tokens"][0] == "[CLS]" and summary["tokens"][-1] == "[SEP]"
    assert len(summary["head_map"]) == 72 and len(summary["collapse"]["entropy"]) == 6
    # the table is the measures of the captured weights, and the printed heads are its maxima
    model = minilm()
    enc = model.encode(TEXT)
    ref = head_table(capture(model, **enc))
    assert [r["name"] for r in ref] == [r["name"] for r in table]
    assert max(abs(a["sep"] - b["sep"]) for a, b in zip(ref, table)) < 1e-6
    printed = capsys.readouterr().out
    best_sep = max(table, key=lambda r: r["sep"])
    assert re.search(rf"{best_sep['name']} -> \[SEP\] {best_sep['sep']:.2f}", printed)
    best_prev = max(table, key=lambda r: r["prev"])
    assert f"{best_prev['name']} -> previous token" in printed
    for row in table:  # the PNG of each strongest head exists
        if row["name"] == best_sep["name"]:
            assert (out / f"head_{row['name']}.png").exists()
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
    assert main(["inspect", TEXT, "--model", str(folder), "--out", str(tmp_path / "o")]) == 0
    assert "2 layers x 4 heads" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "o" / "heads.csv")))
    assert len(rows) == 8 and (tmp_path / "o" / "viewer.html").stat().st_size > 0
    (folder / "model.safetensors").unlink()
    assert main(["inspect", TEXT, "--model", str(folder), "--out", str(tmp_path / "p")]) == 2
    assert "no .safetensors weights" in capsys.readouterr().err
