"""Data augmentation on whole batches of tensors (CPU or GPU), no per-image Python.

torchvision.transforms works one PIL image at a time inside DataLoader workers; for data held
in memory as tensors it is much faster to augment the batch in one go on the device it is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (N, C, H, W)."""
    flip = torch.rand(len(x), generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``padding`` (reflect) and cut a random HxW window from each image: a random
    translation by up to ``padding`` pixels, the classic CIFAR-10 augmentation.

    Vectorized with one gather: build each image's row and column indices and index once.
    """
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x.float() if not x.is_floating_point() else x, (padding,) * 4, mode="reflect").to(x.dtype)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]


def crop_flip(padding: int = 4, seed: int = 0):
    """A batch transform: random crop (translate) then random flip, with its own seed."""
    generator = torch.Generator().manual_seed(seed)

    def augment(x: torch.Tensor) -> torch.Tensor:
        return random_flip(random_crop(x, padding, generator), generator)

    return augment
