"""A tiny lab with the anatomy of a real one, for tests of resume, Ctrl-C and SIGTERM.

Run: python tests/tiny_lab.py [--smoke] [--interrupt-at STEP] [--resume CHECKPOINT]
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from common.config import Range, ResumableConfig
from common.loader import TensorLoader
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate


@dataclass
class Config(ResumableConfig):
    """A tiny lab: an MLP on Gaussian blobs."""

    epochs: Annotated[int, Range(1)] = 4  # passes over the data
    lr: Annotated[float, Range(0, lo_open=True)] = 0.05  # peak learning rate
    schedule: Literal["onecycle", "step", "none"] = "onecycle"  # onecycle per batch; step per epoch
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # dropout p (draws random numbers)
    patience: Annotated[int, Range(0)] = 0  # stop after N epochs without a lower val loss (0: off)
    signal_at: Annotated[int, Range(0)] = 0  # send SIGTERM after this optimizer step (0: never)
    SMOKE: ClassVar[dict] = {"epochs": 2}
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*ResumableConfig.RESUME_MAY_CHANGE, "signal_at")


class Net(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


def blobs(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 2.5 * nn.functional.one_hot(y, 4).float()
    return x, y


def train_one_epoch(model, train, optimizer, scheduler, cfg: Config, step: int) -> tuple[dict, int]:
    model.train()
    total, correct, seen = torch.zeros(()), 0, 0
    for x, y in train:
        output = model(x)
        loss = nn.functional.cross_entropy(output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step == cfg.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a real SIGTERM, as `kill` would send
        if cfg.schedule == "onecycle":
            scheduler.step()  # per batch
        total, seen = total + loss.detach() * len(x), seen + len(x)
        correct += (output.argmax(1) == y).sum().item()
    return {"train_loss": (total / seen).item(), "train_acc": correct / seen}, step


def main(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    x, y = blobs()
    train = TensorLoader(x[:96], y[:96], 16, shuffle=True, seed=cfg.seed,
                         augment=lambda xb, g: xb + 0.1 * torch.randn(xb.shape, generator=g))
    val = TensorLoader(x[96:], y[96:], 24)
    model = Net(cfg.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = None
    if cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr,
                                                        total_steps=cfg.epochs * len(train))
    elif cfg.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    run = Run.start(cfg, __file__, torch.device("cpu"), quiet=True)
    state = run.restore(model, optimizer, scheduler)
    step, best = state.get("step", 0), state.get("best", math.inf)
    best_epoch = state.get("best_epoch", 0)
    stopped = state.get("stopped", False)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if stopped:
            break
        train.set_epoch(epoch)  # the batches an uninterrupted run would see in this epoch
        row, step = train_one_epoch(model, train, optimizer, scheduler, cfg, step)
        check_finite(row["train_loss"], epoch)
        row.update({f"val_{k}": v for k, v in evaluate(model, val).items()},
                   lr=optimizer.param_groups[0]["lr"])
        if cfg.schedule == "step":
            scheduler.step()  # per epoch
        if row["val_loss"] < best:
            best, best_epoch = row["val_loss"], epoch
        stopped = bool(cfg.patience) and epoch - best_epoch >= cfg.patience
        run.log(epoch=epoch, **row)
        run.save_checkpoint(model, optimizer, scheduler, epoch=epoch, step=step, best=best,
                            best_epoch=best_epoch, stopped=stopped)
    torch.save(model.state_dict(), run.path("final_weights.pt"))
    last = run.rows[-1] if run.rows else {}
    return run.finish(val_acc=last.get("val_acc"), epochs_done=last.get("epoch", 0))


if __name__ == "__main__":
    launch(main, Config)
