"""Exporting a trained model for inference: ONNX, a torch.export program, and a bundle of both.

    bundle = write_bundle("bundles/mnist_cnn", model, example, name="mnist_cnn", classes=data.classes,
                          mean=data.mean, std=data.std)
    meta = read_bundle(bundle)          # validated metadata; a damaged folder is one LabError line

A bundle folder holds ``model.onnx`` (for ONNX Runtime), ``model.pt2`` (``torch.export``, for
PyTorch without the Python class) and ``metadata.json`` (classes, input shape, checksums...).
Both graphs take float pixels scaled to [0, 1], shape (N, C, H, W), any N: the training
normalization ``(x - mean) / std`` is baked INTO them (``Normalized``), so a client only divides
uint8 pixels by 255 and cannot forget, or get wrong, the statistics of the training set.

Two exporters, one capture: since PyTorch 2.5 both start from ``torch.export``, which runs the
model once on symbolic shapes and records every tensor operation in an FX graph (no Python
control flow survives: an ``if`` on a tensor's value must become ``torch.cond``). The ONNX
exporter (``torch.onnx.export(..., dynamo=True)``, the default since 2.9) translates that graph
to ONNX operators. TorchScript (``torch.jit.trace/script``) is the deprecated legacy path.

This module imports torch only inside the functions that export: ``read_bundle`` works in an
environment without torch (the ONNX side of a deployment needs onnxruntime, numpy and Pillow).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import LabError, one_line
from common.io import atomic_write, atomic_write_text

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
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed; it comes with the deploy extra: {DEPLOY_EXTRA}") from None


def _export_example(example: torch.Tensor) -> torch.Tensor:
    """An example batch of two. torch.export specializes sizes 0 and 1 (a batch of 1 would be
    baked in as a constant), so a dynamic batch axis needs an example with batch >= 2."""
    if example.ndim < 2:
        raise ExportError(f"the example input must have a batch axis first, found shape {tuple(example.shape)}")
    return example[:1].expand(2, *example.shape[1:]).contiguous()


def _batch_dims() -> tuple[dict, ...]:
    """``dynamic_shapes`` for a one-input model: axis 0 is a symbol "batch", the rest fixed."""
    import torch

    return ({0: torch.export.Dim("batch", min=1, max=2**16)},)


def _to_eval(model: nn.Module) -> bool:
    was_training = model.training
    model.eval()  # Dropout off, BatchNorm on its running statistics: what inference means
    return was_training


def export_program(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """``torch.export`` the model in eval mode with a dynamic batch axis and save it as a .pt2
    file (atomically). Load it with ``torch.export.load(path).module()``: no class definition
    needed, but torch.export.load unpickles, so load only files you trust."""
    import torch

    was_training = _to_eval(model)
    try:
        x = _export_example(example)
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=_batch_dims())
        except Exception as e:  # a data-dependent branch, an unsupported op: the exporter's reason
            raise ExportError(f"torch.export failed for {type(model).__name__}: {one_line(e)}") from None
    finally:
        model.train(was_training)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save would not like the .tmp suffix
            torch.export.save(program, f)

    return atomic_write(path, save)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export to ONNX with the current (torch.export-based) exporter, input ``pixels`` with a
    dynamic batch axis, output ``logits``; write it atomically, then check it with
    ``onnx.checker`` (structure, types and shapes, the opset's operator schemas)."""
    import warnings

    import torch

    onnx = _needs("onnx")
    _needs("onnxscript")  # the exporter translates ATen ops to ONNX with it
    was_training = _to_eval(model)
    try:
        x = _export_example(example)
        with warnings.catch_warnings():  # the exporter's notes on its own internals
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_batch_dims(),
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            opset_version=OPSET, verbose=False)
            except Exception as e:
                raise ExportError(f"ONNX export failed for {type(model).__name__}: {one_line(e)}") from None
    finally:
        model.train(was_training)
    # One self-contained file (weights inside; fine below ONNX's 2 GB protobuf limit).
    path = atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        Path(path).unlink(missing_ok=True)
        raise ExportError(f"the exported ONNX model fails onnx.checker: {one_line(e)}") from None
    return Path(path)


# ----------------------------------------------------------------------------------------
# Bundles: the model as a service loads it
# ----------------------------------------------------------------------------------------
def _normalized(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """The model behind its input normalization: takes pixels in [0, 1]."""
    import torch
    from torch import nn

    class Normalized(nn.Module):
        """``model((x - mean) / std)``: the statistics become constants of the exported graph."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model((x - self.mean) / self.std)

    return Normalized()


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_exports(wrapped: nn.Module, folder: Path, example: torch.Tensor) -> dict[str, float]:
    """Run both exported files at a batch size other than the example's and compare with eager."""
    import numpy as np
    import torch

    ort = _needs("onnxruntime")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(CHECK_BATCH, *example.shape[1:], generator=generator, dtype=torch.float32)
    with torch.inference_mode():
        expected = wrapped.eval()(x).numpy()
        from_program = torch.export.load(folder / PROGRAM_FILE).module()(x).numpy()
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    from_onnx = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diffs = {}
    for name, got in (("onnx", from_onnx), ("pt2", from_program)):
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=CHECK_RTOL, atol=CHECK_ATOL):
            raise ExportError(f"the exported {name} model does not match eager PyTorch at batch {CHECK_BATCH} "
                              f"(max abs difference {np.abs(got - expected).max():.3g})")
        diffs[f"{name}_max_abs_diff"] = float(np.abs(got - expected).max())
    return diffs


