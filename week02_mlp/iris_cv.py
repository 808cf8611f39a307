"""Week 2 self-work: Iris with stratified k-fold cross-validation, vs a single train/test split.

Iris has 150 flowers. A usual 80/20 split tests on 30 of them, so one flower more or less
classified right moves the accuracy by 1/30 = 3.3 points: two models a few points apart on
one split are not distinguishable. k-fold cross-validation tests on every flower once (each
fold takes a turn as the test set) and reports mean +- std over the folds; "stratified" keeps
the three species in the same proportions in every fold.

Run: python week02_mlp/iris_cv.py [--smoke] [--help]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from common.config import BaseConfig, run
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import LabError
from common.loader import TensorLoader, split
from common.plots import plt, save
from common.runs import Run
from common.train import evaluate
from week02_mlp.part2 import Config as Part2Config
from week02_mlp.part2 import Splits, train_mlp, with_defaults


@dataclass
class Config(BaseConfig):
    """Week 2 self-work: Iris with stratified k-fold cross-validation vs single splits."""

    folds: int = 5  # k of k-fold cross-validation (each fold tests on 150/k flowers)
    splits: int = 10  # random single 80/20 splits to compare against
    hidden: str = "16"  # hidden widths of the MLP (the other model is softmax regression: no hidden layer)
    epochs: int = 100  # training epochs per model (both models must be trained to convergence to compare)
    batch_size: int = 16  # examples per step
    lr: float = 0.03  # Adam peak learning rate (OneCycle)

    SMOKE: ClassVar[dict] = {"folds": 3, "splits": 2, "epochs": 10}


def stratified_folds(labels: torch.Tensor, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Split row indices into ``k`` folds with each class spread evenly over them: shuffle the
    rows of each class, then deal them out to the folds like cards."""
    g = torch.Generator().manual_seed(seed)
    folds: list[list[torch.Tensor]] = [[] for _ in range(k)]
    offset = 0
    for cls in labels.unique():
        rows = (labels == cls).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        for i in range(k):
            # Start each class at a different fold so leftover rows do not all land in fold 0.
            folds[(i + offset) % k].append(rows[i::k])
        offset += len(rows) % k
    return [torch.cat(parts).sort().values for parts in folds]


def standardized(x_tr, y_tr, x_te, y_te, classes) -> Splits:
    """Scale with the training rows' mean and std only: the test rows stay unseen."""
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1e-6)
    empty = x_tr[:0]
    return Splits((x_tr - mean) / std, y_tr, empty, y_tr[:0], (x_te - mean) / std, y_te, classes, is_image=False)


def held_out_accuracy(model_cfg: Part2Config, sets: Splits, device: torch.device) -> float:
    model, _ = train_mlp(model_cfg, sets, device, verbose=False)
    batches = TensorLoader(sets.x_test, sets.y_test, 256, device=device)
    return evaluate(model, batches, nn.CrossEntropyLoss(), device)["acc"]


def main(cfg: Config) -> dict:
    cfg = cfg.resolved()
    if cfg.folds < 2:
        raise LabError(f"--folds must be at least 2, got {cfg.folds}")
    # Iris batches are 16 x 4 numbers: splitting such tiny operations over threads costs more
    # than it saves (10x slower on a busy 2-core machine), so train on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cross_validate(cfg)
    finally:
        torch.set_num_threads(threads)


def cross_validate(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load("iris", cfg.data_dir)  # bundled with scikit-learn: real data even with --smoke
    x, y = torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])
    run_ = Run.start(cfg, __file__, device)

    models = {
        f"MLP ({cfg.hidden})": cfg.hidden,
        "softmax regression": "",
    }
    folds = stratified_folds(y, cfg.folds, cfg.seed)
    results: dict[str, dict[str, list[float]]] = {}
    for name, hidden in models.items():
        model_cfg = with_defaults(Part2Config(dataset="iris", hidden=hidden, epochs=cfg.epochs,
                                              batch_size=cfg.batch_size, lr=cfg.lr, dropout=0.0, val_fraction=0.0,
                                              seed=cfg.seed, device=cfg.device))
        cv = []
        for i, test_rows in enumerate(folds):
            train_rows = torch.cat([f for j, f in enumerate(folds) if j != i])
            sets = standardized(x[train_rows], y[train_rows], x[test_rows], y[test_rows], data.classes)
            cv.append(held_out_accuracy(model_cfg, sets, device))
            run_.log(model=name, evaluation=f"{cfg.folds}-fold CV", fold=i + 1, test_size=len(test_rows),
                     test_acc=cv[-1])
        single = []
        for s in range(cfg.splits):  # the same model, judged on different random 30-flower test sets
            x_tr, y_tr, x_te, y_te = split(x, y, 0.2, seed=1000 + s)
            single.append(held_out_accuracy(model_cfg, standardized(x_tr, y_tr, x_te, y_te, data.classes), device))
            run_.log(model=name, evaluation="single 80/20 split", fold=s + 1, test_size=len(y_te),
                     test_acc=single[-1])
        results[name] = {"cv": cv, "single": single}

    step = 1 / round(0.2 * len(x))
    print(f"\nIris: {len(x)} flowers. One test flower on a 30-flower split = {step:.1%} of accuracy.")
    print(f"{'model':20s} {cfg.folds}-fold CV (mean +- std)   single splits: first, min..max over {cfg.splits}")
    for name, r in results.items():
        cv, single = np.array(r["cv"]), np.array(r["single"])
        print(f"{name:20s} {cv.mean():.3f} +- {cv.std(ddof=1):.3f}            "
              f"{single[0]:.3f}, {single.min():.3f}..{single.max():.3f}")
    print("A single split's number swings by several 3.3-point steps with the choice of the 30 test flowers;\n"
          "differences between models smaller than that swing (and than the CV std) are not evidence.")
    plot_accuracies(results, cfg, run_.path("cv_vs_single_split.png"))

    summary = {}
    for key, name in zip(("mlp", "softmax"), results):
        cv, single = np.array(results[name]["cv"]), np.array(results[name]["single"])
        summary.update({f"{key}_cv_mean": cv.mean(), f"{key}_cv_std": cv.std(ddof=1),
                        f"{key}_single_min": single.min(), f"{key}_single_max": single.max()})
    return run_.finish(**summary)


def plot_accuracies(results: dict, cfg: Config, path) -> None:
    """Each model: its per-fold accuracies and its single-split accuracies, as dots."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    rng = np.random.default_rng(0)
    for i, r in enumerate(results.values()):
        for j, (kind, values) in enumerate((("cv", r["cv"]), ("single", r["single"]))):
            xs = 2 * i + j + rng.uniform(-0.12, 0.12, len(values))  # jitter so equal values stay visible
            ax.scatter(xs, values, s=25, alpha=0.8, color=f"C{j}",
                       label=(f"{cfg.folds}-fold CV folds" if kind == "cv" else "single 80/20 splits") if i == 0
                       else None)
            ax.errorbar(2 * i + j + 0.3, np.mean(values), yerr=np.std(values, ddof=1), fmt="D", color="black",
                        capsize=4)
    ax.set_xticks([2 * i + 0.5 for i in range(len(results))], list(results))
    ax.set(ylabel="test accuracy", title="Iris: per-fold and per-split accuracy (diamond: mean +- std)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower left")
    save(fig, path)


if __name__ == "__main__":
    run(main, Config)
