"""Week 2, Part 2: an MLP as a torch.nn.Module, trained with torch.optim on MNIST or Iris.

Part 1 wrote every gradient by hand; here autograd computes them and an optimizer applies
them. The model is the same idea: Linear -> activation -> ... -> Linear -> logits, trained
with softmax cross-entropy (``nn.CrossEntropyLoss`` takes raw logits: the log-sum-exp trick
lives inside it).

Run: python week02_mlp/part2.py [--smoke] [--help]
     python week02_mlp/part2.py --dataset iris
     python week02_mlp/part2.py --optimizer sgd --lr 0.1 --schedule constant
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from common.augment import translate
from common.config import BaseConfig, run
from common.data import ImageData, TabularData, load
from common.device import cpu_has_native_bf16, pick_device, seed_everything
from common.errors import LabError
from common.loader import TensorLoader, normalizer, split
from common.plots import confusion_matrix, plot_confusion, plot_history, plot_images
from common.runs import Run
from common.train import FitResult, evaluate, fit, predict

# What "auto" / 0 in the config mean for each data set: MNIST has 60k images of 784 pixels,
# Iris 120 training rows of 4 numbers, so they want very different widths, batches and epochs.
DATASET_DEFAULTS = {
    "mnist": {"hidden": "1024,1024", "epochs": 12, "batch_size": 512},
    "iris": {"hidden": "16", "epochs": 30, "batch_size": 16},
}
# A sensible starting step size per data set and optimizer. Plain SGD needs a much larger step
# than Adam, whose update is normalized to about lr per weight whatever the gradient's scale;
# Iris (120 rows, a few hundred steps in all) wants bigger steps than MNIST (thousands of steps).
DEFAULT_LR = {
    "mnist": {"sgd": 0.1, "momentum": 0.01, "adam": 1e-3, "adamw": 1e-3},
    "iris": {"sgd": 0.3, "momentum": 0.03, "adam": 1e-2, "adamw": 1e-2},
}


@dataclass
class Config(BaseConfig):
    """Week 2, Part 2: an MLP (nn.Module) trained with torch.optim on MNIST or Iris."""

    dataset: Literal["mnist", "iris"] = "mnist"  # which data set to learn
    hidden: str = "auto"  # hidden layer widths, comma separated ("" = no hidden layer); auto: per data set
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu"  # nonlinearity after each hidden layer
    dropout: float = 0.2  # probability of zeroing a hidden unit during training
    optimizer: Literal["adam", "adamw", "sgd", "momentum"] = "adam"  # momentum = SGD with --momentum
    lr: float = 0.0  # (peak) learning rate; 0: per data set and optimizer (mnist: adam 1e-3, sgd 0.1)
    momentum: float = 0.9  # momentum of the "momentum" optimizer
    weight_decay: float = 0.0  # L2 penalty (adamw: decoupled weight decay)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"  # learning-rate schedule, stepped per batch
    epochs: int = 0  # passes over the training data; 0: per data set (mnist 12, iris 30)
    batch_size: int = 0  # examples per step; 0: per data set (mnist 512, iris 16)
    label_smoothing: float = 0.0  # target = (1 - eps) * one-hot + eps / classes
    shift: int = 1  # images: random translation by up to SHIFT pixels (augmentation; 0: none)
    val_fraction: float = 0.1  # share of the training data held out for validation (0: none)
    bf16: Literal["auto", "on", "off"] = "auto"  # CPU matmuls in bfloat16; auto: on if the CPU has AVX512-BF16/AMX

    # The synthetic twin is small (461 training images) and hard: a few quick epochs at a larger step.
    SMOKE: ClassVar[dict] = {"hidden": "128", "epochs": 4, "batch_size": 32, "lr": 3e-3}


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class MLP(nn.Module):
    """Flatten -> [Linear -> activation -> Dropout] per hidden width -> Linear (logits).

    PyTorch's ``nn.Linear`` starts from Kaiming-uniform weights with a = sqrt(5) (variance
    1/(3 fan_in)); for ReLU nets He init (variance 2/fan_in, Part 1) is the principled choice,
    so we apply it, with zero biases.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, activation: str = "relu",
                 dropout: float = 0.0, bf16: bool = False):
        super().__init__()
        nonlinearity = "relu" if activation in ("relu", "gelu") else activation
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for next_width in hidden:
            layers += [he_init(nn.Linear(width, next_width), nonlinearity), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = next_width
        layers.append(he_init(nn.Linear(width, num_classes), "linear"))  # logits: no nonlinearity follows
        self.layers = nn.Sequential(*layers)
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 on the CPU: the weights stay float32 (the optimizer updates exact values); only
        # the matrix products run in bfloat16, which CPUs with AVX512-BF16 do about twice as fast.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and x.device.type == "cpu"):
            logits = self.layers(x)
        return logits.float()


def he_init(layer: nn.Linear, nonlinearity: str) -> nn.Linear:
    """Weights ~ N(0, gain^2 / fan_in) (gain^2 = 2 for ReLU, 1 for linear), biases 0."""
    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
    nn.init.zeros_(layer.bias)
    return layer


def use_bf16(setting: str, device: torch.device) -> bool:
    native = setting == "on" or (setting == "auto" and cpu_has_native_bf16())
    return device.type == "cpu" and native


def parse_hidden(text: str) -> list[int]:
    """ "1024,1024" -> [1024, 1024]; "" -> [] (softmax regression)."""
    try:
        widths = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LabError(f"--hidden must be comma-separated widths like 256,128; got {text!r}") from None
    if any(w < 1 for w in widths):
        raise LabError(f"--hidden widths must be >= 1; got {text!r}")
    return widths


def make_optimizer(name: str, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   ) -> torch.optim.Optimizer:
    """SGD:      w <- w - lr g
    momentum: v <- mu v + g;  w <- w - lr v            (a running sum of past gradients)
    Adam:     m <- b1 m + (1-b1) g;  s <- b2 s + (1-b2) g^2;
              w <- w - lr m_hat / (sqrt(s_hat) + eps)  (per-weight step ~ lr, bias-corrected)"""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    """A per-batch schedule. OneCycle warms up to the peak lr for 25% of the steps, then anneals
    to ~0: the warm-up lets a large peak rate start safely, the annealing settles the weights."""
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"],
                                                   total_steps=total_steps, pct_start=0.25)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


