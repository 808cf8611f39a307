"""Checkpoints: model + optimizer + scheduler + epoch + config (+ random-number state) in one file.

Saved atomically (temp file, then rename) and loaded with ``weights_only=True``, which
refuses to unpickle arbitrary objects: a checkpoint from the internet cannot run code on load.
That is why the config is stored as a plain dict and not as the dataclass itself.

Resuming is exact: the file also holds torch's random-number state, so dropout masks after a
resume are the ones the uninterrupted run would have drawn (``TensorLoader.set_epoch`` does
the same for the order of the batches and their augmentation).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import CheckpointError, one_line
from common.io import atomic_write

FORMAT = "dl-labs-checkpoint/1"
# Entries every checkpoint has, and their types: anything else is a damaged or foreign file.
REQUIRED = {"format": str, "model_class": str, "model": dict, "epoch": int, "config": dict,
            "extra": dict}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    config: dict | None = None,
    script: str = "",
    **extra: Any,
) -> Path:
    """Write everything needed to resume training (or just to use the model) to ``path``.
    ``script`` ("week03/part2") lets a resume refuse another script's checkpoint."""
    payload = {
        "format": FORMAT,
        "script": script,
        "model_class": type(model).__name__,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "config": _plain(config or {}),
        "rng": rng_state(),
        "extra": _plain(extra),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def rng_state() -> dict[str, Any]:
    """torch's random-number generators (CPU, and every GPU's): what dropout draws from."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if ("cuda" in state and torch.cuda.is_available()
            and len(state["cuda"]) == torch.cuda.device_count()):
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """Reduce to types that ``weights_only=True`` loading accepts (dict/list/str/numbers)."""
    if isinstance(value, dict):  # int keys stay ints: an optimizer's state_dict is keyed by them
        return {k if isinstance(k, int) else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return value
    return str(value)


def _reason(e: BaseException) -> str:
    """Why torch could not load a file, in words that fit a damaged checkpoint."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("Weights only load failed"):  # torch's long advice does not fit damage
        text = "not a plain tensors-and-numbers PyTorch file"
    elif isinstance(e, (EOFError, OSError)):  # e.g. "[Errno 22] Invalid argument" from a cut zip
        text = f"cut short or damaged: {text}"
    elif isinstance(e, KeyError) or len(text) < 8:  # e.g. KeyError('101') for a text file
        text = f"unreadable: {type(e).__name__} {text}"
    return one_line(ValueError(text), width=140)


# torch.save's format before PyTorch 1.6 (torch.load still reads it) pickles this number first.
LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def read_checkpoint(path: str | Path, instead: str = "start without --resume") -> dict:
    """Load and validate a checkpoint file; every failure is a one-line CheckpointError.
    ``instead``: the advice after "use another checkpoint or" (the script's own flag)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the checkpoint.pt file in a run folder")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; "
                              "check the path (runs are under --out)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); "
                              f"use another checkpoint or {instead}")
    try:
        # torch.load does not check the CRCs: flipped bytes would load silently.
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"{bad} fails its checksum")
        else:  # torch's legacy format (before 1.6, often a .th file): no CRCs; torch.load reads it
            with path.open("rb") as f:
                if LEGACY_MAGIC not in f.read(32):
                    raise ValueError("cut short, or neither torch.save's zip format nor the legacy")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut zip, random bytes, text, pickles with code: "not a checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({_reason(e)}); "
            f"use another checkpoint or {instead}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint written by these labs (no '{FORMAT}' marker); "
            "to use a bare state_dict, call "
            "model.load_state_dict(torch.load(path, weights_only=True))"
        )
    for key, kind in REQUIRED.items():
        value = payload.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"checkpoint {path} is damaged (its '{key}' entry is missing or "
                                  f"not a {kind.__name__}); use another checkpoint or {instead}")
    if not all(isinstance(v, torch.Tensor) for v in payload["model"].values()):
        raise CheckpointError(f"checkpoint {path} is damaged (its weights are not all tensors)")
    return payload


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    script: str = "",
    restore_rng: bool = True,
) -> dict:
    """Restore ``model`` (and optimizer/scheduler if given, and the random-number state) from
    ``path``; returns the payload (``epoch``, ``config``, ``extra``) so the caller can go on
    where it stopped. ``script`` set: refuse a checkpoint that another script wrote."""
    payload = read_checkpoint(path)
    if script and payload.get("script") and payload["script"] != script:
        raise CheckpointError(f"{path} was written by {payload['script']}, not {script}; "
                              f"resume it with that script, or pass a checkpoint of this one")
    expected = type(model).__name__
    if payload["model_class"] != expected:
        raise CheckpointError(
            f"{path} holds a {payload['model_class']}, not a {expected}; "
            "pass a checkpoint of this model"
        )
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else _reason(e)
        raise CheckpointError(
            f"{path} is a {expected} of another shape ({one_line(ValueError(detail), 150)}); "
            "use the same model settings as the run that saved it"
        ) from None
    try:
        if optimizer is not None and payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload.get("scheduler") is not None:
            restore_scheduler(scheduler, payload["scheduler"])
        if restore_rng and isinstance(payload.get("rng"), dict) and "cpu" in payload["rng"]:
            set_rng_state(payload["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(
            f"{path}: its optimizer or scheduler state does not fit this run ({_reason(e)}); "
            "use the same settings as the run that saved it") from None
    return payload



def resume_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any | None = None, script: str = "") -> dict:
    """Where a training loop starts: ``{"epoch": 0}`` when ``path`` is empty; else everything
    is loaded from that checkpoint (``load_checkpoint``) and the dict holds its epoch and the
    extras the loop saved with it. ``Run.restore`` calls it; so do the ranks that have no run
    folder under torchrun."""
    if not path:
        return {"epoch": 0}
    payload = load_checkpoint(path, model, optimizer, scheduler, script=script)
    return {**payload["extra"], "epoch": payload["epoch"]}

# Scheduler entries that change as it steps; the rest describe its plan (peak, length, shape).
_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
             "best", "num_bad_epochs", "cooldown_counter"}


def restore_scheduler(scheduler: Any, state: dict) -> None:
    """Load a scheduler's saved state, or, if the plan changed (``--resume ... --epochs 20`` on a
    run planned for 10: OneCycle's length, cosine's T_max), replay its saved number of steps
    on the new plan, so the learning rate is where the longer schedule has it at that step."""
    fresh = scheduler.state_dict()
    same_plan = all(fresh.get(k) == v for k, v in state.items() if k not in _PROGRESS)
    if same_plan:
        scheduler.load_state_dict(state)
        return
    steps = int(state.get("last_epoch", 0))
    # Replay from the plan's start, not from the saved (already decayed) learning rate.
    for group in scheduler.optimizer.param_groups:
        if "initial_lr" in group:
            group["lr"] = group["initial_lr"]
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        for _ in range(steps):
            scheduler.step()
