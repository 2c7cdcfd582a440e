"""``qkv train forecast``: an attention forecaster on a real series a package ships.

The series is Google's daily trading volume, 2004-08-19 to 2008-10-14 (1047 trading days), from
matplotlib's sample data (``goog.npz``, from Yahoo Finance); we forecast ``log(volume)`` five trading
days ahead from the last 60 days. The first 80% of days train, the last 20% test (every forecast origin).
Metric: mean absolute error in log volume, beside the seasonal-naive baseline (each weekday repeats its
value of the week before, season 5 trading days); the naive last-value error is printed too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.blocks import TransformerBlock
from .common import TaskResult, fit

__all__ = ["Forecaster", "load_series", "seasonal_naive", "train"]

WINDOW, HORIZON, SEASON = 60, 5, 5


def load_series() -> tuple[np.ndarray, np.ndarray]:
    """``(log_volume (T,), weekday (T,) 0=Monday)`` of matplotlib's ``goog.npz`` sample data."""
    from matplotlib import cbook

    r = np.load(cbook.get_sample_data("goog.npz", asfileobj=False))["price_data"]
    vol = np.log(r["volume"].astype(np.float64))
    weekday = (r["date"].astype("datetime64[D]").view("int64") - 4) % 7  # 1970-01-01 was a Thursday
    return vol, weekday.astype(np.int64)


def seasonal_naive(series: np.ndarray, origin: int, horizon: int = HORIZON, season: int = SEASON) -> np.ndarray:
    """Forecast of ``series[origin:origin+horizon]`` by the value one season earlier (known data only)."""
    return np.array([series[origin - season + (h % season)] for h in range(horizon)])


class Forecaster(nn.Module):
    """Transformer encoder over a window: each day is ``Linear(value) + weekday embedding + position``;
    the last token's state predicts the next ``horizon`` values.

    Args:
        window: input length; horizon: steps predicted; dim, layers, heads: model size.
    """

    def __init__(self, window: int = WINDOW, horizon: int = HORIZON, dim: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.inp = nn.Linear(1, dim)
        self.day = nn.Embedding(7, dim)
        self.pos = nn.Parameter(torch.randn(window, dim) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, 2 * dim, dropout=0.1, norm_first=True) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, horizon)

    def forward(self, x: Tensor, weekday: Tensor) -> Tensor:
        """``x`` ``(B, window)`` normalised values, ``weekday`` ``(B, window)`` -> ``(B, horizon)``."""
        h = self.inp(x[..., None]) + self.day(weekday) + self.pos[: x.shape[1]]
        for b in self.blocks:
            h = b(h)
        return x[:, -1:] + self.out(self.norm(h[:, -1]))  # predict the change from the last value


def _windows(z: Tensor, wd: Tensor, origins: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.stack([z[o - WINDOW : o] for o in origins])
    w = torch.stack([wd[o - WINDOW : o] for o in origins])
    y = torch.stack([z[o : o + HORIZON] for o in origins])
    return x, w, y


def train(out: str | None = None, quick: bool = False, seed: int = 0, progress: bool = False) -> TaskResult:
    """Train the forecaster on the first 80% of days; evaluate every origin of the last 20%."""
    torch.manual_seed(seed)
    vol, weekday = load_series()
    T = len(vol)
    split = int(T * 0.8)
    mu, sd = vol[:split].mean(), vol[:split].std()
    z = torch.tensor((vol - mu) / sd, dtype=torch.float32)
    wd = torch.tensor(weekday)
    train_origins = list(range(WINDOW, split - HORIZON + 1))
    test_origins = list(range(split, T - HORIZON + 1))

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(train_origins), (64,), generator=g).tolist()
            yield _windows(z, wd, [train_origins[i] for i in idx])

    def loss_fn(m: nn.Module, b: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return F.l1_loss(m(b[0], b[1]), b[2])

    model = Forecaster()
    steps = 30 if quick else 1500
    losses = fit(model, batches(), loss_fn, steps, 1e-3, desc="forecast", progress=progress, weight_decay=0.01)
    x, w, y = _windows(z, wd, test_origins)
    with torch.no_grad():
        pred = model(x, w).double().numpy() * sd + mu
    truth = y.double().numpy() * sd + mu
    mae = float(np.abs(pred - truth).mean())
    snaive = np.stack([seasonal_naive(vol, o) for o in test_origins])
    base = float(np.abs(snaive - truth).mean())
    naive = float(np.abs(np.stack([np.full(HORIZON, vol[o - 1]) for o in test_origins]) - truth).mean())
    notes = [
        f"Google daily trading volume (matplotlib sample data goog.npz), {T} days; test = last {T - split} days, "
        f"{len(test_origins)} origins, horizon {HORIZON}",
        f"naive last value MAE {naive:.4f} (log volume)",
    ]
    return TaskResult("forecast", "MAE (log volume)", mae, "seasonal naive, season 5", base, losses, notes, [], model)
