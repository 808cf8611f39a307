"""Week 5, self-work: which layers to freeze, and for how long (freeze / unfreeze schedules).

Every schedule starts from the same pretrained weights and head initialization, trains the same
number of epochs with the same two learning rates (head: lr, backbone: lr x backbone_lr_scale),
and differs only in WHAT may learn in each epoch:

    head_only       the backbone is frozen throughout (feature extraction, without the cache)
    last_block      the last block and the head, throughout (partial fine-tuning)
    gradual         gradual unfreezing (ULMFiT): the head alone first, then one more block from
                    the top every ``--unfreeze-every`` epochs, ending with the whole network
    head_then_all   the head alone for ``--unfreeze-every`` epochs, then everything: the new
                    head stops sending large random gradients into the backbone before it thaws
    all             everything from the first step (full fine-tuning)

Each kept model (lowest validation loss) meets the test set once; the schedule is chosen on
validation. A block that thaws mid-run joins training at once: its parameters were in the
optimizer from the start (frozen ones get no gradient, and the optimizer skips them).

Run: python week05_transfer/freeze_schedule.py [--smoke] [--help]
     python week05_transfer/freeze_schedule.py --data-dir DATA --backbone efficientnet_lite0 --image-size 128
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from common.config import BaseConfig, Range
from common.device import pick_device, prepare_model, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run, compare_table
from common.train import Callback, Loop, evaluate, fit
from week04_regularization.part2 import EarlyStopping, EpochScheduler
from week05_transfer.backbones import BACKBONES, build_backbone
from week05_transfer.part2 import (
    TransferNet,
    count_parameters,
    image_loaders,
    input_transform,
    load_splits,
    make_net,
    param_groups,
)

SCHEDULES = ("head_only", "last_block", "gradual", "head_then_all", "all")


@dataclass
class Config(BaseConfig):
    """Week 5, self-work: freeze/unfreeze schedules for fine-tuning, compared on validation."""

    dataset: Literal["hymenoptera", "flowers102", "folder"] = "hymenoptera"  # folder: the ImageFolder at --data-dir
    backbone: Literal[BACKBONES] = "resnet18"  # the pretrained network
    weights: str = "imagenet"  # imagenet, none (random), or a state_dict PATH
    schedules: tuple[str, ...] = SCHEDULES  # which schedules to compare (see the module docstring)
    epochs: Annotated[int, Range(1)] = 6  # epochs of every schedule
    unfreeze_every: Annotated[int, Range(1)] = 1  # gradual / head_then_all: epochs between thaws
    image_size: Annotated[int, Range(16, 512)] = 224  # images are decoded once at this many pixels a side
    batch_size: Annotated[int, Range(1)] = 32  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # AdamW learning rate of the new head
    backbone_lr_scale: Annotated[float, Range(0, 1, lo_open=True)] = 0.1  # backbone layers learn at lr x this
    weight_decay: Annotated[float, Range(0, 1)] = 1e-4  # AdamW decoupled weight decay
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # dropout before the new head
    augment: bool = True  # random resized crops (+ flips) of the training images
    crop_scale: Annotated[float, Range(0.05, 1)] = 0.35  # smallest share of the image a random crop keeps
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.2  # of train/ held out, where no val split

    SMOKE: ClassVar[dict] = {"backbone": "resnet20_cifar", "weights": "none", "image_size": 24, "epochs": 3,
                             "schedules": ("head_only", "gradual", "all"), "batch_size": 32, "lr": 3e-3,
                             "crop_scale": 0.6, "backbone_lr_scale": 1.0}  # random weights: nothing to protect

    def check(self) -> None:
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        if unknown or not self.schedules:
            raise ConfigError(f"--schedules {' '.join(self.schedules)}: choose one or more of {', '.join(SCHEDULES)}")
        if self.backbone in ("resnet20_cifar", "week04") and self.weights == "imagenet":
            raise ConfigError(f"--backbone {self.backbone} has no ImageNet weights: pass --weights PATH (or none)")


def thawed_blocks(schedule: str, epoch: int, every: int, n_stages: int) -> int:
    """How many backbone blocks, counted from the top (output side), learn in ``epoch`` (1-based)."""
    if schedule == "head_only":
        return 0
    if schedule == "last_block":
        return 1
    if schedule == "all":
        return n_stages
    if schedule == "head_then_all":
        return 0 if epoch <= every else n_stages
    if schedule == "gradual":
        return min(n_stages, (epoch - 1) // every)
    raise ValueError(f"unknown schedule {schedule!r}")


def apply_plan(net: TransferNet, stages: list[nn.Module], thawed: int) -> None:
    """The top ``thawed`` blocks (and the head) learn; the rest of the backbone is frozen."""
    for p in net.body.parameters():
        p.requires_grad_(False)
    for stage in stages[len(stages) - thawed:] if thawed else []:
        for p in stage.parameters():
            p.requires_grad_(True)


class Unfreeze(Callback):
    """After each epoch, set what learns in the next one (and log how much learnt in this one)."""

    def __init__(self, net: TransferNet, stages: list[nn.Module], schedule: str, every: int):
        self.net, self.stages, self.schedule, self.every = net, stages, schedule, every

    def on_epoch_end(self, loop: Loop) -> None:
        loop.row["trainable_params"] = count_parameters(self.net)[0]
        loop.row["thawed_blocks"] = thawed_blocks(self.schedule, loop.epoch, self.every, len(self.stages))
        apply_plan(self.net, self.stages, thawed_blocks(self.schedule, loop.epoch + 1, self.every, len(self.stages)))


def train_schedule(schedule: str, cfg: Config, data, pretrained, device: torch.device, log: Run):
    net, backbone = make_net(cfg, "frozen", pretrained, len(data.classes))
    apply_plan(net, backbone.stages, thawed_blocks(schedule, 1, cfg.unfreeze_every, len(backbone.stages)))
    net = prepare_model(net, device)
    train, val, test = image_loaders(cfg, data, input_transform(cfg, "frozen", backbone, data), device)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    early = EarlyStopping(net, cfg.epochs + 1)  # never stops; keeps the epoch with the lowest val loss
    print(f"--- {schedule} ---")
    t0 = time.perf_counter()
    # Unfreeze runs before EarlyStopping's restore at the end; it changes requires_grad only.
    loop = fit(net, optimizer, train, val, cfg.epochs, callbacks=[
        EpochScheduler(scheduler), Unfreeze(net, backbone.stages, schedule, cfg.unfreeze_every), early])
    train_s = time.perf_counter() - t0
    for row in loop.rows:
        log.log(**row)
    kept = evaluate(net, val)
    test_acc = evaluate(net, test)["acc"]  # once, at the end
    return loop.rows, {"val_loss": kept["loss"], "val_acc": kept["acc"], "test_acc": test_acc,
                       "kept_epoch": early.best_epoch, "train_time_s": round(train_s, 2)}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_splits(cfg, n_synthetic=320)
    pretrained = build_backbone(cfg.backbone, cfg.weights)  # checked before the run folder exists
    print(f"backbone {cfg.backbone}: weights from {pretrained.source}; {len(pretrained.stages)} blocks")
    run = Run.start(cfg, __file__, device)
    summaries, curves = {}, {}
    for schedule in cfg.schedules:
        rows, summaries[schedule] = train_schedule(schedule, cfg, data, pretrained, device,
                                                   run.sub(schedule, schedule=schedule))
        curves[schedule] = [(r["epoch"], r["val_acc"]) for r in rows]
    plot_curves(curves, run.path("val_acc.png"), ylabel="validation accuracy", title="freeze schedules")
    entries = [{"week": run.week, "script": run.script, "dir": s, "summary": summary,
                "config": {**run.config, "schedules": s}} for s, summary in summaries.items()]
    table = compare_table(entries, metrics=["kept_epoch", "val_acc", "test_acc", "train_time_s"])
    run.path("comparison.txt").write_text(table + "\n")
    print(table)
    best = max(summaries, key=lambda s: (summaries[s]["val_acc"], -summaries[s]["val_loss"]))  # on validation
    per_schedule = {f"{k}_{s}": v for s, summary in summaries.items() for k, v in summary.items()}
    return run.finish(**per_schedule, **summaries[best], best_schedule=best)


if __name__ == "__main__":
    launch(main, Config)
