"""Data: one registry of data sets, each loaded and checked once.

    data = load("mnist", cfg.data_dir, smoke=cfg.smoke)      # -> ImageData / TabularData

Real data sets are downloaded the standard way (torchvision) into one data root:
``--data-dir``, else ``$DL_LABS_DATA``, else ``~/.cache/dl-labs/data``. Files already there
are never downloaded again. Offline with nothing on disk, ``load`` raises ``DataUnavailable``
naming the data set, where it looked, and the two ways on. It never falls back to fake data:
you get the synthetic twin (``common.twins``) only when you ask for it (``smoke=True`` or
``synthetic=True``). Batching is in ``common.loader``, augmentation in ``common.augment``.

Every set is validated once, here, before any training: inputs and labels have the same
number of rows, images are uint8 (N, C, H, W), class labels are int64 in [0, num_classes).
A damaged file on disk (a truncated download, a corrupt archive) becomes a one-line
``DataError`` naming the data set and the file, not a reshape error in the middle of an epoch.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import imagefolder
from common.datasets import ImageData, TabularData, channel_stats, validate
from common.download import DAMAGED, cache_root, checked_root, damaged, data_root, fetching
from common.errors import DataUnavailable, one_line
from common.twins import synthetic_images, synthetic_tabular

# ----------------------------------------------------------------------------------------
# Real data sets
# ----------------------------------------------------------------------------------------
MNIST_CLASSES = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "boot"]

Damage = tuple[Path, str]  # a file and what is wrong with it ("is truncated (...)")


def _torchvision(cls, name: str, root: Path, train: bool,
                 find_damage: Callable[[Path, bool], Damage | None]):
    """Open a torchvision data set, downloading it if needed, with a timeout and clear errors.

    torchvision reports a damaged file with whatever its reader tripped on (an assert, a
    reshape error, "not found or corrupted") and no file name; ``find_damage`` looks at the
    files on disk to name the one that is bad.
    """
    split = "training" if train else "test"
    folder = root / (getattr(cls, "base_folder", None) or cls.__name__)
    try:
        return cls(root=str(root), train=train, download=False)
    except Exception as e:  # torchvision raises anything from RuntimeError to AssertionError
        # Anything but "not found": the files are there but do not read.
        if not (isinstance(e, RuntimeError) and "not found" in str(e)):
            damage = find_damage(root, train)
            if damage:
                raise damaged(name, f"{damage[0].name} {damage[1]}", damage[0].parent) from None
            why = f"the {split} files could not be read ({one_line(e)})"
            raise damaged(name, why, folder) from None
    try:
        with fetching(name, root):
            return cls(root=str(root), train=train, download=True)
    except DataUnavailable:
        damage = find_damage(root, train)  # e.g. a CIFAR batch file whose checksum is wrong
        if damage:
            why = f"{damage[0].name} {damage[1]}, and no good copy could be downloaded"
            raise damaged(name, why, damage[0].parent) from None
        raise


def _idx_problem(path: Path, ndim: int) -> str | None:
    """What is wrong with an MNIST idx file, or None (also when it is absent: then it is
    downloaded). The header gives the dimensions, so the exact file size is known."""
    if not path.is_file():
        return None
    size, header_size = path.stat().st_size, 4 + 4 * ndim
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        return f"is truncated ({size} bytes, shorter than its {header_size}-byte header)"
    if header[:4] != bytes([0, 0, 0x08, ndim]):
        return (f"is not an MNIST idx file of {ndim}-d uint8 data "
                f"(it starts with {header[:4].hex()})")
    dims = [int.from_bytes(header[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    expected = header_size + int(np.prod(dims))
    if size != expected:
        return (f"is {'truncated' if size < expected else 'too long'} "
                f"({size:,} bytes, expected {expected:,})")
    return None


def _idx_damage(cls) -> Callable[[Path, bool], Damage | None]:
    def find(root: Path, train: bool) -> Damage | None:
        folder, prefix = root / cls.__name__ / "raw", "train" if train else "t10k"
        files = ((folder / f"{prefix}-images-idx3-ubyte", 3),
                 (folder / f"{prefix}-labels-idx1-ubyte", 1))
        present = [path for path, _ in files if path.is_file()]
        if present and len(present) < len(files):  # half a set: name what is missing, no download
            missing = next(path for path, _ in files if not path.is_file())
            return missing, "is missing (the other file of the pair is there)"
        for path, ndim in files:
            problem = _idx_problem(path, ndim)
            if problem:
                return path, problem
        return None

    return find


def _cifar_damage(root: Path, train: bool) -> Damage | None:
    """A CIFAR-10 batch file (or the tarball) whose checksum is not the original's."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = root / CIFAR10.base_folder
    if folder.is_dir():
        meta = [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]
        for filename, md5 in [*CIFAR10.train_list, *CIFAR10.test_list, meta]:
            path = folder / filename
            if not path.exists():
                return path, "is missing"
            if not check_integrity(str(path), md5):
                return path, "is damaged (its checksum is not the original's)"
    tarball = root / CIFAR10.filename
    if tarball.is_file() and not check_integrity(str(tarball), CIFAR10.tgz_md5):
        return tarball, "is damaged (its checksum is not the original's)"
    return None


