"""The training loop: plain PyTorch, one screen.

    loop = fit(model, optimizer, train_batches, val_batches, epochs=10, scheduler=one_cycle, run=run)

``train_epoch`` is the loop every lab teaches (forward, loss, ``zero_grad``, ``backward``,
``step``); ``fit`` repeats it for ``epochs``, evaluates after each, logs a metrics row and saves
a checkpoint (when given a ``run``), and can resume from one exactly. The ``scheduler`` given
to ``fit`` is stepped after every batch (one-cycle, warmup). Everything else hooks in through
``callbacks``: objects with ``on_after_backward`` (gradient clipping), ``on_step_end`` and
``on_epoch_end`` (per-epoch or plateau schedules, early stopping: Week 4 writes those), and
``state_dict`` / ``load_state_dict`` so that a resumed run has their state too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint
from common.device import autocast, grad_scaler
from common.errors import NonFiniteLoss

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Loop:
    """Where training stands; what callbacks read (and ``stop`` is how they end it)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    epoch: int = 0  # the epoch in progress (1-based); after fit: the last one done
    step: int = 0  # optimizer steps taken since the start of training
    loss: torch.Tensor | None = None  # the last batch's loss (detached)
    row: dict = field(default_factory=dict)  # the metrics of the epoch that just ended
    rows: list[dict] = field(default_factory=list)  # one row per epoch
    stop: bool = False  # a callback sets it to end training after this epoch

    @property
    def last(self) -> dict:
        return self.rows[-1] if self.rows else {}


class Callback:
    """Hooks into ``fit``; override the ones you need."""

    def on_after_backward(self, loop: Loop) -> None:
        """Gradients are in ``.grad`` and the optimizer has not stepped yet (clip here)."""

    def on_step_end(self, loop: Loop) -> None:
        """After each optimizer step; ``loop.loss`` is that batch's loss."""

    def on_epoch_end(self, loop: Loop) -> None:
        """After validation; ``loop.row`` holds the epoch's metrics, ``loop.stop = True`` ends training."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (on resume)."""


def _correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Number of right answers in a batch, or None when accuracy means nothing (regression)."""
    if target.dtype != torch.long:
        return None
    return (output.argmax(dim=1) == target).sum()


def _check_finite(loss: torch.Tensor, loop: Loop, where: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss became {loss.item()} in epoch {loop.epoch} ({where}); stopped, keeping the "
                            "last checkpoint (if any). Try a smaller --lr, or check the data for NaNs")


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, loss_fn, loop: Loop,
                scheduler=None, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """One pass over ``batches``: forward, loss, zero_grad, backward, step. Returns mean loss
    (and accuracy, for classification) over the pass."""
    model.train()
    device = next(model.parameters()).device
    scaler = grad_scaler(device)  # active only for float16 autocast (older GPUs)
    total_loss, total_correct = torch.zeros((), device=device), torch.zeros((), device=device)
    seen, has_accuracy = 0, True
    check_every = 1 if device.type == "cpu" else 50  # the NaN check waits for the GPU: not every step
    for x, y in tqdm(batches, desc=f"epoch {loop.epoch}", leave=False, disable=None):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            output = model(x)
            loss = loss_fn(output, y)
        if loop.step % check_every == 0:
            _check_finite(loss.detach(), loop, f"step {loop.step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradients for the callbacks (a no-op without float16)
        for callback in callbacks:
            callback.on_after_backward(loop)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        loop.step, loop.loss = loop.step + 1, loss.detach()
        for callback in callbacks:
            callback.on_step_end(loop)
        total_loss += loss.detach().float() * len(x)
        correct = _correct(output.detach(), y)
        has_accuracy = has_accuracy and correct is not None
        if correct is not None:
            total_correct += correct
        seen += len(x)
    if seen == 0:
        raise ValueError("train_epoch got no batches (is the training set smaller than one batch with drop_last?)")
    _check_finite(total_loss, loop, "epoch mean")
    metrics = {"loss": (total_loss / seen).item()}
    if has_accuracy:
        metrics["acc"] = (total_correct / seen).item()
    return metrics


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches, loss_fn=nn.CrossEntropyLoss()) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over ``batches``, in eval mode (dropout off,
    BatchNorm with its running statistics), without gradients."""
    outputs, targets = predict(model, batches)
    metrics = {"loss": loss_fn(outputs, targets).item()}
    correct = _correct(outputs, targets)
    if correct is not None:
        metrics["acc"] = correct.item() / len(targets)
    return metrics


@torch.inference_mode()
def predict(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (float32, on the CPU) and targets for every batch, concatenated, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    outputs, targets = [], []
    for x, y in batches:
        with autocast(device):
            outputs.append(model(x.to(device, non_blocking=True)).float().cpu())
        targets.append(y.cpu())
    return torch.cat(outputs), torch.cat(targets)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train_batches: Batches, val_batches: Batches | None,
        epochs: int, loss_fn=nn.CrossEntropyLoss(), scheduler=None, callbacks: Sequence[Callback] = (),
        run=None, resume: str = "") -> Loop:
    """Train for ``epochs`` epochs, evaluating on ``val_batches`` after each.

    scheduler   stepped after every batch (per-epoch schedules are callbacks)
    run         a ``common.runs.Run``: a metrics.csv row and checkpoint.pt after every epoch
    resume      a checkpoint.pt of this run to continue from: model, optimizer, scheduler,
                callbacks, random-number state and epoch are restored, so the run ends with
                the weights an uninterrupted one would have
    """
    loop = Loop(model, optimizer, epochs)
    if resume:
        payload = load_checkpoint(resume, model, optimizer, scheduler, script=run.name if run else "")
        loop.epoch, loop.step = payload["epoch"], payload["extra"].get("step", 0)
        loop.rows = list(payload["extra"].get("rows", []))
        for callback, state in zip(callbacks, payload["extra"].get("callbacks", [])):
            callback.load_state_dict(state)
        loop.stop = bool(payload["extra"].get("stopped"))  # early stopping had ended it: stay stopped
        print(f"resumed from {resume} after epoch {loop.epoch}")
    # Checkpoints are written between epochs only, so the one on disk is always consistent: after
    # Ctrl-C (common.config.run names it) the unfinished epoch is redone, from the same batches
    # and random numbers.
    for epoch in range(loop.epoch + 1, epochs + 1):
        if loop.stop:
            break
        loop.epoch = epoch
        if hasattr(train_batches, "set_epoch"):
            train_batches.set_epoch(epoch)  # the same batches as an uninterrupted run would see
        t0 = time.perf_counter()
        train = train_epoch(model, train_batches, optimizer, loss_fn, loop, scheduler, callbacks)
        loop.row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}}
        if val_batches is not None:
            loop.row.update({f"val_{k}": v for k, v in evaluate(model, val_batches, loss_fn).items()})
        loop.row["lr"] = optimizer.param_groups[0]["lr"]
        loop.row["epoch_time_s"] = round(time.perf_counter() - t0, 3)
        for callback in callbacks:
            callback.on_epoch_end(loop)
        loop.rows.append(loop.row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in loop.row.items()))
        if run is not None:
            run.log(**loop.row)
            run.save_checkpoint(model, optimizer, scheduler, epoch=epoch, step=loop.step, stopped=loop.stop,
                                callbacks=[c.state_dict() for c in callbacks])
    return loop
