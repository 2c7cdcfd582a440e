"""Shared test set-up: make tests/oracle.py importable, seed, keep hypothesis quick, keep Hugging Face offline."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers: no test downloads

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "qkv", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("qkv")
torch.manual_seed(0)
