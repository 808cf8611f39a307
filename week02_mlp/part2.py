"""Week 2, Part 2: an MLP as a torch.nn.Module, trained by a loop we write, on MNIST or Iris.

Part 1 wrote every gradient by hand; here autograd computes them and torch.optim applies them.
The model is the same idea: Linear -> activation -> ... -> Linear -> logits, trained with
softmax cross-entropy (``nn.CrossEntropyLoss`` takes raw logits: the log-sum-exp trick lives
inside it). The loop is the one every PyTorch script has: forward, loss, zero_grad, backward,
step; then an evaluation pass with dropout off and no gradients. After each epoch it logs a row
and saves a checkpoint, so Ctrl-C loses at most one epoch and ``--resume`` goes on exactly.

Run: python week02_mlp/part2.py [--smoke] [--help]
     python week02_mlp/part2.py --dataset iris
     python week02_mlp/part2.py --optimizer sgd --lr 0.1 --schedule constant
     python week02_mlp/part2.py --resume runs/week02/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.augment import translate
from common.config import Range, ResumableConfig
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader
from common.plots import plot_history
from common.runner import launch
from common.runs import Run
from common.train import check_finite
from week02_mlp.data import Splits, prepare
from week02_mlp.report import report_mistakes


@dataclass
class Config(ResumableConfig):
    """Week 2, Part 2: an MLP (nn.Module) trained by a hand-written loop on MNIST or Iris."""

    dataset: Literal["mnist", "iris"] = "mnist"  # iris: hidden 16, epochs 30, batch 16, lr 0.01
    hidden: Annotated[tuple[int, ...], Range(1, 8192)] = (1024, 1024)  # --hidden alone: none
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"  # after each hidden layer
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # chance of zeroing a hidden unit
    optimizer: Literal["adam", "adamw", "sgd", "momentum"] = "adam"  # momentum: SGD with --momentum
    # Learning rates stop at 1e6: far past any that trains, and below float32's 3.4e38, past which
    # torch.optim cannot even represent the step (a RuntimeError instead of a diverging loss).
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # peak (sgd wants ~0.1, momentum 0.01)
    momentum: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.9  # mu of momentum
    weight_decay: Annotated[float, Range(0, 1)] = 0.0  # L2 penalty (adamw: decoupled weight decay)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"  # stepped after every batch
    epochs: Annotated[int, Range(1)] = 12  # passes over the training data
    batch_size: Annotated[int, Range(1)] = 512  # examples per optimizer step
    label_smoothing: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # (1-eps) one-hot + eps/K
    shift: Annotated[int, Range(0, 8)] = 1  # images: random shift by up to SHIFT pixels (0: none)
    val_fraction: Annotated[float, Range(0, 0.5)] = 0.1  # share of training data held out

    # Iris is 120 rows of 4 numbers, not 60k images of 784 pixels: a small net, small batches.
    PRESETS: ClassVar[dict] = {
        "dataset": {"iris": {"hidden": (16,), "epochs": 30, "batch_size": 16, "lr": 1e-2}}}
    # The MNIST twin is small (461 training images) and hard: small batches, a few epochs.
    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32}


class MLP(nn.Module):
    """Flatten -> [Linear -> activation -> Dropout] per hidden width -> Linear (logits).

    ``nn.Linear`` starts from Kaiming-uniform weights with a = sqrt(5) (variance 1/(3 fan_in));
    for ReLU nets He init (variance 2/fan_in, Part 1) is the principled choice, so we apply it.
    """

    ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int,
                 activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        gain = "relu" if activation in ("relu", "gelu") else activation
        widths = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths, widths[1:]):
            layers += [he_init(nn.Linear(fan_in, fan_out), gain), self.ACTIVATIONS[activation](),
                       nn.Dropout(dropout)]
        # The logits: no activation after the last layer.
        layers.append(he_init(nn.Linear(widths[-1], num_classes), "linear"))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, C, H, W) or (B, D) -> flattened -> (B, classes)


def he_init(layer: nn.Linear, nonlinearity: str) -> nn.Linear:
    """Weights ~ N(0, gain^2 / fan_in) (gain^2 = 2 for ReLU, 1 for linear), biases 0."""
    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
    nn.init.zeros_(layer.bias)
    return layer


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD:      w <- w - lr g
    momentum: v <- mu v + g;  w <- w - lr v            (a running sum of past gradients)
    Adam:     m <- b1 m + (1-b1) g;  s <- b2 s + (1-b2) g^2;
              w <- w - lr m_hat / (sqrt(s_hat) + eps)  (per-weight step ~ lr, bias-corrected)"""
    if name in ("sgd", "momentum"):
        mu = momentum if name == "momentum" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=mu, weight_decay=weight_decay)
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, weight_decay=weight_decay)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    """A per-batch schedule. OneCycle warms up to the peak lr for 25% of the steps, then anneals
    to ~0: the warm-up lets a large peak rate start safely, the annealing settles the weights."""
    if name == "onecycle":
        if total_steps < 5:  # its warm-up and annealing phases need a few steps each
            raise ConfigError(f"--schedule onecycle needs at least 5 optimizer steps in all, this "
                              f"run has {total_steps}: raise --epochs, lower --batch-size, or use "
                              "--schedule constant")
        peak = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=total_steps,
                                                   pct_start=0.25)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


