"""``linear`` backend: against Katharopoulos et al.'s formula computed directly in float64, causality by
gradients, recurrent decoding equal to the parallel form, declines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.backends.linear import LinearAttentionState, step
from qkv.masks import causal, sliding_window


def formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), by explicit loops over i (float64)."""
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = H // Hkv
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                last = i + Lk - Lq if is_causal else Lk - 1
                if last < 0:
                    continue
                fq = F.elu(q[b, h, i].double()) + 1
                fk = F.elu(k[b, h // g, : last + 1].double()) + 1
                w = fk @ fq  # (j,)
                out[b, h, i] = (w[:, None] * v[b, h // g, : last + 1].double()).sum(0) / w.sum()
    return out


@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    g=st.integers(1, 2),
    Lq=st.integers(1, 13),
    Lk=st.integers(1, 13),
    D=st.integers(1, 5),
    Dv=st.integers(1, 5),
    is_causal=st.booleans(),
    chunk=st.integers(1, 6),
    seed=st.integers(0, 100),
)
def test_matches_formula(
    B: int, Hkv: int, g: int, Lq: int, Lk: int, D: int, Dv: int, is_causal: bool, chunk: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=gen, dtype=torch.float64)
    got = qkv.attention(q, k, v, backend="linear", mask=causal() if is_causal else None, chunk_size=chunk)
    torch.testing.assert_close(got, formula(q, k, v, is_causal), rtol=1e-10, atol=1e-10)
    got32 = qkv.attention(q.float(), k.float(), v.float(), backend="linear", mask=causal() if is_causal else None)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), formula(q, k, v, is_causal), rtol=1e-4, atol=1e-5)


def test_weights_reproduce_output() -> None:
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    out, w = qkv.attention(q, k, v, backend="linear", mask=causal(), return_weights=True)
    torch.testing.assert_close(w @ v, out)
    assert (w.triu(1) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 9, dtype=torch.float64))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_causal_never_sees_the_future(chunk: int) -> None:
    L = 12
    q, k, v = (torch.randn(1, 2, L, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = qkv.attention(q, k, v, backend="linear", mask=causal(), chunk_size=chunk)
    for t in range(L):
        dq, dk, dv = torch.autograd.grad(out[:, :, t].sum(), (q, k, v), retain_graph=True)
        for g in (dq, dk, dv):
            assert (g[:, :, t + 1 :] == 0).all(), f"output {t} depends on a later input"
        assert dv[:, :, t].abs().sum() > 0  # and it does see its own position


def test_recurrent_step_equals_parallel() -> None:
    B, H, Hkv, L, D, Dv = 2, 4, 2, 17, 8, 5
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, Dv, dtype=torch.float64)
    par = qkv.attention(q, k, v, backend="linear", mask=causal(), chunk_size=5)
    state: LinearAttentionState | None = None
    outs = []
    for t in range(L):
        o, state = step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(o)
    assert state is not None and state.t == L and state.kv.shape == (B, H, D, Dv)
    torch.testing.assert_close(torch.stack(outs, 2), par, rtol=1e-12, atol=1e-12)


def test_declines_and_errors() -> None:
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(NotImplementedError, match="mask=None or mask=causal"):
        qkv.attention(q, q, q, backend="linear", mask=sliding_window(2))
    with pytest.raises(NotImplementedError, match="score mod"):
        qkv.attention(q, q, q, backend="linear", score_mod=qkv.scores.softcap(5.0))
    with pytest.raises(NotImplementedError, match="dropout"):
        qkv.attention(q, q, q, backend="linear", dropout_p=0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        qkv.attention(q, q, q, backend="linear", mask=causal(), chunk_size=0)
    with pytest.raises(TypeError, match="num_features"):
        qkv.attention(q, q, q, backend="linear", num_features=3)
    with pytest.raises(ValueError, match="q_t"):
        step(q[0, 0], q[0, 0], q[0, 0])
    assert "linear" not in str(qkv.explain(q, q, q)).split("\n")[0]
