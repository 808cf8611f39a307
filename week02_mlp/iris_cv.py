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
from typing import Annotated, ClassVar

import numpy as np
import torch

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.loader import TensorLoader, split
from common.plots import plt, save
from common.runner import launch
from common.runs import Run
from week02_mlp import part2
from week02_mlp.data import Splits
from week02_mlp.quiet import train_quietly


@dataclass
class Config(BaseConfig):
    """Week 2 self-work: Iris with stratified k-fold cross-validation vs single splits."""

    folds: Annotated[int, Range(2, 50)] = 5  # k of k-fold CV (150/k test flowers, >= 1 per species)
    splits: Annotated[int, Range(2)] = 10  # random single 80/20 splits to compare against
    hidden: Annotated[tuple[int, ...], Range(1, 8192)] = (16,)  # MLP hidden widths (other: none)
    epochs: Annotated[int, Range(1)] = 100  # epochs per model (compare converged models)
    batch_size: Annotated[int, Range(1)] = 16  # examples per step
    # At most 1e6, like part2's --lr.
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.03  # Adam peak lr (OneCycle)

    SMOKE: ClassVar[dict] = {"folds": 3, "splits": 2, "epochs": 10}
    UNUSED: ClassVar[tuple] = ('data_dir',)  # bundled with scikit-learn: no --data-dir


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


def fold_splits(labels: torch.Tensor, k: int,
                seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train rows, test rows) for each of the ``k`` rounds: fold i is the test set of round i,
    the other k - 1 folds train. Every row is tested exactly once, never by a model it trained."""
    folds = stratified_folds(labels, k, seed)
    return [(torch.cat([f for j, f in enumerate(folds) if j != i]), test)
            for i, test in enumerate(folds)]


def held_out_accuracy(model_cfg: part2.Config, x_tr, y_tr, x_te, y_te, classes: list[str],
                      device: torch.device) -> float:
    """Train a fresh model on (x_tr, y_tr) and score it on (x_te, y_te). The features are scaled
    with the training rows' mean and std only: the test rows stay unseen."""
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1e-6)
    scale = lambda x: (x - mean) / std  # noqa: E731
    sets = Splits(scale(x_tr), y_tr, x_tr[:0], y_tr[:0], scale(x_te), y_te, classes,
                  is_image=False)
    model, _ = train_quietly(model_cfg, sets, device)
    return part2.evaluate(model, TensorLoader(sets.x_test, sets.y_test, 256, device=device))["acc"]


def main(cfg: Config) -> dict:
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
    run = Run.start(cfg, __file__, device)

    models = {f"MLP ({' '.join(map(str, cfg.hidden))})": cfg.hidden, "softmax regression": ()}
    results: dict[str, dict[str, list[float]]] = {}
    for name, hidden in models.items():
        model_cfg = part2.Config(dataset="iris", hidden=hidden, epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, optimizer="adam", lr=cfg.lr,
                                 schedule="onecycle", dropout=0.0, val_fraction=0.0,
                                 seed=cfg.seed, device=cfg.device)
        cv = []
        for i, (train_rows, test_rows) in enumerate(fold_splits(y, cfg.folds, cfg.seed)):
            cv.append(held_out_accuracy(model_cfg, x[train_rows], y[train_rows], x[test_rows],
                                        y[test_rows], data.classes, device))
            run.log(model=name, evaluation=f"{cfg.folds}-fold CV", fold=i + 1,
                    test_size=len(test_rows), test_acc=cv[-1])
        single = []
        for s in range(cfg.splits):  # the same model, judged on other random 30-flower test sets
            x_tr, y_tr, x_te, y_te = split(x, y, 0.2, seed=1000 + s)
            single.append(held_out_accuracy(model_cfg, x_tr, y_tr, x_te, y_te, data.classes,
                                            device))
            run.log(model=name, evaluation="single 80/20 split", fold=s + 1, test_size=len(y_te),
                     test_acc=single[-1])
        results[name] = {"cv": cv, "single": single}

    step = 1 / round(0.2 * len(x))
    print(f"\nIris: {len(x)} flowers. "
          f"One test flower on a 30-flower split = {step:.1%} of accuracy.")
    print(f"{'model':20s} {cfg.folds}-fold CV (mean +- std)   "
          f"single splits: first, min..max over {cfg.splits}")
    for name, r in results.items():
        cv, single = np.array(r["cv"]), np.array(r["single"])
        print(f"{name:20s} {cv.mean():.3f} +- {cv.std(ddof=1):.3f}            "
              f"{single[0]:.3f}, {single.min():.3f}..{single.max():.3f}")
    print("A single split's number swings by several 3.3-point steps with the choice of the 30 "
          "test flowers;\ndifferences between models smaller than that swing (and than the CV "
          "std) are not evidence.")
    plot_accuracies(results, cfg, run.path("cv_vs_single_split.png"))

    summary = {}
    for key, name in zip(("mlp", "softmax"), results):
        cv, single = np.array(results[name]["cv"]), np.array(results[name]["single"])
        summary.update({f"{key}_cv_mean": cv.mean(), f"{key}_cv_std": cv.std(ddof=1),
                        f"{key}_single_min": single.min(), f"{key}_single_max": single.max()})
    return run.finish(**summary)


def plot_accuracies(results: dict, cfg: Config, path) -> None:
    """Each model: its per-fold accuracies and its single-split accuracies, as dots."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    rng = np.random.default_rng(0)
    for i, r in enumerate(results.values()):
        for j, (kind, values) in enumerate((("cv", r["cv"]), ("single", r["single"]))):
            # Jitter, so that equal values stay visible.
            xs = 2 * i + j + rng.uniform(-0.12, 0.12, len(values))
            label = f"{cfg.folds}-fold CV folds" if kind == "cv" else "single 80/20 splits"
            ax.scatter(xs, values, s=25, alpha=0.8, color=f"C{j}", label=label if i == 0 else None)
            ax.errorbar(2 * i + j + 0.3, np.mean(values), yerr=np.std(values, ddof=1), fmt="D",
                        color="black", capsize=4)
    ax.set_xticks([2 * i + 0.5 for i in range(len(results))], list(results))
    ax.set(ylabel="test accuracy",
           title="Iris: per-fold and per-split accuracy (diamond: mean +- std)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower left")
    save(fig, path)


if __name__ == "__main__":
    launch(main, Config)
