"""Attention modules: multi-head (self/cross, GQA/MQA), additive and multiplicative attention,
positional encodings, KV caches and transformer blocks. All of them call :func:`qkv.attention`; the
attention modules carry named hook points (:mod:`qkv.nn.hooks`) for analysis."""

from .additive import AdditiveAttention, LuongAttention
from .attention import MultiHeadAttention, TorchMasks, masks_from_torch
from .base import AttentionModule, BackendSwitch, capture_weights, set_backend
from .blocks import DecoderBlock, EncoderBlock, FeedForward, TransformerBlock, make_norm
from .cache import (
    CrossAttentionKVCache,
    FixedKVCache,
    GrowingKVCache,
    KVCache,
    SinkKVCache,
    SlidingWindowKVCache,
    at_positions,
)
from .differential import DifferentialAttention
from .hooks import HOOK_POINTS, HookPoint, hook_points, hooked
from .latent import LatentAttention, LatentKVCache
from .linear_attention import LinearSelfAttention
from .linformer import LinformerSelfAttention
from .positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    sinusoidal_table,
)
from .ssm import HybridStack, SelectiveSSM, SSMState, hybrid_mixers

__all__ = [
    "ALiBi",
    "AdditiveAttention",
    "LuongAttention",
    "AttentionModule",
    "BackendSwitch",
    "CrossAttentionKVCache",
    "DecoderBlock",
    "DifferentialAttention",
    "EncoderBlock",
    "FeedForward",
    "FixedKVCache",
    "GrowingKVCache",
    "HOOK_POINTS",
    "HookPoint",
    "HybridStack",
    "KVCache",
    "LatentAttention",
    "LatentKVCache",
    "LearnedPositionalEmbedding",
    "LinearSelfAttention",
    "LinformerSelfAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SSMState",
    "SelectiveSSM",
    "SinkKVCache",
    "SinusoidalPositionalEncoding",
    "SlidingWindowKVCache",
    "T5RelativeBias",
    "TorchMasks",
    "TransformerBlock",
    "at_positions",
    "hybrid_mixers",
    "hook_points",
    "hooked",
    "capture_weights",
    "make_norm",
    "masks_from_torch",
    "set_backend",
    "sinusoidal_table",
]
