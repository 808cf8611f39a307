"""Week 2, Part 1: a multilayer perceptron from scratch in NumPy: forward pass, backprop by
hand, weight initialization, and mini-batch SGD on real handwritten digits.

Every layer has a ``forward`` that remembers what its ``backward`` needs, and a ``backward``
that turns dL/d(output) into dL/d(input) (and dL/d(weights) for Linear): the chain rule, one
layer at a time. The formulas sit next to the code; tests/test_week02_mlp.py checks each
against PyTorch's autograd in float64.

Then three experiments:
  1. a gradient check: backprop vs finite differences on a small net;
  2. initialization: zeros, small normal, Xavier/Glorot, He/Kaiming in a deep net, with the
     activation and gradient statistics layer by layer (the vanishing gradient of a deep
     sigmoid net included), and whether each deep net trains at all;
  3. mini-batch SGD training of an MLP on scikit-learn's 8x8 digits (offline), with curves.

Run: python week02_mlp/part1.py [--smoke] [--help]
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch

from common.config import BaseConfig, Range
from common.data import load
from common.device import seed_everything
from common.errors import NonFiniteLoss
from common.loader import split
from common.parity import max_relative_error, numerical_grad
from common.plots import plot_history, plt, save
from common.runner import launch
from common.runs import Run

Init = Literal["zeros", "small", "xavier", "he"]


# ----------------------------------------------------------------------------------------
# Initialization
# ----------------------------------------------------------------------------------------
def init_weights(scheme: str, fan_in: int, fan_out: int, rng: np.random.Generator) -> np.ndarray:
    """A (fan_in, fan_out) weight matrix drawn from a zero-mean normal with variance:

    zeros   0                        every unit computes the same thing: symmetry never breaks
    small   0.01^2                   fixed, ignores the layer size: signals shrink layer by layer
    xavier  2 / (fan_in + fan_out)   Glorot & Bengio 2010: keeps Var(activations) (needs 1/fan_in)
                                     and Var(gradients) (needs 1/fan_out) about constant for
                                     tanh-like units near 0; the harmonic compromise of the two
    he      2 / fan_in               He et al. 2015: ReLU zeroes half its inputs, which halves the
                                     variance; the factor 2 puts it back

    Why variance matters: for y = sum_i x_i w_i over fan_in independent terms,
    Var(y) = fan_in * Var(w) * E[x^2]. Multiply that factor over 10 layers and anything but
    ~1 explodes or vanishes.
    """
    if scheme == "zeros":
        return np.zeros((fan_in, fan_out))
    std = {"small": 0.01, "xavier": np.sqrt(2.0 / (fan_in + fan_out)),
           "he": np.sqrt(2.0 / fan_in)}[scheme]
    return rng.normal(0.0, std, size=(fan_in, fan_out))


# ----------------------------------------------------------------------------------------
# Layers: forward remembers, backward applies the chain rule
# ----------------------------------------------------------------------------------------
class Linear:
    """y = x W + b      x: (N, fan_in), W: (fan_in, fan_out), b: (fan_out,), y: (N, fan_out)

    Given g = dL/dy (N, fan_out):
        dL/dW = x^T g           (fan_in, fan_out): each weight's effect summed over the batch
        dL/db = sum_n g[n]      (fan_out,)
        dL/dx = g W^T           (N, fan_in): handed to the layer below
    """

    def __init__(self, fan_in: int, fan_out: int, init: str = "he",
                 rng: np.random.Generator | None = None):
        rng = rng if rng is not None else np.random.default_rng(0)
        self.W = init_weights(init, fan_in, fan_out, rng)
        self.b = np.zeros(fan_out)
        self.dW, self.db = np.zeros_like(self.W), np.zeros_like(self.b)

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.W + self.b

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        self.dW = self.x.T @ grad_out
        self.db = grad_out.sum(axis=0)
        return grad_out @ self.W.T


class ReLU:
    """y = max(0, x);   dy/dx = 1 if x > 0 else 0   (at exactly 0 we use 0, as PyTorch does)"""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.mask = x > 0
        return x * self.mask

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.mask


class Sigmoid:
    """y = 1 / (1 + e^-x);   dy/dx = y (1 - y)  <= 1/4

    Each sigmoid layer shrinks gradients 4x or more. Computed as e^x / (1 + e^x) for x < 0
    so that e^-x never overflows."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(-np.abs(x))  # in (0, 1]: no overflow either way
        self.y = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return self.y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.y * (1.0 - self.y)


