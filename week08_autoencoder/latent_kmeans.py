"""Week 8 self-work: k-means on an autoencoder's latent codes vs on raw pixels (and on PCA codes).

The same test images, clustered three ways with Part 1's k-means (k-means++ starts, the best of
a few restarts), and each clustering scored against the digit labels it never saw: accuracy
after matching clusters to labels one to one (the Hungarian algorithm) and NMI.
    pixels   the 784 raw pixels: distances are dominated by stroke thickness and position
    PCA      the first `bottleneck` PCA coordinates: a linear code of the same size
    latent   the autoencoder's codes (trained on the training images, labels unused)

Run: python week08_autoencoder/latent_kmeans.py [--smoke] [--help]
     python week08_autoencoder/latent_kmeans.py --arch conv --bottleneck 16 --epochs 20
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np

from common.config import Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import save
from common.runner import launch
from common.runs import Run
from week08_autoencoder import part1, part2


@dataclass
class Config(part2.Settings):
    """Week 8 self-work: k-means on autoencoder codes, PCA codes and raw pixels, against labels."""

    bottleneck: Annotated[int, Range(1, 784)] = 10  # size of the latent code (and of the PCA code)
    clusters: Annotated[int, Range(2, 100)] = 10  # k of k-means
    restarts: Annotated[int, Range(1, 100)] = 3  # k-means++ starts each; the lowest inertia is kept
    cluster_points: Annotated[int, Range(10)] = 10000  # test images clustered (at most all of them)

    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32, "hidden": (128,), "channels": (8, 16),
                             "lr": 1e-2, "restarts": 2}

    def check(self) -> None:
        super().check()
        if self.clusters > self.cluster_points:
            raise ConfigError(f"--clusters {self.clusters} is more than --cluster-points "
                              f"{self.cluster_points}")


def plot_scores(scores: dict[str, dict[str, float]], path, title: str):
    names = list(scores)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.38
    for i, metric in enumerate(("accuracy", "NMI")):
        values = [scores[n][metric] for n in names]
        bars = ax.bar(np.arange(len(names)) + (i - 0.5) * width, values, width, label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylim=(0, 1.05), ylabel="score against the labels", title=title)
    ax.legend(fontsize=8)
    return save(fig, path)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = part2.load_images(cfg)
    train, val, _ = part2.make_loaders(cfg, data, device)
    n = min(cfg.cluster_points, len(data.x_test))
    if cfg.clusters > n:
        raise ConfigError(f"--clusters {cfg.clusters} is more than the {n} test images to cluster")
    run = Run.start(cfg, __file__, device)
    # No checkpoints: this script has no --resume (Ctrl-C says there is nothing to resume).
    model = part2.train_autoencoder(cfg, train, val, device, run, checkpoints=False)

    labels = data.y_test[:n].numpy()
    x = part2.pixels(data.x_test[:n])
    pca = part1.pca_eig(part2.pixels(train.x.cpu()))  # fitted on the training images, like the AE
    views = {"pixels": x, "PCA": pca.transform(x, cfg.bottleneck),
             "latent": part2.encode_all(model, data.x_test[:n], device)}
    scores, summary = {}, {}
    for name, features in views.items():
        result = part1.best_of_restarts(features, cfg.clusters, cfg.restarts, 300, cfg.seed)
        acc, score = part1.matched_accuracy(labels, result.labels), part1.nmi(labels, result.labels)
        scores[name] = {"accuracy": acc, "NMI": score}
        key = name.lower()
        summary.update({f"acc_{key}": acc, f"nmi_{key}": score,
                        f"iterations_{key}": result.iterations})
        print(f"k-means on {name:7s} ({features.shape[1]:4d} numbers per image): accuracy after "
              f"matching {acc:.3f}, NMI {score:.3f}, {result.iterations} iterations")
        run.log(representation=name, dims=features.shape[1], accuracy=acc, nmi=score,
                iterations=result.iterations)
    plot_scores(scores, run.path("scores.png"),
                f"k-means (k={cfg.clusters}) on {n} test images of {data.name}")
    return run.finish(**summary, clustered=n, bottleneck=cfg.bottleneck, arch=cfg.arch)


if __name__ == "__main__":
    launch(main, Config)
