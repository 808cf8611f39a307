"""Week 10: export a trained model for inference: torch.export, ONNX, and a bundle of both.

    bundle = write_bundle("bundles/mnist_cnn", model, example, name="mnist_cnn",
                          classes=data.classes, mean=data.mean, std=data.std)
    meta = read_bundle(bundle)    # validated metadata; a damaged folder is one LabError line

Two exporters, one capture. ``torch.export.export`` runs the model once on symbolic shapes and
records every tensor operation (ATen ops) in an FX graph: no Python control flow survives, so an
``if`` on a tensor's value must become ``torch.cond``. The ONNX exporter
(``torch.onnx.export(..., dynamo=True)``, the default since PyTorch 2.9) starts from that same
capture and translates the graph to ONNX operators. TorchScript (``torch.jit.trace/script``) is
the deprecated legacy path (part1.py shows why).

A bundle folder holds ``model.onnx`` (for ONNX Runtime), ``model.pt2`` (``torch.export``, for
PyTorch without the Python class) and ``metadata.json`` (classes, input shape, checksums...).
Both graphs take float pixels in [0, 1], shape (N, C, H, W), any N: the training normalization
``(x - mean) / std`` is baked INTO them, so a client only divides uint8 pixels by 255 and
cannot forget, or get wrong, the statistics of the training set.

Why ``import torch`` sits inside the functions: the service reads bundles with ``read_bundle``,
and its ONNX backend (the Docker image) runs without PyTorch. Reading needs json and hashlib
only; exporting needs torch, onnx and onnxscript (the ``deploy`` extra).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import LabError, one_line
from common.io import atomic_write, atomic_write_text, sha256

if TYPE_CHECKING:
    import torch
    from torch import nn

BUNDLE_FORMAT = "dl-labs-bundle/1"
ONNX_FILE, PROGRAM_FILE, METADATA_FILE = "model.onnx", "model.pt2", "metadata.json"
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"  # the ONNX graph's input and output names
OPSET = 18  # the ONNX operator set the exporter targets (ONNX Runtime 1.16+ runs it)
# Exported graphs are checked against eager PyTorch at this batch size (not the example's) and
# tolerance: float32 kernels that add in another order differ by ~1e-6 relative, not more.
CHECK_BATCH, CHECK_RTOL, CHECK_ATOL = 3, 1e-4, 1e-5
DEPLOY_EXTRA = 'pip install -e ".[deploy]"'


class ExportError(LabError):
    """A model could not be exported, or an export does not match the eager model."""


class BundleError(LabError):
    """A bundle folder is missing, damaged, or not one written by ``write_bundle``."""


def _needs(module: str):
    """Import an optional dependency of the deploy extra, or say in one line how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed; it comes with the deploy extra: "
                          f"{DEPLOY_EXTRA}") from None


# ---- 1. The capture: eval mode, a batch axis that stays a symbol ----
@contextmanager
def eval_mode(model: nn.Module):
    """Exporters record what the model does NOW: in train mode that is random dropout masks and
    BatchNorm on batch statistics. Export in eval mode, then give the caller its mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _export_example(example: torch.Tensor) -> torch.Tensor:
    """An example batch of two. torch.export specializes sizes 0 and 1 (a batch of 1 would be
    baked in as a constant), so a dynamic batch axis needs an example with batch >= 2."""
    if example.ndim < 2:
        raise ExportError("the example input must have a batch axis first, found shape "
                          f"{tuple(example.shape)}")
    return example[:1].expand(2, *example.shape[1:]).contiguous()


def _batch_dims() -> tuple[dict, ...]:
    """``dynamic_shapes`` for a one-input model: axis 0 is a symbol "batch", the rest fixed."""
    import torch

    return ({0: torch.export.Dim("batch", min=1, max=2**16)},)


def export_program(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """``torch.export`` the model (eval mode, dynamic batch axis) to a .pt2 file, atomically.
    Load it with ``torch.export.load(path).module()``: no class definition needed, but
    torch.export.load unpickles, so load only files you trust."""
    import torch

    x = _export_example(example)
    with eval_mode(model):
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=_batch_dims())
        except Exception as e:  # a data-dependent branch, an unsupported op: the exporter's reason
            raise ExportError(f"torch.export failed for {type(model).__name__}: "
                              f"{one_line(e)}") from None

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save dislikes the .tmp suffix
            torch.export.save(program, f)

    return atomic_write(path, save)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """ONNX with the torch.export-based exporter: input ``pixels`` with a dynamic batch axis,
    output ``logits``; written atomically, then checked by ``onnx.checker`` (structure, types,
    shapes, the opset's operator schemas)."""
    import torch

    onnx = _needs("onnx")
    _needs("onnxscript")  # the exporter translates ATen ops to ONNX operators with it
    x = _export_example(example)
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_batch_dims(),
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=OPSET, verbose=False)
        except Exception as e:
            raise ExportError(f"ONNX export failed for {type(model).__name__}: "
                              f"{one_line(e)}") from None
    # One self-contained file (weights inside; fine below ONNX's 2 GB protobuf limit).
    path = atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        Path(path).unlink(missing_ok=True)
        raise ExportError(f"the exported ONNX model fails onnx.checker: {one_line(e)}") from None
    return Path(path)


