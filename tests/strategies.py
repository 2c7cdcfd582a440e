"""Hypothesis strategies shared by the backend conformance tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from qkv import masks as M

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def problems(draw, dtypes=DTYPES, max_len: int = 12, max_window: int = 5):
    """Random (q, k, v, mask) with GQA, Lq != Lk, Dv != D and a mask drawn from every constructor."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    Lq, Lk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    D, Dv = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 5]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype)
    kind = draw(
        st.sampled_from(
            [
                "none",
                "causal",
                "window",
                "padding",
                "document",
                "prefix",
                "dilated",
                "global",
                "block",
                "random",
                "dense",
                "fn",
                "combo",
            ]
        )
    )
    w = draw(st.integers(0, max_window))
    if kind == "none":
        mask = None
    elif kind == "causal":
        mask = M.causal()
    elif kind == "window":
        mask = M.sliding_window(w, draw(st.integers(0, 3)))
    elif kind == "padding":
        mask = M.padding(draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B)))
    elif kind == "document":
        q_ids = sorted(draw(st.lists(st.integers(0, 2), min_size=Lq, max_size=Lq)))
        k_ids = sorted(draw(st.lists(st.integers(0, 2), min_size=Lk, max_size=Lk)))
        mask = M.document(q_ids, k_ids)
    elif kind == "prefix":
        mask = M.prefix_lm(w)
    elif kind == "dilated":
        mask = M.dilated(w + 2, 2)
    elif kind == "global":
        mask = M.global_tokens(min(w, Lk)) | M.sliding_window(1, 1)
    elif kind == "block":
        bs = 3
        nq, nk = -(-Lq // bs), -(-Lk // bs)
        mask = M.block_sparse(torch.rand(nq, nk, generator=g) > 0.5, bs)
    elif kind == "random":
        mask = M.random_blocks(1, 3, seed=seed)
    elif kind == "dense":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.4
    elif kind == "fn":

        def mask(b, h, q_idx, kv_idx):  # a FlexAttention mask_mod, used as is
            return (q_idx + kv_idx + h) % 3 != 0

    else:
        mask = (M.causal() & M.sliding_window(w)) | ~M.padding(min(w, Lk))
    return q, k, v, mask


@st.composite
def sink_problems(draw, dtypes=DTYPES):
    """A drawn problem with sinks ``(H,)``: some heads may have none (``-inf``); in the dtype of q or float32."""
    q, k, v, mask = draw(problems(dtypes, max_len=13))
    H = q.shape[1]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    s = torch.randn(H, generator=g) * 2
    if draw(st.booleans()):  # a head without a sink
        s[draw(st.integers(0, H - 1))] = float("-inf")
    return q, k, v, s.to(draw(st.sampled_from([q.dtype, torch.float32]))), mask
