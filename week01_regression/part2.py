"""Week 1, Part 2: PyTorch basics: tensors, autograd, nn.Linear, torch.optim, BCEWithLogitsLoss.

Part 1 derived every gradient by hand. Here PyTorch records the computation as a graph while it
runs and walks it backwards (``.backward()``) to get the same numbers, which we check. Then the
two Part 1 models again, written the way PyTorch code is written: a module, a loss, an optimizer.

Run: python week01_regression/part2.py [--smoke] [--help]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch
from torch import nn

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import NonFiniteLoss
from common.loader import TensorLoader
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from week01_regression.introspect import environment, graph_chain
from week01_regression.part1 import closed_form, load_arrays


@dataclass
class Config(BaseConfig):
    """Week 1, Part 2: autograd, nn.Linear and torch.optim on diabetes and breast_cancer."""

    epochs: Annotated[int, Range(1)] = 100  # passes over the training data for each model
    batch_size: Annotated[int, Range(1)] = 32  # examples per SGD step
    # At most 1e6: far past any that trains, far below float32's 3.4e38 (where optim cannot step).
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.05  # linear (MSELoss) SGD step size
    logistic_lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.1  # logistic SGD step size
    x: Annotated[float, Range(-1e6, 1e6)] = 2.0  # where the polynomial's derivative is taken
    synthetic: bool = False  # use synthetic twins of diabetes and breast_cancer, not the real sets

    SMOKE: ClassVar[dict] = {"epochs": 8}
    UNUSED: ClassVar[tuple] = ('data_dir',)  # bundled with scikit-learn: no --data-dir


# ---- 2. Autograd on a polynomial (1., the environment: introspect.py) ------------------
def polynomial(x: torch.Tensor) -> torch.Tensor:
    """f(x) = 3x^3 - 2x^2 + x."""
    return 3 * x**3 - 2 * x**2 + x


def polynomial_grad(x: float) -> float:
    """f'(x) = 9x^2 - 4x + 1, by the power rule: the hand-derived answer autograd must match."""
    return 9 * x**2 - 4 * x + 1


def autograd_demo(x_value: float) -> dict:
    """f'(x) by autograd and by hand; what a second backward does to ``.grad``; and the fix."""
    x = torch.tensor(x_value, dtype=torch.float64, requires_grad=True)  # a leaf: we want df/dx
    y = polynomial(x)
    print(f"f(x) = 3x^3 - 2x^2 + x at x={x_value}: f = {y.item():g}; "
          f"y.grad_fn = {type(y.grad_fn).__name__}")
    print("the graph autograd recorded (walked backwards from y):")
    for line in graph_chain(y.grad_fn):
        print("   " + line)
    y.backward()  # fills x.grad with dy/dx, then frees the graph's saved tensors
    autograd = x.grad.item()
    manual = polynomial_grad(x_value)
    print(f"dy/dx: autograd {autograd:.12g}, by hand 9x^2 - 4x + 1 = {manual:.12g}, "
          f"difference {abs(autograd - manual):.1e}")

    # The pitfall: .backward() ADDS into .grad (useful for summing over several losses), so a
    # second pass without zeroing gives twice the gradient. Optimizers' zero_grad() exists for this.
    polynomial(x).backward()
    accumulated = x.grad.item()
    print(f"after a second backward without zeroing: x.grad = {accumulated:g} "
          f"(= 2 x {autograd:g}: accumulated)")
    x.grad = None  # what optimizer.zero_grad() does by default (set_to_none=True)
    polynomial(x).backward()
    print(f"after x.grad = None and a fresh backward: x.grad = {x.grad.item():g}")
    return dict(poly_grad_autograd=autograd, poly_grad_manual=manual,
                poly_grad_accumulated=accumulated)


