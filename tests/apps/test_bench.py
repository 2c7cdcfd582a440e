"""``qkv bench`` on a tiny config writes its table, raw results and plot; its methods are the peers and the
registered exact backends, so a backend added in one file (``tests/backends/*_backend.py``) is timed with
no other edit; the memory probe sees a known allocation; the CLI reaches ``run_bench``."""

from __future__ import annotations

import json

import pytest
import torch

import backend_files
from qkv.apps import bench
from qkv.backends import registered
from qkv.cli import build_parser


def test_run_bench_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "b"
    rc = bench.run_bench(str(out), quick=True, sizes=(64,), masks=("causal", "sliding_window(16)"), repeats=1)
    assert rc == 0
    md = (out / "bench.md").read_text()
    assert "| causal | 64 | 8 | fwd |" in md and "| sliding_window(16) | 64 | 8 | fwd+bwd |" in md
    assert "(1.00x)" in md  # SDPA against itself
    rows = json.loads((out / "bench.json").read_text())
    exact = {n for n, b in registered().items() if b.exact and b.automatic and b.available()}
    assert {r["method"] for r in rows} == (exact | {"sdpa"}) - {"flex"}  # no flex sizes with quick
    assert all(r["ms"] and r["ms"] > 0 for r in rows)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench.md" in capsys.readouterr().out
    assert "Matmul peak in float32" in md and "GFLOP/s (peak)" in md
    for r in rows:  # achieved rate of the work the mask leaves, and its fraction of the measured peak
        want = bench.useful_flops(r["mask"], r["L"], r["H"], r["mode"]) / (r["ms"] / 1000) / 1e9
        assert abs(r["extra"]["gflops"] - want) < 1e-6 * want and r["extra"]["peak"] > 0 and r["dtype"] == "float32"
    # every method's fraction is of the one matmul peak measured at the start (not of another quantity)
    peaks = [r["extra"]["gflops"] * 1e9 / r["extra"]["peak"] for r in rows]
    assert max(peaks) < 1.000001 * min(peaks)


def test_run_bench_in_bfloat16(tmp_path):
    out = tmp_path / "b"
    rc = bench.run_bench(str(out), quick=True, sizes=(64,), masks=("causal",), repeats=1, dtype="bfloat16")
    assert rc == 0
    md = (out / "bench.md").read_text()
    assert "bfloat16, B=1" in md and "Matmul peak in bfloat16" in md
    assert {r["dtype"] for r in json.loads((out / "bench.json").read_text())} == {"bfloat16"}


@pytest.mark.parametrize("backend", list(backend_files.extra().values()), ids=lambda b: b.name)
def test_a_backend_added_in_one_file_is_timed(tmp_path, backend):
    """Registered, it is a column of ``qkv bench`` (timed through qkv.attention, its ratio to SDPA from the
    same run); unregistered, it is gone."""
    with backend_files.registered(backend) as name:
        assert name in bench.methods()
        out = tmp_path / "b"
        assert bench.run_bench(str(out), quick=True, sizes=(32,), masks=("causal",), repeats=1) == 0
        rows = [r for r in json.loads((out / "bench.json").read_text()) if r["method"] == name]
        assert [(r["mask"], r["mode"]) for r in rows] == [("causal", "fwd"), ("causal", "fwd+bwd")]
        assert all(r["ms"] and r["ms"] > 0 for r in rows)
        assert f"{name} ms (x SDPA)" in (out / "bench.md").read_text()
    assert name not in bench.methods()


def test_live_pairs_count_what_the_mask_leaves():
    for kind in ("dense", "causal", "sliding_window(5)", "document(3)"):
        for L in (1, 4, 17):
            mask = bench.make_mask(kind, L)
            want = L * L if mask is None else int(mask.to_dense(1, 1, L, L).sum())
            assert bench.live_pairs(kind, L) == want, (kind, L)


def test_matmul_peak_is_a_rate():
    rate = bench.matmul_peak(torch.float32, max_n=256)
    assert 1e6 < rate < 1e15


def test_peak_memory_sees_a_known_allocation():
    n = 64 * 2**20  # 64 MiB
    peak = bench.peak_memory(lambda: torch.ones(n // 4).sum())
    if peak is None:
        pytest.skip("the memory probe needs a writable /proc/self/clear_refs (Linux); the bench reports n/a")
    assert n * 0.9 < peak < n * 1.5
    small = bench.peak_memory(lambda: torch.ones(1000).sum())
    assert small is not None and small < n / 4


def test_skips_what_would_take_too_long_and_says_why():
    r = bench.measure("reference", "dense", 8192, 8, "fwd+bwd", max_call_s=1000.0, reference_bytes=2**30)
    assert r.ms is None and "GiB" in r.note
    r = bench.measure("sdpa", "dense", 32768, 8, "fwd+bwd", max_call_s=1.0)
    assert r.ms is None and "skipped" in r.note


def test_cli_bench_options():
    args = build_parser().parse_args(["bench", "--quick", "--out", "x"])
    assert args.quick and args.out == "x" and args.dtype == "float32"
    assert build_parser().parse_args(["bench", "--dtype", "bfloat16"]).dtype == "bfloat16"
