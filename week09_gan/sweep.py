"""Week 9, self-work: a learning-rate / Adam beta1 / label-smoothing sweep of the DCGAN, scored.

Run: python week09_gan/sweep.py [--smoke] [--help]
     python week09_gan/sweep.py --data-dir DATA   # DCGAN's, then lr 1e-3, beta1 0.9, smoothing 0.1
     python week09_gan/sweep.py --data-dir DATA --design grid --lrs 2e-4 1e-3 --beta1s 0.5 0.9

Each setting (``--design around``: the first value of each list, then each other value changed
alone; ``--design grid``: every combination) trains Part 2's DCGAN from the same initial weights
(``part2.train_gan``: the same alternating D and G steps) on the same images, and is scored the
same way: the Frechet distance on our classifier's features against held-out real images (the
real-vs-real baseline beside it) and each class's share. The run folder holds, per setting,
``<setting>_samples_epochNN.png``, ``<setting>_progression.png``, ``<setting>_losses.png``;
and for all of them ``sweep_fd.png`` (the scores side by side), ``sweep_samples.png`` (the
same noise through every final generator, one row each) and ``comparison.txt``.

What to look for: beta1 = 0.9 (Adam's default) against DCGAN's 0.5; a learning rate 5x
DCGAN's; whether one-sided label smoothing (D's target for real images 0.9 instead of 1)
changes the score or the D(x) curve. The best setting is chosen on the held-out images, never
on the test set (which this week never touches).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import save
from common.runner import launch
from common.runs import Run
from week09_gan import part2
from week09_gan.plots import GRID_SIDE, save_grid
from week09_gan.quality import gan_split, get_scorer


@dataclass
class Config(BaseConfig):
    """Week 9, self-work: the DCGAN under several learning rates, beta1s and label smoothings."""

    dataset: Literal["mnist", "cifar10"] = "mnist"  # which image data set to imitate
    lrs: Annotated[tuple[float, ...], Range(0, 1e6, lo_open=True)] = (2e-4, 1e-3)  # Adam lrs to try
    beta1s: Annotated[tuple[float, ...], Range(0, 1, hi_open=True)] = (0.5, 0.9)  # Adam beta1s
    smoothings: Annotated[tuple[float, ...], Range(0, 0.5)] = (0.0, 0.1)  # one-sided smoothings
    design: Literal["around", "grid"] = "around"  # around: firsts, then each other alone; grid: all
    epochs: Annotated[int, Range(1)] = 2  # epochs of each run
    train_subset: Annotated[int, Range(0)] = 20_000  # GAN training images, at random (0: all)
    batch_size: Annotated[int, Range(2)] = 128  # images per step
    latent_dim: Annotated[int, Range(1, 4096)] = 64  # size of the noise vector z
    g_width: Annotated[int, Range(1, 1024)] = 32  # channels of G's last hidden layer
    d_width: Annotated[int, Range(1, 1024)] = 32  # channels of D's first layer
    score_samples: Annotated[int, Range(10)] = 10_000  # images generated per run for the score
    SMOKE: ClassVar[dict] = {"lrs": (2e-3,), "beta1s": (0.5,), "smoothings": (0.0, 0.1),
                             "epochs": 2, "batch_size": 32, "latent_dim": 16, "g_width": 16,
                             "d_width": 8, "score_samples": 200}

    def check(self) -> None:
        for name in ("lrs", "beta1s", "smoothings"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} needs at least one value")


def settings(cfg: Config) -> list[tuple[float, float, float]]:
    """(lr, beta1, smoothing) of every run. ``grid``: every combination. ``around``: the first
    value of each list (DCGAN's recipe by default), then one run per other value with the
    other two held at their first values: 1 + 1 + 1 + 1 runs for the defaults instead of 8,
    each one changing a single thing against the same reference."""
    if cfg.design == "grid":
        return list(itertools.product(cfg.lrs, cfg.beta1s, cfg.smoothings))
    base = (cfg.lrs[0], cfg.beta1s[0], cfg.smoothings[0])
    runs = [base]
    for position, values in enumerate((cfg.lrs, cfg.beta1s, cfg.smoothings)):
        for value in values[1:]:
            changed = list(base)
            changed[position] = value
            runs.append(tuple(changed))
    return list(dict.fromkeys(runs))


def label(lr: float, beta1: float, smoothing: float) -> str:
    return f"lr={lr:g} beta1={beta1:g} smoothing={smoothing:g}"


def plot_scores(summaries: dict[str, dict], path) -> None:
    """One bar per setting (its Frechet distance), the real-vs-real baseline as a line."""
    names = list(summaries)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.8))
    ax.bar(range(len(names)), [summaries[n]["fd"] for n in names], color="C0")
    ax.axhline(summaries[names[0]]["fd_real"], color="C3", ls="--", label="real vs real")
    ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=7)
    ax.set(ylabel="Frechet distance (classifier features)", title="lower is better")
    ax.legend(fontsize=8)
    save(fig, path)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    x_train, _, x_val, _ = gan_split(data)
    if cfg.train_subset and cfg.train_subset < len(x_train):
        g = torch.Generator().manual_seed(cfg.seed)
        x_train = x_train[torch.randperm(len(x_train), generator=g)[:cfg.train_subset]]
    if len(x_train) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(x_train)} "
                          "training images")
    scorer = get_scorer(cfg.dataset, data, cfg.smoke, device)
    run = Run.start(cfg, __file__, device)
    real_val = part2.to_tanh_range(x_val)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(part2.Config)
              if hasattr(cfg, f.name) and f.name != "resume"}
    summaries, finals = {}, []
    fixed_z = torch.randn(GRID_SIDE, cfg.latent_dim,
                          generator=torch.Generator().manual_seed(cfg.seed))
    for lr, beta1, smoothing in settings(cfg):
        name = label(lr, beta1, smoothing)
        print(f"\n--- {name} ---")
        log_every = max(1, min(50, len(x_train) // cfg.batch_size // 4))
        gan_cfg = part2.Config(**{**shared, "lr": lr, "beta1": beta1, "label_smoothing": smoothing,
                                  "log_every": log_every})
        view = run.sub(name.replace(" ", "_"), setting=name)
        summaries[name], gan = part2.train_gan(gan_cfg, data, x_train, real_val, scorer, device,
                                               view)
        finals.append(part2.generate(gan.generator, fixed_z.to(device)))
    plot_scores(summaries, run.path("sweep_fd.png"))
    save_grid(torch.cat(finals), run.path("sweep_samples.png"),
              "the same noise through each final generator", row_labels=list(summaries))
    run.write_comparison(summaries, ["fd", "fd_real", "min_class_share", "max_class_share",
                                     "last_epoch_d_real", "last_epoch_d_fake", "train_time_s"],
                         column="setting")
    best = min(summaries, key=lambda n: summaries[n]["fd"])  # held-out real images, not test ones
    print(f"lowest Frechet distance: {best} ({summaries[best]['fd']:.3f}; real vs real "
          f"{summaries[best]['fd_real']:.3f})")
    scores = {f"fd_{name.replace(' ', '_')}": s["fd"] for name, s in summaries.items()}
    coverage = {f"min_class_share_{name.replace(' ', '_')}": s["min_class_share"]
                for name, s in summaries.items()}
    first = next(iter(summaries.values()))
    return run.finish(best=best, runs=len(summaries), **scores, **coverage,
                      fd_real=first["fd_real"], fd_start=first["fd_start"],
                      classifier_val_acc=scorer.val_acc,
                      fd_spread=float(np.ptp([s["fd"] for s in summaries.values()])))


if __name__ == "__main__":
    launch(main, Config)
