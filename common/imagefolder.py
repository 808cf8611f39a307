"""Image-folder data sets: photos of any size, decoded once to uint8 tensors of one size.

    data = load_images("hymenoptera", cfg.data_dir, size=224, smoke=cfg.smoke)   # -> ImageData

The layout is torchvision's ``ImageFolder``: ``<split>/<class>/<image>`` with the splits
``train`` and ``val`` and/or ``test`` (or class folders alone: then a fixed random 20% is the
test set). It is read from a folder, a ``.zip`` or a ``.tar.gz`` as it is, never extracted.

Every image is resized so that its shorter side is ``size`` and cut to the centre
``size x size`` square, then all of them are stacked into one uint8 tensor and kept in
``common.data.cache_root()``: the next run loads one file instead of decoding hundreds of
JPEGs. Training then batches by indexing (``common.loader.TensorLoader``), with the random
part of the usual ``RandomResizedCrop`` done on whole batches
(``common.augment.random_resized_crop``).

Sets (``IMAGE_FOLDERS``):

    hymenoptera  ants vs bees, the PyTorch transfer-learning tutorial's set (train 245 / val 153
                 files here): ``hymenoptera_data/`` or ``hymenoptera_data.zip`` / ``.tar.gz`` in the
                 data root, else the original zip from download.pytorch.org
    flowers102   Oxford Flowers-102 through torchvision (train 1020 / val 1020 / test 6149)
    folder       any ImageFolder: ``--dataset folder --data-dir PATH`` (PATH is the folder itself)

Splits: ``x_train``/``x_test`` as usual; ``x_val``/``y_val`` only when the set has its own
validation split besides a test split (flowers102, or a folder with train/val/test). A set
with train and val only (hymenoptera) gives its val folder as the test set: the lab holds out
part of the training images for validation, so the val folder is touched once, at the end.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.datasets import ImageData, channel_stats, validate
from common.download import DAMAGED, cache_root, checked_root, download, fetching
from common.errors import DataError, DataUnavailable, one_line
from common.twins import synthetic_images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
HYMENOPTERA_CLASSES = ["ants", "bees"]
SPLITS = ("train", "val", "test")
DEFAULT_SIZE = 224
FOLDER_WAYS_ON = ("pass --data-dir PATH to a folder with train/<class>/*.jpg (and val/ or test/), "
                  "or run with --smoke")


def resize_center_crop(image, size: int) -> np.ndarray:
    """A PIL image -> (size, size, 3) uint8: shorter side scaled to ``size`` (PIL's antialiased
    bilinear filter), then the centre square, as torchvision's Resize(size) + CenterCrop(size)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _members(source: Path) -> Iterator[tuple[str, callable]]:
    """(path inside the source, a function returning its bytes) for every image file, sorted by
    path so the order (and so the tensors) are the same on every machine."""
    if source.is_dir():
        paths = (p for p in source.rglob("*")
                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for path in sorted(paths):
            yield str(path.relative_to(source)), path.read_bytes
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()  # CRC of every member: a damaged download is caught here
            if bad is not None:
                raise ValueError(f"{bad} fails its CRC check")
            for name in sorted(archive.namelist()):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS and "__MACOSX" not in name:
                    yield name, lambda name=name: archive.read(name)
    else:
        with tarfile.open(source) as tar:
            infos = sorted((i for i in tar.getmembers()
                            if i.isfile() and Path(i.name).suffix.lower() in IMAGE_EXTENSIONS),
                           key=lambda i: i.name)
            for info in infos:
                yield info.name, lambda info=info: tar.extractfile(info).read()


def decode_folder(source: Path, size: int) -> dict:
    """Decode ``<split>/<class>/<image>`` (or ``<class>/<image>``) under ``source`` (a folder, a
    .zip or a .tar.gz) into ``{"classes": [...], "train": (x, y), "val": ..., "test": ...}``;
    classes are sorted by name, as ImageFolder numbers them."""
    from PIL import Image

    found: dict[str, list[tuple[str, np.ndarray]]] = {}
    member = str(source)
    for member, read in _members(source):
        parts = Path(member).parts
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue
        split = parts[-3] if len(parts) >= 3 and parts[-3] in SPLITS else ""
        try:
            with Image.open(io.BytesIO(read())) as image:
                found.setdefault(split, []).append((parts[-2], resize_center_crop(image, size)))
        except (OSError, ValueError) as e:  # PIL's "cannot identify image file", truncated data
            raise ValueError(f"{member}: {one_line(e, 80)}") from None
    if not found:
        raise ValueError("no images in <split>/<class>/ folders")
    if "" in found and len(found) > 1:
        splits = ", ".join(s for s in found if s)
        raise ValueError(f"images both in split folders ({splits}) and outside them")
    if found.keys() - {""} and "train" not in found:
        raise ValueError(f"split folders {sorted(found)} but no train/")
    classes = sorted({cls for items in found.values() for cls, _ in items})
    if len(classes) < 2:
        raise ValueError(f"one class folder only ({classes[0]}); a classifier needs two or more")
    blob: dict = {"classes": classes}
    for split, items in found.items():
        x = torch.from_numpy(np.stack([image for _, image in items]))  # (N, H, W, 3)
        x = x.permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        y = torch.tensor([classes.index(cls) for cls, _ in items], dtype=torch.long)
        blob[split or "all"] = (x, y)
    return blob


def _signature(source: Path) -> str:
    """A short hash of what is on disk (names, sizes, times): a change redoes the cache."""
    h = hashlib.sha256()
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        stat = path.stat()
        shown = path.relative_to(source) if path != source else path.name
        h.update(f"{shown}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return h.hexdigest()[:16]


def cached_decode(name: str, source: Path, size: int, cache_key: str = "") -> dict:
    """``decode_folder`` once; later runs load the tensors from ``cache_root()``."""
    from common.io import atomic_write

    cache = cache_root() / f"{cache_key or name}-{size}px-{_signature(source)}.pt"
    if cache.exists():
        try:
            blob = torch.load(cache, weights_only=True)
            return {k: tuple(v) if isinstance(v, list) and k != "classes" else v
                    for k, v in blob.items()}
        except Exception as e:  # our own cache: decode again rather than fail
            print(f"the cache {cache} does not load ({one_line(e)}); decoding again", flush=True)
    print(f"decoding {source} once at {size}x{size} into {cache} ...", flush=True)
    try:
        blob = decode_folder(source, size)
    except (OSError, EOFError, ValueError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{name}: could not read the images in {source} ({one_line(e)}); "
                        "replace the damaged files or archive "
                        "(or pass --data-dir PATH to a good copy, or --smoke)") from None
    try:
        atomic_write(cache, lambda tmp: torch.save(blob, tmp))
    except OSError as e:  # a read-only cache folder: carry on, decode again next time
        print(f"warning: could not keep the decoded copy in {cache} ({e.strerror or e}); "
              "set DL_LABS_CACHE to a writable folder to skip decoding next time")
    return blob


def _image_data(name: str, blob: dict, source: Path):
    """The decoded splits as ImageData: test = test/ (else val/, else a fixed 20% of the images);
    x_val = val/ only when there is a test/ as well."""

    if "all" in blob:  # class folders without splits: a fixed random 20% is the test set
        x, y = blob["all"]
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_test = max(1, round(0.2 * len(x)))
        blob = {**blob, "train": (x[perm[n_test:]], y[perm[n_test:]]),
                "test": (x[perm[:n_test]], y[perm[:n_test]])}
    test_split = "test" if "test" in blob else "val" if "val" in blob else None
    if test_split is None:
        raise DataError(f"{name}: {source} has train/ but neither val/ nor test/; {FOLDER_WAYS_ON}")
    (x_train, y_train), (x_test, y_test) = blob["train"], blob[test_split]
    x_val, y_val = blob["val"] if test_split == "test" and "val" in blob else (None, None)
    mean, std = channel_stats(x_train)
    return ImageData(x_train, y_train, x_test, y_test, list(blob["classes"]), mean, std, name,
                     source=str(source), x_val=x_val, y_val=y_val)


def hymenoptera(root: Path, size: int = DEFAULT_SIZE):
    """``hymenoptera_data/`` (a folder), else its .zip or .tar.gz, in the data root; else the
    original zip from download.pytorch.org. The zip's CRCs are checked when it is read. (No
    published checksum of the zip was at hand when this was written: a damaged download
    fails its CRCs or its JPEG decoding, with a message naming the file.)"""
    for candidate in ("hymenoptera_data", "hymenoptera_data.zip", "hymenoptera_data.tar.gz"):
        if (root / candidate).exists():
            source = root / candidate
            break
    else:
        with fetching("hymenoptera", root):
            source = download(HYMENOPTERA_URL, root / Path(HYMENOPTERA_URL).name)
    data = _image_data("hymenoptera", cached_decode("hymenoptera", source, size), source)
    if data.classes != HYMENOPTERA_CLASSES:
        raise DataError(f"hymenoptera: {source} has classes {data.classes}, "
                        f"expected {HYMENOPTERA_CLASSES}; pass --data-dir PATH to the original "
                        "hymenoptera_data (or use --dataset folder)")
    return data


def flowers102(root: Path, size: int = DEFAULT_SIZE):
    """Oxford Flowers-102 via torchvision (its archive and checksums), decoded once at ``size``."""
    from torchvision.datasets import Flowers102

    from common.io import atomic_write

    def open_split(split: str, download: bool):
        return Flowers102(str(root), split=split, download=download)

    try:
        splits = {s: open_split(s, False) for s in ("train", "val", "test")}
    except RuntimeError:  # "Dataset not found or corrupted": download (torchvision checks the md5s)
        with fetching("flowers102", root):
            splits = {s: open_split(s, s == "train") for s in ("train", "val", "test")}
    folder = root / "flowers-102"
    cache_file = cache_root() / f"flowers102-{size}px-{_signature(folder / 'imagelabels.mat')}.pt"
    blob = None
    if cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
        except Exception as e:
            print(f"the cache {cache_file} does not load ({one_line(e)}); decoding again",
                  flush=True)
    if blob is None:
        from PIL import Image

        print(f"decoding flowers102 once at {size}x{size} into {cache_file} ...", flush=True)
        blob = {}
        for split, ds in splits.items():
            images = []
            for path in ds._image_files:  # torchvision keeps the file list; decoding here is ours
                try:
                    with Image.open(path) as image:
                        images.append(resize_center_crop(image, size))
                except OSError as e:
                    raise DataError(f"flowers102: could not decode {path} ({one_line(e)}); "
                                    f"delete {folder} to download it again "
                                    "(or pass --data-dir PATH, or --smoke)") from None
            blob[f"x_{split}"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            blob[f"y_{split}"] = torch.tensor(ds._labels, dtype=torch.long)
        try:
            atomic_write(cache_file, lambda tmp: torch.save(blob, tmp))
        except OSError as e:
            print(f"warning: could not keep the decoded copy in {cache_file} ({e.strerror or e})")
    classes = list(getattr(splits["train"], "classes", None) or [str(i) for i in range(102)])
    mean, std = channel_stats(blob["x_train"])
    return ImageData(blob["x_train"], blob["y_train"], blob["x_test"], blob["y_test"], classes,
                     mean, std, "flowers102", source=str(folder), x_val=blob["x_val"],
                     y_val=blob["y_val"])


def image_folder(folder: Path, size: int = DEFAULT_SIZE):
    """Any ImageFolder: ``folder`` itself holds train/ and val/ or test/ (or class folders)."""
    blob = cached_decode("folder", folder, size, cache_key=f"folder-{folder.name}")
    return _image_data("folder", blob, folder)


# The loader and the twin's classes (flowers102's twin: 10 shapes/textures).
IMAGE_FOLDERS = {"hymenoptera": (hymenoptera, HYMENOPTERA_CLASSES),
                 "flowers102": (flowers102, [f"class{i}" for i in range(10)]),
                 "folder": (image_folder, ["class0", "class1"])}


def twin(name: str, size: int, n_train: int = 200, seed: int = 0):
    """The synthetic twin at ``size`` pixels: class-dependent shapes and textures (common.twins),
    hymenoptera's two classes (flowers102: 10, the most the generator draws)."""

    classes = IMAGE_FOLDERS[name][1]
    n_test = max(n_train // 4, 2 * len(classes))
    x, y = synthetic_images(n_train + n_test, 3, size, len(classes), seed)
    mean, std = channel_stats(x[:n_train])
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, mean, std,
                     f"{name} (synthetic twin)", synthetic=True, source="common.twins")


def load_images(name: str, data_dir: str | Path | None = None, size: int = DEFAULT_SIZE,
                smoke: bool = False, synthetic: bool = False, n_synthetic: int = 200,
                seed: int = 0):
    """An image-folder set decoded at ``size`` x ``size`` (see the module docstring), checked
    by ``common.data.validate``. ``smoke``/``synthetic``: the twin, with ``n_synthetic``
    training images."""

    if name not in IMAGE_FOLDERS:
        raise DataUnavailable(f"unknown image-folder set {name!r}; "
                              f"known: {', '.join(IMAGE_FOLDERS)}")
    if smoke or synthetic:
        data = twin(name, size, n_synthetic, seed)
    elif name == "folder":
        if not data_dir:
            raise DataUnavailable("--dataset folder reads the ImageFolder named by --data-dir; "
                                  f"{FOLDER_WAYS_ON}")
        data = image_folder(checked_root(name, data_dir), size)
    else:
        data = IMAGE_FOLDERS[name][0](checked_root(name, data_dir), size)
    validate(name, data, DAMAGED)
    if data.x_val is not None and (data.x_val.shape[1:] != data.x_train.shape[1:]
                                   or len(data.x_val) != len(data.y_val) or not len(data.x_val)):
        raise DataError(f"{name}: the validation split in {data.source} is empty or does not "
                        "match the training images")
    return data
