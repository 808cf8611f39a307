"""Week 3, Part 2: a small CNN on CIFAR-10 (or MNIST) with augmentation on tensor batches.

Run: python week03_cnn/part2.py [--smoke] [--help]
     python week03_cnn/part2.py --dataset mnist --epochs 3
"""

from __future__ import annotations

import math
import time
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from common.augment import crop_flip, translate
from common.config import BaseConfig, dataclass, run
from common.data import ImageData, load
from common.device import CpuBFloat16, pick_device, prepare_model, seed_everything
from common.errors import LabError
from common.loader import TensorLoader, normalizer, split
from common.plots import confusion_matrix, plot_confusion, plot_history, plot_images
from common.runs import Run
from common.train import fit, predict


@dataclass
class Config(BaseConfig):
    """Week 3, Part 2: a CNN on CIFAR-10 (or MNIST), with augmentation and feature maps."""

    dataset: Literal["cifar10", "mnist"] = "cifar10"  # which image data set to learn
    epochs: int = 10  # passes over the training data
    batch_size: int = 128  # images per optimizer step
    lr: float = 2e-3  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4  # AdamW decoupled weight decay
    width: int = 32  # channels of the first conv block; each next block doubles them
    blocks: int = 3  # conv blocks (conv-[BN]-ReLU-pool), each halves the image: up to 4 (MNIST), 5 (CIFAR)
    head_pool: int = 1  # last feature maps averaged to head_pool x head_pool before the linear head
    batch_norm: bool = True  # BatchNorm2d after every conv
    dropout: float = 0.1  # dropout probability before the linear head (0 = none)
    augment: bool = True  # random crop (pad 4) + horizontal flip per batch; MNIST: 2-pixel shifts only
    val_fraction: float = 0.1  # share of the training set held out for validation curves (0 = none)
    budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    channels_last: bool = True  # NHWC memory layout: faster convolutions on most CPUs and on GPUs
    bf16: bool = False  # CPU only: bfloat16 autocast, ~1.5-2x faster on CPUs with AVX512-BF16/AMX
    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "width": 16, "lr": 5e-3}  # learns the twin in ~3 s


class CNN(nn.Module):
    """Conv blocks (3x3 conv -> [BatchNorm] -> ReLU -> 2x2 max-pool), then average pooling,
    [Dropout] and a linear classifier.

    Each pool halves the feature map (32 -> 16 -> 8 -> 4 for CIFAR, 28 -> 14 -> 7 -> 3 for
    MNIST) while the channels grow: deeper layers see a wider part of the image (a larger
    receptive field) and describe it with more features. Adaptive average pooling brings the
    last maps to a fixed ``head_pool`` x ``head_pool`` grid (1: one number per map), so the same
    network takes 28x28 and 32x32 inputs.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
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


def training_augment(data: ImageData, augment: bool):
    """The random part of the training batches (applied to uint8, before normalizing): random
    crop + flip when ``augment``, else None.

    Digits must not be mirrored (a flipped 2 is not a 2), so MNIST gets small shifts only.
    """
    if not augment:
        return None
    return translate(2) if data.x_train.shape[1] == 1 else crop_flip(4)


def make_model(cfg: Config, data: ImageData) -> CNN:
    size = data.x_train.shape[-1]
    if cfg.blocks < 1 or size >> cfg.blocks < 1:
        raise LabError(f"--blocks {cfg.blocks}: each block halves the {size}-pixel image, so use 1 to "
                       f"{int(math.log2(size))} blocks")
    if cfg.width < 1 or cfg.head_pool < 1 or cfg.batch_size < 1:
        raise LabError("--width, --head-pool and --batch-size must be at least 1")
    if cfg.dropout >= 1:
        raise LabError(f"--dropout {cfg.dropout}: a probability below 1 (1 would drop every feature)")
    widths = tuple(cfg.width * 2**i for i in range(cfg.blocks))
    return CNN(data.x_train.shape[1], data.num_classes, widths, cfg.batch_norm, cfg.dropout, cfg.head_pool)


def one_cycle(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int,
              warmup: float = 0.25) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle learning rate, stepped after every batch: warm up from lr/25 to lr over the
    first ``warmup`` of training, then anneal to ~0. Large steps early explore; small steps
    at the end settle into a minimum, which is where most of the final accuracy comes from.

    With a time budget the number of steps that fit is unknown in advance, so progress is the
    larger of the share of steps done and the share of the budget used (wall clock): the run
    anneals to ~0 when its epochs or its time run out, whichever comes first. Such a run does
    not repeat exactly (how far it gets depends on the machine's speed).
    """
    if cfg.budget_s <= 0:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=warmup)
    start, total_steps = time.perf_counter(), cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        progress = min(max(step / total_steps, (time.perf_counter() - start) / cfg.budget_s), 1.0)
        if progress < warmup:
            return 0.04 + 0.96 * progress / warmup
        return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))  # cosine down to 0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def feature_maps(model: CNN, image: torch.Tensor, max_maps: int = 16) -> list[tuple[str, torch.Tensor]]:
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
    """Diagonal / row sums: the share of each true class that was predicted right."""
    return matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)


