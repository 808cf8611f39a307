"""Week 5: the images the week's scripts train on, with a validation split, and their batches.

    data = load_splits(cfg)                                   # ImageData, x_val / y_val set
    train, val, test = image_loaders(cfg, data, transform, device)   # uint8 images, augmented
    features = [extract_features(body, x, transform, device) for x in (x_train, x_val, x_test)]
    train, val, test = feature_loaders(cfg, data, features, device)  # frozen mode: (N, D) each
    val_mirror, test_mirror = mirrored(data, transform, device, body)  # flip TTA's other view
    logits, targets = scored(model, test, test_mirror)               # mean logits of both views

Images are decoded once to uint8 tensors at ``cfg.image_size`` (common.imagefolder) and stay in
memory; each batch is augmented (random resized crops and flips) and normalized on the fly.
Frozen mode runs the frozen body over every image once and trains the head on those features.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from common.augment import random_resized_crop
from common.data import ImageData
from common.errors import ConfigError
from common.imagefolder import load_images
from common.loader import TensorLoader, split
from common.plots import plot_images
from common.train import predict


def load_splits(cfg, n_synthetic: int = 320) -> ImageData:
    """The data set at ``cfg.image_size`` with a validation split: its own, else
    ``cfg.val_fraction`` of the training images (hymenoptera: its val/ folder is the test set)."""
    data = load_images(cfg.dataset, cfg.data_dir, cfg.image_size, smoke=cfg.smoke,
                       n_synthetic=n_synthetic, seed=cfg.seed)
    if data.x_val is None:
        x, y, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
        if not len(x_val) or len(x) < 2:
            raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(data.x_train)} training "
                              f"images leaves {len(x)} to train on and {len(x_val)} to validate "
                              "on; use more images")
        data = dataclasses.replace(data, x_train=x, y_train=y, x_val=x_val, y_val=y_val)
    # The last batch may be short, so a larger batch would still train (one batch per epoch),
    # but every week refuses it the same way: it is almost surely a mistyped setting.
    if cfg.batch_size > len(data.x_train):
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the "
                          f"{len(data.x_train)} training images")
    print(f"{data.name}: train {len(data.x_train)}, validation {len(data.x_val)}, test "
          f"{len(data.x_test)} images, {cfg.image_size}x{cfg.image_size}, classes {data.classes}")
    return data


def image_loaders(cfg, data: ImageData, transform,
                  device: torch.device) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """Training batches (shuffled; random resized crops and flips when ``cfg.augment``),
    validation and test batches; all uint8 in memory, normalized per batch by ``transform``."""
    augment = random_resized_crop(scale=(cfg.crop_scale, 1.0)) if cfg.augment else None
    train = TensorLoader(data.x_train, data.y_train, cfg.batch_size, shuffle=True,
                         augment=augment, transform=transform, device=device, seed=cfg.seed)
    val = TensorLoader(data.x_val, data.y_val, 64, transform=transform, device=device)
    test = TensorLoader(data.x_test, data.y_test, 64, transform=transform, device=device)
    return train, val, test


@torch.inference_mode()
def extract_features(body: nn.Module, images: torch.Tensor, transform, device: torch.device,
                     batch_size: int = 64) -> torch.Tensor:
    """The body's features (N, D) of uint8 images, in eval mode, computed once: with a frozen
    body they are the same every epoch, so an epoch of the head costs (N x D) @ (D x K)."""
    body.eval()
    chunks = [body(transform(images[i:i + batch_size].to(device))).float().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def feature_loaders(cfg, data: ImageData, features: list[torch.Tensor],
                    device: torch.device) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """Batches of the frozen body's features (N, D) of the training, validation and test images
    (in that order in ``features``), with their labels: no augmentation, the images never change."""
    x_train, x_val, x_test = features
    train = TensorLoader(x_train, data.y_train, cfg.batch_size, shuffle=True, device=device,
                         seed=cfg.seed)
    val = TensorLoader(x_val, data.y_val, 1024, device=device)
    return train, val, TensorLoader(x_test, data.y_test, 1024, device=device)


def mirrored(data: ImageData, transform, device: torch.device,
             body: nn.Module | None = None) -> tuple[TensorLoader, TensorLoader]:
    """The validation and test images mirrored left-right, for flip TTA: as the frozen
    ``body``'s features when it is given (what the frozen head reads), else as images."""
    loaders = []
    for x, y in ((data.x_val, data.y_val), (data.x_test, data.y_test)):
        x = x.flip(3)  # (N, 3, H, W), each row of pixels reversed
        if body is not None:
            loaders.append(TensorLoader(extract_features(body, x, transform, device), y, 1024,
                                        device=device))
        else:
            loaders.append(TensorLoader(x, y, 64, transform=transform, device=device))
    return loaders[0], loaders[1]


def scored(model: nn.Module, batches: TensorLoader,
           mirror: TensorLoader | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of every batch; with ``mirror`` (flip TTA) the mean of the logits of
    each image and of its mirror image: a bee facing left is still a bee."""
    logits, targets = predict(model, batches)
    if mirror is not None:
        logits = (logits + predict(model, mirror)[0]) / 2
    return logits, targets


def plot_augmented(cfg, data: ImageData, path) -> None:
    """16 training images as the random resized crops and flips show them to the network."""
    crop = random_resized_crop(scale=(cfg.crop_scale, 1.0))
    plot_images(crop(data.x_train[:16], torch.Generator().manual_seed(0)), path,
                title="training images after augmentation")
