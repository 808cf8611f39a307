"""Week 11's images in memory: the Dataset every rank indexes, and its three splits.

part2.py, restart.py, profiling.py and throughput.py all read their data through ``Images``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from common.data import ImageData
from common.loader import split


class Images(Dataset):
    """uint8 images (N, 1, 28, 28) held in memory, handed out normalized. ``dataset[i]`` is one
    example (DataLoader calls it B times per batch and stacks: ``--loading per_sample``);
    ``dataset[list_of_indices]`` is a whole batch in one gather (``--loading batched``): the
    fix for the bottleneck profiling.py finds."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: float, std: float):
        self.x, self.y, self.mean, self.std = x, y, mean, std

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        return self.normalize(self.x[index]), self.y[index]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std


def make_datasets(cfg, data: ImageData) -> tuple[Images, Images, Images]:
    """Training, validation (``cfg.val_fraction`` of the training images, held out with
    ``cfg.seed``: the same on every rank) and test."""
    x, y, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    mean, std = data.mean[0], data.std[0]
    return (Images(x, y, mean, std), Images(x_val, y_val, mean, std),
            Images(data.x_test, data.y_test, mean, std))