# ---- 3. Manual gradients vs autograd on the linear model -------------------------------
def manual_mse_grads(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Part 1's formulas in torch: r = X w + b - y, dL/dw = (2/n) X^T r, dL/db = (2/n) sum r."""
    residual = X @ w + b - y
    n = len(y)
    return 2 / n * X.T @ residual, 2 / n * residual.sum()


def autograd_mse_grads(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same gradients with autograd: build the loss, call backward, read .grad."""
    w, b = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    loss = ((X @ w + b - y) ** 2).mean()
    loss.backward()
    return w.grad, b.grad


# ---- 4. and 5. The two models, PyTorch style -------------------------------------------
def train(model: nn.Module, loader: TensorLoader, loss_fn: nn.Module,
          optimizer: torch.optim.Optimizer, epochs: int, evaluate) -> list[dict]:
    """The loop every PyTorch training script has. ``evaluate()`` returns a dict of test metrics."""
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for xb, yb in loader:
            prediction = model(xb)           # forward: builds the graph
            loss = loss_fn(prediction, yb)   # a scalar at the end of the graph
            if not math.isfinite(loss.item()):  # a step size too large makes the loss explode
                raise NonFiniteLoss(f"the loss became {loss.item()} in epoch {epoch} with lr="
                                    f"{optimizer.param_groups[0]['lr']:g}: the step is too large, "
                                    "use a smaller one")
            optimizer.zero_grad()            # clear last step's .grad (backward accumulates)
            loss.backward()                  # dloss/dparameter into each parameter's .grad
            optimizer.step()                 # SGD: p <- p - lr * p.grad
            total += loss.item() * len(xb)
            seen += len(xb)
        history.append({"epoch": epoch, "train_loss": total / seen, **evaluate()})
    return history


def bce_stability_demo() -> dict:
    """Why BCEWithLogitsLoss(z, y) and not BCELoss(sigmoid(z), y).

    A confident wrong answer, z = 40 and y = 0, has loss log(1 + e^40) ~ 40. In float32
    sigmoid(40) is exactly 1.0, so BCELoss takes log(1 - 1) = log(0): clamped to -100, with a
    gradient of 0 through the rounded sigmoid: no learning from the worst mistakes.
    BCEWithLogitsLoss computes max(z, 0) - z y + log(1 + e^-|z|) (log-sum-exp) from z: exact,
    with the informative gradient sigmoid(z) - y."""
    z = torch.tensor([40.0, -120.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0])
    with_logits = nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    through_sigmoid = nn.functional.binary_cross_entropy(torch.sigmoid(z), y, reduction="none")
    grad_with_logits = torch.autograd.grad(with_logits.sum(), z)[0]
    grad_through_sigmoid = torch.autograd.grad(through_sigmoid.sum(), z)[0]
    print("a confident wrong prediction, float32: logits z = [40, -120], targets y = [0, 1]")
    print(f"  BCEWithLogitsLoss:     loss {with_logits.tolist()}, "
          f"dloss/dz {grad_with_logits.tolist()}")
    print(f"  sigmoid then BCELoss:  loss {through_sigmoid.tolist()}, "
          f"dloss/dz {grad_through_sigmoid.tolist()}")
    return {"bce_with_logits_loss_z40": with_logits[0].item(),
            "bce_after_sigmoid_loss_z40": through_sigmoid[0].item()}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    reg = load_arrays("diabetes", cfg.data_dir, cfg.synthetic, cfg.seed)
    clf = load_arrays("breast_cancer", cfg.data_dir, cfg.synthetic, cfg.seed)
    run = Run.start(cfg, __file__, device)

    print("\n== 1. environment")
    env = environment(device)
    for key, value in env.items():
        print(f"  {key:15s} {value}")

    print("\n== 2. autograd on a polynomial")
    poly = autograd_demo(cfg.x)

    print(f"\n== 3. manual gradients vs autograd (linear regression on {reg.name}, MSE, float64)")
    X64, y64 = torch.from_numpy(reg.x_train), torch.from_numpy(reg.y_train)
    w64 = torch.randn(X64.shape[1], dtype=torch.float64)
    b64 = torch.tensor(0.5, dtype=torch.float64)
    manual_w, manual_b = manual_mse_grads(X64, y64, w64, b64)
    auto_w, auto_b = autograd_mse_grads(X64, y64, w64, b64)
    grad_diff = max((manual_w - auto_w).abs().max().item(), (manual_b - auto_b).abs().item())
    print(f"  dL/dw[:3] by hand {manual_w[:3].tolist()}\n  autograd {auto_w[:3].tolist()}")
    print(f"  max |difference| over all weights and the bias: {grad_diff:.1e}")

    def tensors(*arrays):  # float32 on the device; targets (n, 1) like the model's output
        return [torch.as_tensor(a, dtype=torch.float32, device=device) for a in arrays]

    print(f"\n== 4. linear regression on {reg.name}: nn.Linear + MSELoss + optim.SGD")

    x_tr, y_tr, x_te, y_te = tensors(reg.x_train, reg.y_train[:, None],
                                     reg.x_test, reg.y_test[:, None])
    linear = nn.Linear(x_tr.shape[1], 1).to(device)
    mse = nn.MSELoss()

    @torch.inference_mode()
    def evaluate_linear() -> dict:
        linear.eval()
        return {"test_mse": mse(linear(x_te), y_te).item()}

    loader = TensorLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, seed=cfg.seed)
    linear_history = train(linear, loader, mse, torch.optim.SGD(linear.parameters(), lr=cfg.lr),
                           cfg.epochs, evaluate_linear)
    w_exact, b_exact = closed_form(reg.x_train, reg.y_train)
    exact_test_mse = float(np.mean((reg.x_test @ w_exact + b_exact - reg.y_test) ** 2))
    print(f"  after {cfg.epochs} epochs: train MSE {linear_history[-1]['train_loss']:.1f}, "
          f"test MSE {linear_history[-1]['test_mse']:.1f} (Part 1's closed form: "
          f"{exact_test_mse:.1f}; SGD with a constant step jitters around the minimum)")

    print(f"\n== 5. logistic regression on {clf.name}: nn.Linear + BCEWithLogitsLoss + optim.SGD")
    stability = bce_stability_demo()
    x_tr, y_tr, x_te, y_te = tensors(clf.x_train, clf.y_train[:, None],
                                     clf.x_test, clf.y_test[:, None])
    logistic = nn.Linear(x_tr.shape[1], 1).to(device)  # a logit z; p = sigmoid(z) when needed
    bce = nn.BCEWithLogitsLoss()

    @torch.inference_mode()
    def evaluate_logistic() -> dict:
        logistic.eval()
        logits = logistic(x_te)
        predicted = (logits >= 0).float()  # z >= 0 <=> p >= 0.5
        return {"test_loss": bce(logits, y_te).item(),
                "test_acc": (predicted == y_te).float().mean().item()}

    loader = TensorLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, seed=cfg.seed)
    logistic_history = train(logistic, loader, bce,
                             torch.optim.SGD(logistic.parameters(), lr=cfg.logistic_lr),
                             cfg.epochs, evaluate_logistic)
    majority = max(clf.y_test.mean(), 1 - clf.y_test.mean())
    print(f"  after {cfg.epochs} epochs: train BCE {logistic_history[-1]['train_loss']:.3f}, "
          f"test accuracy {logistic_history[-1]['test_acc']:.3f} (majority class: {majority:.3f})")

    for lin, log in zip(linear_history, logistic_history):
        run.log(epoch=lin["epoch"], linear_train_mse=lin["train_loss"],
                linear_test_mse=lin["test_mse"], logistic_train_bce=log["train_loss"],
                logistic_test_bce=log["test_loss"], logistic_test_acc=log["test_acc"])
    plot_curves({"train": [h["train_loss"] for h in linear_history],
                 "test": [h["test_mse"] for h in linear_history]},
                run.path("linear_curves.png"), ylabel="MSE",
                title=f"linear regression on {reg.name}", logy=True)
    plot_curves({"train BCE": [h["train_loss"] for h in logistic_history],
                 "test BCE": [h["test_loss"] for h in logistic_history],
                 "test accuracy": [h["test_acc"] for h in logistic_history]},
                run.path("logistic_curves.png"), title=f"logistic regression on {clf.name}")

    return run.finish(**{f"env_{k}": v for k, v in env.items()}, **poly, **stability,
                      linear_grad_max_abs_diff=grad_diff, closed_form_test_mse=exact_test_mse,
                      linear_test_mse=linear_history[-1]["test_mse"],
                      logistic_test_acc=logistic_history[-1]["test_acc"],
                      logistic_test_bce=logistic_history[-1]["test_loss"],
                      logistic_majority_acc=majority)


if __name__ == "__main__":
    launch(main, Config)
