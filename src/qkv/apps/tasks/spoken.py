"""Spoken digit strings ("four seven two") synthesised with Debian's ``espeak-ng`` and turned into log-mel
spectrograms: the data of ``qkv train speech``.

Each utterance is a random string of digit words spoken by one *voice* (an ``espeak-ng`` accent such as
``en-gb-scotland`` with a voice variant such as ``+f3``) at a random speed (words per minute) and pitch.
``espeak-ng --stdout`` writes 16-bit mono WAV at 22050 Hz; we never touch the disk for audio and run a
few ``espeak-ng`` processes at once (each call costs ~15 ms of CPU, mostly start-up).

Features come from librosa (``librosa.feature.melspectrogram``: 40 mel bands, 23 ms windows, 10 ms hop,
then log and per-utterance mean/variance normalisation). We use librosa rather than torchaudio because
torchaudio's wheels are built against one exact torch release and none matches our pinned torch 2.13 CPU
build; librosa depends only on numpy/scipy. The features of a whole data set are cached in one ``.npz``
(keyed by a hash of the utterance list and the feature settings) so a second run skips synthesis.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import wave
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "ACCENTS",
    "DIGIT_WORDS",
    "INSTALL_HINT",
    "VARIANTS",
    "Utterance",
    "espeak_available",
    "log_mel",
    "make_utterances",
    "synthesize",
    "utterance_features",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: espeak-ng's English accents (its own "gmw" voices; the mbrola ones need an extra package)
ACCENTS = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
#: espeak-ng voice variants (formant and timbre settings layered on an accent: ``en-us+f3``)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "whisper")
INSTALL_HINT = "espeak-ng is not installed; install it with `apt-get install -y espeak-ng` (Debian/Ubuntu)"
SAMPLE_RATE = 22050
N_MELS = 40
HOP = 220  # 10 ms at 22050 Hz
N_FFT = 512  # 23 ms


@dataclass(frozen=True)
class Utterance:
    """One utterance: the digits spoken, the voice (``accent+variant``), speed (words/min) and pitch (0-99)."""

    digits: tuple[int, ...]
    voice: str
    speed: int
    pitch: int

    @property
    def text(self) -> str:
        """The words spoken, e.g. ``"four seven two"``."""
        return " ".join(DIGIT_WORDS[d] for d in self.digits)


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` command is on the PATH."""
    return shutil.which("espeak-ng") is not None


def make_utterances(
    n: int, max_digits: int, voices: Sequence[str], seed: int, speeds: tuple[int, int] = (120, 230)
) -> list[Utterance]:
    """``n`` utterances of 1..``max_digits`` uniformly random digits (length uniform too), each with a voice
    drawn from ``voices``, a speed uniform in ``speeds`` and a pitch uniform in 25..75."""
    if n < 0 or max_digits < 1 or not voices:
        raise ValueError(f"make_utterances: need n >= 0, max_digits >= 1 and voices, got {n}, {max_digits}, {voices}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, max_digits)
        digits = tuple(rng.randrange(10) for _ in range(k))
        out.append(Utterance(digits, rng.choice(list(voices)), rng.randint(*speeds), rng.randint(25, 75)))
    return out


def synthesize(u: Utterance) -> np.ndarray:
    """Speak ``u`` with ``espeak-ng``: float32 samples in [-1, 1] at :data:`SAMPLE_RATE` Hz.

    Raises ``RuntimeError`` (with :data:`INSTALL_HINT`) when ``espeak-ng`` is missing or fails."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(INSTALL_HINT)
    cmd = [exe, "--stdout", "-v", u.voice, "-s", str(u.speed), "-p", str(u.pitch), u.text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) < 100:
        raise RuntimeError(f"espeak-ng failed on {u}: {proc.stderr.decode(errors='replace').strip()}")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"espeak-ng wrote {w.getnchannels()} channels of {w.getsampwidth()} bytes")
        # espeak-ng streams to stdout before it knows the length, so the header's frame count is bogus
        data = proc.stdout.find(b"data", 12)
        raw = proc.stdout[data + 8 :]
        rate = w.getframerate()
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {SAMPLE_RATE}")
    return np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def log_mel(y: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Log-mel spectrogram ``(frames, N_MELS)`` float32 of samples ``y`` (silence trimmed at both ends,
    each band normalised to zero mean and unit variance over the utterance)."""
    import librosa

    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"log_mel: y must be a non-empty 1-D array of samples, got shape {y.shape}")
    y, _ = librosa.effects.trim(y, top_db=40, frame_length=N_FFT, hop_length=HOP)
    m = librosa.feature.melspectrogram(
        y=y, sr=sr, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, fmin=60.0, fmax=8000.0, center=True
    )
    x = np.log(m + 1e-6).T
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x.astype(np.float32)


def _features(u: Utterance) -> np.ndarray:
    return log_mel(synthesize(u))


def _cache_key(utts: Sequence[Utterance]) -> str:
    spec = {"v": 1, "sr": SAMPLE_RATE, "mels": N_MELS, "hop": HOP, "fft": N_FFT, "utts": [asdict(u) for u in utts]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def utterance_features(
    utts: Sequence[Utterance],
    cache_dir: str | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """The log-mel features ``(frames, N_MELS)`` of every utterance, in order.

    Synthesises with ``workers`` ``espeak-ng`` processes at a time. With ``cache_dir``, the features are
    read from (or written to) ``cache_dir/spoken-<hash>.npz``; ``progress(k)`` is called as utterances finish."""
    path = os.path.join(cache_dir, f"spoken-{_cache_key(utts)}.npz") if cache_dir else None
    if path is not None and os.path.exists(path):
        with np.load(path) as z:
            flat, ends = z["flat"], z["ends"]
        if progress is not None:
            progress(len(utts))
        return np.split(flat.astype(np.float32), ends[:-1])
    if not espeak_available():
        raise RuntimeError(INSTALL_HINT)
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn, which librosa needs

    feats: list[np.ndarray] = []
    # one BLAS thread: the matrices are tiny and the utterances already run in parallel (multi-threaded
    # BLAS on them is 5x slower on a busy 2-core machine)
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for f in pool.map(_features, utts):
            feats.append(f)
            if progress is not None:
                progress(1)
    if path is not None:
        os.makedirs(cache_dir or ".", exist_ok=True)
        ends = np.cumsum([len(f) for f in feats])
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, flat=np.concatenate(feats).astype(np.float16), ends=ends)
        os.replace(tmp, path)
        feats = [f.astype(np.float16).astype(np.float32) for f in feats]  # what a cached run reads
    return feats
