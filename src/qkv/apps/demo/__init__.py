"""``qkv demo``: why attention was invented, shown on this machine in minutes.

Three translators learn to turn lists of numbers written in English words into German number words
(:mod:`qkv.apps.demo.data`): a GRU encoder-decoder that must squeeze the source into one fixed vector, the
same with Bahdanau attention, and a small Transformer. Exact-match accuracy on held-out lists, by source
length, shows what attention buys; the report folder holds the learned alignments, training curves, an
HTML viewer of the Transformer's heads and ``summary.md``.
"""

from __future__ import annotations

from .run import DemoConfig, run_demo, train_models

__all__ = ["DemoConfig", "run_demo", "train_models"]