def main(cfg: Config) -> dict:
    cfg = cfg.resolved()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    cnn = make_model(cfg, data)  # before Run.start: impossible settings stop here, with no run folder
    run_ = Run.start(cfg, __file__, device)

    x_train, y_train, x_val, y_val = data.x_train, data.y_train, None, None
    if cfg.val_fraction > 0:
        x_train, y_train, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    normalize = normalizer(data.mean, data.std)
    train = TensorLoader(x_train, y_train, cfg.batch_size, shuffle=True, drop_last=True, device=device,
                         augment=training_augment(data, cfg.augment), transform=normalize, seed=cfg.seed)
    val = TensorLoader(x_val, y_val, 1024, transform=normalize, device=device) if x_val is not None else None
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalize, device=device)

    cnn = prepare_model(cnn, device)
    if cfg.channels_last:  # prepare_model does this on CUDA; on the CPU it is worth it too
        cnn = cnn.to(memory_format=torch.channels_last)
    model = CpuBFloat16(cnn) if cfg.bf16 and device.type == "cpu" else cnn
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters\n{cnn}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = one_cycle(optimizer, cfg, len(train))
    result = fit(model, train, val, optimizer, cfg.epochs, device, run=run_, scheduler=scheduler,
                 scheduler_per_batch=True, config=cfg.to_dict(), time_budget_s=cfg.budget_s)
    plot_history(result.rows, run_.path("curves.png"), title=f"CNN on {data.name}")

    logits, targets = predict(model, test, device)
    predicted = logits.argmax(1)
    test_acc = (predicted == targets).float().mean().item()
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), data.num_classes)
    plot_confusion(matrix, data.classes, run_.path("confusion.png"), title=f"test accuracy {test_acc:.2%}")
    class_acc = per_class_accuracy(matrix)
    print(f"{'class':>12s}  accuracy")
    for name, acc in zip(data.classes, class_acc):
        print(f"{name:>12s}  {acc:7.2%}")

    image = normalize(data.x_test[:1].to(device))
    plot_images(data.x_test[:1].numpy(), run_.path("test_image.png"), titles=[data.classes[int(data.y_test[0])]])
    for k, (name, maps) in enumerate(feature_maps(cnn, image), start=1):
        plot_images(maps.numpy(), run_.path(f"feature_maps_block{k}.png"), title=f"feature maps, {name}",
                    cmap="viridis")

    return run_.finish(test_acc=test_acc, epochs_done=len(result.rows), params=n_params,
                       train_time_s=round(sum(r["epoch_time_s"] for r in result.rows), 2),
                       final_train_loss=result.last.get("train_loss"), final_val_acc=result.last.get("val_acc"),
                       per_class_acc={c: round(float(a), 4) for c, a in zip(data.classes, class_acc)})


if __name__ == "__main__":
    run(main, Config)
