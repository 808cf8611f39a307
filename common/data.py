"""Data: one registry of data sets, their synthetic twins, and fast in-memory batching.

    data = load("mnist", cfg.data_dir, smoke=cfg.smoke)      # -> ImageData / TabularData
    train = TensorLoader(data.x_train, data.y_train, batch_size=128, shuffle=True)

Real data sets are downloaded the standard way (torchvision) into one data root:
``--data-dir``, else ``$DL_LABS_DATA``, else ``~/.cache/dl-labs/data``. Files already there
are never downloaded again. Offline with nothing on disk, ``load`` raises ``DataUnavailable``
naming the data set, where it looked, and the two ways on. It never falls back to fake data:
you get the synthetic twin only when you ask for it (``smoke=True`` or ``synthetic=True``).

Every real data set has a twin with the same shapes and classes, generated in memory, that a
model has to actually learn (class = shape x texture at a random place, size and colour).
"""

from __future__ import annotations

import io
import math
import os
import socket
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import DataUnavailable

DOWNLOAD_TIMEOUT_S = 30


def data_root(data_dir: str | Path | None = None) -> Path:
    """Where real data sets live: the argument, else $DL_LABS_DATA, else a cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("DL_LABS_DATA"):
        return Path(os.environ["DL_LABS_DATA"]).expanduser()
    return Path.home() / ".cache" / "dl-labs" / "data"


def cache_root() -> Path:
    """Where decoded copies go (the data root may be read-only): $DL_LABS_CACHE or ~/.cache."""
    return Path(os.environ.get("DL_LABS_CACHE") or Path.home() / ".cache" / "dl-labs" / "cache")


@dataclass
class ImageData:
    """Images as uint8 tensors (N, C, H, W) and int64 labels, all in memory."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per-channel mean/std of the training images, in [0, 1] units
    std: tuple[float, ...]
    name: str = ""
    synthetic: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class TabularData:
    """Features (float32, N x D) and targets (int64 classes, or float32 for regression)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]  # empty for regression
    feature_names: list[str]
    name: str = ""
    synthetic: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------
# Synthetic twins
# ----------------------------------------------------------------------------------------
SHAPES = ("disk", "square", "ring", "cross", "triangle")


def synthetic_images(n: int, channels: int = 1, size: int = 28, num_classes: int = 10,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images (n, channels, size, size) whose class is a shape and a texture.

    Class k draws shape ``SHAPES[k % 5]``, solid when k < 5, striped (random angle and
    frequency) when k >= 5. Position, size, brightness (or colours) and noise are random, so a
    model must learn shape and texture, not a pixel lookup. All vectorized: no Python loop.
    """
    if not 2 <= num_classes <= 2 * len(SHAPES):
        raise ValueError(f"synthetic_images supports 2..{2 * len(SHAPES)} classes, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes  # balanced classes, then shuffled
    y = y[torch.randperm(n, generator=g)]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy, scale = uniform(-0.3, 0.3, 1, 1), uniform(-0.3, 0.3, 1, 1), uniform(0.4, 0.65, 1, 1)
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    radius = torch.sqrt(dx**2 + dy**2)
    masks = torch.stack([
        radius < 1.0,                                                         # disk
        torch.maximum(dx.abs(), dy.abs()) < 0.8,                              # square
        (radius > 0.55) & (radius < 1.0),                                     # ring
        ((dx.abs() < 0.3) & (dy.abs() < 1)) | ((dy.abs() < 0.3) & (dx.abs() < 1)),  # cross
        (dy > 2 * dx.abs() - 1) & (dy < 0.8),                                 # triangle
    ], dim=1).float()  # (n, 5, H, W)
    mask = masks[torch.arange(n), y % len(SHAPES)]
    theta, freq = uniform(0, math.pi, 1, 1), uniform(2.5, 4.0, 1, 1)
    stripes = (torch.sin(freq * math.pi * (dx * torch.cos(theta) + dy * torch.sin(theta))) > 0).float()
    striped = (y >= len(SHAPES)).float().view(n, 1, 1)
    texture = striped * (0.25 + 0.75 * stripes) + (1 - striped)
    if channels == 1:
        background, foreground = uniform(0.0, 0.25, 1, 1, 1), uniform(0.7, 1.0, 1, 1, 1)
    else:  # random colours; keep foreground and background apart in brightness
        background = uniform(0.0, 0.35, channels, 1, 1)
        foreground = (background + uniform(0.4, 0.65, channels, 1, 1)).clamp(max=1)
    image = background + (foreground - background) * (mask * texture).unsqueeze(1)
    image = image + 0.08 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), y


