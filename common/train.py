"""Small calls for a training loop that the lab writes out itself.

A Part 2 writes its own ``train_one_epoch`` (forward, loss, ``backward()``, the week's own step
mechanics, ``optimizer.step()``, ``scheduler.step()``) and its own epoch loop; from here it takes
one-line helpers:

    check_finite(total_loss, epoch)      stop with a message when the loss became NaN or inf
    evaluate(model, val)                 mean loss and accuracy, in eval mode, without gradients
    predict(model, test)                 the model's outputs and the targets, for a confusion matrix

``fit`` is for self-work sweeps that repeat a loop their week already wrote out (many small
models in one script): it trains and evaluates, and neither prints nor saves anything.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common.device import autocast
from common.errors import NonFiniteLoss

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def check_finite(loss: torch.Tensor | float, epoch: int) -> None:
    """Raise NonFiniteLoss (one line, non-zero exit) when ``loss`` is NaN or infinite.

    Checked once per epoch on the summed loss (a NaN in any batch makes the sum NaN): one
    GPU sync per epoch instead of one per step. Checkpoints are written after the check, so
    the last one on disk is the last good epoch."""
    value = float(loss)
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteLoss(f"loss became {value} in epoch {epoch}; stopped, keeping the last "
                            "checkpoint (if any). Try a smaller --lr, or check the data for NaNs")


def accuracy_count(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Number of right answers in a batch, or None when accuracy means nothing (regression)."""
    if target.dtype != torch.long:
        return None
    return (output.argmax(dim=1) == target).sum()


@torch.inference_mode()
def predict(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (float32, on the CPU) and targets of every batch, concatenated, in eval
    mode (dropout off, BatchNorm with its running statistics)."""
    model.eval()
    device = next(model.parameters()).device
    outputs, targets = [], []
    for x, y in batches:
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            outputs.append(model(x.to(device, non_blocking=True)).float().cpu())
        targets.append(y.cpu())
    return torch.cat(outputs), torch.cat(targets)


def evaluate(model: nn.Module, batches: Batches, loss_fn=F.cross_entropy) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over ``batches``, in eval mode."""
    outputs, targets = predict(model, batches)
    metrics = {"loss": loss_fn(outputs, targets).item()}
    correct = accuracy_count(outputs, targets)
    if correct is not None:
        metrics["acc"] = correct.item() / len(targets)
    return metrics


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                scheduler=None, loss_fn=F.cross_entropy) -> dict[str, float]:
    """One pass of the plain loop every Part 2 writes out: forward, loss, backward, step, and a
    per-batch ``scheduler.step()`` when given. Mean loss (and accuracy) over the pass."""
    model.train()
    device = next(model.parameters()).device
    total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            output = model(x)
            loss = loss_fn(output, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach().float() * len(x)
        right = accuracy_count(output.detach(), y)
        correct = correct + right if right is not None else correct
        seen += len(x)
    if seen == 0:
        raise ValueError("train_epoch got no batches "
                         "(is the training set smaller than one batch with drop_last?)")
    metrics = {"loss": (total_loss / seen).item()}
    if y.dtype == torch.long:  # classification: accuracy means something
        metrics["acc"] = (correct / seen).item()
    return metrics


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train: Batches, val: Batches | None,
        epochs: int, scheduler=None) -> list[dict]:
    """``epochs`` passes of ``train_epoch`` (cross-entropy; ``scheduler`` stepped per batch), each
    followed by ``evaluate`` on ``val``: one metrics row per epoch. No printing, no checkpoints:
    for sweeps over many small models whose loop the week already showed."""
    rows = []
    for epoch in range(1, epochs + 1):
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        metrics = train_epoch(model, train, optimizer, scheduler)
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in metrics.items()}}
        check_finite(row["train_loss"], epoch)
        if val is not None:
            row.update({f"val_{k}": v for k, v in evaluate(model, val).items()})
        rows.append(row)
    return rows
