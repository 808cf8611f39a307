"""Week 5, Part 1: transfer learning made measurable, in NumPy, on scikit-learn's digits.

Run: python week05_transfer/part1.py [--smoke] [--help]

Three small experiments that need no download (the 1,797 8x8 digits ship with scikit-learn):

1. Feature extraction with little data. A small network is trained on a SOURCE task (digits
   0-4, all their images). Its hidden layer is then used, frozen, as the features of a TARGET
   task it never saw (digits 5-9) that has only k labelled images per class. A linear
   classifier (softmax regression) on those features is compared with the same classifier on
   the raw pixels and on the hidden layer of an untrained network of the same shape: the
   last one separates "the features are learnt" from "there are more of them".

2. Counting parameters. The formulas (conv: k*k*C_in*C_out, BatchNorm: 2C, linear:
   (D_in + 1) * D_out) give ResNet-18's 11.7 million weights, and how many of them each
   fine-tuning mode of Part 2 trains: the head alone is about 0.01% of the network.

3. Domain shift. A classifier trained on clean digits is tested on digits whose contrast,
   brightness and noise changed (a new scanner: the same classes, another input
   distribution). Accuracy drops, although nothing about the task changed. Re-standardizing
   the inputs with the statistics of the NEW domain (no labels needed) undoes most of it: the
   simplest form of domain adaptation (the idea behind AdaBN: BatchNorm statistics re-estimated
   on the target domain).

The math is NumPy; tests/test_week05_transfer.py checks the losses and gradients against PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch
from torch import nn

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from common.twins import synthetic_images


@dataclass
class Config(BaseConfig):
    """Week 5, Part 1: pretrained features vs raw pixels with few labels; parameter counts;
    domain shift."""

    shots: tuple[int, ...] = (1, 2, 5, 10, 20)  # labelled target images per class (a probe each)
    repeats: Annotated[int, Range(1, 100)] = 10  # draws of the labelled images per shot (averaged)
    image_size: Annotated[int, Range(8, 64)] = 24  # pixels a side of the synthetic shape images
    source_images: Annotated[int, Range(10)] = 2000  # images of the 5 source classes to pretrain on
    source_epochs: Annotated[int, Range(1)] = 6  # pretraining epochs (Adam, lr 3e-3, batch 64)
    target_test: Annotated[int, Range(10)] = 1000  # test images of the target task
    probe_steps: Annotated[int, Range(1)] = 300  # full-batch gradient steps of each probe
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.5  # the probes' gradient-descent LR
    l2: Annotated[float, Range(0, 1e3)] = 1e-3  # L2 penalty of the probes (l2/2 * ||W||^2)
    contrast: Annotated[float, Range(0, 10, lo_open=True)] = 0.5  # shift: x contrast + brightness
    brightness: Annotated[float, Range(-16, 16)] = 6.0  # added to every pixel (digits: 0..16)
    noise: Annotated[float, Range(0, 16)] = 1.0  # std of Gaussian noise added in the shifted domain
    SMOKE: ClassVar[dict] = {"shots": (2, 10), "repeats": 3, "source_images": 600,
                             "source_epochs": 4, "target_test": 300, "probe_steps": 150}
    # the CPU, and data generated or bundled with scikit-learn
    UNUSED: ClassVar[tuple] = ("device", "data_dir")

    def check(self) -> None:
        from common.errors import ConfigError

        if not self.shots or min(self.shots) < 1:
            raise ConfigError(f"--shots needs one or more counts >= 1, got {list(self.shots)}")


# ----------------------------------------------------------------------------------------
# Softmax regression: the linear classifier put on top of features
# ----------------------------------------------------------------------------------------
def softmax(z: np.ndarray) -> np.ndarray:
    """p_k = exp(z_k - max z) / sum_j exp(z_j - max z): subtracting the max changes nothing
    mathematically and keeps exp from overflowing."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_loss_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float = 0.0,
                      ) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of softmax(x w + b) plus an L2 penalty, and its gradients:

        L     = -1/N sum_n log p[n, y_n] + l2/2 ||w||^2
        dL/dz = (p - onehot(y)) / N              (z = x w + b, the logits)
        dL/dw = x^T dL/dz + l2 w,   dL/db = sum_n dL/dz[n]
    """
    n = len(x)
    p = softmax(x @ w + b)
    loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * np.sum(w * w)
    dz = p.copy()
    dz[np.arange(n), y] -= 1
    dz /= n
    return float(loss), x.T @ dz + l2 * w, dz.sum(axis=0)


def fit_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int, lr: float, l2: float,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression by full-batch gradient descent from zero weights (the loss is convex:
    the start does not matter, and zeros make every run repeatable)."""
    w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
    for _ in range(steps):
        _, dw, db = softmax_loss_grad(w, b, x, y, l2)
        w -= lr * dw
        b -= lr * db
    return w, b


def accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ w + b).argmax(axis=1) == y).mean())


