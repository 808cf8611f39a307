"""Week 4, Part 2: when a learning-rate scheduler steps, and how early stopping decides.

The Week 3 CNN (imported, with Week 3's batches and augmentation) with BatchNorm, Dropout and
weight decay, one of four LR schedules, and early stopping on validation data held out from
the training set. When each schedule steps is the lesson:

    onecycle        after every BATCH: train_one_epoch steps it after each optimizer step
    step, cosine    after every EPOCH, on a fixed plan: step_per_epoch, after validation
    plateau         after every EPOCH, handed the validation loss: it reacts to the run

``--schedule all`` trains each from the same initial weights and keeps the one with the lowest
validation loss; each trained model meets the test set once, at the end.

Run: python week04_regularization/part2.py [--smoke] [--help]
     python week04_regularization/part2.py --schedule all --train-subset 10000   # compare the four
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.config import Range, ResumableConfig
from common.data import load, subset
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import ConfigError, Interrupted
from common.loader import TensorLoader
from common.plots import plot_curves, plot_history
from common.runner import interrupted, launch
from common.runs import Run
from common.train import check_finite, evaluate
from week03_cnn.part2 import CNN, IMAGE_SIZE, make_loaders

SCHEDULES = ("step", "plateau", "onecycle", "cosine")


@dataclass
class Config(ResumableConfig):
    """Week 4, Part 2: a regularized CNN, four learning-rate schedules, early stopping."""

    dataset: Literal["cifar10", "mnist"] = "cifar10"  # which image data set to learn
    schedule: Literal[(*SCHEDULES, "all")] = "onecycle"  # the LR schedule; all: compare the four
    epochs: Annotated[int, Range(1)] = 15  # most passes over the data (early stopping: fewer)
    patience: Annotated[int, Range(0)] = 3  # stop after N epochs with no lower val loss (0: never)
    batch_size: Annotated[int, Range(1)] = 128  # images per optimizer step
    optimizer: Literal["adamw", "sgd"] = "adamw"  # AdamW (decoupled decay) or SGD+Nesterov (L2)
    lr: Annotated[float, Range(0, lo_open=True)] = 2e-3  # peak/initial LR (sgd: try 0.05)
    weight_decay: Annotated[float, Range(0, 1)] = 0.05  # AdamW: decoupled; SGD: L2 (try 5e-4)
    width: Annotated[int, Range(1, 512)] = 32  # channels of the first conv block, doubled per block
    blocks: Annotated[int, Range(1, 5)] = 3  # conv-BN-ReLU-pool blocks, each halves the image
    batch_norm: bool = True  # BatchNorm2d after every conv
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # dropout before the linear head
    augment: bool = True  # Week 3's rule: crop + flip for photos, shifts only for digits
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # training images held out
    train_subset: Annotated[int, Range(0)] = 0  # use N training images drawn at random (0: all)

    SMOKE: ClassVar[dict] = {"epochs": 6, "batch_size": 32, "width": 16, "lr": 5e-3, "patience": 2}

    def check(self) -> None:
        if self.resume and self.schedule == "all":
            raise ConfigError("--resume continues the run of one schedule; a --schedule all "
                              "comparison cannot be resumed: start it again, or start one "
                              "schedule alone (e.g. --schedule cosine)")
        size = IMAGE_SIZE[self.dataset]
        if size >> self.blocks < 1:
            raise ConfigError(f"--blocks {self.blocks}: each block halves the {size}-pixel "
                              f"{self.dataset} images, so use at most {size.bit_length() - 1}")


# ---- Weight decay on the weights that need it, not on BatchNorm or biases ----
def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 no_decay_lr_scale: float = 1.0) -> list[dict]:
    """Conv/linear weights (2+ dims) get weight decay; BatchNorm gammas/betas and biases (1-D) get
    none and may learn ``no_decay_lr_scale`` times faster (best_cnn.py: 16). A BN gamma or bias of
    0 is not "simpler", and a conv before BN is scale-invariant: there decay keeps the LR up."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.ndim > 1]
    free = [p for p in trainable if p.ndim <= 1]
    return [{"params": decayed, "lr": lr, "weight_decay": weight_decay},
            {"params": free, "lr": lr * no_decay_lr_scale, "weight_decay": 0.0}]


