"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, learned positions, and
pre-norm :class:`qkv.nn.TransformerBlock` s (so ``qkv.nn.capture_weights`` and the hook points see every
layer). Attention rollout of the class token over the patches::

    from qkv.analysis import attention_rollout, capture
    r = attention_rollout(capture(vit, images))[:, 0, 1:].reshape(-1, vit.grid, vit.grid)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.blocks import TransformerBlock

__all__ = ["ViT"]


class ViT(nn.Module):
    """A small Vision Transformer for classification.

    Args:
        image_size: side of the square input image (pixels).
        patch_size: side of a square patch; must divide ``image_size``.
        num_classes: number of output classes.
        dim: model width; depth: encoder blocks; heads: attention heads; mlp: feed-forward width.
        channels: image channels.
        dropout: dropout inside the blocks (attention weights, feed-forward, residual branches).
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
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp or 2 * dim, dropout=dropout, norm_first=True) for _ in range(depth)
        )
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
