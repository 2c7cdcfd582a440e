"""benchmarks/attention_as_explanation.py (the figures of docs/results.md's "Is attention an explanation?")
still runs end to end: every part, tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_part_runs_and_writes_its_figures(tmp_path):
    pytest.importorskip("num2words")  # the demo's data (extra demo)
    out = tmp_path / "f.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attention_as_explanation.py"), "--quick", "--steps", "3", "--n-test", "20", "--examples", "2",
           "--tvd-examples", "8", "--ig-steps", "2", "--sentences", "1", "--lm-steps", "2", "--every", "1",
           "--copy-steps", "2", "--every-copy", "1", "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)
    res = json.loads(out.read_text())
    for kind in ("rnn+attention", "transformer"):
        m = res["translator"]["models"][kind]
        assert (
            "attention vs leave_one_out" in m["agreement"]
            and -1 <= m["agreement"]["attention vs leave_one_out"]["kendall_tau"] <= 1
        )
        assert all(0 <= v["exact_match"] <= 1 and 0 <= v["tvd_median"] <= 1 for v in m["interventions"].values())
    assert set(res["translator"]["models"]["transformer"]["interventions"]) == {
        "permuted dec.*.cross_attn", "uniform dec.*.cross_attn", "permuted *", "uniform *"
    }  # fmt: skip
    assert res["minilm"]["pairs"]["value_norm vs leave_one_out"]["sentences"] == 1
    assert [r["step"] for r in res["lm"]["history"]] == [0, 1, 2]
    assert len(res["lm"]["history"][-1]["ascii"]["induction"]) == 4  # layers
    assert [r["step"] for r in res["induction"]["history"]] == [0, 1, 2]
