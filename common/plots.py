"""Figures a person would rather look at than read. All return the PNG path they wrote."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no window: labs run on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.io import atomic_write  # noqa: E402


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, Sequence], path: str | Path, xlabel: str = "epoch",
                ylabel: str = "", title: str = "", logy: bool = False) -> Path:
    """One line per entry. A value is either a list of y values (x = 1, 2, ...) or of (x, y)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in curves.items():
        values = list(values)
        if values and isinstance(values[0], (tuple, list)):
            xs, ys = zip(*values)
        else:
            xs, ys = range(1, len(values) + 1), values
        ax.plot(xs, ys, label=label, marker="o" if len(values) <= 30 else None, markersize=3)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_history(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy panels from metrics rows (train_loss, val_loss, train_acc, val_acc)."""
    panels = [k for k in ("loss", "acc") if any(f"train_{k}" in r or f"val_{k}" in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        for split in ("train", "val"):
            key = f"{split}_{kind}"
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=split)
        ax.set(xlabel="epoch", ylabel=kind, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """A confusion matrix, rows = true class, columns = predicted, counts written in cells."""
    matrix = np.asarray(matrix)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    return save(fig, path)


def plot_images(images, path: str | Path, titles: Sequence[str] | None = None, ncols: int = 8,
                title: str = "", cmap: str = "gray") -> Path:
    """A grid of images given as an array (N, H, W) or (N, C, H, W), values scaled per image."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images.transpose(0, 2, 3, 1)
        if images.shape[-1] == 1:
            images = images[..., 0]
    n = len(images)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        lo, hi = img.min(), img.max()
        ax.imshow((img - lo) / (hi - lo + 1e-8), cmap=cmap if img.ndim == 2 else None)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def confusion_matrix(true, pred, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs, computed with one bincount."""
    true, pred = np.asarray(true), np.asarray(pred)
    counts = np.bincount(true * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)
