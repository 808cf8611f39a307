"""Week 2 self-work: a learning-rate x batch-size sweep of short MLP runs, as a heatmap.

Every cell trains the same MLP from the same initial weights for the same number of epochs;
only the step size and the batch size change. Two things to see:
  - the usable learning rates form a band: too small learns slowly, too large diverges (the
    loss ends higher than it started, or becomes inf/NaN: those cells are marked, not hidden);
  - with a fixed number of epochs, a bigger batch means fewer steps, so it wants a bigger step
    (the "linear scaling" rule of thumb: lr roughly proportional to batch size, up to a point).

Run: python week02_mlp/sweep.py [--smoke] [--help]
     python week02_mlp/sweep.py --optimizer adam --lrs 0.0001 0.001 0.01 0.1
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader
from common.plots import plt, save
from common.runner import launch
from common.runs import Run
from week02_mlp import part2
from week02_mlp.data import Splits, prepare
from week02_mlp.quiet import train_quietly


@dataclass
class Config(BaseConfig):
    """Week 2 self-work: learning rate x batch size sweep of an MLP, final val accuracy heatmap."""

    # Up to 1e6, below float32's 3.4e38 (part2.py's --lr says why): enough to see every way a
    # run breaks.
    lrs: Annotated[tuple[float, ...], Range(0, 1e6, lo_open=True)] = (
        0.001, 0.01, 0.1, 1, 10)  # learning rates to try
    batch_sizes: Annotated[tuple[int, ...], Range(1)] = (16, 64, 256, 1024)  # batch sizes to try
    optimizer: Literal["sgd", "momentum", "adam", "adamw"] = "sgd"  # the optimizer of every cell
    hidden: Annotated[tuple[int, ...], Range(1, 8192)] = (128,)  # hidden layer widths of the MLP
    epochs: Annotated[int, Range(1)] = 2  # epochs per cell (short: a scan, not a final model)
    train_size: Annotated[int, Range(1)] = 10000  # MNIST training images used (too many: all)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # share of those held out

    # 3000 is absurd on purpose: the smoke run must show a diverged cell, not only good ones.
    SMOKE: ClassVar[dict] = {"lrs": (0.01, 0.1, 3000), "batch_sizes": (16, 128), "hidden": (128,),
                             "epochs": 2}

    def check(self) -> None:
        if not self.lrs or not self.batch_sizes:
            raise ConfigError("--lrs and --batch-sizes need at least one value each, "
                              "e.g. --lrs 0.01 0.1")


def load_subset(cfg: Config) -> Splits:
    """MNIST (or its twin with --smoke), the first ``train_size`` training images, split."""
    data = load("mnist", cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    data.x_train, data.y_train = data.x_train[:cfg.train_size], data.y_train[:cfg.train_size]
    sets = prepare(data, cfg.val_fraction, cfg.seed)
    if len(sets.x_val) < 10:  # every cell is judged on the validation images
        raise ConfigError(f"--train-size {cfg.train_size} with --val-fraction {cfg.val_fraction} "
                          f"leaves {len(sets.x_val)} validation images; hold out at least 10")
    return sets


@dataclass
class CellResult:
    val_acc: float  # NaN when the loss became inf/NaN
    val_loss: float
    initial_val_loss: float  # the same network before training
    top_class_share: float  # share of validation predictions that go to the most predicted class

    @property
    def verdict(self) -> str:
        """nan: the loss overflowed; diverged: training made the loss worse than at the start;
        collapsed: the network answers (almost) the same class for everything, typically because
        a huge step killed every ReLU so only the output bias is left; stable: none of these."""
        if math.isnan(self.val_loss):
            return "nan"
        if self.val_loss > self.initial_val_loss:
            return "diverged"
        if self.top_class_share > 0.9:
            return "collapsed"
        return "stable"


def sweep_cell(cfg: part2.Config, sets: Splits, device: torch.device) -> CellResult:
    """Train with ``cfg`` and judge the result on the validation split."""
    val_batches = TensorLoader(sets.x_val, sets.y_val, 2048, device=device)
    initial_model = part2.setup(cfg, sets, device)[0]  # the weights every cell starts from
    initial_loss = part2.evaluate(initial_model, val_batches)["loss"]
    model, rows = train_quietly(cfg, sets, device)
    if not (math.isfinite(rows[-1]["train_loss"]) and math.isfinite(rows[-1]["val_loss"])):
        return CellResult(math.nan, math.nan, initial_loss, math.nan)
    logits, _ = part2.predict(model, val_batches)
    top_share = torch.bincount(logits.argmax(dim=1)).max().item() / len(logits)
    return CellResult(rows[-1]["val_acc"], rows[-1]["val_loss"], initial_loss, top_share)


def plot_heatmap(cells: list[list[CellResult]], lrs: list[float], batch_sizes: list[int], path,
                 title: str) -> None:
    """Colour = final validation accuracy; failed cells say how they failed (NaN: grey)."""
    acc = np.array([[c.val_acc for c in row] for row in cells])
    fig, ax = plt.subplots(figsize=(1.3 * len(lrs) + 2, 0.8 * len(batch_sizes) + 1.8))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgray")
    ax.imshow(np.ma.masked_invalid(acc), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            if c.verdict == "nan":
                text = "loss NaN"
            elif c.verdict == "diverged":
                text = f"{c.val_acc:.3f}\ndiverged\nloss {c.val_loss:.3g}"
            elif c.verdict == "collapsed":
                text = f"{c.val_acc:.3f}\ncollapsed"
            else:
                text = f"{c.val_acc:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if c.verdict == "nan" or c.val_acc > 0.6 else "white")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(batch_sizes)), [str(b) for b in batch_sizes])
    ax.set(xlabel="learning rate", ylabel="batch size", title=title)
    save(fig, path)


def main(cfg: Config) -> dict:
    lrs, batch_sizes = cfg.lrs, cfg.batch_sizes
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    sets = load_subset(cfg)
    run = Run.start(cfg, __file__, device)
    print(f"{len(lrs)} x {len(batch_sizes)} runs of {cfg.epochs} epochs on {len(sets.x_train)} "
          f"images ({cfg.optimizer}, hidden {' '.join(map(str, cfg.hidden))}); chance is 0.10")

    cells: list[list[CellResult]] = []
    for batch_size in batch_sizes:
        cells.append([])
        for lr in lrs:
            cell_cfg = part2.Config(hidden=cfg.hidden, epochs=cfg.epochs, batch_size=batch_size,
                                    optimizer=cfg.optimizer, lr=lr, schedule="constant",
                                    dropout=0.0, shift=0, seed=cfg.seed, device=cfg.device)
            t0 = time.perf_counter()
            c = sweep_cell(cell_cfg, sets, device)
            cells[-1].append(c)
            steps = cfg.epochs * math.ceil(len(sets.x_train) / batch_size)
            run.log(batch_size=batch_size, lr=lr, steps=steps, val_acc=c.val_acc,
                    val_loss=c.val_loss, initial_val_loss=c.initial_val_loss,
                    top_class_share=c.top_class_share, verdict=c.verdict,
                    seconds=round(time.perf_counter() - t0, 2))
            shown = "the loss became inf/NaN" if c.verdict == "nan" else (
                f"val_acc={c.val_acc:.4f}  val_loss={c.val_loss:<8.4g} "
                f"(at init {c.initial_val_loss:.4g})  top class {c.top_class_share:4.0%}")
            print(f"batch {batch_size:5d}  lr {lr:<8g} {steps:6d} steps  {c.verdict:9s}  {shown}")

    plot_heatmap(cells, lrs, batch_sizes, run.path("sweep_heatmap.png"),
                 title=f"final validation accuracy ({cfg.optimizer}, {cfg.epochs} epochs)")
    verdicts = [c.verdict for row in cells for c in row]
    summary = {verdict: verdicts.count(verdict)
               for verdict in ("stable", "collapsed", "diverged", "nan")}
    learned = [(c.val_acc, bs, lr) for row, bs in zip(cells, batch_sizes) for c, lr in zip(row, lrs)
               if c.verdict == "stable"]
    if learned:
        acc, bs, lr = max(learned)
        summary.update(best_val_acc=acc, best_lr=lr, best_batch_size=bs)
        print(f"best: batch {bs}, lr {lr:g}: val_acc {acc:.4f}")
    return run.finish(**summary, chance=1 / len(sets.classes))


if __name__ == "__main__":
    launch(main, Config)
