"""``qkv train speech``: word error rate by hand, the encoder's shapes and padding, the missing-espeak exit,
a seeded run repeats (to rounding), and a small run's attention model beats the one-vector baseline."""

from __future__ import annotations

import shutil

import pytest
import torch

from qkv.apps.tasks import run_task, speech, spoken
from qkv.apps.tasks.speech import (
    SpeechConfig,
    SpeechEncoder,
    build_model,
    edit_distance,
    subsampled_lengths,
    train,
    word_error_rate,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)

TINY = SpeechConfig(n_train=64, n_test=16, max_digits=3, dim=32, heads=2, enc_layers=1, dec_layers=1, steps=6, batch=8)


def test_edit_distance_and_wer_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], []) == 2 and edit_distance([1], [1]) == 0
    assert edit_distance([4, 7, 2], [4, 2]) == 1  # one deletion
    assert edit_distance([4, 7, 2], [2, 7, 4]) == 2  # two substitutions
    # 1 + 0 + 2 errors over 3 + 1 + 2 reference words
    assert word_error_rate([(4, 7, 2), (1,), (5, 5)], [[4, 2], [1], []]) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="equally many"):
        word_error_rate([(1,)], [])


def test_encoder_shapes_and_padding():
    torch.manual_seed(0)
    enc = SpeechEncoder(32, 2, 2).eval()
    for L in (1, 2, 3, 4, 5, 37, 40):
        h, lens = enc(torch.randn(2, L, 40))
        assert h.shape == (2, (L + 3) // 4, 32) and lens.tolist() == [(L + 3) // 4] * 2
    assert subsampled_lengths(torch.tensor([1, 4, 5, 8, 9])).tolist() == [1, 1, 2, 2, 3]
    # a row padded with junk encodes its real frames exactly as when it is alone
    x = torch.randn(1, 37, 40)
    alone, _ = enc(x)
    batch = torch.cat([x, torch.randn(1, 23, 40) * 5], 1)
    padded, lens = enc(torch.cat([batch, torch.randn(1, 60, 40)]), torch.tensor([37, 60]))
    assert lens.tolist() == [10, 15]
    torch.testing.assert_close(padded[0, :10], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"x must be \(B, L, 40\)"):
        enc(torch.randn(2, 10, 13))
    m = build_model(TINY, bottleneck=True)
    assert m.memory(torch.randn(3, 20, 40), torch.tensor([20, 12, 7]))[0].shape == (3, 1, 32)


def test_without_espeak_the_command_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(spoken.shutil, "which", lambda name: None)
    assert speech.missing() == spoken.INSTALL_HINT
    assert run_task("speech", out=None, quick=True) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install -y espeak-ng" in err


@pytest.mark.slow
@needs_espeak
def test_seeded_runs_repeat():
    """The same seed gives the same run, to rounding: the data, the initial weights, the batches and the
    dropout all follow it. Not to the bit: in 2 of ~14 full runs of the suite (AMD EPYC, 2026-12), the
    first of the two runs in a long-lived worker differed from the second by 3e-6 in one step's loss, and
    no run in isolation ever did; a change of torch's thread count alone moves the losses by 2e-7 and the
    weights by 5e-5. Another seed moves them by 6e-2 and 4.6."""
    a = train(quick=True, seed=1, cfg=TINY)
    b = train(quick=True, seed=1, cfg=TINY)
    assert b.losses == pytest.approx(a.losses, rel=1e-4) and a.metric == b.metric and a.baseline == b.baseline
    assert a.model is not None and b.model is not None
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-3, msg=name)
    assert train(quick=True, seed=2, cfg=TINY).losses != pytest.approx(a.losses, rel=1e-2)


@needs_espeak
@pytest.mark.slow
def test_quick_run_attention_beats_one_vector(tmp_path):
    r = train_task_quick(tmp_path)
    assert r.metric < r.baseline - 0.1, (r.metric, r.baseline)
    pics = sorted(tmp_path.glob("speech_attention_*.png"))
    assert pics and all(p.stat().st_size > 10_000 for p in pics)
    assert (tmp_path / "speech_viewer.html").stat().st_size > 10_000


def train_task_quick(tmp_path):
    from qkv.apps.tasks import train_task

    return train_task("speech", out=str(tmp_path), quick=True, seed=0)
