"""Week 1 self-work: data -> model -> loss -> gradients -> optimizer step pipeline, made visible.

A tiny problem (fit a line to a handful of noisy points) small enough to print everything:
the shape of each tensor at each stage, the loss, the gradients (checked against the formula),
and the parameter update of each step. The figure shows the fitted line moving step by step.
Every PyTorch training loop in the coming weeks is this loop with a bigger model and data.

Run: python week01_regression/pipeline.py [--smoke] [--help]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import NonFiniteLoss
from common.plots import save
from common.runner import launch
from common.runs import Run


@dataclass
class Config(BaseConfig):
    """Week 1 self-work: every stage of one training loop, printed and plotted."""

    n_points: Annotated[int, Range(2, 1_000_000)] = 16  # examples in the toy set y = 2x + 1 + noise
    noise: Annotated[float, Range(0, 100)] = 0.3  # standard deviation of the noise on y
    steps: Annotated[int, Range(1)] = 40  # full-batch gradient-descent steps
    # At most 1e6: past that the loss overflows anyway, and above float32's 3.4e38 torch.optim
    # cannot represent the step at all (a RuntimeError instead of this script's message).
    # Gradient descent diverges above 2/lambda_max, ~0.75 on this data.
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.1  # SGD step size (diverges above ~0.75)
    detailed_steps: Annotated[int, Range(0)] = 2  # how many first steps to print stage by stage

    SMOKE: ClassVar[dict] = {"steps": 20}
    UNUSED: ClassVar[tuple] = ('data_dir',)  # bundled with scikit-learn: no --data-dir


def describe(name: str, t: torch.Tensor) -> str:
    """One line about a tensor: its shape, dtype, and whether autograd tracks it."""
    tracked = f", grad_fn={type(t.grad_fn).__name__}" if t.grad_fn is not None else ""
    return f"{name:10s} shape={tuple(t.shape)!s:8s} dtype={t.dtype}{tracked}"


def make_data(n: int, noise: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x uniform in [-2, 2], y = 2x + 1 + noise. Shaped (n, 1): n examples of 1 feature each,
    the layout nn.Linear expects (a batch dimension first)."""
    x = 4 * torch.rand(n, 1, generator=generator) - 2
    return x, 2 * x + 1 + noise * torch.randn(n, 1, generator=generator)


def training_step(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                  optimizer: torch.optim.Optimizer, verbose: bool) -> dict:
    """One pass through the pipeline; prints each stage when ``verbose``. Returns what happened."""
    before = [p.detach().clone() for p in model.parameters()]
    prediction = model(x)                       # model: y_hat = x W^T + b
    loss = loss_fn(prediction, y)               # loss: mean((y_hat - y)^2), a 0-d tensor
    optimizer.zero_grad()
    loss.backward()                             # gradients: dloss/dW, dloss/db into .grad
    grad_w, grad_b = model.weight.grad.clone(), model.bias.grad.clone()
    grad_norm = torch.sqrt(grad_w.square().sum() + grad_b.square().sum())
    optimizer.step()                            # optimizer: p <- p - lr * p.grad
    update = [p.detach() - old for p, old in zip(model.parameters(), before)]
    if verbose:
        # The same gradient by hand: with r = y_hat - y, dL/dW = (2/n) sum r x, dL/db = (2/n) sum r.
        residual = (prediction - y).detach()
        manual_w, manual_b = 2 * (residual * x).mean(), 2 * residual.mean()
        print("  " + describe("prediction", prediction) + "  (model output, one per example)")
        print("  " + describe("loss", loss) + f"  value {loss.item():.4f}")
        print(f"  gradients  dL/dW={grad_w.item():+.4f} (by hand {manual_w.item():+.4f})  "
              f"dL/db={grad_b.item():+.4f} (by hand {manual_b.item():+.4f})  "
              f"norm {grad_norm.item():.4f}")
        print(f"  update     W {before[0].item():+.4f} -> {model.weight.item():+.4f} "
              f"(change {update[0].item():+.4f} = -lr * dL/dW)   "
              f"b {before[1].item():+.4f} -> {model.bias.item():+.4f} "
              f"(change {update[1].item():+.4f})")
    return {"loss": loss.item(), "grad_norm": grad_norm.item(),
            "update_norm": torch.sqrt(sum(u.square().sum() for u in update)).item(),
            "w": model.weight.item(), "b": model.bias.item()}


