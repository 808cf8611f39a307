"""The training loop: plain PyTorch, one function per idea.

    result = fit(model, train_loader, val_loader, optimizer, epochs=10, device=device, run=run)

``train_epoch`` is the loop every lab teaches (forward, loss, ``zero_grad``, ``backward``,
``step``); ``fit`` adds what real runs need around it: evaluation, an LR scheduler (per epoch,
per batch, or on plateau), early stopping that restores the best weights, gradient clipping,
a NaN/inf guard, mixed precision on CUDA, a checkpoint every epoch, resume, and Ctrl-C.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from common.checkpoint import load_checkpoint, save_checkpoint
from common.device import autocast, grad_scaler
from common.errors import Interrupted, NonFiniteLoss

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def _correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Number of right answers in a batch, or None when accuracy means nothing (regression)."""
    if target.dtype != torch.long:
        return None
    return (output.argmax(dim=1) == target).sum()


def _check_finite(loss: torch.Tensor, epoch: int, step: int, checkpoint: Path | None) -> None:
    if not torch.isfinite(loss):
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else \
            "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"loss became {loss.item()} at epoch {epoch} step {step}; stopped ({kept}). "
            "Try a smaller --lr, gradient clipping, or check the data for NaNs"
        )


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                device: torch.device, scheduler=None, clip_grad: float = 0.0, amp: bool = True,
                scaler: torch.amp.GradScaler | None = None, epoch: int = 1,
                checkpoint: Path | None = None, progress: bool = True,
                deadline: float | None = None) -> dict[str, float]:
    """One pass over ``batches``; ``scheduler`` here is stepped after every batch (OneCycle).
    ``deadline`` (a ``time.perf_counter()`` value) ends the pass early: time-budgeted runs."""
    model.train()
    scaler = scaler or grad_scaler(device, amp)
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), device=device)
    seen, has_accuracy = 0, True
    # The guard syncs with the GPU, so check every step on the CPU but only now and then on CUDA.
    check_every = 1 if device.type == "cpu" else 25
    for step, (x, y) in enumerate(tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None if progress
                                       else True), start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(x)
            loss = loss_fn(output, y)
        if step % check_every == 0 or step == 1:
            _check_finite(loss.detach(), epoch, step, checkpoint)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.detach().float() * len(x)
        correct = _correct(output.detach(), y)
        if correct is None:
            has_accuracy = False
        else:
            total_correct += correct
        seen += len(x)
        if deadline is not None and time.perf_counter() > deadline:
            break
    _check_finite(total_loss / max(seen, 1), epoch, step if seen else 0, checkpoint)
    metrics = {"loss": (total_loss / seen).item()}
    if has_accuracy:
        metrics["acc"] = (total_correct / seen).item()
    return metrics


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches, loss_fn: Callable, device: torch.device,
             amp: bool = True) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over ``batches``, without gradients."""
    model.eval()
    total_loss, total_correct, seen, has_accuracy = 0.0, 0, 0, True
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(x)
        total_loss += loss_fn(output.float(), y).item() * len(x)
        correct = _correct(output, y)
        if correct is None:
            has_accuracy = False
        else:
            total_correct += correct.item()
        seen += len(x)
    metrics = {"loss": total_loss / seen}
    if has_accuracy:
        metrics["acc"] = total_correct / seen
    return metrics


@torch.inference_mode()
def predict(model: nn.Module, batches: Batches, device: torch.device, amp: bool = True,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (float32, on the CPU) and targets for every batch, concatenated."""
    model.eval()
    outputs, targets = [], []
    for x, y in batches:
        with autocast(device, amp):
            outputs.append(model(x.to(device, non_blocking=True)).float().cpu())
        targets.append(y.cpu())
    return torch.cat(outputs), torch.cat(targets)


@dataclass
class FitResult:
    rows: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    best_epoch: int = 0  # the epoch with the lowest validation loss
    best_val_loss: float = math.inf
    stopped_early: bool = False
    out_of_time: bool = False  # stopped by time_budget_s

    @property
    def last(self) -> dict:
        return self.rows[-1] if self.rows else {}


