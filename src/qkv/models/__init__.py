"""Models built on :mod:`qkv.nn`: transformers, GPT, a BERT-style encoder that loads real checkpoints,
ViT, RNN seq2seq with attention, state-space hybrids."""

from .bert import BertConfig, BertEncoder, BertTokenizer, minilm, minilm_path
from .gpt import GPT, GPTCache, sample_next
from .seq2seq import Seq2Seq, TransformerSeq2Seq
from .transformer import Transformer, TransformerDecoder, TransformerEncoder
from .vit import ViT

__all__: list[str] = [
    "GPT",
    "GPTCache",
    "sample_next",
    "Transformer",
    "TransformerDecoder",
    "TransformerEncoder",
    "BertConfig",
    "BertEncoder",
    "BertTokenizer",
    "minilm",
    "minilm_path",
    "Seq2Seq",
    "TransformerSeq2Seq",
    "ViT",
]
