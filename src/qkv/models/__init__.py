"""Models built on :mod:`qkv.nn`: transformers, GPT, a BERT-style encoder that loads real checkpoints,
ViT, RNN seq2seq with attention, state-space hybrids."""

from .bert import BertConfig, BertEncoder, BertTokenizer, minilm, minilm_path

__all__: list[str] = ["BertConfig", "BertEncoder", "BertTokenizer", "minilm", "minilm_path"]