def _mnist_like(cls, name: str, classes: list[str]):
    def load_real(root: Path) -> ImageData:
        find_damage = _idx_damage(cls)
        train = _torchvision(cls, name, root, True, find_damage)
        test = _torchvision(cls, name, root, False, find_damage)
        x_train, x_test = train.data.unsqueeze(1), test.data.unsqueeze(1)
        mean, std = channel_stats(x_train)
        return ImageData(x_train, train.targets.long(), x_test, test.targets.long(), classes,
                         mean, std, name, source=str(root / cls.__name__ / "raw"))

    return load_real


JPG_DAMAGED = ("the copy is damaged: replace it, or delete it to download the standard CIFAR-10 "
               "(or pass --data-dir PATH to a good copy, or --smoke)")


def _decode_cifar10_jpg(source: Path) -> dict[str, torch.Tensor]:
    """Decode ``{train,test}/<class>/*.jpg`` from a folder or a .tar.gz into uint8 tensors."""
    from PIL import Image

    images: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}

    def add(member_path: str, data: bytes):
        parts = Path(member_path).parts
        if len(parts) < 4 or parts[-3] not in images or not parts[-1].endswith(".jpg"):
            return
        split, cls = parts[-3], parts[-2]
        if cls not in CIFAR10_CLASSES:
            raise ValueError(f"{cls!r} is not a CIFAR-10 class")
        images[split].append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        labels[split].append(CIFAR10_CLASSES.index(cls))

    member = str(source)
    try:
        if source.is_dir():
            for path in sorted(source.rglob("*.jpg")):
                member = str(path)
                add(member, path.read_bytes())
        else:
            with tarfile.open(source) as tar:
                for info in tar:
                    member = f"{source}:{info.name}"
                    if info.isfile():
                        add(info.name, tar.extractfile(info).read())
        member = str(source)
        for split in images:
            if not images[split]:
                raise ValueError(f"no {split}/<class>/*.jpg images")
            if len({im.shape for im in images[split]}) > 1:
                raise ValueError(f"{split} images of different sizes")
    # PIL's errors are OSErrors.
    except (OSError, EOFError, ValueError, tarfile.TarError, zlib.error) as e:
        why = f"could not decode {member} ({one_line(e)})"
        raise damaged("cifar10", why, source, JPG_DAMAGED) from None
    blob = {f"x_{s}": torch.from_numpy(np.stack(images[s])).permute(0, 3, 1, 2).contiguous()
            for s in images}
    blob.update({f"y_{s}": torch.tensor(labels[s], dtype=torch.long) for s in labels})
    return blob


def _cifar10_jpg(source: Path) -> ImageData:
    """The JPEG copy of CIFAR-10 (``cifar10_jpg/{train,test}/<class>/*.jpg``), a folder or
    its .tar.gz, decoded once and cached as tensors (decoding 60k JPEGs takes a while)."""
    from common.io import atomic_write

    stat = source.stat()
    cache = cache_root() / f"cifar10_jpg-{stat.st_size}-{int(stat.st_mtime)}.pt"
    blob = None
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
        except Exception as e:  # our own cache: decode again rather than fail
            print(f"the cache {cache} does not load ({one_line(e)}); decoding again", flush=True)
    if blob is None:
        print(f"decoding {source} once into {cache} ...", flush=True)
        blob = _decode_cifar10_jpg(source)
        try:
            atomic_write(cache, lambda tmp: torch.save(blob, tmp))
        except OSError as e:  # a read-only or odd cache folder: carry on, decode again next time
            print(f"warning: could not keep the decoded copy in {cache} ({e.strerror or e}); "
                  "set DL_LABS_CACHE to a writable folder to skip decoding next time")
    mean, std = channel_stats(blob["x_train"])
    return ImageData(blob["x_train"], blob["y_train"], blob["x_test"], blob["y_test"],
                     CIFAR10_CLASSES, mean, std, "cifar10", source=str(source))


