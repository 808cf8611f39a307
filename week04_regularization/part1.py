"""Week 4, Part 1: BatchNorm, Dropout, weight decay and learning-rate schedules in NumPy.

Run: python week04_regularization/part1.py [--smoke] [--help]

Everything here is written from the formulas, then checked against PyTorch in
tests/test_week04_regularization.py (nn.BatchNorm1d/2d, nn.Dropout, torch.optim.SGD/Adam/AdamW,
torch.optim.lr_scheduler). The script itself runs small demonstrations of each idea and plots
every schedule on one figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch

from common.config import BaseConfig, Range
from common.device import seed_everything
from common.parity import max_relative_error, numerical_grad
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run

# =========================================================================================
# BatchNorm
# =========================================================================================
# For every channel c, over the m values it takes in a mini-batch (m = N for (N, D) inputs,
# m = N*H*W for (N, C, H, W) images):
#
#     mu    = (1/m) sum_i x_i                    batch mean
#     var   = (1/m) sum_i (x_i - mu)^2           batch variance, BIASED (divide by m)
#     x^_i  = (x_i - mu) / sqrt(var + eps)       normalized: mean 0, variance ~1
#     y_i   = gamma * x^_i + beta                learned scale and shift give the freedom back
#
# Training mode uses the batch's mu and var; evaluation mode uses running averages kept during
# training, so one test image's output does not depend on the other images in its batch.
# PyTorch's momentum convention (the opposite of an "EMA decay"):
#
#     running_mean <- (1 - momentum) * running_mean + momentum * mu
#     running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (UNBIASED)


def _channel_axes(x: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The axes to average over and the shape that broadcasts a per-channel vector:
    (N, D) -> axes (0,), shape (1, D); (N, C, H, W) -> axes (0, 2, 3), shape (1, C, 1, 1)."""
    if x.ndim == 2:
        return (0,), (1, x.shape[1])
    if x.ndim == 4:
        return (0, 2, 3), (1, x.shape[1], 1, 1)
    raise ValueError(f"BatchNorm expects (N, D) or (N, C, H, W) input, got shape {x.shape}")


@dataclass
class BatchNormCache:
    """What the backward pass needs from the forward pass."""

    x_hat: np.ndarray  # the normalized input
    inv_std: np.ndarray  # 1 / sqrt(var + eps), per channel, broadcastable
    gamma: np.ndarray  # broadcastable
    training: bool  # batch statistics (True) or fixed running statistics (False)


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      running_mean: np.ndarray, running_var: np.ndarray, training: bool = True,
                      momentum: float = 0.1, eps: float = 1e-5,
                      ) -> tuple[np.ndarray, BatchNormCache]:
    """y = gamma * (x - mu) / sqrt(var + eps) + beta for (N, D) or (N, C, H, W) input.

    training=True normalizes with the batch statistics and UPDATES ``running_mean`` and
    ``running_var`` in place (as nn.BatchNorm does); training=False uses them unchanged.
    """
    axes, shape = _channel_axes(x)
    if training:
        m = x.size // x.shape[1]  # values per channel
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # biased: this is what normalizes the batch
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * m / max(m - 1, 1)  # unbiased estimate for later use
    else:
        mean, var = running_mean, running_var
    inv_std = 1.0 / np.sqrt(var.reshape(shape) + eps)
    x_hat = (x - mean.reshape(shape)) * inv_std
    out = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return out, BatchNormCache(x_hat, inv_std, gamma.reshape(shape), training)


