"""Week 12: a small Vision Transformer (Dosovitskiy et al. 2021), written out.

An image becomes a sequence: cut it into patch x patch squares, flatten each, project it to a
``dim``-wide token. A learned [class] token is put in front, a learned position vector is added
to every token (attention itself does not know where a token came from), and pre-norm
transformer blocks mix the tokens. The class token's final state is classified.

Shapes below: B images, C channels, H x W pixels, L patches, T = L + 1 tokens, d = dim,
nh heads of hs = d / nh channels each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def num_patches(size: int, patch: int) -> int:
    """Tokens from a size x size image: ceil(size / patch) per side (the last patch padded)."""
    return math.ceil(size / patch) ** 2


class PatchEmbedding(nn.Module):
    """(B, C, H, W) images -> (B, L, d) tokens, one per patch, row by row.

    "Flatten each patch and multiply by a matrix" is exactly a convolution whose kernel and
    stride are the patch size. An image whose side is not a multiple of the patch is zero-padded
    on the right and bottom (zero = the mean colour after normalization): L = ceil(H/p) ceil(W/p).
    """

    def __init__(self, in_channels: int, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[2] % self.patch, -x.shape[3] % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)  # (B, d, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, L, d): row by row


class Attention(nn.Module):
    """Multi-head self-attention, written out: softmax(Q K^T / sqrt(hs)) V per head.

    (F.scaled_dot_product_attention would fuse it; with 65 tokens the explicit form is as fast
    on the CPU, exports to ONNX as plain MatMul/Softmax, and FlopCounterMode can count it.)"""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, d // self.heads)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        scores = q @ k.transpose(-2, -1) * self.scale  # (B, nh, T, T): who looks at whom
        weights = scores.softmax(dim=-1)  # each row sums to 1 over the T tokens looked at
        mixed = (weights @ v).transpose(1, 2).reshape(B, T, d)  # (B, T, d): the heads side by side
        return self.dropout(self.proj(mixed))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)). Normalizing the
    branch inputs (not the sum) keeps a clean residual path, so deep stacks train without warm
    restarts or careful init."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """patches -> [class] token + positions -> blocks -> LayerNorm -> linear head on the class
    token.

    ``positional=False`` leaves the position vectors out: the model then sees a bag of patches
    (shuffling them changes nothing, as the tests check), which is what the position vectors fix.
    """

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 patch: int = 4, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
                 dropout: float = 0.0, positional: bool = True):
        super().__init__()
        self.patches = PatchEmbedding(in_channels, patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        tokens = 1 + num_patches(image_size, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim)) if positional else None
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for parameter in (self.cls_token, self.pos_embed):
            if parameter is not None:
                nn.init.trunc_normal_(parameter, std=0.02)  # small: positions start as a hint
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x)  # (B, L, d)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, d); shape[0]: a dynamic batch
        tokens = torch.cat([cls, tokens], dim=1)  # (B, T, d)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed  # (1, T, d) broadcast over the batch
        tokens = self.norm(self.blocks(tokens))  # (B, T, d)
        return self.head(tokens[:, 0])  # (B, classes): the class token alone is classified


def _init_linear(module: nn.Module) -> None:
    """Linear weights ~ truncated normal(0.02), zero biases: the usual ViT start."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
