"""The pieces part2.py's pipeline assembles: the model, the data loaders, and the checks and
restore that let a run go on after Ctrl-C (in one process or under torchrun)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from common.checkpoint import read_checkpoint
from common.data import ImageData
from common.distributed import DistInfo, shard
from common.errors import CheckpointError, ConfigError
from common.loader import TensorLoader, derive_seed, normalizer, split
from week04_regularization.best_cnn import (
    SpeedNet,
    flip_translate,
    prepare_batch,
    whitening_filters,
)
from week12_capstone.vit import ViT

if TYPE_CHECKING:
    from week12_capstone.part2 import Config


def make_model(cfg: Config, data: ImageData) -> nn.Module:
    """The ViT, or Week 4's SpeedNet (a residual CNN) with its patch-whitening first layer
    computed from 1000 training images drawn at random (the JPEG copy is stored class by class)."""
    channels, size = data.x_train.shape[1], data.x_train.shape[2]
    if cfg.model == "vit":
        return ViT(in_channels=channels, image_size=size, num_classes=data.num_classes,
                   patch=cfg.patch, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                   mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
    net = SpeedNet((cfg.width, 2 * cfg.width, 4 * cfg.width), num_classes=data.num_classes,
                   in_channels=channels)
    g = torch.Generator().manual_seed(cfg.seed)
    sample = torch.randperm(len(data.x_train), generator=g)[:1000]
    images = normalizer(data.mean, data.std)(data.x_train[sample])  # (1000, C, H, W)
    net.stem.weight.data.copy_(whitening_filters(images))
    return net


def make_loaders(cfg: Config, data: ImageData,
                 info: DistInfo) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """Training batches (this process's shard under torchrun, Week 4's shifts + flips), validation
    held out of the training set, and the test set, all normalized with the training statistics
    (channels_last for the CNN, whose convs run faster so). A setting the data cannot satisfy is
    refused here, before Run.start writes anything."""
    x, y, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    if len(x_val) == 0:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(data.x_train)} training "
                          "images holds out none for validation; use more images or a larger one")
    x, y = shard(x, y, info)  # rank r trains on examples r, r+W, ...; val and test stay whole
    if len(x) < cfg.batch_size:  # drop_last: an epoch would have no batch at all
        where = "of each process" if info.distributed else "left after validation"
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(x)} training "
                          f"images {where}")
    normalize = normalizer(data.mean, data.std)
    channels_last = cfg.model == "resnet"

    def transform(x: torch.Tensor) -> torch.Tensor:
        return prepare_batch(normalize(x), channels_last)

    train = TensorLoader(x, y, cfg.batch_size, shuffle=True, drop_last=True, device=info.device,
                         seed=derive_seed(cfg.seed, info.rank),
                         augment=flip_translate(cfg.translate, cfg.flip), transform=transform)
    val = TensorLoader(x_val, y_val, 1024, transform=transform, device=info.device)
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=transform, device=info.device)
    return train, val, test


def check_resume_matches_launch(resume: str, info: DistInfo) -> None:
    """A checkpoint saved under torchrun holds the DistributedDataParallel wrapper ("module."
    names); one saved by a single process does not. Say so before touching the run's folder."""
    if not resume:
        return
    under_torchrun = read_checkpoint(resume)["model_class"] == "DistributedDataParallel"
    if under_torchrun != info.distributed:
        how = "under torchrun (several processes)" if under_torchrun else "by a single process"
        again = "torchrun --nproc_per_node N " if under_torchrun else "python "
        raise CheckpointError(f"{resume} was saved {how}; resume it the same way "
                              f"({again}week12_capstone/part2.py --resume {resume})")