def batchnorm_backward(d_out: np.ndarray,
                       cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dL/dx, dL/dgamma, dL/dbeta) from dL/dy.

        dL/dbeta  = sum_i dy_i                 dL/dgamma = sum_i dy_i * x^_i
        g_i       = gamma * dy_i               (the gradient reaching x^_i)

    Evaluation mode: mu and var are constants, so dL/dx_i = g_i / sqrt(var + eps).
    Training mode: mu and var depend on every x_i too. Pushing g through x^ = (x - mu) * inv_std
    with the chain rule over mu and var and simplifying gives, per channel,

        dL/dx_i = inv_std / m * (m * g_i - sum_j g_j - x^_i * sum_j g_j x^_j)

    i.e. the incoming gradient with its mean removed and its component along x^ removed:
    BatchNorm's output cannot change by shifting or scaling the batch, so neither can its input.
    """
    axes, shape = _channel_axes(d_out)
    x_hat, inv_std = cache.x_hat, cache.inv_std
    d_beta = d_out.sum(axis=axes)
    d_gamma = (d_out * x_hat).sum(axis=axes)
    g = d_out * cache.gamma
    if not cache.training:
        return g * inv_std, d_gamma, d_beta
    m = d_out.size // d_out.shape[1]
    sum_g = g.sum(axis=axes).reshape(shape)
    sum_g_xhat = (g * x_hat).sum(axis=axes).reshape(shape)
    d_x = inv_std / m * (m * g - sum_g - x_hat * sum_g_xhat)
    return d_x, d_gamma, d_beta


class BatchNorm:
    """A BatchNorm layer holding its parameters, gradients and running statistics.

    ``train()``/``eval()`` switch modes as on an nn.Module; ``forward`` then ``backward(dy)``
    fills ``d_gamma`` and ``d_beta`` and returns dL/dx.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        self.gamma, self.beta = np.ones(num_features), np.zeros(num_features)
        self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
        self.momentum, self.eps, self.training = momentum, eps, True
        self.d_gamma = self.d_beta = None
        self._cache: BatchNormCache | None = None

    def train(self) -> BatchNorm:
        self.training = True
        return self

    def eval(self) -> BatchNorm:
        self.training = False
        return self

    def forward(self, x: np.ndarray) -> np.ndarray:
        out, self._cache = batchnorm_forward(x, self.gamma, self.beta, self.running_mean,
                                             self.running_var, self.training, self.momentum,
                                             self.eps)
        return out

    def backward(self, d_out: np.ndarray) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("call forward before backward")
        d_x, self.d_gamma, self.d_beta = batchnorm_backward(d_out, self._cache)
        return d_x


# =========================================================================================
# Inverted Dropout
# =========================================================================================
# Training: zero each unit with probability p and scale the survivors by 1 / (1 - p):
#     y_i = x_i * z_i / (1 - p),   z_i ~ Bernoulli(1 - p)   =>   E[y_i] = x_i
# so the expected activation is the same as at test time, where dropout is the identity.
# (The original paper scaled the weights at test time instead; "inverted" moves the scaling to
# training so inference needs no change.) Backward: dL/dx_i = dL/dy_i * z_i / (1 - p).


