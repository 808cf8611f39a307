"""Classify images with an exported bundle using ONNX Runtime, NumPy and Pillow only: no PyTorch.

This file stands alone (it imports nothing from the labs), so it runs where torch is not
installed: copy it and a bundle folder (model.onnx + metadata.json, written by
week10_deploy/part2.py) to any machine with ``pip install onnxruntime numpy pillow``.
The service (week10_deploy/service.py) serves its ONNX backend with the same class,
``OnnxClassifier``, and the same image handling, ``decode_image`` and ``pixels_from_json``.

Run: python week10_deploy/standalone/predict_onnx.py BUNDLE IMAGE [IMAGE ...] [--top-k 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

BUNDLE_FORMAT = "dl-labs-bundle/1"
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
MAX_PIXELS = 4096 * 4096  # width x height above which an image is refused (decompression bombs)


class BadInput(ValueError):
    """An input the model cannot take, with the HTTP status the service answers it with:
    400 unreadable, 413 too large, 415 wrong content type, 422 readable but wrong
    shape/type/values."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- Images in, pixels in [0, 1] out ----
def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit grayscale (e.g. a 16-bit PNG) scaled down to 0..255, not clipped."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def prepare_image(image: Image.Image, shape: tuple[int, int, int]) -> np.ndarray:
    """A decoded image as the model takes it: (C, H, W) float32 in [0, 1].

    - turned upright as its EXIF orientation says (phone photos are often stored sideways);
    - transparency composited onto white, as a viewer shows it (RGBA, LA, palette with alpha);
    - the model's channels: grayscale to RGB repeats the gray, RGB to grayscale uses luminance;
    - resized to the model's H x W (bilinear, stretched if the aspect ratio differs).
    """
    channels, height, width = shape
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy()


