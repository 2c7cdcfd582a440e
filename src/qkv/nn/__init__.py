"""Attention modules: multi-head (self/cross, GQA/MQA), additive and multiplicative attention,
positional encodings, KV caches and transformer blocks. All of them call :func:`qkv.attention`."""

from .base import AttentionModule, capture_weights, set_backend

__all__ = ["AttentionModule", "capture_weights", "set_backend"]