def write_bundle(folder: str | Path, model: nn.Module, example: torch.Tensor, *, name: str, classes: list[str],
                 mean: tuple[float, ...], std: tuple[float, ...], extra: dict | None = None) -> Path:
    """Export ``model`` (normalization baked in) to ``folder/model.onnx`` and ``folder/model.pt2``,
    check both against eager PyTorch at another batch size, and write ``folder/metadata.json``.

    ``example``: one or more inputs (N, C, H, W) in [0, 1], only their shape matters.
    ``mean``/``std``: the per-channel statistics the model was trained with (``ImageData``'s).
    """
    import torch

    channels = example.shape[1] if example.ndim == 4 else 0
    if example.ndim != 4 or len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ExportError(f"write_bundle needs images (N, C, H, W) and one positive std per channel; got example "
                          f"{tuple(example.shape)}, mean {tuple(mean)}, std {tuple(std)}")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ExportError("write_bundle needs the class names as a list of strings")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # On the CPU: the bundle is for CPU inference (a GPU-trained model is copied, not moved).
    wrapped = _normalized(copy.deepcopy(model).cpu(), tuple(map(float, mean)), tuple(map(float, std)))
    example = example.detach().float().cpu()
    export_program(wrapped, example, folder / PROGRAM_FILE)
    export_onnx(wrapped, example, folder / ONNX_FILE)
    checked = _check_exports(wrapped, folder, example)
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
REQUIRED = {"format": str, "name": str, "classes": list, "input_shape": list, "mean": list, "std": list,
            "version": str, "created": str, "torch": str, "files": dict, "extra": dict}


def read_bundle(folder: str | Path, verify_files: bool = True) -> dict:
    """The metadata of a bundle folder, validated; every problem is one ``BundleError`` line.
    ``verify_files``: also check the model files against their recorded SHA-256 (a cut copy,
    a flipped byte). This catches damage, not tampering: whoever can rewrite the model can
    rewrite the checksums too, so serve bundles you made."""
    folder = Path(folder).expanduser()
    remedy = "pass a folder written by common.export.write_bundle (e.g. by week10_deploy/part2.py)"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise BundleError(f"bundle {folder} {what}; {remedy}")
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except FileNotFoundError:
        raise BundleError(f"bundle {folder} has no {METADATA_FILE}; {remedy}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"bundle {folder}: {METADATA_FILE} is damaged ({one_line(e, 100)}); {remedy}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder / METADATA_FILE} is not the metadata of a dl-labs bundle (no '{BUNDLE_FORMAT}' "
                          f"marker); {remedy}")
    for key, kind in REQUIRED.items():
        if not isinstance(metadata.get(key), kind):
            raise BundleError(f"bundle {folder} is damaged: metadata '{key}' is missing or not a {kind.__name__}")
    shape, classes = metadata["input_shape"], metadata["classes"]
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise BundleError(f"bundle {folder} is damaged: input_shape must be [C, H, W] positive integers, got {shape}")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"bundle {folder} is damaged: classes must be a non-empty list of names")
    for key in ("mean", "std"):
        values = metadata[key]
        if len(values) != shape[0] or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise BundleError(f"bundle {folder} is damaged: {key} needs {shape[0]} finite numbers, got {values}")
    if min(metadata["std"]) <= 0:
        raise BundleError(f"bundle {folder} is damaged: std must be positive, got {metadata['std']}")
    for file in (ONNX_FILE, PROGRAM_FILE):
        path, recorded = folder / file, metadata["files"].get(file)
        if not path.is_file():
            raise BundleError(f"bundle {folder} has no {file}; export it again ({remedy})")
        if verify_files and recorded != sha256(path):
            raise BundleError(f"bundle {folder}: {file} does not match its recorded SHA-256 (cut short or changed "
                              f"after export); export it again")
    return metadata


def bundle_files(folder: str | Path) -> dict[str, Path]:
    """Where a bundle keeps its files: {"onnx": ..., "pt2": ..., "metadata": ...}."""
    folder = Path(folder).expanduser()
    return {"onnx": folder / ONNX_FILE, "pt2": folder / PROGRAM_FILE, "metadata": folder / METADATA_FILE}


def describe_bundle(metadata: dict[str, Any]) -> str:
    c, h, w = metadata["input_shape"]
    return f"{metadata['name']} v{metadata['version']}: {len(metadata['classes'])} classes, input {c}x{h}x{w}"
