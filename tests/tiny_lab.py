"""A tiny lab with the anatomy of a real one, for tests of resume, Ctrl-C and SIGTERM.

Run: python tests/tiny_lab.py [--smoke] [--interrupt-at STEP] [--resume CHECKPOINT]
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from common.config import Range, ResumableConfig, run
from common.loader import TensorLoader
from common.runs import Run
from common.train import Callback, Loop, fit


@dataclass
class Config(ResumableConfig):
    """A tiny lab: an MLP on Gaussian blobs."""

    epochs: Annotated[int, Range(1)] = 4  # passes over the data
    lr: Annotated[float, Range(0, lo_open=True)] = 0.05  # peak learning rate
    schedule: Literal["onecycle", "step", "none"] = "onecycle"  # onecycle: per batch; step: per epoch (callback)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # dropout probability (draws random numbers)
    patience: Annotated[int, Range(0)] = 0  # stop after this many epochs without a lower val loss (0: off)
    interrupt_at: Annotated[int, Range(0)] = 0  # simulate Ctrl-C after this optimizer step (0: never)
    signal_at: Annotated[int, Range(0)] = 0  # send this process SIGTERM after this optimizer step (0: never)
    SMOKE: ClassVar[dict] = {"epochs": 2}
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*ResumableConfig.RESUME_MAY_CHANGE, "interrupt_at", "signal_at")


class Net(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


class EpochStep(Callback):
    """A per-epoch scheduler, stepped after validation."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def on_epoch_end(self, loop: Loop) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


class Patience(Callback):
    """Stop when the validation loss has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch = patience, float("inf"), 0

    def on_epoch_end(self, loop: Loop) -> None:
        if loop.row["val_loss"] < self.best:
            self.best, self.best_epoch = loop.row["val_loss"], loop.epoch
        loop.stop = loop.epoch - self.best_epoch >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class Fault(Callback):
    """Ctrl-C (KeyboardInterrupt) or a real SIGTERM after a given optimizer step."""

    def __init__(self, interrupt_at: int, signal_at: int):
        self.interrupt_at, self.signal_at = interrupt_at, signal_at

    def on_step_end(self, loop: Loop) -> None:
        if loop.step == self.interrupt_at:
            raise KeyboardInterrupt
        if loop.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)


def blobs(n: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 2.5 * nn.functional.one_hot(y, 4).float()
    return x, y


def main(cfg: Config) -> dict:
    torch.manual_seed(cfg.seed)
    x, y = blobs()
    train = TensorLoader(x[:96], y[:96], 16, shuffle=True, seed=cfg.seed,
                         augment=lambda xb, g: xb + 0.1 * torch.randn(xb.shape, generator=g))
    val = TensorLoader(x[96:], y[96:], 24)
    model = Net(cfg.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler, callbacks = None, []
    if cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * len(train))
    elif cfg.schedule == "step":
        callbacks.append(EpochStep(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)))
    if cfg.patience:
        callbacks.append(Patience(cfg.patience))
    callbacks.append(Fault(cfg.interrupt_at, cfg.signal_at))
    run_ = Run.start(cfg, __file__, torch.device("cpu"), quiet=True)
    loop = fit(model, optimizer, train, val, cfg.epochs, scheduler=scheduler, callbacks=callbacks, run=run_,
               resume=cfg.resume)
    torch.save(model.state_dict(), run_.path("final_weights.pt"))
    return run_.finish(val_acc=loop.last["val_acc"], epochs_done=loop.epoch)


if __name__ == "__main__":
    run(main, Config)