def dropout_forward(x: np.ndarray, p: float, training: bool = True,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (y, scaled_mask) with y = x * scaled_mask; the mask is all ones in evaluation."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0:
        return x.copy(), np.ones_like(x)
    if p == 1:  # every unit dropped: avoid 0 / 0
        return np.zeros_like(x), np.zeros_like(x)
    rng = rng if rng is not None else np.random.default_rng()
    mask = (rng.random(x.shape) >= p) / (1 - p)
    return x * mask, mask


def dropout_backward(d_out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same mask passes the gradient: units that were dropped get none."""
    return d_out * mask


# =========================================================================================
# Weight decay: an L2 term's gradient vs decoupled decay
# =========================================================================================
# L2 regularization adds (wd/2)*||w||^2 to the loss, so its gradient wd*w is ADDED TO THE
# GRADIENT before the optimizer sees it (torch.optim.SGD/Adam ``weight_decay``).
# Decoupled decay (Loshchilov & Hutter, AdamW) shrinks the weights DIRECTLY, w <- w*(1 - lr*wd),
# and the optimizer sees only the loss gradient.
#
#   plain SGD: w - lr*(g + wd*w) = w*(1 - lr*wd) - lr*g   -> the two are the same thing.
#   Adam:      the L2 gradient goes through m / sqrt(v), so weights with large gradients
#              (large v) are decayed LESS; AdamW decays every weight at the same rate lr*wd.


def sgd_step(w: np.ndarray, grad: np.ndarray, lr: float, weight_decay: float = 0.0,
             decoupled: bool = False) -> np.ndarray:
    """One plain SGD step (no momentum) with L2 (coupled) or decoupled weight decay."""
    if decoupled:
        return w * (1 - lr * weight_decay) - lr * grad
    return w - lr * (grad + weight_decay * w)


@dataclass
class AdamState:
    m: np.ndarray  # first moment: running mean of gradients
    v: np.ndarray  # second moment: running mean of squared gradients
    t: int = 0  # steps taken (for the bias corrections)


def adam_step(w: np.ndarray, grad: np.ndarray, state: AdamState, lr: float = 1e-3,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled: bool = False) -> np.ndarray:
    """One Adam step (``decoupled=False``: torch.optim.Adam with L2 ``weight_decay``) or AdamW
    (``decoupled=True``: torch.optim.AdamW). Updates ``state`` in place; returns the new w.

        g <- g + wd*w                  (Adam with L2 only)
        w <- w * (1 - lr*wd)           (AdamW only)
        m <- b1*m + (1-b1)*g           v <- b2*v + (1-b2)*g^2
        w <- w - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
    """
    beta1, beta2 = betas
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        grad = grad + weight_decay * w
    state.t += 1
    state.m = beta1 * state.m + (1 - beta1) * grad
    state.v = beta2 * state.v + (1 - beta2) * grad**2
    m_hat = state.m / (1 - beta1**state.t)
    v_hat = state.v / (1 - beta2**state.t)
    return w - lr * m_hat / (np.sqrt(v_hat) + eps)


def quadratic_grad(w: np.ndarray, curvature: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Gradient of L(w) = 0.5 * sum_i curvature_i * (w_i - target_i)^2."""
    return curvature * (w - target)


def weight_decay_demo(steps: int = 100, lr: float = 0.05, weight_decay: float = 0.1,
                      adam_lr: float = 0.05) -> dict[str, np.ndarray]:
    """Minimize a badly scaled quadratic from the same start with L2 and with decoupled decay.

    Returns the final weights of: SGD+L2, SGD+decoupled (equal), Adam+L2, AdamW (different).
    The curvatures differ by 100x, so Adam's per-weight scaling treats the L2 term very
    differently for the steep and the flat coordinate; AdamW does not.
    """
    curvature, target = np.array([10.0, 1.0, 0.1]), np.array([1.0, -2.0, 3.0])
    w0 = np.array([0.5, 0.5, 0.5])
    finals = {}
    for name, decoupled in (("sgd_l2", False), ("sgd_decoupled", True)):
        w = w0.copy()
        for _ in range(steps):
            w = sgd_step(w, quadratic_grad(w, curvature, target), lr, weight_decay, decoupled)
        finals[name] = w
    for name, decoupled in (("adam_l2", False), ("adamw", True)):
        w, state = w0.copy(), AdamState(np.zeros_like(w0), np.zeros_like(w0))
        for _ in range(steps):
            w = adam_step(w, quadratic_grad(w, curvature, target), state, adam_lr,
                          weight_decay=weight_decay, decoupled=decoupled)
        finals[name] = w
    return finals


# =========================================================================================
# Learning-rate schedules as plain functions of the step count t = 0, 1, 2, ...
# =========================================================================================
# Each returns the learning rate to use at step t, the value the matching
# torch.optim.lr_scheduler gives after t calls of scheduler.step().


def step_lr(t: int, base_lr: float, step_size: int, gamma: float = 0.1) -> float:
    """StepLR: lr = base_lr * gamma^floor(t / step_size) (drop by gamma every step_size)."""
    return base_lr * gamma ** (t // step_size)


def exponential_lr(t: int, base_lr: float, gamma: float) -> float:
    """ExponentialLR: lr = base_lr * gamma^t."""
    return base_lr * gamma**t


def cosine_lr(t: int, base_lr: float, t_max: int, eta_min: float = 0.0) -> float:
    """CosineAnnealingLR for 0 <= t <= t_max: half a cosine from base_lr down to eta_min,
    lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / t_max)) / 2."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * min(t, t_max) / t_max)) / 2


def linear_warmup_lr(t: int, base_lr: float, start_factor: float = 0.1, end_factor: float = 1.0,
                     total_iters: int = 5) -> float:
    """LinearLR (used for warmup): the factor goes linearly from start_factor to end_factor
    over total_iters steps, then stays: lr = base_lr * (s + (e - s) * min(t, T) / T).
    Warmup keeps the first steps small while BatchNorm statistics and Adam's moments settle."""
    return base_lr * (start_factor
                      + (end_factor - start_factor) * min(t, total_iters) / total_iters)


def one_cycle_lr(t: int, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 anneal: str = "cos") -> float:
    """OneCycleLR (Smith & Topin): warm up from max_lr/div_factor to max_lr over the first
    pct_start of training, then anneal down to max_lr/(div_factor*final_div_factor).

    Phase 1 covers steps 0 .. pct_start*total_steps - 1 and phase 2 ends at total_steps - 1
    (PyTorch's boundaries); inside a phase, pct = (t - start) / (end - start) and
        cos:    lr = end + (start - end) * (1 + cos(pi * pct)) / 2
        linear: lr = start + (end - start) * pct
    """
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warmup_end = pct_start * total_steps - 1
    if t <= warmup_end:
        start_step, end_step, start_lr, end_lr = 0.0, warmup_end, initial_lr, max_lr
    else:
        start_step, end_step, start_lr, end_lr = warmup_end, total_steps - 1, max_lr, min_lr
    pct = (t - start_step) / (end_step - start_step)
    if anneal == "linear":
        return start_lr + (end_lr - start_lr) * pct
    return end_lr + (start_lr - end_lr) * (1 + math.cos(math.pi * pct)) / 2


def schedule_curves(total_steps: int, base_lr: float = 0.1) -> dict[str, list[float]]:
    """Every schedule over the same number of steps, for one plot."""
    warmup = max(total_steps // 10, 1)
    step_size = max(int(0.3 * total_steps), 1)
    steps = range(total_steps)
    return {
        "step (x0.1 every 30%)": [step_lr(t, base_lr, step_size) for t in steps],
        "exponential (gamma=0.97)": [exponential_lr(t, base_lr, 0.97) for t in steps],
        "cosine": [cosine_lr(t, base_lr, total_steps - 1) for t in steps],
        "linear warmup (10%)": [linear_warmup_lr(t, base_lr, 0.1, 1.0, warmup) for t in steps],
        "one-cycle": [one_cycle_lr(t, base_lr, total_steps) for t in steps],
    }


# =========================================================================================
# The script: a demonstration of each idea
# =========================================================================================
@dataclass
class Config(BaseConfig):
    """Week 4, Part 1: BatchNorm, Dropout, weight decay and LR schedules from scratch (NumPy)."""

    batch_size: Annotated[int, Range(2, 100_000)] = 64  # rows of the BN / Dropout batch (2+: var)
    features: Annotated[int, Range(1, 1024)] = 8  # features per row
    dropout: Annotated[float, Range(0, 1)] = 0.3  # dropout probability in the demonstration
    bn_steps: Annotated[int, Range(1, 1_000_000)] = 50  # batches fed to BatchNorm before eval mode
    wd_steps: Annotated[int, Range(1, 1_000_000)] = 200  # optimizer steps in the weight-decay demo
    schedule_steps: Annotated[int, Range(2, 1_000_000)] = 100  # steps shown in the schedule plot

    SMOKE: ClassVar[dict] = {"bn_steps": 10, "wd_steps": 50, "schedule_steps": 40}  # --smoke
    UNUSED: ClassVar[tuple] = ("device", "data_dir")  # NumPy on the CPU, data drawn in memory


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    run = Run.start(cfg, __file__, device=torch.device("cpu"))  # NumPy only: runs on the CPU

    # BatchNorm: inputs far from mean 0 / std 1 come out normalized; running stats converge.
    true_mean, true_std = rng.normal(5, 2, cfg.features), rng.uniform(0.5, 3, cfg.features)
    bn = BatchNorm(cfg.features, momentum=0.1)
    for step in range(1, cfg.bn_steps + 1):
        x = true_mean + true_std * rng.standard_normal((cfg.batch_size, cfg.features))
        y = bn.forward(x)
        run.log(demo="batchnorm", step=step, out_mean=float(np.abs(y.mean(0)).max()),
                 out_std=float(y.std(0).mean()),
                 running_mean_error=float(np.abs(bn.running_mean - true_mean).max()))
    print(f"BatchNorm: train-mode output mean {np.abs(y.mean(0)).max():.2e}, "
          f"std {y.std(0).mean():.3f}; "
          f"running mean within {np.abs(bn.running_mean - true_mean).max():.3f} of the true mean "
          f"after {cfg.bn_steps} batches")
    bn.eval()
    y_eval = bn.forward(x[:1])  # one image alone: works only with running statistics

    # Backward checked against finite differences (the tests compare with PyTorch as well).
    x_small = rng.standard_normal((6, 3))
    upstream = rng.standard_normal((6, 3))
    check = BatchNorm(3)

    def loss_of(x_in: np.ndarray) -> float:
        out, _ = batchnorm_forward(x_in, check.gamma, check.beta, np.zeros(3), np.ones(3), True)
        return float((out * upstream).sum())

    check.forward(x_small)
    grad_error = max_relative_error(check.backward(upstream), numerical_grad(loss_of, x_small))
    print(f"BatchNorm backward vs finite differences: max relative error {grad_error:.2e}")

    # Dropout keeps the expected activation: average many masks of the same input.
    ones = np.ones((2000, cfg.features))
    dropped, mask = dropout_forward(ones, cfg.dropout, training=True, rng=rng)
    zero_fraction = float((mask == 0).mean())
    print(f"Dropout p={cfg.dropout}: zeros {zero_fraction:.3f}, "
          f"mean output {dropped.mean():.3f} (input 1.0)")

    # Weight decay: identical for SGD, different for Adam.
    finals = weight_decay_demo(steps=cfg.wd_steps)
    sgd_gap = float(np.abs(finals["sgd_l2"] - finals["sgd_decoupled"]).max())
    adam_gap = float(np.abs(finals["adam_l2"] - finals["adamw"]).max())
    for name, w in finals.items():
        print(f"  {name:14s} final w = {np.array2string(w, precision=4)}")
    print(f"weight decay: |SGD+L2 - SGD decoupled| = {sgd_gap:.1e}; "
          f"|Adam+L2 - AdamW| = {adam_gap:.3f}")

    curves = schedule_curves(cfg.schedule_steps)
    plot = plot_curves(curves, run.path("schedules.png"), xlabel="step", ylabel="learning rate",
                       title="learning-rate schedules (base lr 0.1)")
    print(f"schedules plotted to {plot}")
    return run.finish(bn_out_std=float(y.std(0).mean()), bn_eval_out=float(y_eval.mean()),
                       bn_grad_rel_error=grad_error, dropout_zero_fraction=zero_fraction,
                       dropout_mean=float(dropped.mean()), sgd_l2_vs_decoupled=sgd_gap,
                       adam_l2_vs_adamw=adam_gap)


if __name__ == "__main__":
    launch(main, Config)