def _cifar10(root: Path) -> ImageData:
    """torchvision's CIFAR-10 (``cifar-10-batches-py``), or the JPEG copy if that is what the
    data root holds, else a download."""
    from torchvision.datasets import CIFAR10

    if not (root / "cifar-10-batches-py").exists():
        for candidate in (root / "cifar10_jpg", root / "cifar10_jpg.tar.gz"):
            if candidate.exists():
                return _cifar10_jpg(candidate)
    train = _torchvision(CIFAR10, "cifar10", root, True, _cifar_damage)
    test = _torchvision(CIFAR10, "cifar10", root, False, _cifar_damage)
    x_train = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
    x_test = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
    mean, std = channel_stats(x_train)
    return ImageData(x_train, torch.tensor(train.targets, dtype=torch.long), x_test,
                     torch.tensor(test.targets, dtype=torch.long), CIFAR10_CLASSES, mean, std,
                     "cifar10", source=str(root / CIFAR10.base_folder))


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
        features = [str(f) for f in bunch.feature_names]
        return TabularData(x[train], y[train], x[test], y[test], classes, features,
                           loader_name.removeprefix("load_"),
                           source=f"sklearn.datasets.{loader_name}")

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
        mean, std = channel_stats(x[:n_train])
        return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, mean, std,
                         f"{name} (synthetic twin)", synthetic=True, source="common.twins")

    return make


def _tabular_twin(name: str, num_features: int, num_classes: int):
    def make(n_train: int, seed: int) -> TabularData:
        n_test = max(n_train // 4, 2 * max(num_classes, 1))
        x, y = synthetic_tabular(n_train + n_test, num_features, num_classes, seed)
        classes = [f"class{i}" for i in range(num_classes)]
        return TabularData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes,
                           [f"x{i}" for i in range(num_features)], f"{name} (synthetic twin)",
                           synthetic=True, source="common.twins")

    return make


def _fashion(root: Path) -> ImageData:
    from torchvision.datasets import FashionMNIST

    return _mnist_like(FashionMNIST, "fashion_mnist", FASHION_CLASSES)(root)


def _mnist(root: Path) -> ImageData:
    from torchvision.datasets import MNIST

    return _mnist_like(MNIST, "mnist", MNIST_CLASSES)(root)


def _image_folder_set(name: str):
    """An image-folder set (common.imagefolder) at its default size, 224 x 224; labs that choose
    the size call ``common.imagefolder.load_images`` instead."""

    def load_real(root: Path) -> ImageData:
        return imagefolder.IMAGE_FOLDERS[name][0](root)

    def make_twin(n_train: int, seed: int) -> ImageData:
        return imagefolder.twin(name, imagefolder.DEFAULT_SIZE, n_train, seed)

    return Entry(load_real, make_twin)


REGISTRY: dict[str, Entry] = {
    "mnist": Entry(_mnist, _image_twin("mnist", 1, 28, MNIST_CLASSES)),
    "fashion_mnist": Entry(_fashion, _image_twin("fashion_mnist", 1, 28, FASHION_CLASSES)),
    "cifar10": Entry(_cifar10, _image_twin("cifar10", 3, 32, CIFAR10_CLASSES)),
    "iris": Entry(_sklearn("load_iris"), _tabular_twin("iris", 4, 3), bundled=True),
    "wine": Entry(_sklearn("load_wine"), _tabular_twin("wine", 13, 3), bundled=True),
    "breast_cancer": Entry(_sklearn("load_breast_cancer"), _tabular_twin("breast_cancer", 30, 2),
                           bundled=True),
    "diabetes": Entry(_sklearn("load_diabetes"), _tabular_twin("diabetes", 10, 0), bundled=True),
    "digits": Entry(_sklearn("load_digits"), _tabular_twin("digits", 64, 10), bundled=True),
    "hymenoptera": _image_folder_set("hymenoptera"),  # ants vs bees (common.imagefolder)
    "flowers102": _image_folder_set("flowers102"),
}


def load(name: str, data_dir: str | Path | None = None, smoke: bool = False,
         synthetic: bool = False, n_synthetic: int = 512, seed: int = 0) -> ImageData | TabularData:
    """Load a data set from the registry, and check it (see ``validate``).

    ``smoke`` gives the tiny synthetic twin (bundled sets, already offline and small, stay
    real); ``synthetic`` always gives the twin, with ``n_synthetic`` training examples.
    An explicit ``data_dir`` must exist; the default data root is created to download into
    (and removed again if the download fails and leaves it empty).
    """
    if name not in REGISTRY:
        raise DataUnavailable(f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if synthetic or (smoke and not entry.bundled):
        data, remedy = entry.make_twin(n_synthetic, seed), "a bug in common/twins.py"
    elif entry.bundled:
        data = entry.load_real(data_root(data_dir))
        remedy = "scikit-learn's bundled copy is damaged: reinstall it"
    else:
        data, remedy = entry.load_real(checked_root(name, data_dir)), DAMAGED
    validate(name, data, remedy)
    return data


def subset(data: ImageData, n: int, seed: int) -> ImageData:
    """``n`` training images drawn at random (0 or more than there are: all), before any
    validation is held out of them; the first ``n`` of a copy stored class by class (CIFAR-10's
    JPEG copy) would miss classes."""
    if not n or n >= len(data.x_train):
        return data
    from dataclasses import replace

    keep = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:n]
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
