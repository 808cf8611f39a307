"""Parity checks: the same computation from scratch (NumPy) and in PyTorch, compared.

The shape of micrograd's tests: run the NumPy forward and hand-written backward, run the
same function in torch with autograd, and compare values and gradients at a stated tolerance.
All comparisons are in float64 so the tolerance measures our math, not float32 rounding.

    out, grads = torch_reference(lambda x, w: torch.tanh(x @ w), x, w, upstream=g)
    assert_close(my_out, out, "forward"); assert_close(my_dx, grads[0], "dL/dx")
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# float64 parity: near float64 rounding (DESIGN.md 7); looser needs a reason at the call site
RTOL, ATOL = 1e-10, 1e-12


def torch_reference(fn: Callable[..., torch.Tensor], *arrays: np.ndarray,
                    upstream: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run ``fn`` on float64 tensors made from ``arrays``; return its output and the gradient
    of ``sum(output * upstream)`` with respect to each input (``upstream`` defaults to ones,
    i.e. the gradient of ``output.sum()``)."""
    tensors = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    g = torch.ones_like(out)
    if upstream is not None:
        g = torch.tensor(np.asarray(upstream, dtype=np.float64))
    out.backward(g)
    grads = [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for t in tensors]
    return out.detach().numpy(), grads


def numerical_grad(f: Callable[[np.ndarray], float], x: np.ndarray,
                   eps: float = 1e-6) -> np.ndarray:
    """Central finite differences: df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps).

    Error O(eps^2) from the Taylor series, plus rounding O(1e-16 / eps): eps = 1e-6 balances
    the two in float64. ``f`` must return a scalar; ``x`` is not modified.
    """
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f(x)
        x[i] = old - eps
        minus = f(x)
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| / max(|a| + |e|, tiny): the number a gradient check reports."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = np.maximum(np.abs(actual) + np.abs(expected), 1e-12)
    return float(np.max(np.abs(actual - expected) / scale))


def assert_close(actual, expected, what: str = "value", rtol: float = RTOL,
                 atol: float = ATOL) -> None:
    """``np.testing.assert_allclose`` with the shapes checked first and a readable name."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol,
                               err_msg=f"{what} differs from PyTorch")