def decode_image(data: bytes, shape: tuple[int, int, int],
                 max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, GIF, BMP, WebP, TIFF...) -> (C, H, W) float32 in [0, 1].

    Pillow reads only the header on ``open``: the size is checked before any pixel is decoded,
    so a small file that would decode to gigabytes (a decompression bomb) is refused cheaply."""
    if not data:
        raise BadInput(400, "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInput(400, "the upload is not an image Pillow can read "
                            "(send a PNG, JPEG, GIF, BMP or WebP)") from None
    except Image.DecompressionBombError:
        raise BadInput(413, f"the image has too many pixels "
                            f"(the limit is {max_pixels:,})") from None
    except Exception as e:  # a header that lies in other ways
        raise BadInput(400, f"the image cannot be read ({type(e).__name__}: {e})") from None
    if image.width * image.height > max_pixels:
        raise BadInput(413, f"the image is {image.width}x{image.height} = "
                            f"{image.width * image.height:,} pixels; the limit is {max_pixels:,}")
    try:
        image.load()  # decode now: a truncated file fails here ("image file is truncated")
        return prepare_image(image, shape)
    except Exception as e:
        raise BadInput(400, f"the image is damaged or cut short "
                            f"({type(e).__name__}: {e})") from None


def pixels_from_json(value, shape: tuple[int, int, int], batch: bool) -> np.ndarray:
    """JSON pixels -> (N, C, H, W) float32. One image is (C, H, W), or (H, W) for a one-channel
    model; ``batch``: a list of them. Values are numbers in [0, 1] (uint8 pixels divided by 255)."""
    channels, height, width = shape
    try:
        array = np.array(value)
    except (ValueError, TypeError):
        raise BadInput(422, "'pixels' is ragged or not a nested list of numbers "
                            "(rows of equal length)") from None
    if array.dtype.kind not in "iuf":
        ragged = "ragged (rows of unequal length) or not all numbers"
        what = ragged if array.dtype.kind == "O" else f"not numbers ({array.dtype})"
        raise BadInput(422, f"'pixels' is {what}; send numbers in [0, 1]")
    one = (channels, height, width)
    expected = [one] + ([(height, width)] if channels == 1 else [])
    shapes = [(len(array),) + s for s in expected] if batch and array.ndim else expected
    if tuple(array.shape) not in shapes:
        wanted = " or ".join(str(list(s)) for s in expected)
        raise BadInput(422, f"'pixels' has shape {list(array.shape)}; "
                            f"expected {'a list of ' if batch else ''}{wanted}")
    array = array.astype(np.float32).reshape((-1, *one))
    if batch and len(array) == 0:
        raise BadInput(422, "'pixels' holds no images")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise BadInput(422, "'pixels' values must be finite and in [0, 1] "
                            "(divide 0..255 values by 255)")
    return array


# ---- The model ----
def softmax(logits: np.ndarray) -> np.ndarray:
    """exp(z - max z) / sum exp(z - max z) per row: subtracting the max avoids overflow."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, classes: list[str], k: int) -> list[list[dict]]:
    """The k most probable classes per row, most probable first (ties: the lower index first)."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[i], "index": int(i), "probability": float(row[i])} for i in idx]
            for row, idx in zip(probabilities, order)]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_metadata(folder: str | Path) -> dict:
    """metadata.json of a bundle, and model.onnx checked against the SHA-256 it records (a cut
    copy, a flipped byte: ONNX Runtime would only say "InvalidProtobuf"). The full validation is
    week10_deploy/export.py's read_bundle, which the service uses; this file stands alone (it
    may run where the labs are not), so it repeats the checks it needs."""
    folder = Path(folder)
    path = folder / "metadata.json"
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(400, f"cannot read {path}: {e}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise BadInput(400, f"{path} is not the metadata of a dl-labs bundle")
    shape, classes, files = (metadata.get(k) for k in ("input_shape", "classes", "files"))
    shape_ok = isinstance(shape, list) and len(shape) == 3
    shape_ok = shape_ok and all(type(s) is int and s > 0 for s in shape)
    if not (shape_ok and isinstance(classes, list) and classes and isinstance(files, dict)):
        raise BadInput(400, f"{path} is damaged (input_shape, classes or files malformed)")
    model = folder / "model.onnx"
    if not model.is_file():
        raise BadInput(400, f"bundle {folder} has no model.onnx; export it again")
    if files.get("model.onnx") != file_sha256(model):
        raise BadInput(400, f"bundle {folder}: model.onnx does not match its recorded SHA-256 "
                            "(cut short or changed after export); export it again")
    return metadata


class OnnxClassifier:
    """A bundle's model.onnx in an ONNX Runtime session: pixels in [0, 1] -> class probabilities.

    ``threads``: ONNX Runtime threads for one call. A server handles several requests at once
    on its own threads, so one thread per call avoids oversubscribing the cores."""

    backend = "onnx"

    def __init__(self, folder: str | Path, metadata: dict | None = None, threads: int = 1):
        self.folder = Path(folder)
        self.metadata = metadata if metadata is not None else load_metadata(folder)
        self.classes: list[str] = list(self.metadata["classes"])
        self.shape: tuple[int, int, int] = tuple(self.metadata["input_shape"])
        self._load(threads)

    def _load(self, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 in [0, 1] -> (N, classes) logits. Thread-safe (ONNX Runtime's
        ``run`` may be called from several threads on one session)."""
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        return self.session.run([OUTPUT_NAME], feed)[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch).astype(np.float64))

    def classify(self, batch: np.ndarray, k: int = 3) -> list[list[dict]]:
        return top_k(self.probabilities(batch), self.classes, k)


def main(argv: list[str] | None = None) -> int:
    """Classify every image given; one that cannot be read is reported (one line on stderr, and
    under "errors" with --json) beside the others' answers, and the exit status is then 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder (model.onnx + metadata.json)")
    parser.add_argument("images", nargs="+",
                        help="image files (any size or mode: converted like the service does)")
    parser.add_argument("--top-k", type=int, default=3,
                        help="classes to show per image (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    try:
        model = OnnxClassifier(args.bundle)
    except BadInput as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except Exception as e:  # e.g. onnxruntime refusing a model.onnx that passed its checksum
        why = " ".join(str(e).split())[:200]
        print(f"error: cannot load {args.bundle}: {type(e).__name__}: {why}", file=sys.stderr)
        return 1
    images, errors = {}, {}
    for name in args.images:
        try:
            images[name] = decode_image(Path(name).read_bytes(), model.shape)
        except OSError as e:
            errors[name] = f"cannot read the file ({e.strerror or e})"
        except BadInput as e:
            errors[name] = e.message
    results = {}
    if images:  # the readable ones, in one batch
        answers = model.classify(np.stack(list(images.values())), args.top_k)
        results = dict(zip(images, answers))
    for name in args.images:  # in the order given: answers on stdout, unreadable images on stderr
        if name in errors:
            print(f"error: {name}: {errors[name]}", file=sys.stderr, flush=True)
        elif not args.json:
            shown = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in results[name])
            print(f"{name}: {shown}", flush=True)
    if args.json:
        meta = model.metadata
        print(json.dumps({"model": meta.get("name"), "version": meta.get("version"),
                          "predictions": results, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
