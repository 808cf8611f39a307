"""Week 9's figures: image grids, the fixed-noise progression, and the loss / D-output curves.

Imported by ``part2.py`` and ``sweep.py``; not a script of its own.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from common.plots import plot_curves, save

GRID_SIDE = 8  # the fixed-noise grid is 8 x 8 samples
PROGRESSION_ROWS = 10  # the progression figure shows at most this many epochs


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (small to keep in a checkpoint)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path, title: str = "", nrow: int = GRID_SIDE, row_labels=None):
    """Images in [-1, 1] (or uint8) tiled into one picture, with optional labels per row."""
    images = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    rows = math.ceil(len(images) / nrow)
    fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.8, 0.5 * rows + 0.5))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap=None if images.shape[1] == 3 else "gray")
    ax.set_xticks([])
    side = images.shape[-1] + 2
    if row_labels:
        ax.set_yticks([side * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def training_figures(run, rows: list[dict], progression: list[torch.Tensor], name: str) -> None:
    """``progression.png`` (the first fixed-noise samples of up to 10 epochs, one row each),
    ``losses.png`` (D's and G's losses) and ``d_outputs.png`` (what D says of real and fake)."""
    last, n = len(progression) - 1, PROGRESSION_ROWS
    shown = sorted({round(i * last / max(n - 1, 1)) for i in range(n)})
    save_grid(torch.cat([progression[i] for i in shown]), run.path("progression.png"),
              "the same 8 noise vectors after each epoch",
              row_labels=[f"epoch {i + 1}" for i in shown])
    curve = lambda key: [(r["step"], r[key]) for r in rows]  # noqa: E731
    plot_curves({"D loss": curve("d_loss"), "G loss": curve("g_loss")}, run.path("losses.png"),
                xlabel="step", ylabel="loss", title=f"DCGAN on {name}")
    plot_curves({"D(x), real": curve("d_real"), "D(G(z)), fake (D step)": curve("d_fake")},
                run.path("d_outputs.png"), xlabel="step", ylabel="mean D output",
                title="what D says")