class Tanh:
    """y = tanh(x) = (e^x - e^-x) / (e^x + e^-x);  dy/dx = 1 - y^2  (zero-centred, slope 1 at 0)"""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.y = np.tanh(x)
        return self.y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * (1.0 - self.y**2)


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(z) against integer labels y, for logits z: (N, C).

        log p[n, k] = z[n, k] - logsumexp(z[n])
        logsumexp(z) = m + log sum_k e^(z_k - m),  m = max_k z_k
        L = -(1/N) sum_n log p[n, y_n]
        dL/dz = (softmax(z) - onehot(y)) / N

    Subtracting the row max m changes nothing mathematically (it cancels in the ratio) but keeps
    e^(z - m) <= 1, so large logits cannot overflow; the log-probabilities never go through a
    log(0) either. The gradient is this simple because softmax and -log cancel each other's
    curvature: the derivative of -log softmax(z)_y is p - onehot(y).
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self.probs, self.labels = np.exp(log_probs), labels
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    def backward(self) -> np.ndarray:
        grad = self.probs.copy()
        grad[np.arange(len(self.labels)), self.labels] -= 1.0
        return grad / len(self.labels)


# ----------------------------------------------------------------------------------------
# The MLP: a list of layers, forward in order, backward in reverse
# ----------------------------------------------------------------------------------------
class MLP:
    """Linear -> activation -> ... -> Linear (logits), with softmax cross-entropy on top.

    ``sizes`` = [inputs, hidden..., classes], e.g. [64, 128, 64, 10]."""

    def __init__(self, sizes: list[int], activation: str = "relu", init: str = "he", seed: int = 0):
        rng = np.random.default_rng(seed)
        self.layers: list = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.layers.append(Linear(fan_in, fan_out, init, rng))
            if i < len(sizes) - 2:  # no activation after the output layer: the loss takes logits
                self.layers.append(ACTIVATIONS[activation]())
        self.loss_fn = SoftmaxCrossEntropy()

    @property
    def linears(self) -> list[Linear]:
        return [layer for layer in self.layers if isinstance(layer, Linear)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        return self.loss_fn.forward(self.forward(x), labels)

    def backward(self) -> np.ndarray:
        """Backprop from the last ``loss`` call; fills every Linear's dW, db; returns dL/dx."""
        grad = self.loss_fn.backward()
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def sgd_step(self, lr: float) -> None:
        """w <- w - lr dL/dw: a step downhill, in place."""
        for layer in self.linears:
            layer.W -= lr * layer.dW
            layer.b -= lr * layer.db

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x).argmax(axis=1)


def accuracy(net: MLP, x: np.ndarray, labels: np.ndarray) -> float:
    return float((net.predict(x) == labels).mean())


def train_epoch(net: MLP, x: np.ndarray, labels: np.ndarray, lr: float, batch_size: int,
                rng: np.random.Generator) -> float:
    """One pass of mini-batch SGD in a fresh random order; returns the mean training loss.

    A mini-batch gradient is a noisy, cheap estimate of the full-data gradient: many small
    steps per pass beat one exact step per pass."""
    order = rng.permutation(len(x))
    total = 0.0
    for start in range(0, len(x), batch_size):
        batch = order[start:start + batch_size]
        total += net.loss(x[batch], labels[batch]) * len(batch)
        net.backward()
        net.sgd_step(lr)
    return total / len(x)


# ----------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------
def gradient_check(seed: int = 0) -> float:
    """Backprop vs central finite differences on a small tanh net: their max relative error."""
    rng = np.random.default_rng(seed)
    net = MLP([5, 7, 4, 3], activation="tanh", init="xavier", seed=seed)
    x, labels = rng.normal(size=(6, 5)), rng.integers(0, 3, size=6)
    net.loss(x, labels)
    net.backward()
    worst = 0.0
    for layer in net.linears:
        def loss_at(w, layer=layer):
            saved, layer.W = layer.W, w
            value = net.loss(x, labels)
            layer.W = saved
            return value

        analytic = layer.dW.copy()
        worst = max(worst, max_relative_error(analytic, numerical_grad(loss_at, layer.W)))
    return worst


# (label, activation, init) of the deep nets compared in the initialization study
SCHEMES = [
    ("tanh, small N(0, 0.01^2)", "tanh", "small"),
    ("tanh, Xavier", "tanh", "xavier"),
    ("relu, small N(0, 0.01^2)", "relu", "small"),
    ("relu, Xavier", "relu", "xavier"),
    ("relu, He", "relu", "he"),
    ("sigmoid, Xavier", "sigmoid", "xavier"),
    ("relu, zeros", "relu", "zeros"),
]


