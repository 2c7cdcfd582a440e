"""The builder's result is a tensor that stands for HF's own mask (``HFMask``): a model that reads or edits it
gets exactly HF's ``eager`` mask, built once on first use; the ``"qkv"`` attention function reads the qkv
mask it carries and builds nothing; nothing of ``Lq x Lk`` exists unless the model touches it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402

import qkv.hf  # noqa: E402
from qkv.hf import HFMask, attention_forward  # noqa: E402

qkv.hf.register()
B, L, W = 2, 11, 3
AM = torch.tensor([[0, 0, 0] + [1] * 8, [1] * 11])


def _cfg(impl: str, dtype=torch.float32):
    cfg = transformers.MistralConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        sliding_window=W,
    )  # fmt: skip
    cfg._attn_implementation = impl
    return cfg, torch.zeros(B, L, 8, dtype=dtype)


def _pair(dtype=torch.float32) -> tuple[torch.Tensor, HFMask]:
    """(HF eager's mask, the qkv builder's HFMask) for the same sliding-window call on a left-padded batch."""
    out = []
    for impl in ("eager", "qkv"):
        cfg, embeds = _cfg(impl, dtype)
        out.append(mu.create_sliding_window_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=AM, cache=None))
    return out[0], out[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_it_has_hf_eager_mask_metadata_without_data(dtype):
    ref, got = _pair(dtype)
    assert isinstance(got, torch.Tensor) and isinstance(got, HFMask)
    assert got.shape == ref.shape == (B, 1, L, L) and got.dtype == ref.dtype == dtype and got.device == ref.device
    assert got.dim() == got.ndim == 4 and got.size(-1) == L and got.shape[-2] == L
    assert got._dense is None  # nothing above built it
    assert "causal" in repr(got) and "sliding_window" in repr(got) and got._dense is None


def test_any_torch_op_runs_on_exactly_hf_mask_built_once():
    ref, got = _pair()
    calls = []
    fn = got._dense_fn
    got._dense_fn = lambda: calls.append(1) or fn()
    assert torch.equal(got[:, 0], ref[:, 0])  # DeepSeek-V3.2's indexer: mask[:, 0, :, :]
    assert type(got[:, 0]) is torch.Tensor  # a plain tensor comes out
    assert torch.equal(got + 0, ref)
    assert torch.equal(got.masked_fill(torch.ones_like(ref, dtype=torch.bool), 1.0), torch.ones_like(ref))
    assert torch.equal(torch.cat([got, got], dim=-1), torch.cat([ref, ref], dim=-1))  # DeepSeek-V4's extra keys
    assert torch.equal(got != 0, ref != 0) and torch.equal(got.to(torch.bool), ref.to(torch.bool))
    assert len(calls) == 1


def test_slices_that_keep_everything_and_no_op_moves_are_the_mask_itself():
    _, got = _pair()
    for same in (got[:, :, :, :L], got[..., : L + 5], got[:], got[...], got.to(torch.float32), got.to("cpu")):
        assert same is got
    assert got._dense is None
    assert got[:, :, :, : L - 1] is not got and got._dense is not None  # a real slice builds it


def test_a_copy_or_pickle_keeps_the_values():
    ref, got = _pair()
    c = copy.deepcopy(got)
    assert isinstance(c, HFMask) and c.mask is got.mask and torch.equal(c + 0, ref)
    assert torch.equal(pickle.loads(pickle.dumps(got)), ref)


class _Layer(nn.Module):
    is_causal = True

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig()


def _formula(q, k, v, keep):
    w = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf")), -1)
    return (w.nan_to_num(0.0) @ v).transpose(1, 2)


def test_the_attention_function_reads_the_structure_and_builds_nothing():
    ref, got = _pair(torch.float64)
    q, k, v = (torch.randn(B, 2, L, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out, _ = attention_forward(_Layer(), q, k, v, got)
    assert got._dense is None
    assert (out - _formula(q, k, v, ref == 0)).abs().max() < 1e-12
    # what a model that edits the mask passes on: a plain tensor, taken as it is (bool: keep; float: additive)
    edited = got.masked_fill(torch.zeros(L, dtype=torch.bool).index_fill(0, torch.tensor([5]), True), torch.finfo(torch.float64).min)
    keep = (ref == 0) & (torch.arange(L) != 5)
    assert (attention_forward(_Layer(), q, k, v, edited)[0] - _formula(q, k, v, keep)).abs().max() < 1e-12
    assert (attention_forward(_Layer(), q, k, v, keep)[0] - _formula(q, k, v, keep)).abs().max() < 1e-12


def test_sparse_indexer_indices_narrow_the_mask():
    """DeepSeek-V3.2-style ``indices (B, Lq, topk)``: the keys each query may see among those the mask allows."""
    ref, got = _pair(torch.float64)
    q, k, v = (torch.randn(B, 2, L, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    idx = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b))[:4] for b in range(B * L)]).view(B, L, 4)
    idx[0, :, 0] = -1  # none
    sel = torch.zeros(B, L, L + 1, dtype=torch.bool).scatter(-1, torch.where(idx < 0, L, idx), True)[..., :L]
    out, _ = attention_forward(_Layer(), q, k, v, got, indices=idx)
    assert (out - _formula(q, k, v, (ref == 0) & sel[:, None])).abs().max() < 1e-12
    with pytest.raises(ValueError, match="indices"):
        attention_forward(_Layer(), q, k, v, got, indices=idx[:, :3])


def test_nothing_of_lq_by_lk_in_a_model_that_does_not_read_its_mask():
    """A Mistral-shaped model on "qkv" (sliding window, left padding, prefill and decoding): every layer's mask
    stays structure."""
    cfg, _ = _cfg("eager")
    model = transformers.MistralForCausalLM._from_config(cfg, attn_implementation="qkv").eval()
    built = []
    dense = HFMask.dense
    HFMask.dense = lambda self: built.append(1) or dense(self)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            ids = torch.randint(1, 16, (B, L))
            model(input_ids=ids, attention_mask=AM)
            model.generate(input_ids=ids, attention_mask=AM, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        HFMask.dense = dense  # type: ignore[method-assign]
    assert built == []
