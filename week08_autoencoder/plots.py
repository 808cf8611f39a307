"""Week 8's figures: test images rebuilt in rows, and the latent codes drawn in 2-D.

Imported by ``part2.py`` and ``bottleneck_sweep.py``; not a script of its own.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from common.plots import save
from week08_autoencoder import part1


def reconstruction_figure(rows: dict[str, np.ndarray], path, title: str):
    """One row of 28x28 images per entry (original, autoencoder, PCA ...), tiled into a single
    picture (one imshow, not one subplot per image: much faster to draw)."""
    names = list(rows)
    n = len(rows[names[0]])
    tiles = np.ones((len(names) * 30, n * 30))  # 28 pixels + a 2-pixel white border
    for r, name in enumerate(names):
        for c in range(n):
            image = np.clip(rows[name][c].reshape(28, 28), 0, 1)
            tiles[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = image
    fig, ax = plt.subplots(figsize=(1.0 * n + 1.2, 1.0 * len(names) + 0.6))
    ax.imshow(tiles, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([r * 30 + 15 for r in range(len(names))], names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def latent_maps(codes: np.ndarray, labels: np.ndarray, seed: int, path,
                title: str) -> dict[str, np.ndarray]:
    """The codes drawn in 2-D: PCA (a linear view: Part 1's) and t-SNE (a nonlinear one that
    keeps neighbours together but not distances: cluster sizes and gaps mean little)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if codes.shape[1] > 1:
        maps = {"PCA of the codes": part1.pca_svd(codes).transform(codes, 2)}
    else:  # a 1-number code is its own first coordinate
        maps = {"PCA of the codes": np.column_stack([codes[:, 0], np.zeros(len(codes))])}
    perplexity = min(30.0, (len(codes) - 1) / 3)
    # One OpenMP thread: torch and scikit-learn each bring their own OpenMP runtime, and with both
    # spinning on 2 cores this t-SNE took 60 s instead of 1.6 s (measured, 150 points).
    with threadpool_limits(limits=1, user_api="openmp"):
        # init="pca" needs 2 directions to start from: a 1-number code starts from random points
        tsne = TSNE(2, perplexity=perplexity, init="pca" if codes.shape[1] > 1 else "random",
                    max_iter=500, random_state=seed)
        maps["t-SNE of the codes"] = tsne.fit_transform(codes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (name, points) in zip(axes, maps.items()):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4,
                             vmin=-0.5, vmax=9.5)
        ax.set(title=name, xticks=[], yticks=[])
    fig.colorbar(scatter, ax=axes, ticks=range(10), label="label (never seen in training)")
    fig.suptitle(title)
    save(fig, path)
    return maps