def synthetic_tabular(n: int, num_features: int, num_classes: int, seed: int = 0,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs for classification (``num_classes`` >= 2) or a noisy nonlinear target
    for regression (``num_classes`` == 0), float32 features."""
    g = torch.Generator().manual_seed(seed)
    if num_classes == 0:
        x = torch.randn(n, num_features, generator=g)
        w = torch.randn(num_features, generator=g)
        y = x @ w + 0.5 * torch.sin(2 * x[:, 0]) + 0.3 * torch.randn(n, generator=g)
        return x, y
    centers = 2.0 * torch.randn(num_classes, num_features, generator=g)
    y = torch.arange(n) % num_classes
    x = centers[y] + 1.2 * torch.randn(n, num_features, generator=g)
    perm = torch.randperm(n, generator=g)
    return x[perm], y[perm]


# ----------------------------------------------------------------------------------------
# Real data sets
# ----------------------------------------------------------------------------------------
MNIST_CLASSES = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _missing(name: str, root: Path, reason: str) -> DataUnavailable:
    return DataUnavailable(
        f"{name} is not in {root} and could not be downloaded ({reason}). "
        f"Put it there or pass --data-dir PATH to a folder that has it, "
        f"or run with --smoke to use its synthetic twin."
    )


def _torchvision(cls, name: str, root: Path, train: bool):
    """Open a torchvision data set, downloading it if needed, with a timeout and clear error."""
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        pass  # not on disk yet
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading {name} to {root} (once) ...", flush=True)
        return cls(root=str(root), train=train, download=True)
    except Exception as e:  # URLError, timeouts, HTTP errors, checksum mismatch, read-only folder
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise _missing(name, root, reason) from None
    finally:
        socket.setdefaulttimeout(previous)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sample = x[: 10_000].float() / 255
    return tuple(sample.mean(dim=(0, 2, 3)).tolist()), tuple(sample.std(dim=(0, 2, 3)).tolist())


def _mnist_like(cls, name: str, classes: list[str]):
    def load_real(root: Path) -> ImageData:
        train, test = _torchvision(cls, name, root, True), _torchvision(cls, name, root, False)
        x_train, x_test = train.data.unsqueeze(1), test.data.unsqueeze(1)
        mean, std = _channel_stats(x_train)
        return ImageData(x_train, train.targets.long(), x_test, test.targets.long(), classes, mean, std, name)

    return load_real


def _cifar10_jpg(source: Path) -> ImageData:
    """The JPEG copy of CIFAR-10 (``cifar10_jpg/{train,test}/<class>/*.jpg``), a folder or
    its .tar.gz, decoded once and cached as tensors (decoding 60k JPEGs takes a while)."""
    from PIL import Image

    stat = source.stat()
    cache = cache_root() / f"cifar10_jpg-{stat.st_size}-{int(stat.st_mtime)}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
    else:
        print(f"decoding {source} once into {cache} ...", flush=True)
        images: dict[str, list] = {"train": [], "test": []}
        labels: dict[str, list] = {"train": [], "test": []}

        def add(member_path: str, data: bytes):
            parts = Path(member_path).parts
            if len(parts) < 4 or parts[-3] not in images or not parts[-1].endswith(".jpg"):
                return
            split, cls = parts[-3], parts[-2]
            images[split].append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            labels[split].append(CIFAR10_CLASSES.index(cls))

        if source.is_dir():
            for path in sorted(source.rglob("*.jpg")):
                add(str(path), path.read_bytes())
        else:
            with tarfile.open(source) as tar:
                for member in tar:
                    if member.isfile():
                        add(member.name, tar.extractfile(member).read())
        blob = {f"x_{s}": torch.from_numpy(np.stack(images[s])).permute(0, 3, 1, 2).contiguous() for s in images}
        blob.update({f"y_{s}": torch.tensor(labels[s]) for s in labels})
        from common.io import atomic_write

        atomic_write(cache, lambda tmp: torch.save(blob, tmp))
    mean, std = _channel_stats(blob["x_train"])
    return ImageData(blob["x_train"], blob["y_train"], blob["x_test"], blob["y_test"], CIFAR10_CLASSES,
                     mean, std, "cifar10")


def _cifar10(root: Path) -> ImageData:
    """torchvision's CIFAR-10 (``cifar-10-batches-py``), or the JPEG copy if that is what the
    data root holds, else a download."""
    from torchvision.datasets import CIFAR10

    if not (root / "cifar-10-batches-py").exists():
        for candidate in (root / "cifar10_jpg", root / "cifar10_jpg.tar.gz"):
            if candidate.exists():
                return _cifar10_jpg(candidate)
    train, test = _torchvision(CIFAR10, "cifar10", root, True), _torchvision(CIFAR10, "cifar10", root, False)
    x_train = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
    x_test = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
    mean, std = _channel_stats(x_train)
    return ImageData(x_train, torch.tensor(train.targets), x_test, torch.tensor(test.targets),
                     CIFAR10_CLASSES, mean, std, "cifar10")


def _sklearn(loader_name: str, test_fraction: float = 0.2) -> Callable[[Path], TabularData]:
    """Small real data sets bundled inside scikit-learn: offline, no download."""

    def load_real(root: Path) -> TabularData:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader_name)()
        x = torch.tensor(bunch.data, dtype=torch.float32)
        is_classification = hasattr(bunch, "target_names")
        y = torch.tensor(bunch.target, dtype=torch.long if is_classification else torch.float32)
        # A fixed random split (seed 0), the same in every run, so test figures are comparable.
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_test = int(round(test_fraction * len(x)))
        test, train = perm[:n_test], perm[n_test:]
        classes = [str(c) for c in bunch.target_names] if is_classification else []
        return TabularData(x[train], y[train], x[test], y[test], classes, [str(f) for f in bunch.feature_names],
                           loader_name.removeprefix("load_"))

    return load_real


@dataclass
class Entry:
    load_real: Callable[..., ImageData | TabularData]
    make_twin: Callable[[int, int], ImageData | TabularData]
    bundled: bool = False  # ships with a package: no download, so --smoke may use the real thing


def _image_twin(name: str, channels: int, size: int, classes: list[str]):
    def make(n_train: int, seed: int) -> ImageData:
        n_test = max(n_train // 5, 2 * len(classes))
        x, y = synthetic_images(n_train + n_test, channels, size, len(classes), seed)
        mean, std = _channel_stats(x[:n_train])
        return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, mean, std,
                         f"{name} (synthetic twin)", synthetic=True)

    return make


def _tabular_twin(name: str, num_features: int, num_classes: int):
    def make(n_train: int, seed: int) -> TabularData:
        n_test = max(n_train // 4, 2 * max(num_classes, 1))
        x, y = synthetic_tabular(n_train + n_test, num_features, num_classes, seed)
        classes = [f"class{i}" for i in range(num_classes)]
        return TabularData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes,
                           [f"x{i}" for i in range(num_features)], f"{name} (synthetic twin)", synthetic=True)

    return make


def _fashion(root: Path) -> ImageData:
    from torchvision.datasets import FashionMNIST

    return _mnist_like(FashionMNIST, "fashion_mnist", FASHION_CLASSES)(root)


def _mnist(root: Path) -> ImageData:
    from torchvision.datasets import MNIST

    return _mnist_like(MNIST, "mnist", MNIST_CLASSES)(root)


REGISTRY: dict[str, Entry] = {
    "mnist": Entry(_mnist, _image_twin("mnist", 1, 28, MNIST_CLASSES)),
    "fashion_mnist": Entry(_fashion, _image_twin("fashion_mnist", 1, 28, FASHION_CLASSES)),
    "cifar10": Entry(_cifar10, _image_twin("cifar10", 3, 32, CIFAR10_CLASSES)),
    "iris": Entry(_sklearn("load_iris"), _tabular_twin("iris", 4, 3), bundled=True),
    "wine": Entry(_sklearn("load_wine"), _tabular_twin("wine", 13, 3), bundled=True),
    "breast_cancer": Entry(_sklearn("load_breast_cancer"), _tabular_twin("breast_cancer", 30, 2), bundled=True),
    "diabetes": Entry(_sklearn("load_diabetes"), _tabular_twin("diabetes", 10, 0), bundled=True),
    "digits": Entry(_sklearn("load_digits"), _tabular_twin("digits", 64, 10), bundled=True),
}


def load(name: str, data_dir: str | Path | None = None, smoke: bool = False, synthetic: bool = False,
         n_synthetic: int = 512, seed: int = 0) -> ImageData | TabularData:
    """Load a data set from the registry.

    ``smoke`` gives the tiny synthetic twin (bundled sets, already offline and small, stay
    real); ``synthetic`` always gives the twin, with ``n_synthetic`` training examples.
    """
    if name not in REGISTRY:
        raise DataUnavailable(f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if synthetic or (smoke and not entry.bundled):
        return entry.make_twin(n_synthetic, seed)
    return entry.load_real(data_root(data_dir))


# ----------------------------------------------------------------------------------------
# Batching tensors that are already in memory
# ----------------------------------------------------------------------------------------
class TensorLoader:
    """Mini-batches by indexing tensors held in memory (on the GPU when training there).

    Replaces ``DataLoader`` for data that fits in memory: no per-sample Python calls, no worker
    processes, one gather per batch. ``transform`` runs on each whole batch (e.g. uint8 ->
    normalized float, random crops and flips), so augmentation is vectorized too.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, drop_last: bool = False,
                 device: torch.device | str | None = None, seed: int = 0):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.transform = transform
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator).to(self.x.device) if self.shuffle else None
        for i in range(len(self)):
            if order is None:
                xb, yb = self.x[i * self.batch_size:(i + 1) * self.batch_size], \
                    self.y[i * self.batch_size:(i + 1) * self.batch_size]
            else:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                xb, yb = self.x[idx], self.y[idx]
            yield (self.transform(xb) if self.transform else xb), yb


def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images (N, C, H, W) -> float32, scaled to [0, 1], then standardized per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - m.to(x.device)) / s.to(x.device)

    return normalize


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int = 0):
    """Hold out a random ``val_fraction`` of (x, y) for validation: (x_tr, y_tr, x_val, y_val)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(x)))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
