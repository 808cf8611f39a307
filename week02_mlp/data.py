"""Week 2's data as tensors in memory: a validation split held out, inputs standardized once.

Part 2 and the self-work scripts use ``prepare``; Week 7 reuses ``Splits`` for its token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.data import ImageData, TabularData
from common.loader import normalizer, split


@dataclass
class Splits:
    """Normalized float tensors for training, validation (may be empty) and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    is_image: bool

    @property
    def in_features(self) -> int:
        return self.x_train[0].numel()


def prepare(data: ImageData | TabularData, val_fraction: float, seed: int = 0) -> Splits:
    """Hold out a validation split, then standardize the inputs: tabular features with the mean
    and std of the training part only (using validation or test rows would leak information
    about them), images with the per-channel pixel statistics of the training images."""
    x_tr, y_tr, x_val, y_val = split(data.x_train, data.y_train, val_fraction, seed)
    if isinstance(data, ImageData):
        scale = normalizer(data.mean, data.std)  # uint8 pixels -> standardized float32
    else:
        mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1e-6)
        scale = lambda x: (x - mean) / std  # noqa: E731
    return Splits(scale(x_tr), y_tr, scale(x_val), y_val, scale(data.x_test), data.y_test,
                  list(data.classes), isinstance(data, ImageData))
