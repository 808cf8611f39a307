"""Week 1 self-work: one linear regression trained three ways, compared step by step.

    1. NumPy, gradients by hand (Part 1's mse_loss_and_grad)
    2. PyTorch tensors, the same hand-written gradients, no autograd
    3. PyTorch autograd: loss.backward() and torch.optim.SGD

Same data, same start, same step size: the three parameter trajectories must be identical up to
floating-point rounding. The script reports the largest difference over all steps and the time
each version takes. Try --dtype float32 to see how rounding differences grow.

Run: python week01_regression/manual_vs_autograd.py [--smoke] [--help]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.config import BaseConfig, Range
from common.device import seed_everything
from common.errors import LabError
from common.plots import save
from common.runner import launch
from common.runs import Run
from week01_regression.part1 import load_arrays, max_stable_lr, mse_loss_and_grad
from week01_regression.part2 import manual_mse_grads


@dataclass
class Config(BaseConfig):
    """Week 1 self-work: manual gradients vs autograd, the same model trained three ways."""

    steps: Annotated[int, Range(1)] = 500  # full-batch gradient-descent steps for each version
    lr: Annotated[float, Range(0, lo_open=True)] = 0.1  # step size for all three (stable < ~0.245)
    dtype: Literal["float64", "float32"] = "float64"  # float64: differences are rounding (~1e-13)
    synthetic: bool = False  # use the synthetic twin of diabetes instead of the real set

    SMOKE: ClassVar[dict] = {"steps": 100}
    UNUSED: ClassVar[tuple] = ('device', 'data_dir')  # CPU only, data bundled with scikit-learn


@dataclass
class Trajectory:
    params: np.ndarray  # (steps + 1, features + 1): [w..., b] before the first step and after each
    losses: np.ndarray  # (steps + 1,): the loss at those parameters
    seconds: float


def numpy_by_hand(X: np.ndarray, y: np.ndarray, lr: float, steps: int) -> Trajectory:
    """Part 1's loop: loss and gradient from the hand-derived formulas, then w -= lr * grad."""
    w, b = np.zeros(X.shape[1], dtype=X.dtype), X.dtype.type(0)
    params, losses = [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        loss, grad_w, grad_b = mse_loss_and_grad(X, y, w, b)
        params.append(np.append(w, b))
        losses.append(loss)
        if step < steps:
            w, b = w - lr * grad_w, b - X.dtype.type(lr * grad_b)
    return Trajectory(np.array(params), np.array(losses), time.perf_counter() - start)


def torch_by_hand(X: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> Trajectory:
    """The same formulas on torch tensors (Part 2's manual_mse_grads); autograd is never used."""
    w, b = torch.zeros(X.shape[1], dtype=X.dtype), torch.zeros((), dtype=X.dtype)
    params, losses = [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        residual = X @ w + b - y
        params.append(torch.cat([w, b.reshape(1)]))
        losses.append((residual @ residual / len(y)).item())
        if step < steps:
            grad_w, grad_b = manual_mse_grads(X, y, w, b)
            w, b = w - lr * grad_w, b - lr * grad_b
    return Trajectory(torch.stack(params).numpy(), np.array(losses), time.perf_counter() - start)


def torch_autograd(X: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> Trajectory:
    """No formulas: autograd differentiates the loss; optim.SGD applies p <- p - lr * p.grad."""
    w = torch.zeros(X.shape[1], dtype=X.dtype, requires_grad=True)
    b = torch.zeros((), dtype=X.dtype, requires_grad=True)
    optimizer = torch.optim.SGD([w, b], lr=lr)
    params, losses = [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        loss = ((X @ w + b - y) ** 2).mean()
        params.append(torch.cat([w.detach(), b.detach().reshape(1)]))
        losses.append(loss.item())
        if step < steps:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Trajectory(torch.stack(params).numpy(), np.array(losses), time.perf_counter() - start)


def max_abs_diff_per_step(a: Trajectory, b: Trajectory) -> np.ndarray:
    """For each step, the largest |difference| over all parameters of two trajectories."""
    return np.max(np.abs(a.params.astype(np.float64) - b.params.astype(np.float64)), axis=1)


def compare(X: np.ndarray, y: np.ndarray, lr: float, steps: int) -> dict[str, Trajectory]:
    """Train the three versions on the same arrays (their dtype decides the precision)."""
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    return {
        "numpy, by hand": numpy_by_hand(X, y, lr, steps),
        "torch, by hand": torch_by_hand(Xt, yt, lr, steps),
        "torch, autograd + optim.SGD": torch_autograd(Xt, yt, lr, steps),
    }


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    data = load_arrays("diabetes", cfg.data_dir, cfg.synthetic, cfg.seed)
    X, y = data.x_train.astype(cfg.dtype), data.y_train.astype(cfg.dtype)
    # Above 2/lambda_max the three runs blow up together (Part 1): nothing left to compare.
    bound = max_stable_lr(data.x_train)
    if cfg.lr >= bound:
        raise LabError(f"--lr {cfg.lr:g} would diverge: gradient descent on {data.name} is stable "
                       f"only for lr < 2/lambda_max = {bound:.4g}; use a smaller --lr")
    # Small and step by step: the CPU is the fair place to time it.
    run = Run.start(cfg, __file__, torch.device("cpu"))

    runs = compare(X, y, cfg.lr, cfg.steps)
    reference = runs["numpy, by hand"]
    diffs = {name: max_abs_diff_per_step(reference, t)
             for name, t in runs.items() if t is not reference}
    print(f"{cfg.steps} steps of full-batch gradient descent on {data.name} "
          f"({X.shape[0]}x{X.shape[1]}, {cfg.dtype}), lr={cfg.lr}")
    for name, t in runs.items():
        vs = (f"; max |param - numpy's| over all steps {diffs[name].max():.2e}"
              if name in diffs else "")
        us = t.seconds * 1e6 / (cfg.steps + 1)
        print(f"  {name:28s} final loss {t.losses[-1]:.6f}, {us:7.1f} us/step{vs}")

    every = max(1, cfg.steps // 100)
    for step in range(0, cfg.steps + 1, every):
        run.log(step=step, loss=reference.losses[step],
                **{f"max_diff_{key}": d[step]
                   for key, d in zip(("torch_by_hand", "autograd"), diffs.values())})

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, t), style in zip(runs.items(), ("-", "--", ":")):
        left.plot(t.losses, style, linewidth=2, label=name)
    left.set(xlabel="step", ylabel="train MSE", yscale="log",
             title="three implementations, one curve")
    for name, d in diffs.items():
        # A log axis cannot show 0: steps where the parameters are bit-for-bit equal are left blank.
        right.plot(np.where(d > 0, d, np.nan), label=f"{name} vs numpy")
    right.set(xlabel="step", ylabel="max |parameter difference| (blank: identical)", yscale="log",
              title=f"differences are rounding ({cfg.dtype})")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, run.path("manual_vs_autograd.png"))

    names = ("numpy_by_hand", "torch_by_hand", "autograd")
    return run.finish(
        dtype=cfg.dtype,
        steps=cfg.steps,
        max_abs_diff_torch_by_hand=float(diffs["torch, by hand"].max()),
        max_abs_diff_autograd=float(diffs["torch, autograd + optim.SGD"].max()),
        final_loss=float(reference.losses[-1]),
        **{f"{n}_seconds": round(t.seconds, 4) for n, t in zip(names, runs.values())},
    )


if __name__ == "__main__":
    launch(main, Config)
