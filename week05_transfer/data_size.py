r"""Week 5, self-work: accuracy against the number of training images, pretrained vs scratch.

For each number of training images per class (``--per-class 10 50 0``; 0 means all of them),
a random subset of the training images is drawn (the same classes in equal numbers) and each
of ``--modes`` is trained on it with week05_transfer/part2.py's code: by default frozen
pretrained features + a linear head, and the same network trained from scratch. The
validation images (held out once, before any subset is drawn) and the test images are the
same for every point, so the curves differ only in how much there was to learn from.

The figure (``data_size.png``) is the week's argument in one picture: with 10 images per
class a pretrained backbone is already far better than chance and than scratch; the gap
narrows as the data grows (with 245 photos it is still wide).

Run: python week05_transfer/data_size.py [--smoke] [--help]
     python week05_transfer/data_size.py --data-dir DATA --backbone efficientnet_lite0 \
         --image-size 160
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from common.data import ImageData
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from week05_transfer import images, part2
from week05_transfer.backbones import build_backbone


@dataclass
class Config(part2.Config):
    """Week 5, self-work: test accuracy against training images per class, pretrained vs scratch.
    Part 2's settings, with a list of modes and of training-set sizes instead of one mode."""

    per_class: tuple[int, ...] = (10, 50, 0)  # training images per class at each point (0: all)
    modes: tuple[str, ...] = ("frozen", "scratch")  # at each point: frozen partial full scratch

    UNUSED: ClassVar[tuple] = ("mode",)  # --modes instead
    SMOKE: ClassVar[dict] = {**part2.Config.SMOKE, "per_class": (10, 0)}

    def check(self) -> None:
        super().check()
        if not self.per_class or min(self.per_class) < 0:
            raise ConfigError(f"--per-class needs one or more counts >= 0 (0: all), got "
                              f"{list(self.per_class)}")
        unknown = [m for m in self.modes if m not in part2.MODES]
        if unknown or not self.modes:
            raise ConfigError(f"--modes {' '.join(self.modes)}: choose one or more of "
                              f"{', '.join(part2.MODES)}")


def per_class_subset(data: ImageData, n: int, seed: int) -> ImageData:
    """``n`` random training images of every class (all of them for n = 0 or more than a class
    has); the validation and test images stay as they are."""
    if n == 0:
        return data
    g = torch.Generator().manual_seed(seed)
    by_class = (torch.nonzero(data.y_train == c).flatten() for c in range(len(data.classes)))
    keep = torch.cat([idx[torch.randperm(len(idx), generator=g)[:n]] for idx in by_class])
    return dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    # Weights before minutes of decoding images, and before the run folder exists.
    pretrained = build_backbone(cfg.backbone, cfg.weights) if set(cfg.modes) != {"scratch"} \
        else None
    data = images.load_splits(cfg, n_synthetic=320)  # validation held out here, before subsets
    run = Run.start(cfg, __file__, device)
    points: dict[str, list[tuple[int, float]]] = {m: [] for m in cfg.modes}
    results = {}
    for n in cfg.per_class:
        subset = per_class_subset(data, n, cfg.seed)
        counts = torch.bincount(subset.y_train, minlength=len(data.classes))
        images_per_class = int(counts.min())  # as used (a class may have fewer than asked)
        for mode in cfg.modes:
            print(f"=== {len(subset.y_train)} training images ({counts.tolist()} per class), "
                  f"{mode} ===")
            view = run.sub(f"{mode}_n{n}", mode=mode, n=n)
            try:
                _, summary, _ = part2.train_mode(mode, cfg, subset, pretrained, device, view)
            except KeyboardInterrupt as e:
                what = f"the {mode} mode at {f'{n} images' if n else 'all images'} per class"
                raise part2.stopped_in(e, what, run, "fewer --modes or --per-class: shorter") \
                    from None
            points[mode].append((images_per_class, summary["test_acc"]))
            results[f"test_acc_{mode}_n{n}"] = summary["test_acc"]
            results[f"val_acc_{mode}_n{n}"] = summary["val_acc"]
            results[f"train_images_{mode}_n{n}"] = len(subset.y_train)
    curves = {f"{m} ({'pretrained' if m != 'scratch' else 'random init'})": p
              for m, p in points.items()}
    plot_curves(curves, run.path("data_size.png"), xlabel="training images per class",
                ylabel="test accuracy", title=f"{cfg.backbone} on {data.name}")
    for mode, pts in points.items():
        print(f"{mode:>8}: " + ", ".join(f"{n} per class -> {acc:.3f}" for n, acc in pts))
    return run.finish(**results)


if __name__ == "__main__":
    launch(main, Config)