def layer_statistics(net: MLP, x: np.ndarray,
                     labels: np.ndarray) -> tuple[list[float], list[float]]:
    """Std of each hidden layer's output and of each Linear layer's weight gradient dL/dW,
    after one forward and backward pass on a batch."""
    activation_std = [float(np.std(h)) for h in hidden_outputs(net, x)]
    net.loss(x, labels)
    net.backward()
    gradient_std = [float(layer.dW.std()) for layer in net.linears]
    return activation_std, gradient_std


def hidden_outputs(net: MLP, x: np.ndarray) -> list[np.ndarray]:
    """The output of every activation layer (the hidden representations), in order."""
    outputs = []
    for layer in net.layers:
        x = layer.forward(x)
        if not isinstance(layer, Linear):
            outputs.append(x)
    return outputs


def distinct_units(W: np.ndarray) -> int:
    """How many different columns (hidden units) a weight matrix has, to 6 decimals."""
    return len(np.unique(np.round(W, 6), axis=1).T)


@dataclass
class Digits:
    """The digits as float64 arrays: standardized pixels (N, 64) and integer labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(data_dir: str, seed: int) -> Digits:
    """scikit-learn's 8x8 digits (1,797 images, 64 pixels of 0..16, 10 classes), bundled: no
    download. Standardized per pixel with training statistics; float64 like the rest of Part 1."""
    data = load("digits", data_dir)
    x_tr, y_tr, x_val, y_val = split(data.x_train, data.y_train, 0.15, seed)
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1.0)  # border pixels are ~always 0
    scale = lambda x: ((x - mean) / std).double().numpy()
    return Digits(scale(x_tr), y_tr.numpy(), scale(x_val), y_val.numpy(), scale(data.x_test),
                  data.y_test.numpy())


# ----------------------------------------------------------------------------------------
@dataclass
class Config(BaseConfig):
    """Week 2, Part 1: an MLP from scratch in NumPy: backprop by hand, initialization, SGD."""

    hidden: Annotated[tuple[int, ...], Range(1, 4096)] = (128, 64)  # widths (--hidden alone: none)
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"  # nonlinearity of the digits MLP
    init: Init = "he"  # weight initialization of the digits MLP
    lr: Annotated[float, Range(0, lo_open=True)] = 0.05  # SGD step size
    batch_size: Annotated[int, Range(1)] = 32  # examples per SGD step
    epochs: Annotated[int, Range(1)] = 40  # passes over the digits training data
    depth: Annotated[int, Range(1, 100)] = 10  # hidden layers of the deep nets in the init study
    width: Annotated[int, Range(1, 4096)] = 128  # units per hidden layer of those deep nets
    study_epochs: Annotated[int, Range(1)] = 15  # epochs each deep net trains for in the study

    SMOKE: ClassVar[dict] = {"epochs": 4, "depth": 6, "width": 32, "study_epochs": 2}
    UNUSED: ClassVar[tuple] = ('device', 'data_dir')  # CPU only, data bundled with scikit-learn


def init_study(cfg: Config, digits: Digits, run: Run) -> list[dict]:
    """Each scheme's per-layer statistics at initialization, then whether that deep net trains."""
    sizes = [digits.x_train.shape[1], *[cfg.width] * cfg.depth, 10]
    batch = slice(0, 512)
    rows, curves = [], {}
    for label, activation, init in SCHEMES:
        net = MLP(sizes, activation, init, seed=cfg.seed)
        act_std, grad_std = layer_statistics(net, digits.x_train[batch], digits.y_train[batch])
        rng = np.random.default_rng(cfg.seed)
        losses = [train_epoch(net, digits.x_train, digits.y_train, cfg.lr, cfg.batch_size, rng)
                  for _ in range(cfg.study_epochs)]
        rows.append({"scheme": label, "act_std": act_std, "grad_std": grad_std, "losses": losses,
                     "val_acc": accuracy(net, digits.x_val, digits.y_val),
                     "distinct_units": distinct_units(net.linears[1].W)})
        curves[label] = losses
    # Per-layer numbers for a spreadsheet.
    with open(run.path("init_study.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scheme", "statistic", *[f"layer{i}" for i in range(1, cfg.depth + 2)]])
        for row in rows:
            writer.writerow([row["scheme"], "activation_std", *row["act_std"]])
            writer.writerow([row["scheme"], "weight_grad_std", *row["grad_std"]])
    plot_init_study(rows, cfg, run.path("init_study.png"))
    return rows