# ---- The loop: the lesson of the week ----------------------------------------------------
def train_one_epoch(model: nn.Module, batches, loss_fn, optimizer: torch.optim.Optimizer,
                    scheduler=None) -> dict[str, float]:
    """One pass over the training batches; the mean loss and accuracy over the pass."""
    model.train()  # dropout on
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)             # forward: records the graph
        loss = loss_fn(logits, y)     # mean cross-entropy of the batch
        optimizer.zero_grad()         # backward ADDS into .grad: clear the last step's
        loss.backward()               # dloss/dw into every parameter's .grad
        optimizer.step()              # w <- w - lr * update(.grad)
        if scheduler is not None:
            scheduler.step()          # per batch: the lr moves every step
        total_loss += loss.detach() * len(x)  # a tensor: no GPU sync per step
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(x)
    return {"loss": (total_loss / seen).item(), "acc": (correct / seen).item()}


@torch.inference_mode()  # no graph, no .grad: faster and lighter
def predict(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of every batch, with dropout off."""
    model.eval()
    logits, targets = zip(*[(model(x), y) for x, y in batches])
    return torch.cat(logits), torch.cat(targets)


def evaluate(model: nn.Module, batches) -> dict[str, float]:
    """Plain cross-entropy (no label smoothing: comparable across settings) and accuracy."""
    logits, targets = predict(model, batches)
    accuracy = (logits.argmax(1) == targets).float().mean()
    return {"loss": F.cross_entropy(logits, targets).item(), "acc": accuracy.item()}


def setup(cfg: Config, sets: Splits, device: torch.device):
    """Model, optimizer, schedule and training batches as ``cfg`` says. Seeded here, so the same
    seed gives the same initial weights and batches: comparisons are like for like."""
    seed_everything(cfg.seed)
    model = MLP(sets.in_features, cfg.hidden, len(sets.classes), cfg.activation, cfg.dropout)
    model = model.to(device)
    augment = translate(cfg.shift) if sets.is_image and cfg.shift > 0 else None
    batches = TensorLoader(sets.x_train, sets.y_train, cfg.batch_size, shuffle=True,
                           augment=augment, device=device, seed=cfg.seed)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    scheduler = make_schedule(cfg.schedule, optimizer, cfg.epochs * len(batches))
    return model, optimizer, scheduler, batches


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    sets = prepare(data, cfg.val_fraction, cfg.seed)
    model, optimizer, scheduler, train_batches = setup(cfg, sets, device)
    val_batches = None
    if len(sets.x_val):
        val_batches = TensorLoader(sets.x_val, sets.y_val, 2048, device=device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    run = Run.start(cfg, __file__, device)  # --resume: that run's folder, its rows so far
    # --resume: weights, optimizer, schedule and random state as they were after that epoch
    done = run.restore(model, optimizer, scheduler)["epoch"]
    print(f"data: {data.name}: {len(sets.x_train)} train, {len(sets.x_val)} validation, "
          f"{len(sets.x_test)} test")

    for epoch in range(done + 1, cfg.epochs + 1):
        train_batches.set_epoch(epoch)  # batches depend on (seed, epoch): a resume repeats them
        start = time.perf_counter()
        train = train_one_epoch(model, train_batches, loss_fn, optimizer, scheduler)
        check_finite(train["loss"], epoch)  # NaN/inf: stop here, the last checkpoint stays good
        val = evaluate(model, val_batches) if val_batches else {}
        run.log(show=True, epoch=epoch, **{f"train_{k}": v for k, v in train.items()},
                **{f"val_{k}": v for k, v in val.items()}, lr=optimizer.param_groups[0]["lr"],
                epoch_time_s=round(time.perf_counter() - start, 3))
        run.save_checkpoint(model, optimizer, scheduler, epoch=epoch)  # Ctrl-C loses <= 1 epoch
    train_time = sum(r["epoch_time_s"] for r in run.rows)  # epochs before a --resume too

    plot_history(run.rows, run.path("curves.png"), title=f"MLP on {data.name}")
    test_batches = TensorLoader(sets.x_test, sets.y_test, 2048, device=device)
    test = evaluate(model, test_batches)  # the test set, once, at the end
    report_mistakes(*predict(model, test_batches), data, sets.classes, run, test["acc"])
    last = run.rows[-1]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"test accuracy {test['acc']:.4f}; {n_params:,} parameters; trained in {train_time:.1f}s")
    return run.finish(test_acc=test["acc"], test_loss=test["loss"], val_acc=last.get("val_acc"),
                      train_acc=last["train_acc"], first_train_loss=run.rows[0]["train_loss"],
                      last_train_loss=last["train_loss"], epochs=len(run.rows),
                      train_time_s=round(train_time, 2), params=n_params,
                      fastest_epoch_s=min(r["epoch_time_s"] for r in run.rows),
                      threads=torch.get_num_threads(), chance=1 / len(sets.classes))


if __name__ == "__main__":
    launch(main, Config)
