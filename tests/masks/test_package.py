"""``qkv.masks`` is a package whose modules are its layout: every public name is where it always was."""

from __future__ import annotations

import importlib

import qkv
from qkv import masks as M

BEFORE = [  # qkv.masks.__all__ when it was one module; names may be added, none taken away
    "EMPTY", "FULL", "PARTIAL", "Mask", "PositionalMask", "MaskLike", "MaskMod", "Shape", "as_mask",
    "block_sparse", "causal", "dilated", "document", "from_cu_seqlens", "from_dense", "from_fn", "full",
    "global_tokens", "left_padding", "padding", "prefix_lm", "random_blocks", "sliding_window",
]  # fmt: skip


def test_every_public_name_is_still_in_qkv_masks():
    assert set(BEFORE) <= set(M.__all__)
    assert len(M.__all__) == len(set(M.__all__))
    for name in M.__all__:
        assert getattr(qkv.masks, name) is getattr(importlib.import_module("qkv.masks"), name)
    assert callable(M.padding) and callable(M.document)  # functions, not the modules beside them


def test_the_modules_are_one_concept_each():
    where = {
        "base": ["Mask", "Shape", "tensor_key"],
        "positional": ["PositionalMask", "causal", "sliding_window", "dilated", "global_tokens", "full"],
        "lengths": ["padding", "left_padding", "prefix_lm"],
        "documents": ["document", "from_cu_seqlens"],
        "blocks": ["block_sparse", "random_blocks"],
        "custom": ["from_dense", "from_fn", "as_mask"],
    }
    for mod, names in where.items():
        for name in names:
            assert getattr(M, name).__module__ == f"qkv.masks.{mod}", name