def make_decay_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                         momentum: float = 0.9,
                         no_decay_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Week 2's optimizers, now with decay on the weights that need it (``param_groups``).
    AdamW: decay is decoupled (w <- w*(1 - lr*wd), Part 1). SGD: decay is an L2 gradient,
    which for SGD is the same thing; Nesterov momentum looks one step ahead."""
    groups = param_groups(model, lr, weight_decay, no_decay_lr_scale)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or sgd")


# ---- Learning-rate schedules, and WHEN each one steps ----
def make_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int,
                   steps_per_epoch: int) -> tuple[Any, bool]:
    """The scheduler (Part 1 wrote them as functions) and whether it steps after every batch:
    step      StepLR: lr x0.1 every epochs//3 epochs (a staircase); per epoch
    plateau   ReduceLROnPlateau: lr x0.1 after 2 epochs in a row without a lower validation loss
    onecycle  OneCycleLR: up to the peak in 25% of training, then to ~0; planned in batches
    cosine    CosineAnnealingLR: half a cosine from lr to 0 over the epochs; per epoch"""
    schedulers = torch.optim.lr_scheduler
    if name == "step":
        return schedulers.StepLR(optimizer, step_size=max(epochs // 3, 1), gamma=0.1), False
    if name == "plateau":
        return schedulers.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=1), False
    if name == "onecycle":
        peak = [group["lr"] for group in optimizer.param_groups]
        total = epochs * steps_per_epoch
        return schedulers.OneCycleLR(optimizer, peak, total_steps=total, pct_start=0.25), True
    if name == "cosine":
        return schedulers.CosineAnnealingLR(optimizer, T_max=epochs), False
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def step_per_epoch(scheduler, val_loss: float) -> None:
    """A per-epoch scheduler's step, once the epoch's validation loss is known: the epoch's row
    shows the LR it trained with, the next epoch trains with the new one. ReduceLROnPlateau is
    handed the validation loss and decides from it; the others count epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


# ---- Early stopping: how it decides ----
class EarlyStopping:
    """Remembers the weights of the epoch with the lowest validation loss; ``update`` says when
    ``patience`` epochs have passed without a lower one. ``restore_best`` puts those weights back:
    we keep the model validation liked best (never judged on the test set, whose accuracy would
    then be an optimistic estimate). ``state_dict`` goes into the checkpoint, so a resumed run
    restores the same best weights."""

    def __init__(self, model: nn.Module, patience: int | float):
        self.model, self.patience = model, patience
        self.best_loss, self.best_epoch, self.best_weights = math.inf, 0, None

    def update(self, val_loss: float, epoch: int) -> bool:
        """Note this epoch's validation loss; True when it is time to stop."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return epoch - self.best_epoch >= self.patience

    def restore_best(self) -> int:
        """Load the best epoch's weights into the model (if it has any); returns that epoch."""
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return self.best_epoch

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "best_weights": self.best_weights}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.best_weights = (state[k] for k in self.state_dict())


# ---- Training one schedule: the loop, with both kinds of scheduler step in view ----
def train_one_epoch(model: nn.Module, train: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler, per_batch: bool) -> dict:
    model.train()
    device = train.x.device
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in train:  # x: (B, C, H, W), y: (B,)
        with autocast(x.device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if per_batch:
            scheduler.step()  # one-cycle: after EVERY BATCH
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(train) * train.batch_size  # drop_last: every batch is full
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item()}


