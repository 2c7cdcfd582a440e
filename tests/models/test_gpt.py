"""GPT: cached and uncached generation agree, sampling keeps to its top-k / top-p sets, the model is
causal (gradient test), backends and token mixers can be swapped."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from qkv.models import GPT, sample_next

D64 = torch.float64
POS = ["rope", "alibi", "learned", "sinusoidal"]


def _gpt(pos: str, window: int | None = None, **kw: Any) -> GPT:
    torch.manual_seed(0)
    m = GPT(37, 32, 2, 4, n_kv_heads=2, max_len=64, pos=pos, window=window, **kw).double().eval()
    with torch.no_grad():  # larger weights than the init, so that greedy choices are far from ties
        for p in m.parameters():
            p.mul_(3.0)
    return m


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("window", [None, 4])
def test_cached_and_uncached_generation_agree(pos: str, window: int | None) -> None:
    m = _gpt(pos, window)
    idx = torch.randint(0, 37, (2, 6))  # the prompt is longer than the window
    a = m.generate(idx, 25, temperature=0.0)
    b = m.generate(idx, 25, temperature=0.0, use_cache=False)
    assert a.shape == (2, 31) and torch.equal(a[:, :6], idx)
    assert torch.equal(a, b)
    assert len(set(a[0, 6:].tolist())) > 2  # not a degenerate repetition
    # stronger: logits of every cached step equal those of the full forward
    cache = m.make_cache(31)
    with torch.no_grad():
        steps = [m(a[:, :6], cache=cache)] + [m(a[:, t : t + 1], cache=cache) for t in range(6, 31)]
        torch.testing.assert_close(torch.cat(steps, 1), m(a), rtol=1e-9, atol=1e-9)


def test_window_limits_what_a_token_sees() -> None:
    """With a window of 3 and 2 layers the last token (position 9) reaches positions 5..9 only."""
    m = _gpt("rope", window=3)
    idx = torch.randint(0, 37, (1, 10))
    far, near = idx.clone(), idx.clone()
    far[0, :5] = (far[0, :5] + 1) % 37
    near[0, 5] = (near[0, 5] + 1) % 37
    with torch.no_grad():
        last = m(idx)[0, -1]
        torch.testing.assert_close(m(far)[0, -1], last, rtol=0, atol=1e-12)
        assert not torch.allclose(m(near)[0, -1], last)


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("window", [None, 3])
def test_causal_by_gradient(pos: str, window: int | None) -> None:
    m = _gpt(pos, window)
    idx = torch.randint(0, 37, (1, 8))
    emb = m.tok_emb(idx).detach().requires_grad_(True)
    handle = m.tok_emb.register_forward_hook(lambda mod, inp, out: emb)
    try:
        logits = m(idx)
    finally:
        handle.remove()
    for t in range(8):
        (g,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
        seen = g[0].abs().sum(-1)
        assert torch.all(seen[t + 1 :] == 0), f"output {t} depends on a later token"
        assert seen[t] > 0


def test_top_k_and_top_p_keep_to_their_sets() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=D64)
    logits = probs.log().expand(4000, 4)
    # greedy and top_k=1
    assert torch.equal(sample_next(logits[:2], temperature=0.0), torch.tensor([[1], [1]]))
    assert torch.all(sample_next(logits, top_k=1, generator=g) == 1)
    # top_k=2 keeps tokens 1 and 3, renormalised: 0.5/0.8 and 0.3/0.8
    s = sample_next(logits, top_k=2, generator=g)[:, 0]
    assert set(s.tolist()) == {1, 3}
    assert (s == 1).double().mean().item() == pytest.approx(0.625, abs=0.03)
    # top_p=0.7: token 1 (0.5) does not reach 0.7, so token 3 joins; token 2 is not needed
    s = sample_next(logits, top_p=0.7, generator=g)[:, 0]
    assert set(s.tolist()) == {1, 3}
    # top_p=0.4: the most likely token alone
    assert torch.all(sample_next(logits, top_p=0.4, generator=g) == 1)
    # plain sampling follows the probabilities; temperature 2 flattens them to softmax(log p / 2)
    s = sample_next(logits, generator=g)[:, 0]
    for i in range(4):
        assert (s == i).double().mean().item() == pytest.approx(probs[0, i].item(), abs=0.03)
    s = sample_next(logits, temperature=2.0, generator=g)[:, 0]
    flat = (probs.log() / 2).softmax(-1)[0]
    for i in range(4):
        assert (s == i).double().mean().item() == pytest.approx(flat[i].item(), abs=0.03)


def test_generation_with_sampling_is_reproducible_and_cache_independent() -> None:
    m = _gpt("rope")
    idx = torch.randint(0, 37, (2, 3))
    a = m.generate(idx, 12, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = m.generate(idx, 12, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)


def test_set_backend_gives_the_same_logits() -> None:
    m = _gpt("alibi", window=4)
    idx = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        want = m(idx)
        m.set_backend("reference")
        got = m(idx)
    assert all(mod.backend == "reference" for mod in m.modules() if hasattr(mod, "backend"))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


class CumulativeMean(nn.Module):
    """A toy token mixer: each position gets a projection of the mean of the inputs up to it. Its
    cache is the running sum and count."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def init_cache(self, max_len: int) -> dict[str, Any]:
        return {"sum": None, "n": 0}

    def forward(self, x: Tensor, *, mask: Any = None, score_mod: Any = None, cache: Any = None) -> Tensor:
        csum = x.cumsum(1)
        n0 = 0
        if cache is not None:
            if cache["sum"] is not None:
                csum = csum + cache["sum"]
            n0 = cache["n"]
            cache["sum"], cache["n"] = csum[:, -1:], n0 + x.shape[1]
        counts = torch.arange(n0 + 1, n0 + x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return self.proj(csum / counts)


def test_mixer_factory_swaps_layers() -> None:
    torch.manual_seed(0)
    m = GPT(37, 32, 3, 4, max_len=40, mixer_factory=lambda i: CumulativeMean(32) if i == 1 else None).double()
    assert isinstance(m.blocks[1].mixer, CumulativeMean)
    idx = torch.randint(0, 37, (2, 5))
    assert torch.equal(m.generate(idx, 10, temperature=0.0), m.generate(idx, 10, temperature=0.0, use_cache=False))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pos"):
        GPT(10, 8, 1, 2, max_len=8, pos="t5")
    m = GPT(10, 8, 1, 2, max_len=8, pos="learned")
    with pytest.raises(ValueError, match="max_len=8"):
        m.generate(torch.zeros(1, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 3), top_p=0.0)
    with pytest.raises(ValueError, match="idx"):
        m(torch.zeros(4))


def test_decoding_sees_weight_updates() -> None:
    """The decoding path keeps a transposed copy of the output weight: it must follow changes."""
    m = _gpt("rope")
    idx = torch.randint(0, 37, (1, 4))
    m.generate(idx, 3, temperature=0.0)
    with torch.no_grad():
        m.tok_emb.weight.mul_(-1.5)
    x = torch.randint(0, 37, (1, 1))
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.lm_head(m.norm(m.blocks[1](m.blocks[0](m.tok_emb(x), mask=m.mask)))))


def test_capture_weights_sees_every_layer() -> None:
    from qkv.nn import capture_weights

    m = _gpt("alibi", window=3)
    idx = torch.randint(0, 37, (2, 6))
    with capture_weights(m) as maps:
        m(idx)
    assert [name for name, _ in maps] == ["blocks.0.mixer", "blocks.1.mixer"]
    for _, w in maps:
        assert w.shape == (2, 4, 6, 6)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6, dtype=D64))
        i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
        assert torch.all(w[..., (j > i) | (j < i - 2)] == 0)  # causal, window of 3
