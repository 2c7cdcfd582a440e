"""HF's mask closures the bridge cannot read become HF's own function on tiles, with the reason, never an error.

The bridge reads the variables inside ``masking_utils``' closures (``sliding_window_overlay``'s
``sliding_window``, ``and_masks``' ``mask_functions``, ...). A later ``transformers`` may rename them, change
their types or add mask functions; these tests make such closures by hand (same module and qualified name
as HF's, other variables inside) and check that the builder falls back to HF's function evaluated on
tiles, records why, that ``qkv.explain`` shows the reason on its ``mask:`` line, and that the mask is still
exactly HF's.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402

import qkv  # noqa: E402
import qkv.hf  # noqa: E402
from qkv.hf import build_mask  # noqa: E402
from qkv.hf import masks as hf_masks  # noqa: E402

B, L = 2, 9
AM = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def _as_hf(fn, factory: str):
    """``fn`` dressed as the closure ``masking_utils.<factory>`` returns (its module and qualified name)."""
    fn.__module__ = mu.__name__
    fn.__qualname__ = f"{factory}.<locals>.inner_mask"
    return fn


def _renamed_window(w: int):
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):  # HF's sliding_window_overlay, variable renamed
        return kv_idx > q_idx - window

    window = w
    return _as_hf(inner_mask, "sliding_window_overlay")


def _check(fn, reason: str, am: torch.Tensor | None = AM) -> str:
    """The builder's mask for ``fn`` equals HF's, elementwise, and names ``reason``; returns explain's text."""
    args = dict(batch_size=B, q_length=L, kv_length=L, mask_function=fn, attention_mask=am)
    ref = mu.sdpa_mask(**args, allow_is_causal_skip=False).expand(B, 1, L, L)
    got = build_mask(**args, dtype=torch.float32)
    assert got is not None and any(reason in f for f in got.fallbacks), got.fallbacks
    assert torch.equal(got.mask.to_dense(B, 1, L, L).expand(B, 1, L, L), ref)
    assert torch.equal(got + 0, torch.where(ref, 0.0, torch.finfo(torch.float32).min))  # what a model reads
    q = torch.randn(B, 2, L, 4)
    text = str(qkv.explain(q, q, q, mask=got.mask))
    mask_line = next(line for line in text.splitlines() if line.strip().startswith("mask:"))
    assert reason in mask_line, text
    return text


def test_a_renamed_closure_variable_falls_back_with_the_reason():
    fn = mu.and_masks(_renamed_window(3), mu.causal_mask_function)
    _check(fn, "does not capture 'sliding_window'")
    # the causal half of the and is still structure
    got = build_mask(B, L, L, mask_function=fn, attention_mask=AM)
    assert "causal" in repr(got.mask)


def test_a_variable_of_another_type_falls_back():
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx > q_idx - sliding_window

    sliding_window = torch.tensor(3)  # a tensor where HF keeps an int
    fn = _as_hf(inner_mask, "sliding_window_overlay")
    _check(mu.and_masks(fn, mu.causal_mask_function), "is a Tensor, not a int")


def test_a_renamed_and_masks_list_falls_back_whole():
    parts = (mu.causal_mask_function, mu.sliding_window_overlay(3))

    def and_mask(batch_idx, head_idx, q_idx, kv_idx):  # and_masks with its list renamed
        out = q_idx.new_ones((), dtype=torch.bool)
        for f in functions:
            out = out & f(batch_idx, head_idx, q_idx, kv_idx)
        return out

    functions = parts
    fn = _as_hf(and_mask, "and_masks")
    _check(fn, "does not capture 'mask_functions'")


def test_renamed_packed_sequence_and_padding_closures_fall_back():
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1]])

    def packed(batch_idx, head_idx, q_idx, kv_idx):
        return seq[batch_idx, q_idx] == seq[batch_idx, kv_idx]

    seq = ids
    fn = mu.and_masks(mu.causal_mask_function, _as_hf(packed, "packed_sequence_mask_function"))
    _check(fn, "does not capture 'packed_sequence_mask'", am=None)

    def pad(batch_idx, head_idx, q_idx, kv_idx):
        return real[batch_idx, kv_idx]

    real = AM.bool()
    fn = mu.and_masks(mu.causal_mask_function, _as_hf(pad, "padding_mask_function"))
    _check(fn, "does not capture 'padding_mask'", am=None)


def test_an_unknown_mask_function_falls_back():
    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):  # a new overlay a later release might add
        return (kv_idx % 3) != 1

    fn = mu.and_masks(mu.causal_mask_function, _as_hf(inner_mask, "strided_overlay"))
    _check(fn, "has no qkv equivalent")


def test_a_release_without_the_functions_the_bridge_names(monkeypatch):
    """``masking_utils`` without ``causal_mask_function``'s identity, HF's skip test or the packed-sequence
    finder (as the bridge looks them up; HF's own code keeps them): the builder still answers, exactly."""
    causal = mu.causal_mask_function
    gone = {"find_packed_sequence_indices", "_ignore_bidirectional_mask_sdpa", "causal_mask_function"}
    monkeypatch.setattr(hf_masks, "_hf", lambda name: None if name in gone else getattr(mu, name, None))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]] * 2)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]] * 2)
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(causal, pos), mu.packed_sequence_mask_function(ids))
    _check(fn, "find_packed_sequence_indices", am=None)
    got = build_mask(B, L, L, mask_function=mu.bidirectional_mask_function, attention_mask=None,
                     allow_is_bidirectional_skip=True)  # fmt: skip
    assert got is None  # HF's builder was asked, and it skips
    _check(causal, "has no qkv equivalent")
