"""Spoken digits (``qkv.apps.tasks.spoken``): utterance lists, espeak-ng synthesis, log-mel features and their cache.

Synthesis tests need Debian's ``espeak-ng`` (``./dev test`` installs it) and are skipped without it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from qkv.apps.tasks import spoken
from qkv.apps.tasks.spoken import (
    DIGIT_WORDS,
    HOP,
    N_MELS,
    SAMPLE_RATE,
    Utterance,
    hz_to_mel,
    log_mel,
    make_utterances,
    mel_filterbank,
    mel_to_hz,
    synthesize,
    trim_silence,
    utterance_features,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


def test_make_utterances_is_seeded_and_in_range():
    voices = ["en-us+m1", "en-gb+f3"]
    a = make_utterances(200, 4, voices, seed=3)
    assert a == make_utterances(200, 4, voices, seed=3)
    assert a != make_utterances(200, 4, voices, seed=4)
    assert {len(u.digits) for u in a} == {1, 2, 3, 4}
    assert {u.voice for u in a} == set(voices)
    assert all(120 <= u.speed <= 230 and 25 <= u.pitch <= 75 for u in a)
    assert Utterance((4, 0, 2), "en-us", 150, 50).text == "four zero two"
    assert DIGIT_WORDS[7] == "seven"
    with pytest.raises(ValueError, match="max_digits"):
        make_utterances(3, 0, voices, 0)


def test_log_mel_of_a_tone_peaks_in_its_band():
    """A 1 kHz tone: the loudest mel band is the one whose centre is nearest 1 kHz, the centres spaced
    evenly on Slaney's scale (1 kHz = 15 mel, linear below it, 27 mel per factor 6.4 above)."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    y = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    x = log_mel(y)
    assert x.shape == (SAMPLE_RATE // HOP + 1, N_MELS) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)  # each band normalised over the utterance
    lo, hi = 3 * 60.0 / 200, 15 + 27 * np.log(8000 / 1000) / np.log(6.4)  # 60 Hz and 8 kHz in mel
    centres = np.linspace(lo, hi, N_MELS + 2)[1:-1]
    bank = mel_filterbank(SAMPLE_RATE, 512, N_MELS, 60.0, 8000.0)
    tone_bin = round(1000 * 512 / SAMPLE_RATE)
    assert int(bank[:, tone_bin].argmax()) == int(np.abs(centres - 15.0).argmin())
    np.testing.assert_allclose(hz_to_mel(np.array([500.0, 1000.0, 6400.0])), [7.5, 15.0, 42.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(np.array([60.0, 999.0, 1001.0, 8000.0]))), [60, 999, 1001, 8000])
    with pytest.raises(ValueError, match="1-D"):
        log_mel(np.zeros((2, 10), np.float32))


def test_trim_keeps_the_loud_part():
    """Silence, a tone, silence: what is kept starts within a hop of the tone and ends within a hop
    after it; all-zero input is kept whole (its every frame is as loud as the loudest)."""
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    gap = np.zeros(SAMPLE_RATE // 4, np.float32)
    kept = trim_silence(np.concatenate([gap, tone, gap]))
    assert len(tone) - 2 * 512 <= len(kept) <= len(tone) + 2 * HOP + 512
    assert np.abs(kept).max() == np.abs(tone).max()
    assert len(trim_silence(np.zeros(1000, np.float32))) == 1000


def test_log_mel_follows_a_changed_setting(monkeypatch):
    """The window and filterbank are built once per setting: a changed mel range or band count gives
    the features of the new setting, computed here from the filterbank and the FFT in float64."""
    y = np.random.default_rng(1).standard_normal(6000).astype(np.float32)
    log_mel(y)  # the default setting's weights are built and cached
    for name, value in [("F_MAX", 6000.0), ("F_MIN", 120.0), ("N_MELS", 24)]:
        with monkeypatch.context() as m:
            m.setattr(spoken, name, value)
            kept = trim_silence(y).astype(np.float64)
            frames = np.lib.stride_tricks.sliding_window_view(np.pad(kept, 256), 512)[::HOP]
            power = np.abs(np.fft.rfft(frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)), axis=1)) ** 2
            x = np.log(power @ mel_filterbank(SAMPLE_RATE, 512, spoken.N_MELS, spoken.F_MIN, spoken.F_MAX).T + 1e-6)
            want = (x - x.mean(0)) / (x.std(0) + 1e-3)
            np.testing.assert_allclose(log_mel(y), want, atol=1e-5, err_msg=name)


