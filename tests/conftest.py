"""Shared test set-up: make tests/oracle.py importable, seed, keep hypothesis quick, keep Hugging Face offline."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers: no test downloads

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "qkv", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("qkv")
torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _half_precision_kernel_pinned():
    """Pin the fused kernel's half-precision speed (measured per machine otherwise) so that every test
    runs the same engines everywhere: bf16/fp16 go to the fused kernel as they are. Tests of the float32
    fallback pin it low themselves."""
    from qkv.backends import kernels

    saved = dict(kernels._HALF_SPEED)
    for dt in kernels.HALF:
        kernels._HALF_SPEED[dt, False] = kernels._HALF_SPEED[dt, True] = 1.0
    yield
    kernels._HALF_SPEED.clear()
    kernels._HALF_SPEED.update(saved)