# ----------------------------------------------------------------------------------------
# Data: tensors in memory, normalized once
# ----------------------------------------------------------------------------------------
@dataclass
class Splits:
    """Normalized float tensors for training, validation (may be empty) and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    is_image: bool

    @property
    def in_features(self) -> int:
        return self.x_train[0].numel()


def prepare(data: ImageData | TabularData, val_fraction: float, seed: int = 0) -> Splits:
    """Hold out a validation split, then standardize the inputs: tabular features with the mean
    and std of the training part only (using validation or test rows would leak information
    about them), images with the per-channel pixel statistics of the training images."""
    if not 0 <= val_fraction < 1:
        raise LabError(f"--val-fraction must be in [0, 1); got {val_fraction}")
    x_tr, y_tr, x_val, y_val = split(data.x_train, data.y_train, val_fraction, seed)
    if isinstance(data, ImageData):
        scale = normalizer(data.mean, data.std)  # uint8 pixels -> standardized float32
    else:
        mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1e-6)
        scale = lambda x: (x - mean) / std
    return Splits(scale(x_tr), y_tr, scale(x_val), y_val, scale(data.x_test), data.y_test, list(data.classes),
                  isinstance(data, ImageData))


# ----------------------------------------------------------------------------------------
# Training (used by this script and by the week's self-work scripts)
# ----------------------------------------------------------------------------------------
def with_defaults(cfg: Config) -> Config:
    """Fill in the "auto" / 0 fields from the data set's and the optimizer's defaults."""
    defaults = DATASET_DEFAULTS[cfg.dataset]
    return dataclasses.replace(
        cfg,
        hidden=defaults["hidden"] if cfg.hidden == "auto" else cfg.hidden,
        epochs=cfg.epochs or defaults["epochs"],
        batch_size=cfg.batch_size or defaults["batch_size"],
        lr=cfg.lr or DEFAULT_LR[cfg.dataset][cfg.optimizer],
    )


def build_model(cfg: Config, sets: Splits, device: torch.device) -> MLP:
    """The MLP ``cfg`` describes, freshly initialized from ``cfg.seed``."""
    seed_everything(cfg.seed)
    return MLP(sets.in_features, parse_hidden(cfg.hidden), len(sets.classes), cfg.activation, cfg.dropout,
               use_bf16(cfg.bf16, device)).to(device)


def train_mlp(cfg: Config, sets: Splits, device: torch.device, run_: Run | None = None,
              verbose: bool = True) -> tuple[MLP, FitResult]:
    """Build the MLP and optimizer from ``cfg`` (defaults already filled in) and fit it.

    The seed is set here, so two calls with the same seed start from the same weights and see
    the same batches: comparisons between optimizers or learning rates are like for like.
    """
    model = build_model(cfg, sets, device)
    augment = translate(cfg.shift) if sets.is_image and cfg.shift > 0 else None
    train_batches = TensorLoader(sets.x_train, sets.y_train, cfg.batch_size, shuffle=True, augment=augment,
                                 device=device, seed=cfg.seed)
    val_batches = TensorLoader(sets.x_val, sets.y_val, 2048, device=device) if len(sets.x_val) else None
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_schedule(cfg.schedule, optimizer, cfg.epochs * len(train_batches))
    result = fit(model, train_batches, val_batches, optimizer, cfg.epochs, device,
                 loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), run=run_,
                 scheduler=scheduler, scheduler_per_batch=True, config=cfg.to_dict(), resume=cfg.resume or None,
                 verbose=verbose)
    return model, result


def worst_mistakes(probs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` wrong predictions the model was most confident about."""
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != targets).nonzero().flatten()
    return wrong[confidence[wrong].argsort(descending=True)[:k]]


