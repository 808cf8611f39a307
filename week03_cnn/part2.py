"""Week 3, Part 2: a small CNN on CIFAR-10 (or MNIST) with augmentation on tensor batches.

Run: python week03_cnn/part2.py [--smoke] [--help]
     python week03_cnn/part2.py --dataset mnist --epochs 3
     python week03_cnn/part2.py --resume runs/week03/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.augment import Augment, crop_flip, translate
from common.config import Range, ResumableConfig
from common.data import ImageData, load
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader, normalizer, split
from common.plots import confusion_matrix, plot_confusion, plot_history, plot_images
from common.progress import progress
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate, predict

IMAGE_SIZE = {"cifar10": 32, "mnist": 28}  # pixels per side; every conv block halves it


@dataclass
class Config(ResumableConfig):
    """Week 3, Part 2: a CNN on CIFAR-10 (or MNIST), with augmentation and feature maps."""

    dataset: Literal["cifar10", "mnist"] = "cifar10"  # which image data set to learn
    epochs: Annotated[int, Range(1)] = 10  # passes over the training data
    batch_size: Annotated[int, Range(1)] = 128  # images per optimizer step
    # Learning rates stop at 1e6: far past any that trains, and below float32's 3.4e38, past which
    # torch.optim cannot even represent the step (a RuntimeError instead of a diverging loss).
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-3  # peak AdamW learning rate (one-cycle)
    weight_decay: Annotated[float, Range(0, 1)] = 5e-4  # AdamW decoupled weight decay
    width: Annotated[int, Range(1, 512)] = 32  # channels of conv block 1, doubled per block
    blocks: Annotated[int, Range(1, 5)] = 3  # conv-[BN]-ReLU-pool blocks (MNIST: <= 4)
    head_pool: Annotated[int, Range(1)] = 1  # the last maps are averaged to N x N for the head
    batch_norm: bool = True  # BatchNorm2d after every conv
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.1  # dropout before the linear head
    augment: bool = True  # crop (pad 4) + flip; MNIST: 2-pixel shifts
    val_fraction: Annotated[float, Range(0, 0.5)] = 0.1  # training images held out for validation
    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "width": 16, "lr": 5e-3}  # seconds

    def check(self) -> None:
        side = IMAGE_SIZE[self.dataset] >> self.blocks  # side of the last feature maps
        if side < 1:
            size = IMAGE_SIZE[self.dataset]
            raise ConfigError(f"--blocks {self.blocks}: each block halves the {size}-pixel "
                              f"{self.dataset} images, so use at most {size.bit_length() - 1}")
        if self.head_pool > side:
            raise ConfigError(f"--head-pool {self.head_pool}: after {self.blocks} blocks the "
                              f"feature maps are {side}x{side}, so use at most {side}")


class CNN(nn.Module):
    """Conv blocks (3x3 conv -> [BatchNorm] -> ReLU -> 2x2 max-pool), then average pooling,
    [Dropout] and a linear classifier.

    Each pool halves the feature map (32 -> 16 -> 8 -> 4 for CIFAR, 28 -> 14 -> 7 -> 3 for
    MNIST) while the channels grow: deeper layers see a wider part of the image (a larger
    receptive field) and describe it with more features. Adaptive average pooling brings the
    last maps to a fixed ``head_pool`` x ``head_pool`` grid (1: one number per map), so the same
    network takes 28x28 and 32x32 inputs.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 widths: tuple[int, ...] = (32, 64, 128),
                 batch_norm: bool = False, dropout: float = 0.0, head_pool: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            # With BatchNorm right after, a conv bias would be cancelled by BN's mean subtraction.
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        # head_pool = 1 is global average pooling; k > 1 averages down to a k x k grid and
        # flattens it, so the classifier still knows roughly *where* each feature was.
        self.pool = nn.AdaptiveAvgPool2d(head_pool)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels * head_pool**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


def make_model(cfg: Config, data: ImageData) -> CNN:
    widths = tuple(cfg.width * 2**i for i in range(cfg.blocks))  # 32, 64, 128: x2 as maps halve
    return CNN(data.x_train.shape[1], data.num_classes, widths, cfg.batch_norm, cfg.dropout,
               cfg.head_pool)


def training_augment(dataset: str) -> Augment:
    """The random part of the training batches (applied to uint8, before normalizing).

    Photos get a random crop (pad 4) and a left-right flip: a mirrored cat is still a cat.
    Digits are never mirrored (a flipped 2 is not a 2), so MNIST gets small shifts only.
    """
    return translate(2) if dataset == "mnist" else crop_flip(4)