def train_schedule(schedule: str, make_model: Callable[[], nn.Module], train: TensorLoader,
                   val: TensorLoader, test: TensorLoader, cfg: Config, device: torch.device,
                   run: Run) -> tuple[list[dict], dict]:
    """Train a fresh model with one schedule (and early stopping): its rows and summary."""
    seed_everything(cfg.seed)  # the same initial weights for every schedule
    model = prepare_model(make_model(), device)
    optimizer = make_decay_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler, per_batch = make_scheduler(schedule, optimizer, cfg.epochs, len(train))
    early = EarlyStopping(model, cfg.patience or math.inf)  # patience 0: never stop early
    print(f"--- schedule: {schedule} (steps per {'batch' if per_batch else 'epoch'}) ---")
    state = run.restore(model, optimizer, scheduler)
    if "early" in state:
        early.load_state_dict(state["early"])
    stopped, epoch = state.get("stopped", False), state["epoch"]
    while not stopped and epoch < cfg.epochs:
        epoch += 1
        t0 = time.perf_counter()
        train.set_epoch(epoch)  # this epoch's shuffle and crops, the same after a resume
        row = {"epoch": epoch, **train_one_epoch(model, train, optimizer, scheduler, per_batch)}
        check_finite(row["train_loss"], epoch)
        row.update({f"val_{k}": v for k, v in evaluate(model, val).items()})
        row.update(lr=optimizer.param_groups[0]["lr"],
                   epoch_time_s=round(time.perf_counter() - t0, 3))
        if not per_batch:
            step_per_epoch(scheduler, row["val_loss"])  # step, cosine, plateau: after every EPOCH
        stopped = early.update(row["val_loss"], epoch)  # early stopping decides here
        if stopped:
            print(f"early stopping after epoch {epoch}: no lower validation loss for "
                  f"{cfg.patience} epochs")
        run.log(show=True, **row)
        run.save_checkpoint(model, optimizer, scheduler, epoch=epoch, stopped=stopped,
                            early=early.state_dict())
    kept = early.restore_best() if cfg.patience else epoch  # the epoch validation liked best
    if kept != epoch:
        print(f"end of training: restored the weights of epoch {kept} (lowest validation loss)")
    # The kept model's validation figures choose between schedules; the test set is touched
    # here, once.
    kept_val, kept_test = evaluate(model, val), evaluate(model, test)
    rows = [r for r in run.rows if r.get("schedule") == schedule]
    summary = {"val_loss": kept_val["loss"], "val_acc": kept_val["acc"],
               "test_acc": kept_test["acc"], "kept_epoch": kept, "epochs_done": epoch,
               "stopped_early": stopped,
               "train_time_s": round(sum(r["epoch_time_s"] for r in rows), 2)}
    return rows, summary


def comparison_interrupted(e: KeyboardInterrupt, schedule: str, run: Run) -> Interrupted:
    """Ctrl-C / SIGTERM in a ``--schedule all`` run: --resume continues one schedule's run and
    refuses a comparison's checkpoints, so launch's "continue with --resume ..." would lead
    nowhere. One line saying what was kept instead, with Ctrl-C's or SIGTERM's exit status."""
    return interrupted(e, f"in the {schedule} schedule; a --schedule all comparison cannot be "
                          f"resumed (what it finished is in {run.dir}): start it again, or train "
                          f"one schedule alone (--schedule {schedule}), which can be paused with "
                          "Ctrl-C and resumed")


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    data = subset(data, cfg.train_subset, cfg.seed)  # drawn at random, before validation
    train, val, test = make_loaders(cfg, data, device)  # Week 3's: validation held out, augmented
    if val is None:  # early stopping and the choice of schedule need validation images
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(data.x_train)} training "
                          "images holds out none for validation; use more images or a larger "
                          "--val-fraction")
    print(f"train {len(train.x)}, validation {len(val.x)}, test {len(test.x)} images ({data.name})")
    widths = tuple(cfg.width * 2**i for i in range(cfg.blocks))  # channels double as maps halve
    make_model = partial(CNN, data.x_train.shape[1], data.num_classes, widths, cfg.batch_norm,
                         cfg.dropout)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no folder
    schedules = SCHEDULES if cfg.schedule == "all" else (cfg.schedule,)
    summaries: dict[str, dict] = {}
    for schedule in schedules:
        view = run.sub(schedule, schedule=schedule)  # files <schedule>_*, a schedule column
        try:
            rows, summaries[schedule] = train_schedule(schedule, make_model, train, val, test,
                                                       cfg, device, view)
        except KeyboardInterrupt as e:  # one schedule can be resumed, a comparison cannot
            if len(schedules) > 1:
                raise comparison_interrupted(e, schedule, run) from None
            raise
        plot_history(rows, view.path("curves.png"), title=f"CNN, {schedule} schedule")
    for key in ("val_loss", "val_acc", "lr"):  # every schedule on one figure per metric
        curves = {s: [(r["epoch"], r[key]) for r in run.rows if r["schedule"] == s]
                  for s in schedules}
        plot_curves(curves, run.path(f"schedules_{key}.png"), ylabel=key, logy=key == "lr",
                    title=data.name)
    run.write_comparison(summaries, list(summaries[schedules[0]]), column="schedule")

    best = min(summaries, key=lambda s: summaries[s]["val_loss"])  # on validation, never on test
    per_schedule = {f"{key}_{s}": value for s, summary in summaries.items()
                    for key, value in summary.items()}
    return run.finish(**(per_schedule if len(schedules) > 1 else {}), **summaries[best],
                      best_schedule=best)


if __name__ == "__main__":
    launch(main, Config)
