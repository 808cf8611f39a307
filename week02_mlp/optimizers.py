"""Week 2 self-work: SGD vs SGD with momentum vs Adam, on the same MLP and the same data.

Every optimizer starts from the same initial weights and sees the same batches in the same
order (same seed): the only difference between the curves is the update rule.

    SGD        w <- w - lr g
    momentum   v <- mu v + g;  w <- w - lr v        (remembers the direction it was going)
    Adam       w <- w - lr m_hat / (sqrt(s_hat) + eps), m and s running means of g and g^2

Run: python week02_mlp/optimizers.py [--smoke] [--help]
     python week02_mlp/optimizers.py --dataset iris --epochs 60
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from week02_mlp import part2
from week02_mlp.data import prepare
from week02_mlp.quiet import train_quietly


@dataclass
class Config(BaseConfig):
    """Week 2 self-work: SGD vs SGD+momentum vs Adam, same MLP, data, seed and initial weights."""

    dataset: Literal["mnist", "iris"] = "mnist"  # which data set to learn
    hidden: Annotated[tuple[int, ...], Range(1, 8192)] = (256,)  # --hidden alone: none
    epochs: Annotated[int, Range(1)] = 6  # passes over the training data, per optimizer
    batch_size: Annotated[int, Range(1)] = 128  # examples per step
    # Step sizes stop at 1e6, below float32's 3.4e38 (part2.py's --lr says why).
    sgd_lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.05  # step size of plain SGD
    momentum_lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.05  # step size of SGD+momentum
    momentum: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.9  # mu of momentum
    adam_lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # Adam (~lr per weight: smaller)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # share of training held out

    SMOKE: ClassVar[dict] = {"hidden": (64,), "epochs": 6, "batch_size": 32}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    sets = prepare(data, cfg.val_fraction, cfg.seed)
    if len(sets.x_val) < 10:  # the curves compare validation accuracy
        raise ConfigError(f"--val-fraction {cfg.val_fraction} holds out {len(sets.x_val)} of "
                          f"{data.name}'s {len(data.x_train)} training examples; "
                          "hold out at least 10")
    run = Run.start(cfg, __file__, device)

    lrs = {"sgd": cfg.sgd_lr, "momentum": cfg.momentum_lr, "adam": cfg.adam_lr}
    curves_acc, curves_loss, summary, table = {}, {}, {}, []
    for name, lr in lrs.items():
        # A constant learning rate, no dropout, no augmentation: nothing else that could
        # favour one optimizer.
        part2_cfg = part2.Config(dataset=cfg.dataset, hidden=cfg.hidden, epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, optimizer=name, lr=lr,
                                 momentum=cfg.momentum, schedule="constant", dropout=0.0,
                                 shift=0, seed=cfg.seed, device=cfg.device)
        print(f"--- {name} (lr {lr:g})")
        t0 = time.perf_counter()
        _, rows = train_quietly(part2_cfg, sets, device)
        seconds = time.perf_counter() - t0
        for row in rows:  # one spreadsheet: metrics.csv with an optimizer column
            run.log(optimizer=name, **row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()))
        label = f"{name} (lr {lr:g})"
        curves_acc[label] = [row["val_acc"] for row in rows]
        curves_loss[label] = [row["train_loss"] for row in rows]
        summary.update({f"{name}_val_acc": rows[-1]["val_acc"],
                        f"{name}_first_train_loss": rows[0]["train_loss"],
                        f"{name}_train_loss": rows[-1]["train_loss"]})
        table.append((label, curves_acc[label][0], curves_acc[label][-1], max(curves_acc[label]),
                      rows[-1]["train_loss"], seconds))

    plot_curves(curves_acc, run.path("val_acc.png"), ylabel="validation accuracy",
                title=f"optimizers on {data.name}: same model, data, seed")
    plot_curves(curves_loss, run.path("train_loss.png"), ylabel="training loss (log)", logy=True,
                title=f"optimizers on {data.name}: training loss")
    print(f"\n{'optimizer':22s} {'val acc ep1':>11s} {'val acc last':>12s} {'best':>6s} "
          f"{'train loss':>10s} {'time s':>7s}")
    for label, first, last, best, loss, seconds in table:
        print(f"{label:22s} {first:11.4f} {last:12.4f} {best:6.4f} {loss:10.4f} {seconds:7.1f}")
    return run.finish(**summary, epochs=cfg.epochs, chance=1 / len(sets.classes))


if __name__ == "__main__":
    launch(main, Config)
