"""Part 2's loop without run folder, printing or checkpoints, for the week's self-work scripts
(optimizers.py, sweep.py, iris_cv.py), which train many small models."""

from __future__ import annotations

import math

import torch
from torch import nn

from common.loader import TensorLoader
from week02_mlp.data import Splits
from week02_mlp.part2 import MLP, Config, evaluate, setup, train_one_epoch


def train_quietly(cfg: Config, sets: Splits, device: torch.device) -> tuple[MLP, list[dict]]:
    """One row of train and validation metrics per epoch, ending early (not raising) once the
    loss is no longer finite: sweep.py marks such a run as diverged."""
    model, optimizer, scheduler, train_batches = setup(cfg, sets, device)
    val_batches = None
    if len(sets.x_val):
        val_batches = TensorLoader(sets.x_val, sets.y_val, 2048, device=device)
    loss_fn, rows = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), []
    for epoch in range(1, cfg.epochs + 1):
        train = train_one_epoch(model, train_batches, loss_fn, optimizer, scheduler)
        val = evaluate(model, val_batches) if val_batches else {}
        rows.append({"epoch": epoch, **{f"train_{k}": v for k, v in train.items()},
                     **{f"val_{k}": v for k, v in val.items()}})
        if not math.isfinite(train["loss"]):
            break
    return model, rows