# ----------------------------------------------------------------------------------------
# The feature extractor: a small CNN trained on the source task (PyTorch: it is not the math here)
# ----------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Three conv blocks, global average pooling -> 64 features -> a linear layer for the
    source classes. ``features`` stops before that last layer: what gets transferred."""

    def __init__(self, num_classes: int = 5, width: int = 16):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU()]

        self.body = nn.Sequential(*block(1, width), nn.MaxPool2d(2),
                                  *block(width, 2 * width), nn.MaxPool2d(2),
                                  *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 1, S, S) images in [0, 1] -> (N, 64) features, in eval mode, as float64 NumPy."""
        self.eval()
        return self.body(torch.from_numpy(images).float()).double().numpy()


def shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``common.twins``' ten classes of images: k < 5 a solid shape (disk, square, ring, cross,
    triangle), k >= 5 the same shape striped, at random places, sizes and brightness."""
    x, y = synthetic_images(n, 1, size, 10, seed)
    return x.double().numpy() / 255, y.numpy()


def pretrain(cfg: Config, x: np.ndarray, y: np.ndarray) -> tuple[SmallCNN, list[float]]:
    """Train the CNN on the source task (Adam, mini-batches of 64); the mean loss per epoch."""
    torch.manual_seed(cfg.seed)
    net = SmallCNN(num_classes=5)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y)
    losses = []
    for _ in range(cfg.source_epochs):
        net.train()
        order, total = torch.randperm(len(xt)), 0.0
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xt))
    return net, losses


# ----------------------------------------------------------------------------------------
# Experiment 1: pretrained features vs raw pixels with k labelled images per class
# ----------------------------------------------------------------------------------------
def draw_shots(y: np.ndarray, classes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k random examples of each class (fewer where a class has fewer)."""
    return np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c in classes])


def few_shot_curves(cfg: Config, views: dict[str, tuple[np.ndarray, np.ndarray]], y_tr: np.ndarray,
                    y_te: np.ndarray) -> dict[str, list[float]]:
    """Mean test accuracy of a softmax-regression probe on each view (name -> (train, test)
    features) for each number of labelled images per class, over ``cfg.repeats`` draws."""
    classes = np.unique(y_tr)
    rng = np.random.default_rng(cfg.seed)
    curves: dict[str, list[float]] = {name: [] for name in views}
    for k in cfg.shots:
        draws = [draw_shots(y_tr, classes, k, rng) for _ in range(cfg.repeats)]
        for name, (f_tr, f_te) in views.items():
            # One scale per view (the mean feature norm on the training images, no labels): one
            # learning rate then suits every probe.
            scale = np.linalg.norm(f_tr, axis=1).mean() / 4
            accs = [accuracy(*fit_softmax(f_tr[i] / scale, y_tr[i], len(classes),
                                          cfg.probe_steps, cfg.lr, cfg.l2),
                             f_te / scale, y_te) for i in draws]
            curves[name].append(float(np.mean(accs)))
    return curves


# ----------------------------------------------------------------------------------------
# Experiment 2: counting parameters, by formula
# ----------------------------------------------------------------------------------------
def conv_params(c_in: int, c_out: int, k: int, bias: bool = False) -> int:
    """A k x k convolution: one k*k*C_in filter per output channel (+ a bias each)."""
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn_params(c: int) -> int:
    """BatchNorm: a scale gamma and a shift beta per channel (its running mean/var are buffers,
    not trained)."""
    return 2 * c


def linear_params(d_in: int, d_out: int) -> int:
    return (d_in + 1) * d_out


def resnet_params(blocks: tuple[int, ...] = (2, 2, 2, 2),
                  num_classes: int = 1000) -> dict[str, int]:
    """Weights of a torchvision ResNet with basic blocks (ResNet-18: 2, 2, 2, 2), per part:
    stem (7x7 conv + BN), layer1..layer4 (two 3x3 conv+BN per block; the first block of a stage
    that changes the size has a 1x1 conv+BN shortcut), and the fc head."""
    parts = {"stem": conv_params(3, 64, 7) + bn_params(64)}
    c_in = 64
    for i, (n, c) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        total = 0
        for j in range(n):
            first_in = c_in if j == 0 else c
            total += (conv_params(first_in, c, 3) + bn_params(c)
                      + conv_params(c, c, 3) + bn_params(c))
            if j == 0 and first_in != c:  # the projection shortcut
                total += conv_params(first_in, c, 1) + bn_params(c)
        parts[f"layer{i}"], c_in = total, c
    parts["fc"] = linear_params(512, num_classes)
    return parts