def print_init_table(rows: list[dict], cfg: Config) -> None:
    print(f"\nInitialization study: {cfg.depth} hidden layers of {cfg.width} units, statistics "
          f"on 512 digits at initialization, then {cfg.study_epochs} epochs of SGD (lr {cfg.lr})")
    header = (f"{'scheme':26s} {'act std L1':>10s} {'act std L' + str(cfg.depth):>11s} "
              f"{'dW std L1':>10s} {'dW std out':>10s} {'L1/out':>9s} {'val acc':>8s} "
              f"{'distinct units L2':>17s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        first, last = r["grad_std"][0], r["grad_std"][-1]
        ratio = f"{first / last:9.1e}" if last > 0 else f"{'0/0':>9s}"
        print(f"{r['scheme']:26s} {r['act_std'][0]:10.2e} {r['act_std'][-1]:11.2e} "
              f"{first:10.2e} {last:10.2e} {ratio} {r['val_acc']:8.3f} {r['distinct_units']:>17d}")
    print("(L1 = first hidden layer, out = output layer; distinct units: different columns of "
          f"the 2nd layer's weights after training, out of {cfg.width})")


def plot_init_study(rows: list[dict], cfg: Config, path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for r in rows:
        style = {"label": r["scheme"], "marker": "o", "markersize": 3}
        layers = range(1, len(r["act_std"]) + 1)
        # A log axis cannot show 0: zeros init's flat-zero line is drawn at the axis floor instead.
        axes[0].plot(layers, np.maximum(r["act_std"], 1e-12), **style)
        axes[1].plot(range(1, len(r["grad_std"]) + 1), np.maximum(r["grad_std"], 1e-12), **style)
        axes[2].plot(range(1, len(r["losses"]) + 1), r["losses"], **style)
    axes[0].set(yscale="log", xlabel="hidden layer", ylabel="std of activations",
                title="forward: activation std by layer (at init)")
    axes[1].set(yscale="log", xlabel="layer (last = output layer)", ylabel="std of dL/dW",
                title="backward: weight-gradient std by layer\n"
                      "(sigmoid: the gradient vanishes towards layer 1)")
    axes[2].set(xlabel="epoch", ylabel="training loss",
                title=f"does the {cfg.depth}-layer net train?")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    save(fig, path)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    digits = load_digits(cfg.data_dir, cfg.seed)  # load BEFORE Run.start
    run = Run.start(cfg, __file__, torch.device("cpu"))

    # 1. Gradient check
    check = gradient_check(cfg.seed)
    print(f"gradient check: backprop vs finite differences, max relative error {check:.1e} "
          "(float64; < 1e-6 is right)")

    # 2. Initialization study
    rows = init_study(cfg, digits, run)
    print_init_table(rows, cfg)
    sigmoid = next(r for r in rows if r["scheme"].startswith("sigmoid"))
    vanishing = sigmoid["grad_std"][0] / sigmoid["grad_std"][-1]

    # 3. Mini-batch SGD on digits
    widths = list(cfg.hidden)
    net = MLP([digits.x_train.shape[1], *widths, 10], cfg.activation, cfg.init, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    print(f"\nTraining a {[64, *widths, 10]} MLP ({cfg.activation}, {cfg.init} init) on "
          f"{len(digits.x_train)} digits with mini-batch SGD (batch {cfg.batch_size}, "
          f"lr {cfg.lr}); chance is 0.10")
    history = []
    for epoch in range(1, cfg.epochs + 1):
        train_loss = train_epoch(net, digits.x_train, digits.y_train, cfg.lr, cfg.batch_size, rng)
        # NaN weights predict nothing: stop rather than report their accuracy.
        if not np.isfinite(train_loss):
            raise NonFiniteLoss(f"the training loss became {train_loss} in epoch {epoch} "
                                f"with --lr {cfg.lr:g}: the step is too large; use a smaller --lr")
        row = {"epoch": epoch, "train_loss": train_loss,
               "train_acc": accuracy(net, digits.x_train, digits.y_train),
               "val_loss": net.loss(digits.x_val, digits.y_val),
               "val_acc": accuracy(net, digits.x_val, digits.y_val)}
        history.append(row)
        run.log(**row)
        if epoch == 1 or epoch % 10 == 0 or epoch == cfg.epochs:
            print("  ".join(f"{k}={v:.4g}" for k, v in row.items()))
    plot_history(history, run.path("curves.png"), title="NumPy MLP on 8x8 digits")
    test_acc = accuracy(net, digits.x_test, digits.y_test)
    print(f"test accuracy {test_acc:.4f} on {len(digits.x_test)} held-out digits")
    he = next(r for r in rows if r["scheme"] == "relu, He")
    return run.finish(test_acc=test_acc, train_loss=history[-1]["train_loss"],
                      val_acc=history[-1]["val_acc"], gradient_check_error=check,
                      sigmoid_first_over_last_grad=vanishing, he_act_std_last=he["act_std"][-1])


if __name__ == "__main__":
    launch(main, Config)
