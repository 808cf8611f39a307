"""Week 1 benchmark: gradient descent vs the closed-form least-squares solution on diabetes,
NumPy vs PyTorch, error and time.

    python benchmarks/run.py week01_regression [--data-dir DIR] [--device auto] [--set steps=10000]

diabetes ships inside scikit-learn, so ``--data-dir`` is accepted and passed on but not needed.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.run import Benchmark
from common.device import pick_device
from week01_regression.part1 import closed_form, load_arrays, mse_loss_and_grad, train_linear
from week01_regression.part2 import manual_mse_grads


def torch_gradient_descent(X: torch.Tensor, y: torch.Tensor, lr: float, steps: int, autograd: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Full-batch GD in torch from zeros, with Part 2's hand gradients or with autograd; returns
    the weights, the bias and the seconds taken (synchronized on CUDA so the time is real)."""
    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device, requires_grad=autograd)
    b = torch.zeros((), dtype=X.dtype, device=X.device, requires_grad=autograd)
    optimizer = torch.optim.SGD([w, b], lr=lr) if autograd else None
    if X.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        if autograd:
            optimizer.zero_grad()
            ((X @ w + b - y) ** 2).mean().backward()
            optimizer.step()
        else:
            grad_w, grad_b = manual_mse_grads(X, y, w, b)
            w, b = w - lr * grad_w, b - lr * grad_b
    if X.device.type == "cuda":
        torch.cuda.synchronize()
    return w.detach(), b.detach(), time.perf_counter() - start


def gd_vs_closed_form(data_dir: str, device: str, options: dict) -> dict:
    steps, lr = int(options.get("steps", 10000)), float(options.get("lr", 0.2))
    data = load_arrays("diabetes", data_dir)
    X, y = data.x_train, data.y_train

    # The closed form takes well under a millisecond: time many calls and keep the fastest.
    times = []
    for _ in range(50):
        start = time.perf_counter()
        w_exact, b_exact = closed_form(X, y)
        times.append(time.perf_counter() - start)
    closed_form_s = min(times)
    exact = np.append(w_exact, b_exact)

    numpy_gd = train_linear(X, y, lr, steps)
    numpy_diff = float(np.max(np.abs(np.append(numpy_gd.w, numpy_gd.b) - exact)))

    torch_device = pick_device(device)
    Xt, yt = torch.from_numpy(X).to(torch_device), torch.from_numpy(y).to(torch_device)
    results = {}
    for name, autograd in (("torch_manual", False), ("torch_autograd", True)):
        w, b, seconds = torch_gradient_descent(Xt, yt, lr, steps, autograd)
        params = torch.cat([w, b.reshape(1)]).cpu().numpy()
        results[f"{name}_gd_s"] = round(seconds, 4)
        results[f"{name}_max_abs_weight_diff"] = float(np.max(np.abs(params - exact)))

    test_mse = lambda w, b: mse_loss_and_grad(data.x_test, data.y_test, w, b)[0]  # noqa: E731
    over_numpy = lambda name: round(results[f"{name}_gd_s"] / numpy_gd.seconds, 2)  # noqa: E731
    return {
        "metric": "gd_vs_closed_form_max_abs_weight_diff",
        "value": numpy_diff,
        "steps": steps,
        "lr": lr,
        "float": "float64",
        "torch_device": str(torch_device),
        "numpy_gd_s": round(numpy_gd.seconds, 4),
        **results,
        "closed_form_s": closed_form_s,
        "numpy_gd_over_closed_form_time": round(numpy_gd.seconds / closed_form_s, 1),
        "torch_manual_over_numpy_time": over_numpy("torch_manual"),
        "torch_autograd_over_numpy_time": over_numpy("torch_autograd"),
        "gd_test_mse": test_mse(numpy_gd.w, numpy_gd.b),
        "closed_form_test_mse": test_mse(w_exact, b_exact),
    }


ENTRIES = {
    "week01_regression": Benchmark(
        gd_vs_closed_form,
        "diabetes linear regression: GD (NumPy, torch by hand, torch autograd) vs closed form, "
        "error and time",
        higher_is_better=False,
    ),
}
