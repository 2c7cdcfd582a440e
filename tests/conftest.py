"""Shared test set-up: make tests/oracle.py importable, seed every test, keep hypothesis quick, keep Hugging
Face offline, and share the cores among pytest-xdist's workers (``./dev test`` runs one worker per core)."""

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

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""How many pytest processes share this machine's cores (1 without xdist)."""

THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
"""torch threads of each: the cores shared out, so that workers never queue for a core."""


@pytest.fixture(autouse=True)
def _same_start_whatever_ran_before() -> None:
    """Every test starts from the same state, whichever worker runs it and whatever ran there before:
    torch's generator seeded, and torch's thread count (which some tests lower) restored."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold a slow test (``@pytest.mark.slow``, a minute of CPU or less each) first, so that
    the workers start on them and end together on fast ones instead of one worker finishing a long test
    alone. Each file moves whole, in its own order: a module fixture (a compiled kernel) is built once."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the rest keep their order


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
