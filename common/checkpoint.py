"""Checkpoints: model + optimizer + scheduler + epoch + config in one file.

Saved atomically (temp file, then rename) and loaded with ``weights_only=True``, which
refuses to unpickle arbitrary objects: a checkpoint from the internet cannot run code on load.
That is why the config is stored as a plain dict and not as the dataclass itself.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import CheckpointError
from common.io import atomic_write

FORMAT = "dl-labs-checkpoint/1"


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    config: dict | None = None,
    **extra: Any,
) -> Path:
    """Write everything needed to resume training (or just to use the model) to ``path``."""
    payload = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "config": _plain(config or {}),
        "extra": _plain(extra),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _plain(value: Any) -> Any:
    """Reduce to types that ``weights_only=True`` loading accepts (dict/list/str/numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return value
    return str(value)


def read_checkpoint(path: str | Path) -> dict:
    """Load and validate a checkpoint file; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (runs are under --out)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({reason[:120]}); "
            "use another checkpoint or start without --resume"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint written by these labs (no '{FORMAT}' marker); "
            "to use a bare state_dict, call model.load_state_dict(torch.load(path, weights_only=True))"
        )
    return payload


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict:
    """Restore ``model`` (and optimizer/scheduler if given) from ``path``; returns the payload
    (``epoch``, ``config``, ``extra``) so the caller can resume where it stopped."""
    payload = read_checkpoint(path)
    expected = type(model).__name__
    if payload["model_class"] != expected:
        raise CheckpointError(
            f"{path} holds a {payload['model_class']}, not a {expected}; pass a checkpoint of this model"
        )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{path} is a {expected} of another shape ({detail[:150]}); "
            "use the same model settings as the run that saved it"
        ) from None
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return payload
