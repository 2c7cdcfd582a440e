"""Small models whose attention, importance and heads are known by construction (shared by the tests)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.masks import causal
from qkv.nn import MultiHeadAttention


class CopyModel(nn.Module):
    """Copies one token to the output: tokens ``>= V // 2`` are *marked* (embedding dim 0 is 1), every sequence
    has one marked token, the last query attends (all but) only to it, and the output is ``u . content`` of
    what the attention returns. Known truth: the marked position is the only important token.

    ``forward(ids (B, L)) -> (B,)``; ``self.emb`` is the token embedding."""

    def __init__(self, vocab: int = 16, dim: int = 8, sharp: float = 60.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        e[:, 0] = 0.0
        e[vocab // 2 :, 0] = 1.0  # the mark
        self.emb = nn.Embedding(vocab, dim).double()
        self.emb.weight.data.copy_(e)
        self.attn = MultiHeadAttention(dim, 1).double()
        with torch.no_grad():
            for lin in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.out_proj):
                lin.weight.zero_()
                lin.bias.zero_()
            self.attn.q_proj.bias[0] = 1.0  # every query is e_0
            self.attn.k_proj.weight[0, 0] = sharp  # key = sharp * mark
            self.attn.v_proj.weight[1:, 1:] = torch.eye(dim - 1, dtype=torch.float64)  # value = content
            self.attn.out_proj.weight.copy_(torch.eye(dim, dtype=torch.float64))
        self.u = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        h = self.attn(x)
        return h[:, -1] @ self.u


def copy_inputs(vocab: int = 16, length: int = 7, batch: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Token ids ``(batch, length)`` with exactly one marked token per row, and its position ``(batch,)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab // 2, (batch, length), generator=g)
    pos = torch.randint(0, length, (batch,), generator=g)
    ids[torch.arange(batch), pos] = torch.randint(vocab // 2, vocab, (batch,), generator=g)
    return ids, pos


class InductionModel(nn.Module):
    """A hand-built two-layer attention-only transformer (one-hot residual stream ``[token | position |
    previous token]``): layer 0's head attends to the previous token and writes its identity into the residual;
    layer 1's head matches the current token against that and attends to the token after the earlier occurrence:
    a previous-token head (layer 0) and an induction head (layer 1), by construction."""

    def __init__(self, vocab: int = 12, max_len: int = 32, sharp: float = 400.0):
        super().__init__()
        V, P = vocab, max_len
        self.V, self.P = V, P
        D = 2 * V + P
        self.l0 = MultiHeadAttention(D, 1).double()
        self.l1 = MultiHeadAttention(D, 1).double()
        tok, pos, prev = slice(0, V), slice(V, V + P), slice(V + P, D)
        with torch.no_grad():
            for m in (self.l0, self.l1):
                for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                    lin.weight.zero_()
                    lin.bias.zero_()
                m.out_proj.weight.copy_(torch.eye(D, dtype=torch.float64))
            # layer 0: query at position i looks for key position i - 1; value: the key's token into the prev slot
            for i in range(1, P):
                self.l0.q_proj.weight[V + i - 1, V + i] = sharp
            self.l0.k_proj.weight[pos, pos] = torch.eye(P, dtype=torch.float64)
            self.l0.v_proj.weight[prev, tok] = torch.eye(V, dtype=torch.float64)
            # layer 1: query = own token (in the prev slot's coordinates), key = the previous token written by layer 0
            self.l1.q_proj.weight[prev, tok] = sharp * torch.eye(V, dtype=torch.float64)
            self.l1.k_proj.weight[prev, prev] = torch.eye(V, dtype=torch.float64)
            self.l1.v_proj.weight[tok, tok] = torch.eye(V, dtype=torch.float64)
        self.readout = nn.Linear(D, V).double()

    def forward(self, ids: Tensor) -> Tensor:
        B, L = ids.shape
        x = torch.cat(
            [
                nn.functional.one_hot(ids, self.V).double(),
                nn.functional.one_hot(torch.arange(L), self.P).double().expand(B, L, self.P),
                torch.zeros(B, L, self.V, dtype=torch.float64),
            ],
            dim=-1,
        )
        x = x + self.l0(x, mask=causal())
        x = x + self.l1(x, mask=causal())
        return self.readout(x)
