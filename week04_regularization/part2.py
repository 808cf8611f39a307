"""Week 4, Part 2: the Week 3 CNN with BatchNorm, Dropout and weight decay, trained with a
choice of learning-rate schedule and early stopping on a held-out validation set.

Run: python week04_regularization/part2.py [--smoke] [--help]
     python week04_regularization/part2.py --schedule plateau --epochs 20 --patience 3
     python week04_regularization/part2.py --schedule all --train-subset 10000   # compare all four

With ``--schedule all`` every schedule trains the same network from the same initial weights;
metrics.csv gets one row per (schedule, epoch), schedules.png puts their curves on one figure
and comparison.txt holds the table (also printed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import matplotlib.pyplot as plt
import torch
from torch import nn

from common.augment import crop_flip
from common.checkpoint import save_checkpoint
from common.config import BaseConfig, dataclass, run
from common.data import load
from common.device import pick_device, prepare_model, seed_everything
from common.errors import LabError
from common.loader import TensorLoader, normalizer, split
from common.plots import plot_history, save
from common.runs import Run, compare_table
from common.train import FitResult, fit, predict
from week03_cnn.part2 import CNN

SCHEDULES = ("step", "plateau", "onecycle", "cosine")


@dataclass
class Config(BaseConfig):
    """Week 4, Part 2: a regularized CNN with LR schedules and early stopping."""

    dataset: Literal["cifar10", "mnist"] = "cifar10"  # which image data set to learn
    schedule: Literal["step", "plateau", "onecycle", "cosine", "all"] = "onecycle"  # LR schedule; all: compare
    epochs: int = 15  # most passes over the training data (early stopping may end sooner)
    patience: int = 3  # early stopping: stop after this many epochs without a lower val loss (0 = off)
    batch_size: int = 128  # images per optimizer step
    optimizer: Literal["adamw", "sgd"] = "adamw"  # AdamW (decoupled decay) or SGD+Nesterov (L2 decay)
    lr: float = 2e-3  # peak/initial learning rate (try 0.05 with --optimizer sgd)
    weight_decay: float = 0.05  # AdamW: decoupled decay per unit lr; SGD: L2 coefficient (try 5e-4)
    width: int = 32  # channels of the first conv block; each next block doubles them
    blocks: int = 3  # conv blocks (conv-BN-ReLU-pool)
    batch_norm: bool = True  # BatchNorm2d after every conv
    dropout: float = 0.2  # dropout probability before the linear head (0 = none)
    augment: bool = True  # random crop (pad 4) + horizontal flip on every training batch
    val_fraction: float = 0.1  # share of the training set held out for validation / early stopping
    train_subset: int = 0  # train on only this many images (0 = all): quicker comparisons on a CPU
    budget_s: float = 0.0  # stop each schedule's training after this many seconds (0 = no limit)

    SMOKE: ClassVar[dict] = {"epochs": 3, "batch_size": 64, "width": 8, "patience": 2}  # what --smoke changes


# =========================================================================================
# Optimizer: weight decay on the weights that need it, not on BatchNorm or biases
# =========================================================================================
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: conv/linear weights get weight decay; BatchNorm gammas/betas and biases
    (every 1-D parameter) get none.

    Decay pulls a weight towards 0 to keep the function simple. A BatchNorm gamma of 0 or a
    bias of 0 is not "simpler", it just fights what the layer needs, and a conv followed by
    BatchNorm is scale-invariant anyway: there decay only changes the effective learning rate.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW: decay is decoupled (w <- w*(1 - lr*wd), Part 1). SGD: decay is an L2 gradient,
    which for SGD is the same thing; Nesterov momentum looks one step ahead."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


# =========================================================================================
# Learning-rate schedules (Part 1 wrote them as functions; here PyTorch's classes)
# =========================================================================================
def make_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                   ) -> tuple[Any, bool]:
    """The scheduler and whether it is stepped after every batch (True) or every epoch.

    step      StepLR: lr x0.1 every epochs//3 epochs (a staircase)
    plateau   ReduceLROnPlateau: lr x0.1 when the validation loss has not improved for 1 epoch;
              it reacts to the run instead of a fixed plan (fit() passes it val_loss)
    onecycle  OneCycleLR: warm up for 25% of the steps to the peak lr, then anneal to ~0; per batch
    cosine    CosineAnnealingLR: half a cosine from lr to 0 over all epochs; per epoch
    """
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(epochs // 3, 1), gamma=0.1), False
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=1), False
    if name == "onecycle":
        peak = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.25), True
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs), False
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


# =========================================================================================
# Training one schedule, logging into a shared run folder
# =========================================================================================
class ScheduleLog:
    """What fit() needs from a Run (``log`` and ``path``), adding a ``schedule`` column to every
    metrics row and a ``<schedule>_`` prefix to file names when several schedules share a run."""

    def __init__(self, run: Run, schedule: str, prefix: bool):
        self.run, self.schedule, self.prefix = run, schedule, f"{schedule}_" if prefix else ""

    def log(self, **row: Any) -> None:
        self.run.log(schedule=self.schedule, **row)

    def path(self, name: str) -> Path:
        return self.run.path(self.prefix + name)


def save_best(log: ScheduleLog, model: nn.Module, result: FitResult, config: dict) -> Path:
    """Write the weights fit() restored (those of the epoch with the lowest validation loss)
    as best.pt, next to checkpoint.pt (the last epoch, for resuming)."""
    return save_checkpoint(log.path("best.pt"), model, epoch=result.best_epoch, config=config,
                           best_val_loss=result.best_val_loss, stopped_early=result.stopped_early)


def train_schedule(schedule: str, make_model: Callable[[], nn.Module], train: TensorLoader,
                   val: TensorLoader, test: TensorLoader, cfg: Config, device: torch.device,
                   log: ScheduleLog) -> tuple[nn.Module, FitResult, dict]:
    """Train a fresh model with one schedule and early stopping; returns model, fit result and
    the summary row for the comparison table."""
    seed_everything(cfg.seed)  # the same initial weights for every schedule
    # channels_last (NHWC) speeds up convolutions on GPUs and, as Week 3 measured, on CPUs too.
    model = prepare_model(make_model(), device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler, per_batch = make_scheduler(schedule, optimizer, cfg.epochs, len(train))
    print(f"--- schedule: {schedule} ---")
    result = fit(model, train, val, optimizer, cfg.epochs, device, loss_fn=nn.CrossEntropyLoss(), run=log,
                 scheduler=scheduler, scheduler_per_batch=per_batch, patience=cfg.patience,
                 resume=cfg.resume or None, config=cfg.to_dict(), time_budget_s=cfg.budget_s)
    if cfg.patience > 0:  # fit() restored the best epoch's weights: keep them on disk too
        save_best(log, model, result, cfg.to_dict())
    logits, targets = predict(model, test, device)
    test_acc = (logits.argmax(1) == targets).float().mean().item()
    best_row = next(r for r in result.rows if r["epoch"] == result.best_epoch)
    summary = {"test_acc": test_acc, "best_val_loss": result.best_val_loss, "best_val_acc": best_row.get("val_acc"),
               "best_epoch": result.best_epoch, "epochs_done": len(result.rows),
               "stopped_early": result.stopped_early,
               "train_time_s": round(sum(r["epoch_time_s"] for r in result.rows), 2)}
    return model, result, summary


def plot_schedules(rows: list[dict], path: Path) -> Path:
    """Validation loss, validation accuracy and learning rate per epoch, one line per schedule."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        mine = [r for r in rows if r["schedule"] == schedule]
        epochs = [r["epoch"] for r in mine]
        for ax, key in zip(axes, ("val_loss", "val_acc", "lr")):
            ax.plot(epochs, [r[key] for r in mine], marker="o", markersize=3, label=schedule)
    for ax, key in zip(axes, ("validation loss", "validation accuracy", "learning rate (end of epoch)")):
        ax.set(xlabel="epoch", title=key)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend()
    return save(fig, path)


