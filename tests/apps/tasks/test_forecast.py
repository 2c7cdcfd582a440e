"""``qkv train forecast``: a few steps make the loss fall; the series and the seasonal-naive baseline by hand."""

from __future__ import annotations

import numpy as np

from qkv.apps.tasks import train_task
from qkv.apps.tasks.forecast import load_series, seasonal_naive


def test_forecast_quick_loss_falls():
    r = train_task("forecast", quick=True, seed=0)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5
    assert r.metric > 0 and r.baseline > 0


def test_series_and_seasonal_naive():
    vol, wd = load_series()
    assert vol.shape == (1047,) and wd[0] == 3  # 2004-08-19 was a Thursday
    assert set(np.unique(wd)) <= {0, 1, 2, 3, 4}  # trading days only
    s = np.arange(20.0)
    # season 5, horizon 5: the five values before the origin, in order
    assert seasonal_naive(s, 10).tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert seasonal_naive(s, 10, horizon=7).tolist() == [5.0, 6.0, 7.0, 8.0, 9.0, 5.0, 6.0]
