"""Data augmentation on whole batches of tensors (CPU or GPU), no per-image Python.

torchvision.transforms works one PIL image at a time inside DataLoader workers; for data held
in memory as tensors it is much faster to augment the batch in one go on the device it is on.

``crop_flip`` and ``translate`` return augment functions ``(x, generator) -> x`` for
``TensorLoader(augment=...)``. They take the random generator as an argument instead of owning
one, so the loader can hand each batch a generator seeded from (seed, epoch, batch): the same
epoch then gets the same augmentation, which is what makes a resumed run repeat exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (N, C, H, W)."""
    flip = torch.rand(len(x), generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int = 4,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad by ``padding`` (reflect) and cut a random HxW window from each image: a random
    translation by up to ``padding`` pixels, the classic CIFAR-10 augmentation.

    Vectorized with one gather: build each image's row and column indices and index once.
    """
    if padding == 0:
        return x
    n, _, h, w = x.shape
    source = x.float() if not x.is_floating_point() else x
    padded = F.pad(source, (padding,) * 4, mode="reflect").to(x.dtype)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]


def crop_flip(padding: int = 4) -> Augment:
    """Random crop (translate by up to ``padding`` pixels), then random left-right flip: for
    photos (CIFAR-10), where a mirrored scene is still the same class."""

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_flip(random_crop(x, padding, generator), generator)

    return augment


def translate(padding: int) -> Augment:
    """Random shifts by up to ``padding`` pixels, never a mirror: for digits and letters,
    where a flipped 2 is not a 2."""

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_crop(x, padding, generator)

    return augment


def random_resized_crop(scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> Augment:
    """torchvision's RandomResizedCrop (+ a random left-right flip) on a whole batch at once:
    each image gets a random window covering ``scale`` of its area with aspect ratio in
    ``ratio``, stretched back to the full H x W. The standard augmentation for fine-tuning on
    photos: the net sees parts of the object at different sizes and places.

    One ``affine_grid`` + ``grid_sample`` for the batch: per image, the 2x3 matrix
    [[w * sign, 0, cx], [0, h, cy]] maps output pixels (in [-1, 1] coordinates) into the window
    of half-width w and half-height h centred at (cx, cy); sign = -1 mirrors it. uint8 in,
    uint8 out.
    """

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
        lo, hi = torch.tensor(ratio).log().tolist()
        log_ratio = torch.empty(n).uniform_(lo, hi, generator=generator)
        aspect = log_ratio.exp()  # width / height of the window
        w = (area * aspect).sqrt().clamp(max=1.0)  # as fractions of the image side
        h = (area / aspect).sqrt().clamp(max=1.0)
        # centres chosen so that the window stays inside the image
        cx = (1 - w) * (2 * torch.rand(n, generator=generator) - 1)
        cy = (1 - h) * (2 * torch.rand(n, generator=generator) - 1)
        sign = torch.ones(n)
        if flip:
            sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.round().clamp(0, 255).to(x.dtype) if not x.is_floating_point() else out

    return augment