def fit(model: nn.Module, train_batches: Batches, val_batches: Batches | None, optimizer: torch.optim.Optimizer,
        epochs: int, device: torch.device, loss_fn: Callable = nn.CrossEntropyLoss(), run=None,
        scheduler=None, scheduler_per_batch: bool = False, patience: int = 0, clip_grad: float = 0.0,
        amp: bool = True, resume: str | Path | None = None, config: dict | None = None,
        time_budget_s: float = 0.0, verbose: bool = True) -> FitResult:
    """Train for ``epochs`` epochs, evaluating on ``val_batches`` after each.

    scheduler            stepped per epoch, per batch (``scheduler_per_batch``), or with the
                         validation loss when it is ReduceLROnPlateau
    patience             > 0: stop after that many epochs without a lower validation loss and
                         restore the best weights (early stopping)
    clip_grad            > 0: clip the global gradient norm to this value
    run                  a ``common.runs.Run``: metrics.csv rows, checkpoint.pt each epoch
    resume               a checkpoint to continue from (model, optimizer, scheduler, epoch)
    time_budget_s        > 0: stop training (mid-epoch if need be) once this many seconds have
                         passed; the last epoch is still evaluated. For equal-budget comparisons.
    """
    deadline = time.perf_counter() + time_budget_s if time_budget_s > 0 else None
    checkpoint = run.path("checkpoint.pt") if run is not None else None
    scaler = grad_scaler(device, amp)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    result, best_state, start = FitResult(), None, 1
    if resume:
        payload = load_checkpoint(resume, model, optimizer, scheduler)
        start = payload["epoch"] + 1
        if verbose:
            print(f"resumed from {resume} at epoch {start}")

    def save(epoch: int) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, scheduler, epoch=epoch, config=config,
                            best_epoch=result.best_epoch)

    epoch = start - 1
    try:
        for epoch in range(start, epochs + 1):
            t0 = time.perf_counter()
            train = train_epoch(model, train_batches, optimizer, loss_fn, device,
                                scheduler if scheduler_per_batch else None, clip_grad, amp, scaler, epoch,
                                checkpoint, deadline=deadline)
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}}
            if val_batches is not None:
                row.update({f"val_{k}": v for k, v in evaluate(model, val_batches, loss_fn, device, amp).items()})
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["epoch_time_s"] = round(time.perf_counter() - t0, 3)
            if scheduler is not None and not scheduler_per_batch:
                scheduler.step(row["val_loss"]) if plateau else scheduler.step()
            result.rows.append(row)
            if run is not None:
                run.log(**row)
            if verbose:
                print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            monitored = row.get("val_loss", row["train_loss"])
            if monitored < result.best_val_loss:
                result.best_val_loss, result.best_epoch = monitored, epoch
                if patience > 0:  # keep a copy of the best weights to restore at the end
                    best_state = copy.deepcopy(model.state_dict())
            save(epoch)
            if deadline is not None and time.perf_counter() > deadline:
                result.out_of_time = True
                if verbose:
                    print(f"time budget of {time_budget_s:g}s used up after epoch {epoch}")
                break
            if patience > 0 and epoch - result.best_epoch >= patience:
                result.stopped_early = True
                if verbose:
                    print(f"early stop: no better validation loss for {patience} epochs (best: epoch "
                          f"{result.best_epoch})")
                break
    except KeyboardInterrupt:
        save(epoch - 1 if epoch > start - 1 else epoch)  # the interrupted epoch is redone on resume
        where = f"; checkpoint saved to {checkpoint} (resume with --resume {checkpoint})" if checkpoint else ""
        raise Interrupted(f"interrupted during epoch {epoch}{where}") from None
    if best_state is not None:
        model.load_state_dict(best_state)
        if verbose and result.best_epoch != result.rows[-1]["epoch"]:
            print(f"restored the best weights (epoch {result.best_epoch}, val_loss={result.best_val_loss:.4g})")
    return result
