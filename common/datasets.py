"""The containers every data set is loaded into: images or tables, held in memory as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.download import DAMAGED, damaged


@dataclass
class ImageData:
    """Images as uint8 tensors (N, C, H, W) and int64 labels, all in memory."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per-channel mean/std of the training images, in [0, 1] units
    std: tuple[float, ...]
    name: str = ""
    synthetic: bool = False
    source: str = ""  # where it was read from (a folder or file), for messages
    x_val: torch.Tensor | None = None  # its own validation split, if the set has one (flowers102)
    y_val: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class TabularData:
    """Features (float32, N x D) and targets (int64 classes, or float32 for regression)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]  # empty for regression
    feature_names: list[str]
    name: str = ""
    synthetic: bool = False
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of 10,000 images drawn at random (a fixed draw): the first
    10,000 of a set stored class by class (the CIFAR-10 JPEG copy) would be two classes only."""
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:10_000]
    sample = x[pick].float() / 255
    return tuple(sample.mean(dim=(0, 2, 3)).tolist()), tuple(sample.std(dim=(0, 2, 3)).tolist())


# ----------------------------------------------------------------------------------------
# Validation, once, on load
# ----------------------------------------------------------------------------------------
def validate(name: str, data: ImageData | TabularData, remedy: str = DAMAGED) -> None:
    """Raise ``DataError`` naming the set, the split and the source unless ``data`` is sound:
    as many labels as inputs, images uint8 (N, C, H, W) of one size, features finite float32
    (N, D), class labels int64 in [0, num_classes), regression targets float.

    Cheap (a few reductions), and it turns damaged files into a clear message at load time
    instead of a device-side assert or a silently wrong loss hours into training.
    """

    def fail(what: str):
        raise damaged(name, what, data.source or "memory", remedy)

    image = isinstance(data, ImageData)
    splits = (("training", data.x_train, data.y_train), ("test", data.x_test, data.y_test))
    for split, x, y in splits:
        if len(x) != len(y):
            fail(f"the {split} set has {len(x)} inputs but {len(y)} labels")
        if len(x) == 0:
            fail(f"the {split} set is empty")
        if image and (x.dtype != torch.uint8 or x.ndim != 4):
            fail(f"{split} images must be uint8 (N, C, H, W), found {x.dtype} {tuple(x.shape)}")
        if image and x.shape[1:] != data.x_train.shape[1:]:
            fail(f"{split} images are {tuple(x.shape[1:])} "
                 f"but training images {tuple(data.x_train.shape[1:])}")
        if not image and (x.dtype != torch.float32 or x.ndim != 2 or not torch.isfinite(x).all()):
            fail(f"{split} features must be finite float32 (N, D), "
                 f"found {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1:
            fail(f"{split} labels must be one per row (N,), found shape {tuple(y.shape)}")
        if data.classes:
            k = len(data.classes)
            if y.dtype != torch.int64:
                fail(f"{split} labels must be int64 class indices, found {y.dtype}")
            bad = y[(y < 0) | (y >= k)]
            if len(bad):
                fail(f"{split} labels must be in 0..{k - 1}, found {bad[0].item()}")
        elif not y.is_floating_point():
            fail(f"{split} targets of a regression set must be float, found {y.dtype}")
