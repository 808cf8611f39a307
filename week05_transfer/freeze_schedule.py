r"""Week 5, self-work: which layers to freeze, and for how long (freeze / unfreeze schedules).

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
     python week05_transfer/freeze_schedule.py --data-dir DATA --backbone efficientnet_lite0 \
         --image-size 128
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from torch import nn

from common.config import Range
from common.device import pick_device, prepare_model, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate
from week04_regularization.part2 import EarlyStopping, step_per_epoch
from week05_transfer import images, part2
from week05_transfer.backbones import build_backbone
from week05_transfer.part2 import TransferNet, count_parameters, train_one_epoch

SCHEDULES = ("head_only", "last_block", "gradual", "head_then_all", "all")


@dataclass
class Config(part2.Config):
    """Week 5, self-work: freeze/unfreeze schedules for fine-tuning, compared on validation.
    Part 2's settings (backbone, weights, data, learning rates, ...), less its modes."""

    epochs: Annotated[int, Range(1)] = 6  # epochs of every schedule
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # AdamW learning rate of the head
    augment: bool = True  # random resized crops (+ flips) of the training images
    schedules: tuple[str, ...] = SCHEDULES  # which schedules to compare (see the docstring)
    unfreeze_every: Annotated[int, Range(1)] = 1  # gradual / head_then_all: epochs between thaws

    UNUSED: ClassVar[tuple] = ("mode", "head_epochs", "patience")  # every schedule: all epochs
    SMOKE: ClassVar[dict] = {**{k: v for k, v in part2.Config.SMOKE.items() if k != "head_epochs"},
                             "schedules": ("head_only", "gradual", "all")}

    def check(self) -> None:
        super().check()
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        if unknown or not self.schedules:
            raise ConfigError(f"--schedules {' '.join(self.schedules)}: choose one or more of "
                              f"{', '.join(SCHEDULES)}")


def thawed_blocks(schedule: str, epoch: int, every: int, n_stages: int) -> int:
    """How many backbone blocks, counted from the top (output side), learn in ``epoch`` (from
    1)."""
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


def train_schedule(schedule: str, cfg: Config, data, pretrained, device: torch.device,
                   run: Run) -> tuple[list[dict], dict]:
    """Part 2's loop for one schedule, with one line more: what learns is set per epoch."""
    net, backbone = part2.make_net(cfg, "frozen", pretrained, len(data.classes))
    net = prepare_model(net, device)
    transform = part2.input_transform(cfg, "frozen", backbone, data)
    train, val, test = images.image_loaders(cfg, data, transform, device)
    optimizer = torch.optim.AdamW(part2.param_groups(net, cfg.lr, cfg.backbone_lr_scale,
                                                     cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    early = EarlyStopping(net, math.inf)  # never stops; keeps the epoch with the lowest val loss
    stages = backbone.stages
    print(f"--- {schedule} ---")
    t_start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        thawed = thawed_blocks(schedule, epoch, cfg.unfreeze_every, len(stages))
        apply_plan(net, stages, thawed)  # the schedule: what learns in this epoch
        train.set_epoch(epoch)
        row = {"epoch": epoch, **train_one_epoch(net, train, optimizer)}
        check_finite(row["train_loss"], epoch)
        row.update({f"val_{k}": v for k, v in evaluate(net, val).items()})
        row.update(lr=optimizer.param_groups[0]["lr"],
                   epoch_time_s=round(time.perf_counter() - t0, 3),
                   trainable_params=count_parameters(net)[0], thawed_blocks=thawed)
        run.log(show=True, **row)
        step_per_epoch(scheduler, row["val_loss"])
        early.update(row["val_loss"], epoch)
    kept = early.restore_best()
    train_s = time.perf_counter() - t_start
    kept_val = evaluate(net, val)
    test_acc = evaluate(net, test)["acc"]  # once, at the end
    rows = [r for r in run.rows if r.get("schedule") == schedule]
    return rows, {"val_loss": kept_val["loss"], "val_acc": kept_val["acc"], "test_acc": test_acc,
                  "kept_epoch": kept, "train_time_s": round(train_s, 2)}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    pretrained = build_backbone(cfg.backbone, cfg.weights)  # before minutes of decoding images
    print(f"backbone {cfg.backbone}: weights from {pretrained.source}; "
          f"{len(pretrained.stages)} blocks")
    data = images.load_splits(cfg, n_synthetic=320)
    run = Run.start(cfg, __file__, device)
    summaries, curves = {}, {}
    for schedule in cfg.schedules:
        view = run.sub(schedule, schedule=schedule)  # rows with a schedule column
        try:
            rows, summaries[schedule] = train_schedule(schedule, cfg, data, pretrained, device,
                                                       view)
        except KeyboardInterrupt as e:  # no --resume here: say what was kept
            raise part2.stopped_in(e, f"the {schedule} schedule", run,
                                   "fewer --schedules: shorter") from None
        curves[schedule] = [(r["epoch"], r["val_acc"]) for r in rows]
    plot_curves(curves, run.path("val_acc.png"), ylabel="validation accuracy",
                title="freeze schedules")
    run.write_comparison(summaries, ["kept_epoch", "val_acc", "test_acc", "train_time_s"],
                         column="schedules")
    # chosen on validation, never on the test set
    best = max(summaries, key=lambda s: (summaries[s]["val_acc"], -summaries[s]["val_loss"]))
    per_schedule = {f"{k}_{s}": v for s, summary in summaries.items() for k, v in summary.items()}
    return run.finish(**per_schedule, **summaries[best], best_schedule=best)


if __name__ == "__main__":
    launch(main, Config)
