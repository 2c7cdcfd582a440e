"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, learned positions,
pre-norm transformer encoder blocks whose attention goes through :class:`qkv.nn.AttentionModule`
(so ``qkv.nn.capture_weights`` sees every layer), and attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.base import capture_weights
from ._blocks import Block

__all__ = ["ViT", "attention_rollout"]


def attention_rollout(weights: list[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020).

    Each layer's weights are averaged over heads, mixed with the identity for the residual path,
    ``A = residual * I + (1 - residual) * mean_h(W)``, rows renormalised, and the layers multiplied
    from the first: ``R = A_L ... A_2 A_1``.

    Args:
        weights: one ``(B, H, L, L)`` tensor per layer, in forward order.
        residual: weight of the identity (0.5 in the paper).

    Returns:
        ``(B, L, L)``: how much each output token draws on each input token through all layers.
    """
    if not weights:
        raise ValueError("attention_rollout: weights must hold at least one layer, got an empty list")
    B, _, L, L2 = weights[0].shape
    if L != L2:
        raise ValueError(f"attention_rollout: self-attention maps must be square, got {tuple(weights[0].shape)}")
    eye = torch.eye(L, dtype=weights[0].dtype, device=weights[0].device)
    roll = eye.expand(B, L, L)
    for w in weights:
        if w.shape[0] != B or w.shape[2:] != (L, L):
            raise ValueError(f"attention_rollout: every layer must be (B, H, {L}, {L}), got {tuple(w.shape)}")
        a = residual * eye + (1 - residual) * w.mean(1)
        a = a / a.sum(-1, keepdim=True)
        roll = a @ roll
    return roll


class ViT(nn.Module):
    """A small Vision Transformer for classification.

    Args:
        image_size: side of the square input image (pixels).
        patch_size: side of a square patch; must divide ``image_size``.
        num_classes: number of output classes.
        dim: model width; depth: encoder blocks; heads: attention heads; mlp: feed-forward width.
        channels: image channels.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp: int | None = None,
        channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT: patch_size={patch_size} must divide image_size={image_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid = image_size // patch_size
        n = self.grid**2
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)  # a linear map of each patch
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp or 2 * dim, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``(B, C, S, S)`` -> class logits ``(B, num_classes)``."""
        want = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"ViT: images must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(images.shape)}")
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))

    @torch.no_grad()
    def rollout(self, images: Tensor, residual: float = 0.5) -> Tensor:
        """Attention-rollout map of the class token over the patches: ``(B, grid, grid)``, rows sum to
        at most 1 (the rest stays on the class token itself)."""
        with capture_weights(self) as maps:
            self(images)
        roll = attention_rollout([w for _, w in maps], residual)
        return roll[:, 0, 1:].reshape(-1, self.grid, self.grid)
