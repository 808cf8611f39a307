"""Week 8 self-work: how reconstruction quality changes with the size of the bottleneck.

One autoencoder per bottleneck size (same architecture, data, seed and schedule; only the size
of the code changes), each against PCA with as many components: the test MSE per pixel
(pixels in [0, 1], the same test images for all) against the code size, and the same test
images rebuilt by each.

A sweep has no --resume (it keeps no checkpoints): after Ctrl-C it says which sizes finished
(their metrics rows are in the run folder's metrics.csv) and which to run again.

Run: python week08_autoencoder/bottleneck_sweep.py [--smoke] [--help]
     python week08_autoencoder/bottleneck_sweep.py --bottlenecks 2 4 8 16 32 64 --arch conv
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np

from common.config import Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError, Interrupted
from common.plots import save
from common.runner import interrupted, launch
from common.runs import Run
from week08_autoencoder import part1, part2
from week08_autoencoder.plots import reconstruction_figure


@dataclass
class Config(part2.Settings):
    """Week 8 self-work: one autoencoder per bottleneck size, each against PCA at that size."""

    bottlenecks: Annotated[tuple[int, ...], Range(1, 784)] = (2, 8, 32, 64)  # one model per size

    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32, "hidden": (128,), "channels": (8, 16),
                             "lr": 1e-2, "bottlenecks": (4, 16)}
    UNUSED: ClassVar[tuple] = ("bottleneck",)  # one per model: --bottlenecks

    def check(self) -> None:
        super().check()
        if not self.bottlenecks:
            raise ConfigError("--bottlenecks needs at least one size, e.g. --bottlenecks 2 8 32")


def plot_sweep(sizes: list[int], ae: list[float], pca: list[float], mean_mse: float, path,
               title: str):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(sizes, ae, marker="o", label="autoencoder")
    ax.plot(sizes, pca, marker="s", label="PCA, same number of components")
    ax.axhline(mean_mse, color="gray", ls="--", lw=0.8, label="the mean image (0 numbers)")
    ax.set(xscale="log", xlabel="bottleneck size (numbers per image)", ylabel="test MSE per pixel",
           title=title)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()  # the log axis's minor labels (2x10^1, ...) would overprint the sizes
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def sweep_interrupted(e: KeyboardInterrupt, size: int, sizes: list[int], run: Run) -> Interrupted:
    """Ctrl-C / SIGTERM during the sweep: there is no --resume here, so say plainly what was
    kept (the metrics rows of the sizes trained so far) and which sizes are left to run."""
    done = sizes[:sizes.index(size)]
    epochs = sum(r.get("bottleneck") == size for r in run.rows)
    kept = [f"bottlenecks {' '.join(map(str, done))} (finished)"] if done else []
    kept += [f"{epochs} epoch(s) of bottleneck {size}"] if epochs else []
    where = (f"the metrics of {' and '.join(kept)} are in {run.dir / 'metrics.csv'}" if kept
             else f"no epoch finished (run folder {run.dir})")
    left = " ".join(map(str, sizes[len(done):]))
    return interrupted(e, f"while training bottleneck {size}; a sweep keeps no checkpoints and "
                          f"has no --resume: {where}. To finish, run the sizes left: "
                          f"--bottlenecks {left}")


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = part2.load_images(cfg)
    train, val, test = part2.make_loaders(cfg, data, device)
    run = Run.start(cfg, __file__, device)
    x_test = part2.pixels(data.x_test)
    # Fitted once: the first k components of any larger fit are the k-component PCA.
    pca = part1.pca_eig(part2.pixels(train.x.cpu()))
    mean_mse = float(np.mean((x_test - pca.mean) ** 2))
    sizes = sorted(set(cfg.bottlenecks))
    shown = data.x_test[:10]
    rows, summary, ae_mse, pca_mse = {"original": part2.pixels(shown)}, {}, [], []
    for size in sizes:
        print(f"--- bottleneck {size} ---")
        settings = dataclasses.replace(cfg, bottleneck=size)
        try:
            model = part2.train_autoencoder(settings, train, val, device,
                                            run.sub(f"d{size}", bottleneck=size), checkpoints=False)
        except KeyboardInterrupt as e:
            raise sweep_interrupted(e, size, sizes, run) from None
        history = [r for r in run.rows if r["bottleneck"] == size]
        ae_mse.append(part2.reconstruction_mse(model, test))
        pca_mse.append(float(np.mean((x_test - pca.reconstruct(x_test, size)) ** 2)))
        print(f"bottleneck {size}: test MSE autoencoder {ae_mse[-1]:.5f}, PCA {pca_mse[-1]:.5f}")
        rows[f"AE {size}"] = part2.reconstructions(model, shown, device)
        rows[f"PCA {size}"] = pca.reconstruct(part2.pixels(shown), size)
        summary.update({f"test_mse_d{size}": ae_mse[-1], f"pca_test_mse_d{size}": pca_mse[-1],
                        f"val_loss_d{size}": history[-1]["val_loss"]})
    plot_sweep(sizes, ae_mse, pca_mse, mean_mse, run.path("sweep.png"),
               f"{cfg.arch} autoencoder vs PCA ({data.name}, {len(data.x_test)} test images)")
    reconstruction_figure(rows, run.path("reconstructions.png"),
                          "the same test images from each code size")
    print(f"{'size':>6} {'autoencoder':>12} {'PCA':>9}")
    for size, a, p in zip(sizes, ae_mse, pca_mse):
        print(f"{size:6d} {a:12.5f} {p:9.5f}")
    return run.finish(**summary, mean_image_mse=mean_mse, bottlenecks=sizes, arch=cfg.arch,
                      loss=cfg.loss)


if __name__ == "__main__":
    launch(main, Config)