def plot_pipeline(path, x: torch.Tensor, y: torch.Tensor, lines: list[tuple[int, float, float]],
                  rows: list[dict]) -> None:
    """Left: the data and the fitted line after selected steps (dark = early, bright = late).
    Right: loss, gradient norm and update size per step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x_np, y_np = x.cpu().numpy().ravel(), y.cpu().numpy().ravel()
    left.scatter(x_np, y_np, color="black", s=18, zorder=3, label="data")
    grid = np.linspace(x_np.min(), x_np.max(), 2)
    colors = plt.cm.viridis(np.linspace(0, 1, len(lines)))
    for (step, w, b), color in zip(lines, colors):
        left.plot(grid, w * grid + b, color=color, label=f"step {step}")
    left.set(xlabel="x", ylabel="y", title="the fitted line, step by step")
    left.legend(fontsize=7)
    steps = [r["step"] for r in rows]
    for key in ("loss", "grad_norm", "update_norm"):
        right.plot(steps, [r[key] for r in rows], label=key)
    right.set(xlabel="step", yscale="log", title="loss, gradient norm, update size")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save(fig, path)


def main(cfg: Config) -> dict:
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    run = Run.start(cfg, __file__, device)

    print("\n1. data")
    x, y = (t.to(device) for t in make_data(cfg.n_points, cfg.noise, generator))
    print("  " + describe("x", x) + "  (examples x features)")
    print("  " + describe("y", y) + "  (examples x targets)")

    print("\n2. model: nn.Linear(1, 1), y_hat = x W^T + b")
    model = nn.Linear(1, 1).to(device)
    for name, p in model.named_parameters():
        print(f"  {describe(name, p)}  requires_grad={p.requires_grad}  value {p.item():+.4f}")

    print(f"\n3-5. loss (MSELoss) -> gradients (backward) -> optimizer step (SGD, lr={cfg.lr})")
    loss_fn, optimizer = nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=cfg.lr)
    shown = {0, 1, 2, 5, 10, 20, cfg.steps}
    lines = [(0, model.weight.item(), model.bias.item())]
    rows = []
    for step in range(1, cfg.steps + 1):
        verbose = step <= cfg.detailed_steps
        if verbose:
            print(f" step {step}")
        row = {"step": step, **training_step(model, x, y, loss_fn, optimizer, verbose)}
        if not math.isfinite(row["loss"]):  # each step overshoots more than the last: divergence
            raise NonFiniteLoss(f"the loss became {row['loss']} at step {step}: "
                                f"--lr {cfg.lr:g} is too large")
        rows.append(row)
        run.log(**row)
        if step in shown:
            lines.append((step, row["w"], row["b"]))
        if not verbose and (step == cfg.detailed_steps + 1 or step % 10 == 0 or step == cfg.steps):
            print(f" step {step:3d}: loss {row['loss']:.4f}  |grad| {row['grad_norm']:.4f}  "
                  f"|update| {row['update_norm']:.5f}  W {row['w']:+.4f}  b {row['b']:+.4f}")
    plot_pipeline(run.path("pipeline.png"), x, y, lines, rows)

    # The least-squares line for the same points: where gradient descent is heading.
    A, target = torch.cat([x, torch.ones_like(x)], dim=1).double().cpu(), y.double().cpu()
    solution = torch.linalg.lstsq(A, target).solution
    w_best, b_best = solution.ravel().tolist()
    best_loss = torch.mean((A @ solution - target) ** 2).item()
    print(f"\nafter {cfg.steps} steps: W {rows[-1]['w']:+.4f}, b {rows[-1]['b']:+.4f}, "
          f"loss {rows[-1]['loss']:.4f} (least squares: W {w_best:+.4f}, b {b_best:+.4f}, "
          f"loss {best_loss:.4f}; the data came from W=2, b=1)")
    return run.finish(first_loss=rows[0]["loss"], final_loss=rows[-1]["loss"],
                      final_w=rows[-1]["w"], final_b=rows[-1]["b"], least_squares_w=w_best,
                      least_squares_b=b_best, least_squares_loss=best_loss)


if __name__ == "__main__":
    launch(main, Config)