def comparison_table(run_: Run, summaries: dict[str, dict]) -> str:
    """The experiment log's table (common.runs.compare_table), one row per schedule."""
    entries = [{"week": run_.week, "script": run_.script, "dir": str(run_.path(schedule)),
                "config": {**run_.config, "schedule": schedule}, "summary": summary}
               for schedule, summary in summaries.items()]
    return compare_table(entries, metrics=["test_acc", "best_val_acc", "best_val_loss", "best_epoch", "epochs_done",
                                           "stopped_early", "train_time_s"])


def main(cfg: Config) -> dict:
    cfg = cfg.resolved()
    if cfg.resume and cfg.schedule == "all":
        raise LabError("--resume continues one run: pass the --schedule it was trained with, not 'all'")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    run_ = Run.start(cfg, __file__, device)

    # Validation is carved out of the TRAINING set: the test set is touched once, at the end.
    x_train, y_train, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    if cfg.train_subset:
        x_train, y_train = x_train[:cfg.train_subset], y_train[:cfg.train_subset]
    normalize = normalizer(data.mean, data.std)
    train = TensorLoader(x_train, y_train, cfg.batch_size, shuffle=True, drop_last=True,
                         augment=crop_flip(padding=4) if cfg.augment else None, transform=normalize,
                         device=device, seed=cfg.seed)
    val = TensorLoader(x_val, y_val, 1024, transform=normalize, device=device)
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalize, device=device)
    print(f"train {len(x_train)}, validation {len(x_val)}, test {len(data.x_test)} images ({data.name})")

    widths = tuple(cfg.width * 2**i for i in range(cfg.blocks))

    def make_model() -> CNN:
        return CNN(data.x_train.shape[1], data.num_classes, widths, cfg.batch_norm, cfg.dropout)

    schedules = SCHEDULES if cfg.schedule == "all" else (cfg.schedule,)
    summaries: dict[str, dict] = {}
    for schedule in schedules:
        log = ScheduleLog(run_, schedule, prefix=len(schedules) > 1)
        _, result, summaries[schedule] = train_schedule(schedule, make_model, train, val, test, cfg, device, log)
        if len(schedules) == 1:
            plot_history(result.rows, run_.path("curves.png"), title=f"CNN, {schedule} schedule")

    plot_schedules(run_.rows, run_.path("schedules.png"))
    table = comparison_table(run_, summaries)
    run_.path("comparison.txt").write_text(table + "\n")
    print(table)

    best = max(summaries, key=lambda s: summaries[s]["test_acc"])
    if len(schedules) == 1:
        extras = summaries[best]
    else:  # every schedule's figures, e.g. test_acc_cosine
        extras = {f"{key}_{s}": value for s, summary in summaries.items() for key, value in summary.items()}
    return run_.finish(**{**extras, "test_acc": summaries[best]["test_acc"], "best_schedule": best})

if __name__ == "__main__":
    run(main, Config)