# ---- 2. The normalization goes inside the graph ----
def normalized(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """``model`` behind its input normalization: it takes pixels in [0, 1]."""
    import torch
    from torch import nn

    class Normalized(nn.Module):
        """``model((x - mean) / std)``: the statistics become constants of the exported graph."""

        def __init__(self):
            super().__init__()
            self.model = model
            # (1, C, 1, 1): broadcasts over the batch and the pixels
            self.register_buffer("mean", torch.tensor(mean).float().view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).float().view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) in [0, 1]
            return self.model((x - self.mean) / self.std)  # (N, classes)

    return Normalized()


# ---- 3. Trust, but verify: both files against eager PyTorch ----
def check_exports(eager: nn.Module, folder: Path, example: torch.Tensor) -> dict[str, float]:
    """Run both exported files on random pixels at a batch size other than the example's and
    compare with the eager model. An exporter can be wrong without failing (a branch it baked
    in, a batch size it specialized, an op it translated differently): only this check sees it."""
    import numpy as np
    import torch

    ort = _needs("onnxruntime")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(CHECK_BATCH, *example.shape[1:], generator=generator)  # (3, C, H, W)
    with torch.inference_mode():
        expected = eager.eval()(x).numpy()  # (3, classes)
        from_program = torch.export.load(folder / PROGRAM_FILE).module()(x).numpy()
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    from_onnx = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diffs = {}
    for name, got in (("onnx", from_onnx), ("pt2", from_program)):
        if got.shape != expected.shape:
            raise ExportError(f"the exported {name} model returns shape {got.shape}, eager "
                              f"PyTorch {expected.shape}; no bundle written")
        diff = diffs[f"{name}_max_abs_diff"] = float(np.abs(got - expected).max())
        if not np.allclose(got, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
            raise ExportError(f"the exported {name} model does not match eager PyTorch at batch "
                              f"{CHECK_BATCH} (max abs difference {diff:.3g}; allowed: rtol "
                              f"{CHECK_RTOL}, atol {CHECK_ATOL}); no bundle written")
    return diffs


# ---- 4. The bundle: what a service loads ----
def write_bundle(folder: str | Path, model: nn.Module, example: torch.Tensor, *, name: str,
                 classes: list[str], mean: tuple[float, ...], std: tuple[float, ...],
                 extra: dict | None = None) -> Path:
    """Export ``model`` (normalization baked in) to ``folder/model.onnx`` and ``model.pt2``,
    check both against eager PyTorch at another batch size, then write ``metadata.json``
    (last: a folder without it is not a bundle, so a failed export leaves none).

    ``example``: one or more inputs (N, C, H, W) in [0, 1]; only their shape matters.
    ``mean``/``std``: the per-channel statistics the model was trained with (``ImageData``'s).
    """
    import torch

    channels = example.shape[1] if example.ndim == 4 else 0
    if example.ndim != 4 or len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ExportError("write_bundle needs images (N, C, H, W) and one positive std per "
                          f"channel; got example {tuple(example.shape)}, mean {tuple(mean)}, "
                          f"std {tuple(std)}")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ExportError("write_bundle needs the class names as a list of strings")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METADATA_FILE).unlink(missing_ok=True)  # an older bundle here stops being one
    # On the CPU: the bundle is for CPU inference (a GPU-trained model is copied, not moved).
    wrapped = normalized(copy.deepcopy(model).cpu(), tuple(map(float, mean)),
                         tuple(map(float, std)))
    example = example.detach().float().cpu()
    export_program(wrapped, example, folder / PROGRAM_FILE)
    export_onnx(wrapped, example, folder / ONNX_FILE)
    checked = check_exports(wrapped, folder, example)
    onnx_hash = sha256(folder / ONNX_FILE)
    metadata = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "classes": list(classes),
        "input_shape": [int(s) for s in example.shape[1:]],
        "input_range": [0.0, 1.0],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "version": onnx_hash[:12],  # changes whenever the weights do
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "opset": OPSET,
        "files": {ONNX_FILE: onnx_hash, PROGRAM_FILE: sha256(folder / PROGRAM_FILE)},
        "checked": {"batch": CHECK_BATCH, "rtol": CHECK_RTOL, "atol": CHECK_ATOL, **checked},
        "extra": dict(extra or {}),
    }
    atomic_write_text(folder / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    return folder


# What metadata.json must hold, and the types: anything else is damaged or foreign.
REQUIRED = {"format": str, "name": str, "classes": list, "input_shape": list, "mean": list,
            "std": list, "version": str, "created": str, "torch": str, "files": dict, "extra": dict}
REMEDY = "pass a bundle folder written by write_bundle (e.g. by week10_deploy/part2.py)"


def read_bundle(folder: str | Path, verify_files: bool = True) -> dict:
    """The metadata of a bundle folder, validated; every problem is one ``BundleError`` line.
    ``verify_files``: also check the model files against their recorded SHA-256 (a cut copy,
    a flipped byte). This catches damage, not tampering: whoever can rewrite the model can
    rewrite the checksums too, so serve bundles you made."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise BundleError(f"bundle {folder} {what}; {REMEDY}")
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {folder} has no {METADATA_FILE}; {REMEDY}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"bundle {folder}: {METADATA_FILE} is damaged ({one_line(e, 100)}); "
                          f"{REMEDY}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder / METADATA_FILE} is not the metadata of a dl-labs bundle (no "
                          f"'{BUNDLE_FORMAT}' marker); {REMEDY}")
    for key, kind in REQUIRED.items():
        if not isinstance(metadata.get(key), kind):
            raise BundleError(f"bundle {folder} is damaged: metadata '{key}' is missing or not a "
                              f"{kind.__name__}")
    shape, classes = metadata["input_shape"], metadata["classes"]
    if len(shape) != 3 or not all(type(s) is int and s > 0 for s in shape):
        raise BundleError(f"bundle {folder} is damaged: input_shape must be [C, H, W] positive "
                          f"integers, got {shape}")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"bundle {folder} is damaged: classes must be a non-empty list of names")
    for key in ("mean", "std"):
        values = metadata[key]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if len(values) != shape[0] or not finite:
            raise BundleError(f"bundle {folder} is damaged: {key} needs {shape[0]} finite numbers, "
                              f"got {values}")
    if min(metadata["std"]) <= 0:
        raise BundleError(f"bundle {folder} is damaged: std must be positive, got "
                          f"{metadata['std']}")
    for file in (ONNX_FILE, PROGRAM_FILE):
        path, recorded = folder / file, metadata["files"].get(file)
        if not path.is_file():
            raise BundleError(f"bundle {folder} has no {file}; export it again ({REMEDY})")
        if verify_files and recorded != sha256(path):
            raise BundleError(f"bundle {folder}: {file} does not match its recorded SHA-256 (cut "
                              "short or changed after export); export it again")
    return metadata


def bundle_files(folder: str | Path) -> dict[str, Path]:
    """Where a bundle keeps its files: {"onnx": ..., "pt2": ..., "metadata": ...}."""
    folder = Path(folder).expanduser()
    return {"onnx": folder / ONNX_FILE, "pt2": folder / PROGRAM_FILE,
            "metadata": folder / METADATA_FILE}


def describe_bundle(metadata: dict[str, Any]) -> str:
    c, h, w = metadata["input_shape"]
    return (f"{metadata['name']} v{metadata['version']}: {len(metadata['classes'])} classes, "
            f"input {c}x{h}x{w}")
