"""Synthetic twins: in-memory data sets with the shapes and classes of the real ones.

``--smoke`` and ``synthetic=True`` use them (through ``common.data.load``), so every script runs
offline in seconds. They are hard enough that a model has to learn: an image's class is a shape
and a texture at a random place, size and colour, not a pixel lookup.
"""

from __future__ import annotations

import math

import torch

SHAPES = ("disk", "square", "ring", "cross", "triangle")


def synthetic_images(n: int, channels: int = 1, size: int = 28, num_classes: int = 10,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images (n, channels, size, size) whose class is a shape and a texture.

    Class k draws shape ``SHAPES[k % 5]``, solid when k < 5, striped (random angle and
    frequency) when k >= 5. Position, size, brightness (or colours) and noise are random, so a
    model must learn shape and texture, not a pixel lookup. All vectorized: no Python loop.
    """
    if not 2 <= num_classes <= 2 * len(SHAPES):
        raise ValueError(f"synthetic_images supports 2..{2 * len(SHAPES)} classes, "
                         f"got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes  # balanced classes, then shuffled
    y = y[torch.randperm(n, generator=g)]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy, scale = uniform(-0.3, 0.3, 1, 1), uniform(-0.3, 0.3, 1, 1), uniform(0.4, 0.65, 1, 1)
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    radius = torch.sqrt(dx**2 + dy**2)
    masks = torch.stack([
        radius < 1.0,                                                         # disk
        torch.maximum(dx.abs(), dy.abs()) < 0.8,                              # square
        (radius > 0.55) & (radius < 1.0),                                     # ring
        ((dx.abs() < 0.3) & (dy.abs() < 1)) | ((dy.abs() < 0.3) & (dx.abs() < 1)),  # cross
        (dy > 2 * dx.abs() - 1) & (dy < 0.8),                                 # triangle
    ], dim=1).float()  # (n, 5, H, W)
    mask = masks[torch.arange(n), y % len(SHAPES)]
    theta, freq = uniform(0, math.pi, 1, 1), uniform(2.5, 4.0, 1, 1)
    along = dx * torch.cos(theta) + dy * torch.sin(theta)  # distance along the stripe normal
    stripes = (torch.sin(freq * math.pi * along) > 0).float()
    striped = (y >= len(SHAPES)).float().view(n, 1, 1)
    texture = striped * (0.25 + 0.75 * stripes) + (1 - striped)
    if channels == 1:
        background, foreground = uniform(0.0, 0.25, 1, 1, 1), uniform(0.7, 1.0, 1, 1, 1)
    else:  # random colours; keep foreground and background apart in brightness
        background = uniform(0.0, 0.35, channels, 1, 1)
        foreground = (background + uniform(0.4, 0.65, channels, 1, 1)).clamp(max=1)
    image = background + (foreground - background) * (mask * texture).unsqueeze(1)
    image = image + 0.08 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), y


def synthetic_tabular(n: int, num_features: int, num_classes: int, seed: int = 0,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs for classification (``num_classes`` >= 2) or a noisy nonlinear target
    for regression (``num_classes`` == 0), float32 features."""
    g = torch.Generator().manual_seed(seed)
    if num_classes == 0:
        x = torch.randn(n, num_features, generator=g)
        w = torch.randn(num_features, generator=g)
        y = x @ w + 0.5 * torch.sin(2 * x[:, 0]) + 0.3 * torch.randn(n, generator=g)
        return x, y
    centers = 2.0 * torch.randn(num_classes, num_features, generator=g)
    y = torch.arange(n) % num_classes
    x = centers[y] + 1.2 * torch.randn(n, num_features, generator=g)
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]