def main(cfg: Config) -> dict:
    cfg = with_defaults(cfg.resolved())
    parse_hidden(cfg.hidden)  # a typo in --hidden should stop us before loading any data
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)  # load BEFORE Run.start
    sets = prepare(data, cfg.val_fraction, cfg.seed)
    run_ = Run.start(cfg, __file__, device)
    print(f"data: {data.name}: {len(sets.x_train)} train, {len(sets.x_val)} validation, {len(sets.x_test)} test "
          f"examples; torch threads: {torch.get_num_threads()}")

    t0 = time.perf_counter()
    model, result = train_mlp(cfg, sets, device, run_)
    train_time = time.perf_counter() - t0
    plot_history(result.rows, run_.path("curves.png"), title=f"MLP on {data.name}")

    test_batches = TensorLoader(sets.x_test, sets.y_test, 2048, device=device)
    test = evaluate(model, test_batches, nn.CrossEntropyLoss(), device)
    logits, targets = predict(model, test_batches, device)
    predicted = logits.argmax(dim=1)
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), len(sets.classes))
    plot_confusion(matrix, sets.classes, run_.path("confusion.png"),
                   title=f"test accuracy {test['acc']:.2%} ({len(targets)} examples)")
    probs = logits.softmax(dim=1)
    worst = worst_mistakes(probs, targets, k=24)
    if isinstance(data, ImageData) and len(worst):
        titles = [f"{sets.classes[targets[i]]}->{sets.classes[predicted[i]]} {probs[i].max():.2f}" for i in worst]
        plot_images(data.x_test[worst].numpy(), run_.path("worst_mistakes.png"), titles=titles, ncols=8,
                    title="most confident mistakes (true->predicted, confidence)")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"test accuracy {test['acc']:.4f}, {len(worst)} most confident mistakes plotted; "
          f"{n_params:,} parameters; trained in {train_time:.1f}s")
    return run_.finish(test_acc=test["acc"], test_loss=test["loss"], val_acc=result.last.get("val_acc"),
                       train_acc=result.last.get("train_acc"), epochs=len(result.rows),
                       train_time_s=round(train_time, 2), fastest_epoch_s=min(r["epoch_time_s"] for r in result.rows),
                       params=n_params, threads=torch.get_num_threads(), bf16=model.bf16)


if __name__ == "__main__":
    run(main, Config)