def mode_counts(parts: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(trainable, frozen) per Part 2 mode: frozen trains the head; partial the last block too."""
    total = sum(parts.values())
    trainable = {"frozen": parts["fc"], "partial": parts["fc"] + parts["layer4"], "full": total}
    return {mode: (n, total - n) for mode, n in trainable.items()}


# ----------------------------------------------------------------------------------------
# Experiment 3: domain shift, and adapting the input statistics
# ----------------------------------------------------------------------------------------
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (bundled: offline), pixels scaled from 0..16 to 0..1, with
    common.data's fixed train/test split."""
    data = load("digits")
    return (data.x_train.double().numpy() / 16, data.y_train.numpy(),
            data.x_test.double().numpy() / 16, data.y_test.numpy())


def shift_domain(x: np.ndarray, contrast: float, brightness: float, noise: float,
                 rng: np.random.Generator) -> np.ndarray:
    """The same digits through "another scanner":
    x' = contrast * x + brightness/16 + noise/16 * N(0, 1) (in the 0..1 units of ``digits()``)."""
    return contrast * x + brightness / 16 + noise / 16 * rng.standard_normal(x.shape)


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std (std floored: the corner pixels of the digits are always 0)."""
    return x.mean(axis=0), np.maximum(x.std(axis=0), 1e-2)


def domain_shift(cfg: Config, data: tuple) -> dict[str, float]:
    """Train on clean digits (inputs standardized with the clean training statistics), then
    test on clean digits, on shifted digits, and on shifted digits standardized with the
    shifted set's own statistics (estimated from its images alone: no labels)."""
    x_tr, y_tr, x_te, y_te = data
    mean, std = standardizer(x_tr)
    w, b = fit_softmax((x_tr - mean) / std, y_tr, 10, cfg.probe_steps, cfg.lr / 5, cfg.l2)
    shifted = shift_domain(x_te, cfg.contrast, cfg.brightness, cfg.noise,
                           np.random.default_rng(cfg.seed))
    new_mean, new_std = standardizer(shifted)
    return {"acc_clean": accuracy(w, b, (x_te - mean) / std, y_te),
            "acc_shifted": accuracy(w, b, (shifted - mean) / std, y_te),
            "acc_shifted_adapted": accuracy(w, b, (shifted - new_mean) / new_std, y_te)}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    run = Run.start(cfg, __file__, pick_device("cpu"))

    # 1. Pretrain on solid shapes; probe striped shapes with few labels.
    x, y = shapes(2 * cfg.source_images, cfg.image_size, cfg.seed)
    source = y < 5
    extractor, losses = pretrain(cfg, x[source], y[source])
    for epoch, loss in enumerate(losses, start=1):
        run.log(epoch=epoch, source_loss=loss)
    x_new, y_new = shapes(2 * cfg.source_images + 10 * cfg.target_test, cfg.image_size,
                          cfg.seed + 1)
    x_check, y_check = x_new[y_new < 5][:cfg.target_test], y_new[y_new < 5][:cfg.target_test]
    predicted = extractor(torch.from_numpy(x_check).float()).argmax(1).numpy()
    source_acc = float((predicted == y_check).mean())
    print(f"source task (5 solid shapes): loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy on "
          f"new images {source_acc:.3f}")
    striped = y_new >= 5  # the target task: the striped shapes, never seen by the extractor
    x_t, y_t = x_new[striped], y_new[striped] - 5
    n_test = cfg.target_test
    x_te, y_te, x_tr, y_tr = x_t[:n_test], y_t[:n_test], x_t[n_test:], y_t[n_test:]
    torch.manual_seed(cfg.seed + 1)
    untrained = SmallCNN(num_classes=5)
    views = {"raw pixels": (x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)),
             "pretrained features": (extractor.features(x_tr), extractor.features(x_te)),
             "untrained features": (untrained.features(x_tr), untrained.features(x_te))}
    curves = few_shot_curves(cfg, views, y_tr, y_te)
    print("target task (5 striped shapes), test accuracy by labelled images per class:")
    print("  k" + " " * 21 + "  ".join(f"{k:>5}" for k in cfg.shots))
    for name, accs in curves.items():
        print(f"  {name:<22}" + "  ".join(f"{a:5.3f}" for a in accs))
    plot_curves({name: list(zip(cfg.shots, accs)) for name, accs in curves.items()},
                run.path("few_shot.png"),
                xlabel="labelled images per class (striped shapes)", ylabel="test accuracy",
                title="a linear classifier on what, with little data?")

    # 2. Parameters of ResNet-18 by formula, and per fine-tuning mode (2 classes, as in Part 2).
    parts = resnet_params(num_classes=2)
    counts = mode_counts(parts)
    print("ResNet-18 with a 2-class head: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    for mode, (trainable, frozen) in counts.items():
        share = 100 * trainable / (trainable + frozen)
        print(f"  {mode:<8} trains {trainable:>10,} weights ({share:6.3f}%), freezes {frozen:,}")

    # 3. Domain shift on digits.
    shift = domain_shift(cfg, digits())
    print(f"domain shift (digits): clean {shift['acc_clean']:.3f}, shifted "
          f"{shift['acc_shifted']:.3f}, shifted with re-estimated input statistics "
          f"{shift['acc_shifted_adapted']:.3f}")

    few_shot = {f"{name.split()[0]}_acc_k{k}": a for name, accs in curves.items()
                for k, a in zip(cfg.shots, accs)}
    return run.finish(source_loss_first=losses[0], source_loss_last=losses[-1],
                      source_acc=source_acc, **few_shot, resnet18_params=sum(parts.values()),
                      **{f"{m}_trainable": t for m, (t, _) in counts.items()}, **shift)


if __name__ == "__main__":
    launch(main, Config)
