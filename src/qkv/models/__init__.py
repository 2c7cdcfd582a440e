"""Models built on :mod:`qkv.nn`: transformers, GPT, a BERT-style encoder that loads real checkpoints,
ViT, RNN seq2seq with attention, state-space hybrids."""

__all__: list[str] = []
