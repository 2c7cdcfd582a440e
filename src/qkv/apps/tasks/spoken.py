"""Spoken digit strings ("four seven two") synthesised with Debian's ``espeak-ng`` and turned into log-mel
spectrograms: the data of ``qkv train speech``.

Each utterance is a random string of digit words spoken by one *voice* (an ``espeak-ng`` accent such as
``en-gb-scotland`` with a voice variant such as ``+f3``) at a random speed (words per minute) and pitch.
``espeak-ng --stdout`` writes 16-bit mono WAV at 22050 Hz; we never touch the disk for audio and run a
few ``espeak-ng`` processes at once (each call costs ~15 ms of CPU, mostly start-up).

Features are log-mel spectrograms (40 mel bands on Slaney's scale, 23 ms Hann windows, 10 ms hop, silence
trimmed at 40 dB below the loudest frame, then log and per-utterance mean/variance normalisation), computed
here with numpy's FFT: the same numbers as ``librosa.feature.melspectrogram`` (``tests/apps/tasks/test_spoken.py``
compares them), without librosa's numba functions, which compile for 13 s on a machine's first run.
The features of a whole data set are cached in one ``.npz``
(keyed by a hash of the utterance list and the feature settings) so a second run skips synthesis.
"""

from __future__ import annotations

import contextlib
import functools
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
    "hz_to_mel",
    "log_mel",
    "make_utterances",
    "mel_filterbank",
    "mel_to_hz",
    "synthesize",
    "trim_silence",
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
F_MIN, F_MAX = 60.0, 8000.0  # the mel bands' range, Hz
TOP_DB = 40.0  # trim_silence's threshold below the loudest frame


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


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (Auditory Toolbox): linear below 1 kHz (``3 f / 200``), logarithmic above
    (``15 + 27 ln(f / 1000) / ln 6.4``), so 1 kHz is 15 mel and 6.4 kHz is 42."""
    f = np.asarray(f, dtype=np.float64)
    log_part = 15.0 + 27.0 * np.log(np.maximum(f, 1e-10) / 1000.0) / np.log(6.4)
    return np.where(f >= 1000.0, log_part, 3.0 * f / 200.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """The inverse of :func:`hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0), 200.0 * m / 3.0)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` triangular filters, one per mel band, over the FFT bins' frequencies.

    Band ``i`` rises from centre ``i - 1`` to its peak at centre ``i`` and falls to centre ``i + 1``, the
    ``n_mels + 2`` centres evenly spaced in mel between ``fmin`` and ``fmax``; each triangle is scaled by
    ``2 / (its width in Hz)`` so every band gathers about the same energy from white noise (Slaney's norm)."""
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,) Hz
    bins = np.fft.rfftfreq(n_fft, 1.0 / sr)  # (n_fft // 2 + 1,) Hz
    rise = (bins - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]  # (n_mels, bins)
    fall = (edges[2:, None] - bins) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def _frames(y: np.ndarray, n: int, hop: int) -> np.ndarray:
    """``(1 + len(y) // hop, n)`` windows of ``y`` zero-padded by ``n // 2`` at both ends, the ``t``-th
    centred on sample ``t * hop``."""
    padded = np.pad(y, n // 2)
    return np.lib.stride_tricks.sliding_window_view(padded, n)[::hop]


def trim_silence(y: np.ndarray, top_db: float = TOP_DB, frame: int = N_FFT, hop: int = HOP) -> np.ndarray:
    """``y`` without its leading and trailing frames quieter than ``top_db`` below the loudest frame
    (frame loudness: the RMS of ``frame`` samples centred every ``hop``; kept samples run from the first
    loud frame's centre to one hop past the last's)."""
    power = np.mean(np.square(_frames(y.astype(np.float64), frame, hop)), axis=1)  # (frames,) mean square
    db = 10.0 * np.log10(np.maximum(power, 1e-10) / max(float(power.max()), 1e-10))
    loud = np.flatnonzero(db > -top_db)  # never empty: the loudest frame is 0 dB
    return y[loud[0] * hop : min(len(y), (loud[-1] + 1) * hop)]


@functools.lru_cache(maxsize=4)
def _spectrum_weights(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> tuple[np.ndarray, np.ndarray]:
    """The periodic Hann window ``(n_fft,)`` and the filterbank ``(bins, n_mels)`` that :func:`log_mel`
    applies, built once per setting (keyed on every argument it is built from; read-only: they are shared)."""
    window = np.hanning(n_fft + 1)[:-1]
    bank = mel_filterbank(sr, n_fft, n_mels, fmin, fmax).T
    window.setflags(write=False)
    bank.setflags(write=False)
    return window, bank


def log_mel(y: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Log-mel spectrogram ``(frames, N_MELS)`` float32 of samples ``y`` (silence trimmed at both ends,
    each band normalised to zero mean and unit variance over the utterance); ``frames`` is
    ``1 + len(trimmed) // HOP``."""
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"log_mel: y must be a non-empty 1-D array of samples, got shape {y.shape}")
    y = trim_silence(y)
    window, bank = _spectrum_weights(sr, N_FFT, N_MELS, F_MIN, F_MAX)
    power = np.abs(np.fft.rfft(_frames(y.astype(np.float64), N_FFT, HOP) * window, axis=1)) ** 2  # (frames, bins)
    m = power @ bank  # (frames, N_MELS)
    x = np.log(m + 1e-6)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x.astype(np.float32)


def _features(u: Utterance) -> np.ndarray:
    return log_mel(synthesize(u))


def _cache_key(utts: Sequence[Utterance]) -> str:
    # v2: the features are numpy's since librosa's (equal to 3e-6, not to the bit), so v1 caches are not read
    spec = {
        "v": 2,
        "sr": SAMPLE_RATE,
        "mels": N_MELS,
        "hop": HOP,
        "fft": N_FFT,
        "fmin": F_MIN,
        "fmax": F_MAX,
        "top_db": TOP_DB,
        "utts": [asdict(u) for u in utts],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """numpy's BLAS held to one thread where threadpoolctl (scikit-learn's dependency) is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


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
    feats: list[np.ndarray] = []
    # one BLAS thread: the matrices are tiny and the utterances already run in parallel (multi-threaded
    # BLAS on them is 5x slower on a busy 2-core machine)
    with _one_blas_thread(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
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
