"""Attention modules: multi-head (self/cross, GQA/MQA), additive and multiplicative attention,
positional encodings, KV caches and transformer blocks. All of them call :func:`qkv.attention`."""

from .additive import AdditiveAttention, LuongAttention
from .base import AttentionModule, capture_weights, set_backend

__all__ = ["AdditiveAttention", "AttentionModule", "LuongAttention", "capture_weights", "set_backend"]