@pytest.mark.slow  # librosa's numba functions compile on a machine's first run (~13 s)
@needs_espeak
def test_log_mel_equals_librosa():
    """The oracle: librosa's trim + melspectrogram with the same settings, on speech and on noise."""
    librosa = pytest.importorskip("librosa")
    bank = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=512, n_mels=N_MELS, fmin=60.0, fmax=8000.0)
    np.testing.assert_allclose(mel_filterbank(SAMPLE_RATE, 512, N_MELS, 60.0, 8000.0), bank, rtol=1e-5, atol=1e-9)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(9000) * np.linspace(0, 1, 9000) ** 4).astype(np.float32)  # a slow fade-in
    signals = [synthesize(u) for u in make_utterances(6, 4, ["en-us+m1", "en-gb+f3", "en-029+klatt"], seed=5)]
    for y in [*signals, noise]:
        kept, (start, end) = librosa.effects.trim(y, top_db=40, frame_length=512, hop_length=HOP)
        np.testing.assert_array_equal(trim_silence(y), y[start:end])
        m = librosa.feature.melspectrogram(
            y=kept, sr=SAMPLE_RATE, n_fft=512, hop_length=HOP, n_mels=N_MELS, fmin=60.0, fmax=8000.0
        )
        x = np.log(m + 1e-6).T
        np.testing.assert_allclose(log_mel(y), (x - x.mean(0)) / (x.std(0) + 1e-3), atol=2e-5)


def test_missing_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(spoken.shutil, "which", lambda name: None)
    assert not spoken.espeak_available()
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        synthesize(Utterance((1,), "en-us", 150, 50))


@needs_espeak
def test_synthesis_is_deterministic_and_depends_on_the_voice():
    u = Utterance((4, 7, 2), "en-us+m1", 170, 50)
    y = synthesize(u)
    assert y.dtype == np.float32 and 0.4 < len(y) / SAMPLE_RATE < 3.0  # three words at 170 words/min
    assert 0.05 < np.abs(y).max() <= 1.0
    np.testing.assert_array_equal(y, synthesize(u))
    other = synthesize(Utterance((4, 7, 2), "en-gb-scotland+f3", 170, 50))
    assert len(other) != len(y) or not np.array_equal(other, y)
    slow = synthesize(Utterance((4, 7, 2), "en-us+m1", 120, 50))
    assert len(slow) > 1.2 * len(y)  # speed is words per minute
    longer = synthesize(Utterance((4, 7, 2, 9, 9, 1), "en-us+m1", 170, 50))
    assert len(longer) > 1.5 * len(y)


def test_cache_key_follows_the_utterances_and_every_feature_setting(monkeypatch):
    utts = make_utterances(3, 2, ["en-us"], seed=0)
    key = spoken._cache_key(utts)
    for name, value in [("TOP_DB", 30.0), ("F_MIN", 50.0), ("F_MAX", 7000.0), ("HOP", 200), ("N_MELS", 32)]:
        with monkeypatch.context() as m:
            m.setattr(spoken, name, value)
            assert spoken._cache_key(utts) != key, name
    assert spoken._cache_key(utts) == key != spoken._cache_key(utts[:2])


@needs_espeak
def test_features_are_cached(tmp_path, monkeypatch):
    utts = make_utterances(6, 3, ["en-us+m2"], seed=0)
    feats = utterance_features(utts, str(tmp_path), workers=2)
    assert len(feats) == 6 and all(f.shape[1] == N_MELS for f in feats)
    assert len(list(tmp_path.glob("spoken-*.npz"))) == 1

    def boom(u: Utterance) -> np.ndarray:
        raise AssertionError("synthesised again instead of reading the cache")

    monkeypatch.setattr(spoken, "synthesize", boom)
    again = utterance_features(utts, str(tmp_path))
    for a, b in zip(feats, again):
        np.testing.assert_array_equal(a, b)
    # the features of one utterance do not depend on the batch it was synthesised in
    monkeypatch.undo()
    np.testing.assert_allclose(utterance_features(utts[2:3])[0], feats[2], atol=5e-3)
