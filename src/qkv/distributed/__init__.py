"""Attention with the sequence split over ``torch.distributed`` ranks (the public face; the code lives
in :mod:`qkv.backends.ring`, :mod:`qkv.backends.ulysses`, :mod:`qkv.backends.seqpar` and
:mod:`qkv.nn.sequence_parallel`).

- :func:`ring_attention`: ring attention (K/V blocks travel around the ring, logsumexp merges);
  also ``qkv.attention(..., backend="ring", group=..., layout=...)``.
- :func:`ulysses_attention`: all-to-all head parallelism (DeepSpeed-Ulysses); also
  ``backend="ulysses"``.
- :class:`SequenceParallelAttention`: a multi-head self-attention layer over local shards.
- :func:`zigzag_split`, :func:`zigzag_gather`, :func:`global_positions`: the load-balanced layout.
- :func:`fail_together`: every rank raises :class:`RankFailedError` when any rank fails.
"""

from ..backends.ring import ring_attention
from ..backends.seqpar import (
    CommStats,
    RankFailedError,
    comm_stats,
    fail_together,
    global_positions,
    zigzag_gather,
    zigzag_split,
    zigzag_unshuffle,
)
from ..backends.ulysses import heads_to_seq, seq_to_heads, ulysses_attention
from ..nn.sequence_parallel import SequenceParallelAttention

__all__ = [
    "CommStats",
    "RankFailedError",
    "SequenceParallelAttention",
    "comm_stats",
    "fail_together",
    "global_positions",
    "heads_to_seq",
    "ring_attention",
    "seq_to_heads",
    "ulysses_attention",
    "zigzag_gather",
    "zigzag_split",
    "zigzag_unshuffle",
]