def make_loaders(cfg: Config, data: ImageData,
                 device: torch.device) -> tuple[TensorLoader, TensorLoader | None, TensorLoader]:
    """Training batches (shuffled, augmented), validation batches held out from the training
    set (None when ``val_fraction`` is 0) and test batches, all normalized with the training
    set's mean and std. The test set is touched once, at the end."""
    x, y, x_val, y_val = data.x_train, data.y_train, data.x_train[:0], data.y_train[:0]
    if cfg.val_fraction > 0:
        x, y, x_val, y_val = split(x, y, cfg.val_fraction, cfg.seed)
    if len(x) < cfg.batch_size:  # drop_last: an epoch would have no batch at all
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(x)} training "
                          "images")
    normalize = normalizer(data.mean, data.std)
    augment = training_augment(cfg.dataset) if cfg.augment else None
    train = TensorLoader(x, y, cfg.batch_size, shuffle=True, drop_last=True, device=device,
                         seed=cfg.seed, augment=augment, transform=normalize)
    val = TensorLoader(x_val, y_val, 1024, transform=normalize, device=device) if len(x_val) \
        else None
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalize, device=device)
    return train, val, test


@torch.no_grad()
def feature_maps(model: CNN, image: torch.Tensor,
                 max_maps: int = 16) -> list[tuple[str, torch.Tensor]]:
    """The output of every ReLU of ``model.features`` for one normalized image (1, C, H, W):
    what each conv block "sees" after its nonlinearity, up to ``max_maps`` channels each."""
    model.eval()
    maps, x = [], image
    for i, layer in enumerate(model.features):
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            maps.append((f"block {len(maps) + 1} (layer {i})", x[0, :max_maps].float().cpu()))
    return maps


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Diagonal / row sums (rows are the true classes): the share of each class predicted right."""
    return matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)


def train_one_epoch(model: nn.Module, train: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> dict:
    """One pass over the training batches; the mean loss and accuracy over it."""
    model.train()  # dropout on, BatchNorm normalizes with this batch's statistics
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in progress(train, "train"):  # x: (B, C, H, W) normalized, y: (B,)
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # one-cycle is planned in batches: step it after every batch
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(train) * train.batch_size  # drop_last: every batch is full
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item()}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    train, val, test = make_loaders(cfg, data, device)
    model = prepare_model(make_model(cfg, data), device)  # CUDA: also channels_last (tensor cores)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One-cycle learning rate: warm up from lr/25 to lr over the first quarter, then anneal to ~0.
    # Big steps explore early; small ones at the end settle into a minimum.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=len(train), pct_start=0.25)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters\n{model}")

    start = run.restore(model, optimizer, scheduler)["epoch"]  # 0, or the checkpoint's epoch
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train.set_epoch(epoch)  # this epoch's shuffle and crops, the same after a resume
        row = train_one_epoch(model, train, optimizer, scheduler, device)
        check_finite(row["train_loss"], epoch)  # NaN/inf: stop, keeping the last checkpoint
        if val is not None:
            row.update({f"val_{k}": v for k, v in evaluate(model, val).items()})
        run.log(show=True, epoch=epoch, **row, lr=scheduler.get_last_lr()[0],
                epoch_time_s=round(time.perf_counter() - t0, 3))
        run.save_checkpoint(model, optimizer, scheduler, epoch=epoch)  # Ctrl-C resumes from here
    plot_history(run.rows, run.path("curves.png"), title=f"CNN on {data.name}")

    logits, targets = predict(model, test)
    predicted = logits.argmax(1)
    test_acc = (predicted == targets).float().mean().item()
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), data.num_classes)
    plot_confusion(matrix, data.classes, run.path("confusion.png"),
                   title=f"test accuracy {test_acc:.2%}")
    class_acc = per_class_accuracy(matrix)
    print(f"{'class':>12s}  accuracy")
    for name, acc in zip(data.classes, class_acc):
        print(f"{name:>12s}  {acc:7.2%}")

    image = normalizer(data.mean, data.std)(data.x_test[:1].to(device))
    plot_images(data.x_test[:1].numpy(), run.path("test_image.png"),
                titles=[data.classes[int(data.y_test[0])]])
    for k, (name, maps) in enumerate(feature_maps(model, image), start=1):
        plot_images(maps.numpy(), run.path(f"feature_maps_block{k}.png"),
                    title=f"feature maps, {name}", cmap="viridis")

    last = run.rows[-1]
    return run.finish(test_acc=test_acc, epochs_done=last["epoch"], params=n_params,
                      train_time_s=round(sum(r["epoch_time_s"] for r in run.rows), 2),
                      final_train_loss=last["train_loss"], final_val_acc=last.get("val_acc"),
                      per_class_acc={c: round(float(a), 4)
                                     for c, a in zip(data.classes, class_acc)})


if __name__ == "__main__":
    launch(main, Config)
