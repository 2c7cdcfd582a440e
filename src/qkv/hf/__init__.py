"""Every Hugging Face ``transformers`` model on qkv: ``attn_implementation="qkv"``.

::

    import qkv.hf
    qkv.hf.register()                      # once per process
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="qkv")
    model.set_attn_implementation("qkv")   # or switch a loaded model

:func:`register` adds an attention function (:func:`~qkv.hf.attention.attention_forward`: the layer's
call on :func:`qkv.attention`, grouped-query heads as they are, ``scaling``, Gemma 2's ``softcap``,
dropout in training, ``output_attentions`` from qkv's weights on demand) and a mask builder
(:func:`~qkv.hf.masks.build_mask`: causal, sliding windows, padding on either side, packed sequences and
the KV cache's offset as a qkv ``Mask`` inside an :class:`~qkv.hf.masks.HFMask`, a tensor that stands for
HF's own ``eager`` mask and is built only if the model's own code reads it) to ``transformers``'
``AttentionInterface`` and ``AttentionMaskInterface``. Models whose attention layers use that interface
(``model.is_backend_compatible()``: Llama, Mistral, Qwen2, Gemma 2, GPT-2, BERT, ModernBERT, ...) then run
on qkv, and ``backend="auto"`` picks ``tiled`` where the mask leaves tiles to skip.

Needs the ``hf`` extra (``pip install qkv[hf]``); tested with ``transformers`` 5.25 and 5.24
(``tests/hf/test_every_model.py`` runs every causal-LM architecture that declares pluggable attention
against ``eager``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

try:
    from transformers import AttentionInterface, AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("qkv.hf needs Hugging Face transformers; install the hf extra: pip install 'qkv[hf]'") from e

from ..backends.registry import registered  # noqa: E402
from .attention import attention_forward, sinks_to_qkv, wants_weights  # noqa: E402
from .masks import HFMask, build_mask  # noqa: E402

__all__ = [
    "NAME",
    "HFMask",
    "attention_forward",
    "build_mask",
    "from_pretrained",
    "is_qkv",
    "register",
    "sinks_to_qkv",
    "wants_weights",
]

NAME = "qkv"
"""The ``attn_implementation`` that :func:`register` adds by default."""

_NAMES: set[str] = set()


def is_qkv(name: str | None) -> bool:
    """Whether ``name`` is an ``attn_implementation`` that :func:`register` added in this process."""
    return name in _NAMES


def register(name: str = NAME, backend: str = "auto", **options: Any) -> str:
    """Make ``attn_implementation=name`` available to every ``transformers`` model in this process.

    Args:
        name: the implementation's name (``"qkv"``; register another name to pin a backend or options).
        backend: the qkv backend its layers call: ``"auto"`` (the cheapest that serves each call; see
            :func:`qkv.explain`) or a registered backend's name.
        **options: backend options passed to every call (``block_q=``, ``block_k=`` for ``tiled``).

    Returns:
        ``name``, for ``from_pretrained(..., attn_implementation=register())``.

    Raises:
        ValueError: an empty name or one of HF's own, or a backend qkv does not know.
    """
    if not isinstance(name, str) or not name or name in ("eager", "sdpa"):
        raise ValueError(f"register: name must be a new implementation name, got {name!r}")
    if backend != "auto" and backend not in registered():
        raise ValueError(f"register: unknown backend {backend!r}; choose 'auto' or one of {', '.join(registered())}")
    fn = functools.partial(attention_forward, backend=backend, options=dict(options))
    functools.update_wrapper(fn, attention_forward)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, build_mask)
    _NAMES.add(name)
    return name


def from_pretrained(folder: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """A local Hugging Face checkpoint folder on qkv, read offline: ``(model, tokenizer)``.

    Args:
        folder: a folder with ``config.json``, ``*.safetensors`` weights and the tokenizer's files.
        model_class: the ``transformers`` class to load (default ``AutoModel``: the base model, whose
            attention is what qkv runs).
        **kwargs: passed to ``from_pretrained`` (``torch_dtype``, ...).

    Returns:
        The model in eval mode with ``attn_implementation="qkv"`` and its tokenizer. Nothing is downloaded
        (``local_files_only``), only safetensors weights are read and no remote code runs.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its safetensors weights are missing.
    """
    from transformers import AutoModel, AutoTokenizer

    path = os.fspath(folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model folder {path!r} has no config.json")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise FileNotFoundError(f"model folder {path!r} has no .safetensors weights (qkv reads no pickled weights)")
    name = register()
    cls = model_class or AutoModel
    model = cls.from_pretrained(
        path, attn_implementation=name, local_files_only=True, use_safetensors=True, trust_remote_code=False, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model.eval(), tokenizer
