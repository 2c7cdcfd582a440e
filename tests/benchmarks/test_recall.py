"""benchmarks/recall.py (MQAR): the data against a plain-Python reading of Zoology's layout, decode state
against the bytes qkv's own decoding caches hold, matched parameters, and one tiny run end to end in
which exact attention must recall far above chance."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qkv.masks import causal, sliding_window
from qkv.nn import GrowingKVCache, LinearSelfAttention, MultiHeadAttention, SelectiveSSM, SlidingWindowKVCache

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "recall.py"


def _load():
    spec = importlib.util.spec_from_file_location("recall_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["recall_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


R = _load()


@pytest.mark.parametrize("length,pairs,vocab", [(16, 2, 16), (64, 8, 256), (64, 16, 40), (512, 64, 256)])
def test_mqar_layout(length, pairs, vocab):
    ids, targets = R.mqar(50, length, pairs, vocab, torch.Generator().manual_seed(length + pairs))
    assert ids.shape == targets.shape == (50, length)
    half, ctx = vocab // 2, 2 * pairs
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        keys, values = row[0:ctx:2], row[1:ctx:2]
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)
        assert len(set(values)) == pairs and all(half <= v < vocab for v in values)
        answer = dict(zip(keys, values))
        asked = {}
        for p in range(ctx, length):
            if row[p] == 0:
                assert tgt[p] == -100
                continue
            assert (p - ctx) % 2 == 0 and row[p] in answer and row[p] not in asked
            asked[row[p]] = p
            assert tgt[p] == answer[row[p]]  # the value is the next token to predict at the query
        assert set(asked) == set(keys)  # every key asked exactly once
        assert all(t == -100 for t in tgt[:ctx])


def test_mqar_gaps_follow_the_power_law():
    # p(gap = i) ∝ i^(a-1): with a = 0.01 the first slot is ~30x likelier than the 30th; with a = 1, uniform
    L, n = 128, 1
    first = []
    for a in (0.01, 1.0):
        ids, _ = R.mqar(4000, L, n, 16, torch.Generator().manual_seed(0), power_a=a)
        slot = ((ids[:, 2:] != 0).float().argmax(-1)) // 2
        first.append(float((slot == 0).float().mean()))
    space = (L - 2) // 2
    assert first[1] == pytest.approx(1 / space, abs=0.01)
    harmonic = sum(i**-0.99 for i in range(1, space + 1))
    assert first[0] == pytest.approx(1 / harmonic, abs=0.03)


def test_bad_slices_are_refused():
    with pytest.raises(ValueError, match="pairs"):
        R.mqar(1, 16, 5, 64, torch.Generator())
    with pytest.raises(ValueError, match="vocab"):
        replace(R.Config(), vocab=64, lengths=(512,)).check()  # 64 pairs need 64 keys
    with pytest.raises(ValueError, match="window"):
        replace(R.Config(), window=63).check()


def _cache_bytes(model, length: int) -> int:
    """Bytes held by qkv's own decoding caches after ``length`` tokens, block by block (float32)."""
    total = 0
    x = torch.randn(1, length, model.emb.embedding_dim)
    for kind, blk in zip(model.kinds, model.blocks):
        m = blk.mixer
        with torch.no_grad():
            if isinstance(m, MultiHeadAttention):
                cache = SlidingWindowKVCache(model.window + 1) if kind == "window" else GrowingKVCache()
                mask = causal() & sliding_window(model.window) if kind == "window" else causal()
                for t in range(length):  # decode token by token
                    m(x[:, t : t + 1], mask=mask, cache=cache)
                total += cache.k.numel() + cache.v.numel()
            elif isinstance(m, LinearSelfAttention):
                if m.kind == "linear":
                    c = m.init_cache()
                    m(x, mask=causal(), cache=c)
                    total += c.state.kv.numel() + c.state.z.numel()
                else:  # Performer has no decoding cache in qkv: its state is Σ φ(k) vᵀ (m, Dh) and Σ φ(k) (m,)
                    m_feat = m.projection.shape[0]
                    total += m.num_heads * (m_feat * m.head_dim + m_feat)
            elif isinstance(m, SelectiveSSM):
                s = m.init_cache()
                m(x, cache=s)
                total += s.h.numel() + s.conv.numel()
    return 4 * total


@pytest.mark.parametrize("mixer", R.MIXERS)
def test_decode_state_matches_the_caches(mixer):
    cfg = replace(R.Config(), window=8, features=16)
    model = R.Recaller(mixer, cfg, 32, 64, 0)
    for length in (10, 20):  # past the window's 9 keys (its ring buffer is allocated whole from the start)
        assert model.decode_state_bytes(length) == _cache_bytes(model, length), (mixer, length)


def test_state_formulas():
    cfg = R.Config()  # 2 layers, 4 heads, window 32, 64 features, d_state 16, expand 1
    w, L = 64, 512
    dh = w // cfg.heads
    got = {m: R.Recaller(m, cfg, w, 4 * w, 0).decode_state_bytes(L) for m in R.MIXERS}
    assert got["exact"] == 4 * 2 * 2 * w * L
    assert got["window"] == 4 * 2 * 2 * w * (cfg.window + 1)
    assert got["linear"] == 4 * 2 * cfg.heads * (dh * dh + dh)
    assert got["performer"] == 4 * 2 * cfg.heads * (cfg.features * dh + cfg.features)
    assert got["ssm"] == 4 * 2 * (w * cfg.d_state + w * 3)
    assert got["hybrid"] == got["ssm"] // 2 + got["exact"] // 2


@pytest.mark.parametrize("width", [32, 64])
def test_parameter_counts_are_matched(width):
    cfg = R.Config()
    counts = {m: R.Recaller(m, cfg, width, R.matched_d_ff(m, cfg, width), 0).block_params() for m in R.MIXERS}
    for m, c in counts.items():
        assert abs(c - counts["exact"]) <= 0.01 * counts["exact"], (m, counts)


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    # one length, one seed, exact attention, 100 steps (about 5 CPU-seconds): it must recall far above
    # chance (0.8%) and above copying a random value from the context (12.5% with 8 pairs); seeds 0-2 gave 94-100%
    out = tmp_path / "recall"
    cmd = [sys.executable, str(SCRIPT), "--mixers", "exact", "--lengths", "64", "--widths", "64", "--seeds", "0"]
    cmd += ["--pairs", "8", "--steps", "100", "--test-seqs", "64", "--workers", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| exact | 64 | 99,968 | 256 | 1024 B | 64.0 KiB | 64.0 KiB |" in proc.stdout
    assert "recall: 100%" in proc.stderr  # the progress bar
    assert (out / "recall.md").read_text().strip() == proc.stdout.strip()
    assert (out / "recall.png").stat().st_size > 5000
    (run,) = json.loads((out / "recall.json").read_text())["runs"]
    assert run["accuracy"]["64/8"] >= 80.0, run


def test_window_reach_bounds():
    # a query stands after its value: a window of 0 reaches none, one as long as the sequence all of them
    cfg = replace(R.Config(), test_seqs=16)
    assert R.within_window(replace(cfg, window=0), 64, 8) == 0.0
    assert R.within_window(replace(cfg, window=64), 64, 8) == 100.0
    assert 0.0 < R.within_window(replace(cfg, window=32), 64, 8) < 100.0
