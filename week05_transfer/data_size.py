"""Week 5, self-work: accuracy against the number of training images, pretrained vs scratch.

For each number of training images per class (``--per-class 10 50 0``; 0 means all of them),
a random subset of the training images is drawn (the same classes in equal numbers) and each
of ``--modes`` is trained on it with week05_transfer/part2.py's code: by default frozen
pretrained features + a linear head, and the same network trained from scratch. The
validation images (held out once, before any subset is drawn) and the test images are the
same for every point, so the curves differ only in how much there was to learn from.

The figure (``data_size.png``) is the week's argument in one picture: with 10 images per
class a pretrained backbone is already far better than chance and than scratch; the gap
narrows as the data grows (with 245 photos it is still wide).

Run: python week05_transfer/data_size.py [--smoke] [--help]
     python week05_transfer/data_size.py --data-dir DATA --backbone efficientnet_lite0 --image-size 160
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from week05_transfer.backbones import BACKBONES, build_backbone
from week05_transfer.part2 import MODES, Splits, load_splits, train_mode


@dataclass
class Config(BaseConfig):
    """Week 5, self-work: test accuracy against training images per class, pretrained vs scratch."""

    dataset: Literal["hymenoptera", "flowers102", "folder"] = "hymenoptera"  # folder: the ImageFolder at --data-dir
    backbone: Literal[BACKBONES] = "resnet18"  # the pretrained network
    weights: str = "imagenet"  # imagenet, none (random), or a state_dict PATH
    per_class: tuple[int, ...] = (10, 50, 0)  # training images per class at each point (0: all)
    modes: tuple[str, ...] = ("frozen", "scratch")  # part2 modes trained at each point: frozen partial full scratch
    image_size: Annotated[int, Range(16, 512)] = 224  # images are decoded once at this many pixels a side
    head_epochs: Annotated[int, Range(1)] = 40  # frozen mode: epochs of the head on the cached features
    epochs: Annotated[int, Range(1)] = 8  # partial/full/scratch: most epochs (early stopping may end sooner)
    batch_size: Annotated[int, Range(1)] = 32  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # AdamW learning rate of the new head (scratch: all)
    backbone_lr_scale: Annotated[float, Range(0, 1, lo_open=True)] = 0.1  # pretrained layers learn at lr x this
    weight_decay: Annotated[float, Range(0, 1)] = 1e-4  # AdamW decoupled weight decay
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # dropout before the new head
    patience: Annotated[int, Range(0)] = 4  # early stopping: epochs without a lower val loss (0: never stop)
    augment: bool = True  # random resized crops (+ flips) of the training images (not in frozen mode)
    crop_scale: Annotated[float, Range(0.05, 1)] = 0.35  # smallest share of the image a random crop keeps
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.2  # of train/ held out, where no val split

    SMOKE: ClassVar[dict] = {"backbone": "resnet20_cifar", "weights": "none", "image_size": 24, "epochs": 3,
                             "head_epochs": 20, "per_class": (10, 0), "lr": 3e-3, "crop_scale": 0.6,
                             "backbone_lr_scale": 1.0}  # random weights: nothing to protect with a lower lr

    def check(self) -> None:
        if not self.per_class or min(self.per_class) < 0:
            raise ConfigError(f"--per-class needs one or more counts >= 0 (0: all), got {list(self.per_class)}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ConfigError(f"--modes {' '.join(self.modes)}: choose one or more of {', '.join(MODES)}")
        if self.backbone in ("resnet20_cifar", "week04") and self.weights == "imagenet":
            raise ConfigError(f"--backbone {self.backbone} has no ImageNet weights: pass --weights PATH (or none)")


def per_class_subset(data: Splits, n: int, seed: int) -> Splits:
    """``n`` random training images of every class (all of them for n = 0 or more than a class has)."""
    if n == 0:
        return data
    g = torch.Generator().manual_seed(seed)
    keep = torch.cat([idx[torch.randperm(len(idx), generator=g)[:n]]
                      for idx in (torch.nonzero(data.y_train == c).flatten() for c in range(len(data.classes)))])
    return dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_splits(cfg, n_synthetic=320)  # validation is held out here, before any subset
    pretrained = build_backbone(cfg.backbone, cfg.weights) if set(cfg.modes) != {"scratch"} else None
    run = Run.start(cfg, __file__, device)
    points: dict[str, list[tuple[int, float]]] = {m: [] for m in cfg.modes}
    results = {}
    for n in cfg.per_class:
        subset = per_class_subset(data, n, cfg.seed)
        counts = torch.bincount(subset.y_train, minlength=len(data.classes))
        images = int(counts.min())  # per class, as used (a class may have fewer than asked)
        for mode in cfg.modes:
            print(f"=== {len(subset.y_train)} training images ({counts.tolist()} per class), {mode} ===")
            result = train_mode(mode, cfg, subset, pretrained, device, run.sub(f"{mode}_n{n}", mode=mode, n=n))
            points[mode].append((images, result.summary["test_acc"]))
            results[f"test_acc_{mode}_n{n}"] = result.summary["test_acc"]
            results[f"val_acc_{mode}_n{n}"] = result.summary["val_acc"]
            results[f"train_images_{mode}_n{n}"] = len(subset.y_train)
    plot_curves({f"{m} ({'pretrained' if m != 'scratch' else 'random init'})": p for m, p in points.items()},
                run.path("data_size.png"), xlabel="training images per class", ylabel="test accuracy",
                title=f"{cfg.backbone} on {data.name}")
    for mode, pts in points.items():
        print(f"{mode:>8}: " + ", ".join(f"{n} per class -> {acc:.3f}" for n, acc in pts))
    return run.finish(**results)


if __name__ == "__main__":
    launch(main, Config)
