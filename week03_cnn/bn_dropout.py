"""Week 3, self-work: the same CNN with and without BatchNorm and Dropout, side by side.

Run: python week03_cnn/bn_dropout.py [--smoke] [--help]

Four variants (plain, BN, Dropout, BN+Dropout) train on the same images, in the same order,
from the same seed, with the same optimizer and number of epochs. Then a "high learning rate"
pair (plain vs BN at ``high_lr_factor`` x the learning rate) shows BatchNorm's other gift: it
keeps each layer's input at mean 0 / variance 1 however the weights grow, so a step size that
blows up the plain network is fine with BN. Plain SGD with a constant learning rate (no
schedule) keeps the comparison about the layers alone; Week 4 adds schedules.

No ``--resume``: this is a comparison of several short runs (minutes each), not one long
training; an interrupted comparison is simply run again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from common.config import BaseConfig, Range
from common.data import load
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import LabError, NonFiniteLoss
from common.loader import TensorLoader, normalizer, split
from common.plots import save
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate
from week03_cnn.part2 import CNN, training_augment


@dataclass
class Config(BaseConfig):
    """Week 3, self-work: CNN with vs without BatchNorm and Dropout (stability, accuracy, speed)."""

    dataset: Literal["cifar10", "mnist"] = "cifar10"  # which image data set to learn
    train_size: Annotated[int, Range(1)] = 10000  # training images used (after 10% held out)
    epochs: Annotated[int, Range(1)] = 8  # passes over the training images, per variant
    batch_size: Annotated[int, Range(1)] = 128  # images per SGD step
    # Both stop at 1e6, so that lr x factor stays far below float32's 3.4e38, past which torch.optim
    # cannot represent the step (a RuntimeError instead of a variant reported as diverged).
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.05  # SGD (momentum 0.9), constant
    high_lr_factor: Annotated[float, Range(0, 1e6)] = 6.0  # plain and BN also at lr x this (0: no)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # dropout before the classifier
    width: Annotated[int, Range(1, 512)] = 16  # channels of the first conv block (then x2, x4)
    augment: bool = False  # random crop + flip; off by default so that overfitting shows
    # Small batches, enough epochs that even the plain network learns the twin (~12 s for all six).
    SMOKE: ClassVar[dict] = {"epochs": 12, "batch_size": 16, "width": 8}


def variants(cfg: Config) -> list[dict]:
    """Name, short key, batch_norm, dropout and lr of every model trained."""
    lr, p = cfg.lr, cfg.dropout
    specs = [dict(variant="plain", key="plain", batch_norm=False, dropout=0.0, lr=lr),
             dict(variant="BN", key="bn", batch_norm=True, dropout=0.0, lr=lr),
             dict(variant="Dropout", key="dropout", batch_norm=False, dropout=p, lr=lr),
             dict(variant="BN+Dropout", key="bn_dropout", batch_norm=True, dropout=p, lr=lr)]
    if cfg.high_lr_factor > 0:
        high = round(cfg.lr * cfg.high_lr_factor, 12)  # 0.05 * 6 is 0.30000000000000004 in binary
        specs += [dict(variant="plain, high lr", key="plain_high_lr", batch_norm=False,
                       dropout=0.0, lr=high),
                  dict(variant="BN, high lr", key="bn_high_lr", batch_norm=True,
                       dropout=0.0, lr=high)]
    return specs


def train_variant(spec: dict, cfg: Config, data, train: TensorLoader, val: TensorLoader,
                  run: Run) -> dict:
    """Train one variant from the same seed with Week 3's loop (no schedule: the layers alone
    make the difference), keeping every step's loss: per-step curves show the stability (spikes,
    plateaus) that per-epoch means hide. A run whose loss becomes NaN is reported as diverged."""
    seed_everything(cfg.seed)  # the same initial weights for the shared layers, the same dropout
    widths = (cfg.width, 2 * cfg.width, 4 * cfg.width)
    net = CNN(data.x_train.shape[1], data.num_classes, widths, spec["batch_norm"], spec["dropout"])
    model = prepare_model(net, run.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9, weight_decay=5e-4)
    log = run.sub(spec["key"], variant=spec["variant"])  # metrics.csv: a row per variant and epoch
    steps, rows, diverged = [], [], False  # steps: tensors (.item() would wait for the GPU)
    print(f"\n--- {spec['variant']} ---")
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            train.set_epoch(epoch)  # the same batches for every variant: (seed, epoch) decide
            model.train()
            for x, y in train:  # x: (B, C, H, W), y: (B,)
                with autocast(x.device):  # bf16 on CUDA; a no-op on the CPU
                    loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps.append(loss.detach())
            train_loss = torch.stack(steps[-len(train):]).mean()  # drop_last: equal batches
            check_finite(train_loss, epoch)  # NaN or inf: this variant diverged
            rows.append({"epoch": epoch, "train_loss": train_loss.item(),
                         **{f"val_{k}": v for k, v in evaluate(model, val).items()},
                         "epoch_time_s": round(time.perf_counter() - t0, 3)})
            log.log(show=True, **rows[-1])
    except NonFiniteLoss as e:
        print(f"{spec['variant']}: diverged ({str(e).split(';')[0]})")
        diverged = True
    return {
        **spec,
        "epochs_done": len(rows),
        "first_train_loss": rows[0]["train_loss"] if rows else math.nan,
        "final_train_loss": rows[-1]["train_loss"] if rows and not diverged else math.nan,
        "best_val_acc": max((r["val_acc"] for r in rows), default=math.nan),
        # the median: robust to one slow epoch
        "s_per_epoch": float(np.median([r["epoch_time_s"] for r in rows])) if rows else math.nan,
        "diverged": diverged,
        # float64: a diverging loss squared (1e20 ** 2) still fits
        "_steps": torch.stack(steps).double().cpu().numpy() if steps else np.zeros(0),
        "_val_acc": [r["val_acc"] for r in rows],
        "_model": model,
    }


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average (window shrinks at the start) to see the trend through the noise."""
    if len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_comparison(results: list[dict], steps_per_epoch: int, path) -> None:
    """Four panels: per-step training loss (same lr), validation accuracy, seconds per epoch,
    and the high-learning-rate pair's training loss."""
    same_lr = [r for r in results if not r["key"].endswith("high_lr")]
    high_lr = [r for r in results if r["key"].endswith("high_lr")]
    fig, axes = plt.subplots(1, 4 if high_lr else 3, figsize=(21 if high_lr else 16, 4.2))
    window = max(steps_per_epoch // 5, 1)

    def loss_panel(ax, group, title):
        for r in group:
            steps = r["_steps"]
            x = np.arange(1, len(steps) + 1) / steps_per_epoch
            label = r["variant"] + (" (diverged)" if r["diverged"] else "")
            line, = ax.plot(x, smooth(steps, window), label=label)
            ax.plot(x, steps, color=line.get_color(), alpha=0.15, linewidth=0.6)
        ax.set(xlabel="epoch", ylabel="training loss (per step; line = moving average)",
               title=title)
        finite = np.concatenate([r["_steps"] for r in group if len(r["_steps"])] or [[3.0]])
        top = np.nanpercentile(np.where(np.isfinite(finite), finite, np.nan), 99)
        ax.set_ylim(0, min(max(top, 0.5), 5) if np.isfinite(top) else 5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    loss_panel(axes[0], same_lr, f"training stability, lr={results[0]['lr']:g}")
    for r in same_lr:
        axes[1].plot(range(1, len(r["_val_acc"]) + 1), r["_val_acc"], marker="o", markersize=3,
                     label=r["variant"])
    axes[1].set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    names = [r["variant"] for r in results]
    seconds = [0 if math.isnan(r["s_per_epoch"]) else r["s_per_epoch"] for r in results]
    axes[2].barh(names, seconds, color="tab:gray")
    axes[2].invert_yaxis()
    axes[2].set(xlabel="median seconds per epoch (train + validation)", title="time per epoch")
    if high_lr:
        loss_panel(axes[3], high_lr, f"high learning rate: lr={high_lr[0]['lr']:g}")
    fig.tight_layout()
    save(fig, path)


FIGURES = ("test_acc", "first_train_loss", "final_train_loss", "best_val_acc", "s_per_epoch",
           "step_loss_jitter")


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    # CIFAR-10: 5000 images held out for validation
    x_train, y_train, x_val, y_val = split(data.x_train, data.y_train, 0.1, cfg.seed)
    x_train, y_train = x_train[:cfg.train_size], y_train[:cfg.train_size]
    normalize = normalizer(data.mean, data.std)
    if len(x_train) < cfg.batch_size:  # drop_last: an epoch would have no batch at all
        raise LabError(f"--batch-size {cfg.batch_size} is more than the {len(x_train)} training "
                       "images")
    augment = training_augment(cfg.dataset) if cfg.augment else None
    train = TensorLoader(x_train, y_train, cfg.batch_size, shuffle=True, drop_last=True,
                         device=device, augment=augment, transform=normalize, seed=cfg.seed)
    val = TensorLoader(x_val, y_val, 1024, transform=normalize, device=device)
    run = Run.start(cfg, __file__, device)
    print(f"{len(x_train)} training and {len(x_val)} validation images of {data.name}")

    results = [train_variant(spec, cfg, data, train, val, run) for spec in variants(cfg)]
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalize, device=device)
    for r in results:
        r["test_acc"] = math.nan if r["diverged"] else evaluate(r["_model"], test)["acc"]
        steps = r["_steps"]
        # Stability, in one number: how much the loss jumps from one step to the next.
        jitter = np.std(np.diff(steps[len(steps) // 2:]))  # over the second half of training
        r["step_loss_jitter"] = float(jitter) if len(steps) > 4 else None

    columns = ["variant", "lr", "epochs_done", "final_train_loss", "best_val_acc", "test_acc",
               "s_per_epoch",
               "step_loss_jitter"]
    print("\n" + "  ".join(f"{c:>18s}" for c in columns))
    for r in results:
        print("  ".join(f"{r[c]:>18.4g}" if isinstance(r[c], float) else f"{r[c]!s:>18s}"
                        for c in columns))
    plot_comparison(results, len(train), run.path("bn_dropout.png"))
    summary = {f"{name}_{r['key']}": r[name] for r in results for name in FIGURES}
    # A diverged variant's figures are NaN (no final loss or test accuracy): declared, not hidden.
    allowed_nan = [f"{name}_{r['key']}" for r in results if r["diverged"] for name in FIGURES]
    diverged = [r["variant"] for r in results if r["diverged"]]
    return run.finish(**summary, diverged=diverged, allowed_nan=allowed_nan)


if __name__ == "__main__":
    launch(main, Config)
