"""Week 1, Part 1: linear and logistic regression by gradient descent, from scratch in NumPy.

Every gradient here is derived by hand (the formula sits next to its code), checked against
finite differences, and, for linear regression, compared with the exact least-squares answer.
Then: L2 regularization, a learning-rate study, the loss landscape, and overfitting.

Run: python week01_regression/part1.py [--smoke] [--help]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import matplotlib.pyplot as plt
import numpy as np
import torch

from common.config import BaseConfig, Range
from common.data import load
from common.device import seed_everything
from common.errors import ConfigError, LabError
from common.parity import max_relative_error, numerical_grad
from common.plots import plot_curves, save
from common.runner import launch
from common.runs import Run

# A loss function for gradient descent: (w, b) -> (loss, dL/dw, dL/db).
LossAndGrad = Callable[[np.ndarray, float], tuple[float, np.ndarray, float]]


@dataclass
class Config(BaseConfig):
    """Week 1, Part 1: linear and logistic regression by gradient descent, in NumPy."""

    epochs: Annotated[int, Range(1)] = 10000  # full-batch GD steps for linear regression
    lr: Annotated[float, Range(0, lo_open=True)] = 0.2  # step size (stable < ~0.245 on diabetes)
    # Penalties stop at 1e6 (the ridge path goes to 100): 2*l2 must stay a float the
    # eigenvalue solver handles.
    l2: Annotated[float, Range(0, 1e6)] = 0.0  # L2 (ridge) penalty l2*||w||^2 for linear regression
    logistic_epochs: Annotated[int, Range(1)] = 2000  # full-batch GD steps for logistic regression
    logistic_lr: Annotated[float, Range(0, lo_open=True)] = 0.5  # logistic-regression step size
    logistic_l2: Annotated[float, Range(0, 1e6)] = 0.001  # L2 penalty (finite weights if separable)
    grad_tol: Annotated[float, Range(0)] = 0.0  # stop once |gradient| is below this (0: never)
    study_lrs: Annotated[tuple[float, ...], Range(0, lo_open=True)] = (
        0.002, 0.1, 0.3)  # learning rates to compare
    study_epochs: Annotated[int, Range(1)] = 1000  # GD steps per learning rate in the study
    max_degree: Annotated[int, Range(1, 30)] = 15  # overfitting study: polynomial degrees 1..this
    poly_train: Annotated[int, Range(2, 100_000)] = 20  # train points (few, so overfitting shows)
    landscape_steps: Annotated[int, Range(0, 10_000)] = 25  # steps drawn on the loss-landscape plot
    synthetic: bool = False  # use synthetic twins of diabetes and breast_cancer, not the real sets

    SMOKE: ClassVar[dict] = {"epochs": 6000, "logistic_epochs": 500, "study_epochs": 300,
                             "max_degree": 12}
    UNUSED: ClassVar[tuple] = ('device', 'data_dir')  # CPU only, data bundled with scikit-learn

    def check(self) -> None:
        if not self.study_lrs:
            raise ConfigError("--study-lrs needs at least one learning rate, "
                              "e.g. --study-lrs 0.002 0.1 0.3")


# ----------------------------------------------------------------------------------------
# Data: NumPy float64 arrays, features standardized with training statistics only
# ----------------------------------------------------------------------------------------
@dataclass
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str] = field(default_factory=list)
    name: str = ""


def standardize(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """(x - mean) / std with the mean and std of the TRAINING set, applied to every set.

    Using test statistics would leak information about the test set into the model. A
    constant column (std 0) is only centered, not divided by zero.
    """
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(x - mean) / std for x in (x_train, *others)]


def load_arrays(name: str, data_dir: str = "", synthetic: bool = False, seed: int = 0) -> Arrays:
    """A registry data set (``common.data.load``) as standardized float64 NumPy arrays."""
    data = load(name, data_dir, synthetic=synthetic, seed=seed)
    x_train, x_test = standardize(data.x_train.double().numpy(), data.x_test.double().numpy())
    return Arrays(x_train, data.y_train.double().numpy(), x_test, data.y_test.double().numpy(),
                  list(data.feature_names), data.name)


def line_data(n: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One feature, y = 1.5 x - 2 + noise, with x in [0, 4] (deliberately not centered)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 4, size=n)
    return x, 1.5 * x - 2 + 0.5 * rng.normal(size=n)


def curve_data(n: int, seed: int = 0, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """One feature, y = sin(3x) + noise, x in [-1, 1]: a curve no straight line can follow."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=n)
    return x, np.sin(3 * x) + noise * rng.normal(size=n)


# ----------------------------------------------------------------------------------------
# Linear regression: the model, the loss, its gradient
# ----------------------------------------------------------------------------------------
def mse_loss_and_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l2: float = 0.0,
                      ) -> tuple[float, np.ndarray, float]:
    """Mean squared error of the linear model y_hat = X w + b, plus an optional L2 (ridge) term.

        L(w, b) = (1/n) sum_i (x_i . w + b - y_i)^2  +  l2 ||w||^2

    With the residual r = X w + b - y, the chain rule on the square gives

        dL/dw = (2/n) X^T r  +  2 l2 w
        dL/db = (2/n) sum_i r_i              (the bias is not penalized: it only shifts the line)
    """
    n = len(y)
    residual = X @ w + b - y
    loss = residual @ residual / n + l2 * (w @ w)
    grad_w = (2 / n) * (X.T @ residual) + 2 * l2 * w
    grad_b = (2 / n) * residual.sum()
    return float(loss), grad_w, float(grad_b)


def closed_form(X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> tuple[np.ndarray, float]:
    """The exact minimizer of the loss above, with no iterations.

    Append a column of ones, A = [X 1] and theta = [w; b]. Setting the gradient to zero gives
    the normal equations

        (A^T A + n l2 P) theta = A^T y,      P = diag(1, ..., 1, 0)   (no penalty on b)

    We never form inv(A^T A): inverting costs more, and multiplying by a rounded inverse loses
    accuracy when A^T A is ill-conditioned. Without a penalty, ``lstsq`` works on A itself
    (via the SVD), whose condition number is the square root of A^T A's, and also copes when
    A has dependent columns. With l2 > 0 the matrix is symmetric positive definite, so a
    direct ``solve`` of the normal equations is fine.
    """
    n = len(y)
    A = np.hstack([X, np.ones((n, 1))])
    if l2 == 0:
        theta = np.linalg.lstsq(A, y, rcond=None)[0]
    else:
        P = np.eye(A.shape[1])
        P[-1, -1] = 0.0
        theta = np.linalg.solve(A.T @ A + n * l2 * P, A.T @ y)
    return theta[:-1], float(theta[-1])


def max_stable_lr(X: np.ndarray, l2: float = 0.0) -> float:
    """The largest step size for which gradient descent on the MSE does not diverge.

    The MSE is a quadratic with Hessian H = (2/n) A^T A (+ 2 l2 on the weights). Along H's top
    eigenvector one step multiplies the error by (1 - lr lambda_max); that shrinks only when
    lr < 2 / lambda_max. (The slowest direction shrinks by 1 - lr lambda_min per step.)
    """
    n = len(X)
    A = np.hstack([X, np.ones((n, 1))])
    H = (2 / n) * A.T @ A
    H[:-1, :-1] += 2 * l2 * np.eye(X.shape[1])
    return float(2 / np.linalg.eigvalsh(H)[-1])


# ----------------------------------------------------------------------------------------
# Logistic regression: binary cross-entropy and its gradient
# ----------------------------------------------------------------------------------------
def sigmoid(z: np.ndarray) -> np.ndarray:
    """sigma(z) = 1 / (1 + e^-z), computed as e^z / (1 + e^z) for z < 0 so no exp overflows."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def logistic_loss_and_grad(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, l2: float = 0.0,
                           ) -> tuple[float, np.ndarray, float]:
    """Binary cross-entropy of p = sigma(z), z = X w + b, against labels y in {0, 1}.

        L = -(1/n) sum_i [ y_i log p_i + (1 - y_i) log(1 - p_i) ]  +  l2 ||w||^2

    Since log p = -log(1 + e^-z) and log(1 - p) = -log(1 + e^z), each term equals
    log(1 + e^z) - y z, which ``np.logaddexp(0, z)`` evaluates without overflow (never
    log(0) for a confident wrong answer). Its derivative w.r.t. z is sigma(z) - y, hence

        dL/dw = (1/n) X^T (p - y)  +  2 l2 w
        dL/db = (1/n) sum_i (p_i - y_i)
    """
    n = len(y)
    z = X @ w + b
    loss = np.mean(np.logaddexp(0.0, z) - y * z) + l2 * (w @ w)
    error = sigmoid(z) - y
    grad_w = X.T @ error / n + 2 * l2 * w
    grad_b = error.sum() / n
    return float(loss), grad_w, float(grad_b)


def accuracy(X: np.ndarray, y: np.ndarray, w: np.ndarray, b: float) -> float:
    """Share of right answers when predicting 1 where p >= 0.5, i.e. where z = X w + b >= 0."""
    return float(np.mean((X @ w + b >= 0) == (y == 1)))


# ----------------------------------------------------------------------------------------
# Gradient descent, shared by both models
# ----------------------------------------------------------------------------------------
@dataclass
class Descent:
    """What a gradient-descent run did: final parameters and the loss after each step."""

    w: np.ndarray
    b: float
    losses: list[float]  # losses[k] = loss after k steps (losses[0]: at the start)
    path: list[tuple[float, ...]]  # (w..., b) after each step, when asked for
    diverged: bool = False
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses) - 1


def gradient_descent(loss_and_grad: LossAndGrad, w0: np.ndarray, b0: float, lr: float, steps: int,
                     tol: float = 0.0, record_path: bool = False, explode: float = 1e6) -> Descent:
    """Full-batch gradient descent:  w <- w - lr dL/dw,  b <- b - lr dL/db.

    Stops early when the gradient norm drops below ``tol`` (converged), or when the loss
    becomes NaN/inf or grows past ``explode`` times its starting value (diverged). Divergence
    is reported in the result, not raised, so a learning-rate study can show it.
    """
    w, b = np.array(w0, dtype=np.float64), float(b0)
    losses, path = [], []
    start = time.perf_counter()
    # A diverging run may overflow: we check below.
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps + 1):
            loss, grad_w, grad_b = loss_and_grad(w, b)
            losses.append(loss)
            if record_path:
                path.append((*w, b))
            if not np.isfinite(loss) or loss > explode * max(losses[0], 1e-12):
                seconds = time.perf_counter() - start
                return Descent(w, b, losses, path, diverged=True, seconds=seconds)
            if step == steps or (tol > 0 and np.sqrt(grad_w @ grad_w + grad_b**2) < tol):
                break
            w, b = w - lr * grad_w, b - lr * grad_b
    return Descent(w, b, losses, path, seconds=time.perf_counter() - start)


def train_linear(X: np.ndarray, y: np.ndarray, lr: float, steps: int, l2: float = 0.0,
                 tol: float = 0.0) -> Descent:
    """Linear regression by gradient descent from w = 0, b = 0."""
    return gradient_descent(lambda w, b: mse_loss_and_grad(X, y, w, b, l2),
                            np.zeros(X.shape[1]), 0.0, lr, steps, tol)


def train_logistic(X: np.ndarray, y: np.ndarray, lr: float, steps: int, l2: float = 0.0,
                   tol: float = 0.0) -> Descent:
    """Logistic regression by gradient descent from w = 0, b = 0 (p = 0.5 for everyone)."""
    return gradient_descent(lambda w, b: logistic_loss_and_grad(X, y, w, b, l2),
                            np.zeros(X.shape[1]), 0.0, lr, steps, tol)


# ----------------------------------------------------------------------------------------
# Checks and studies
# ----------------------------------------------------------------------------------------
def gradient_check(loss_and_grad: LossAndGrad, w: np.ndarray, b: float) -> float:
    """Largest relative error between the hand-derived gradient and central finite differences
    (``common.parity.numerical_grad``) over all weights and the bias. ~1e-8 or less: correct."""
    _, grad_w, grad_b = loss_and_grad(w, b)
    theta = np.append(w, b)
    numeric = numerical_grad(lambda t: loss_and_grad(t[:-1], t[-1])[0], theta)
    return max_relative_error(np.append(grad_w, grad_b), numeric)


def learning_rate_study(X: np.ndarray, y: np.ndarray, lrs: list[float], steps: int,
                        l2: float = 0.0) -> list[dict]:
    """Linear regression from the same start with each step size. Each result says whether the
    run converged (loss within 0.1% of the exact minimum), was too slow, or diverged."""
    w_best, b_best = closed_form(X, y, l2)
    best = mse_loss_and_grad(X, y, w_best, b_best, l2)[0]
    results = []
    for lr in lrs:
        descent = train_linear(X, y, lr, steps, l2)
        if descent.diverged:
            status = "diverged"
        elif descent.losses[-1] <= best * (1 + 1e-3):
            status = "converged"
        else:
            status = "too slow"
        results.append({"lr": lr, "status": status, "final_loss": descent.losses[-1],
                        "steps": descent.steps, "losses": descent.losses})
    return results


def polynomial_features(x: np.ndarray, degree: int) -> np.ndarray:
    """Columns x, x^2, ..., x^degree (the constant column is the model's bias b).

    A linear model on these features is a polynomial in x: still linear in its parameters,
    so the same loss, gradient and closed form apply.
    """
    return np.stack([x**k for k in range(1, degree + 1)], axis=1)


def degree_study(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 degrees: list[int]) -> tuple[list[float], list[float]]:
    """Train and validation MSE of the exact least-squares polynomial fit for each degree.

    Each degree's model family contains the previous one, so the training error can only go
    down; the validation error goes down while the extra terms capture the true curve, then up
    once they start fitting the noise of the few training points (overfitting).
    """
    train_mse, val_mse = [], []
    for degree in degrees:
        features_train = polynomial_features(x_train, degree)
        features_val = polynomial_features(x_val, degree)
        w, b = closed_form(features_train, y_train)
        train_mse.append(mse_loss_and_grad(features_train, y_train, w, b)[0])
        val_mse.append(mse_loss_and_grad(features_val, y_val, w, b)[0])
    return train_mse, val_mse


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------
def plot_landscape(path, steps: int, seed: int = 0) -> None:
    """MSE contours over (w, b) for a one-feature problem, with the descent path drawn on them:
    raw x (not centered: a long tilted valley, zig-zag steps) next to standardized x (round
    bowl, a straight path). Each side uses 0.9 x its own largest stable step size."""
    x, y = line_data(seed=seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    sides = [("raw x in [0, 4]", x), ("standardized x", standardize(x)[0])]
    for ax, (title, feature) in zip(axes, sides):
        X = feature[:, None]
        lr = 0.9 * max_stable_lr(X)
        descent = gradient_descent(lambda w, b, X=X: mse_loss_and_grad(X, y, w, b),
                                   np.array([-2.0]), 4.0, lr, steps, record_path=True)
        path_w, path_b = np.array(descent.path).T
        w_best, b_best = closed_form(X, y)
        span_w = max(abs(path_w - w_best[0]).max(), 1.0) * 1.3
        span_b = max(abs(path_b - b_best).max(), 1.0) * 1.3
        W, B = np.meshgrid(np.linspace(w_best[0] - span_w, w_best[0] + span_w, 120),
                           np.linspace(b_best - span_b, b_best + span_b, 120))
        # The MSE at every grid point at once: broadcast (grid, grid, 1) against the n samples.
        loss = np.mean((W[..., None] * feature + B[..., None] - y) ** 2, axis=-1)
        levels = np.geomspace(loss.min() * 1.01, loss.max(), 18)
        ax.contour(W, B, loss, levels=levels, cmap="viridis", linewidths=0.8)
        ax.plot(path_w, path_b, "o-", color="tab:red", markersize=3, linewidth=1,
                label=f"GD, lr={lr:.3g}")
        ax.plot(w_best, b_best, "*", color="black", markersize=12, label="closed form")
        ax.set(xlabel="w", ylabel="b",
               title=f"{title}: loss {descent.losses[-1]:.3g} after {steps} steps")
        ax.legend(fontsize=8)
    save(fig, path)


def plot_degree_study(path, degrees, train_mse, val_mse, x_train, y_train,
                      fits: dict[int, tuple]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(degrees, train_mse, "o-", label="train")
    left.plot(degrees, val_mse, "o-", label="validation")
    left.set(xlabel="polynomial degree", ylabel="MSE", yscale="log",
             title="error vs model capacity")
    left.grid(alpha=0.3)
    left.legend()
    grid = np.linspace(-1, 1, 300)
    right.scatter(x_train, y_train, color="black", s=15, label="training points", zorder=3)
    right.plot(grid, np.sin(3 * grid), "--", color="gray", label="true curve")
    for degree, (w, b) in fits.items():
        right.plot(grid, polynomial_features(grid, degree) @ w + b, label=f"degree {degree}")
    right.set(xlabel="x", ylabel="y", ylim=(-2, 2), title="fits of three degrees")
    right.legend(fontsize=8)
    save(fig, path)


def plot_ridge_path(path, l2s, weights, train_mse, test_mse, names) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for j, name in enumerate(names):
        left.plot(l2s, weights[:, j], label=name)
    left.set(xscale="log", xlabel="l2", ylabel="weight", title="ridge: weights shrink as l2 grows")
    left.legend(fontsize=7, ncol=2)
    right.plot(l2s, train_mse, label="train")
    right.plot(l2s, test_mse, label="test")
    right.set(xscale="log", xlabel="l2", ylabel="MSE", title="ridge: error vs l2")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save(fig, path)


# ----------------------------------------------------------------------------------------
# The lab
# ----------------------------------------------------------------------------------------
def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    reg = load_arrays("diabetes", cfg.data_dir, cfg.synthetic, cfg.seed)
    clf = load_arrays("breast_cancer", cfg.data_dir, cfg.synthetic, cfg.seed)
    # Both descents first: a step size that is too large stops the lab here, with a message
    # naming the limit, before a run folder is created.
    gd = train_linear(reg.x_train, reg.y_train, cfg.lr, cfg.epochs, cfg.l2, cfg.grad_tol)
    if gd.diverged:
        raise LabError(f"linear regression diverged at step {gd.steps} with --lr {cfg.lr:g}; "
                       f"stable step sizes are below {max_stable_lr(reg.x_train, cfg.l2):.4g}: "
                       "use a smaller --lr")
    logistic = train_logistic(clf.x_train, clf.y_train, cfg.logistic_lr, cfg.logistic_epochs,
                              cfg.logistic_l2, cfg.grad_tol)
    if logistic.diverged:
        # The penalty's own step is w <- w (1 - 2 lr l2): it overshoots 0 further each time
        # once lr * l2 > 1.
        penalty = ""
        if cfg.logistic_lr * cfg.logistic_l2 >= 1:
            penalty = (f" and --logistic-l2 {cfg.logistic_l2:g}; the penalty alone needs "
                       "--logistic-lr x --logistic-l2 < 1")
        raise LabError(f"logistic regression diverged at step {logistic.steps} with --logistic-lr "
                       f"{cfg.logistic_lr:g}{penalty}; use a smaller --logistic-lr")
    # NumPy runs on the CPU whatever --device says.
    run = Run.start(cfg, __file__, torch.device("cpu"))

    # 1. Gradient check: hand-derived gradients against finite differences, at a random point.
    rng = np.random.default_rng(cfg.seed)
    rows = slice(0, 40)
    w_rand, b_rand = rng.normal(size=reg.x_train.shape[1]), float(rng.normal())
    check_mse = gradient_check(
        lambda w, b: mse_loss_and_grad(reg.x_train[rows], reg.y_train[rows], w, b, 0.1),
        w_rand, b_rand)
    w_rand = rng.normal(size=clf.x_train.shape[1])
    check_bce = gradient_check(
        lambda w, b: logistic_loss_and_grad(clf.x_train[rows], clf.y_train[rows], w, b, 0.1),
        w_rand, b_rand)
    print(f"gradient check (max relative error vs finite differences): "
          f"MSE {check_mse:.2e}, BCE {check_bce:.2e}")

    # 2. Linear regression on diabetes: gradient descent (run above) vs the closed form.
    start = time.perf_counter()
    w_exact, b_exact = closed_form(reg.x_train, reg.y_train, cfg.l2)
    closed_form_s = time.perf_counter() - start
    weight_diff = float(np.max(np.abs(np.append(gd.w - w_exact, gd.b - b_exact))))
    gd_test_mse = mse_loss_and_grad(reg.x_test, reg.y_test, gd.w, gd.b)[0]
    exact_test_mse = mse_loss_and_grad(reg.x_test, reg.y_test, w_exact, b_exact)[0]
    print(f"{reg.name}, {gd.steps} GD steps in {gd.seconds:.3f}s vs closed form in "
          f"{closed_form_s * 1e3:.2f}ms: max |weight difference| {weight_diff:.2e}; "
          f"test MSE GD {gd_test_mse:.1f}, closed form {exact_test_mse:.1f} "
          f"(predicting the training mean: {np.mean((reg.y_test - reg.y_train.mean()) ** 2):.1f})")
    best_train = mse_loss_and_grad(reg.x_train, reg.y_train, w_exact, b_exact, cfg.l2)[0]
    excess = np.maximum(np.array(gd.losses) - best_train, 1e-12 * best_train)
    plot_curves({"GD loss - minimum loss": list(enumerate(excess))}, run.path("gd_convergence.png"),
                xlabel="step", ylabel="train MSE above the exact minimum",
                title="linear regression: GD converges linearly", logy=True)

    # 3. L2 regularization: the closed form over a range of penalties, and GD with one of them.
    l2s = np.geomspace(1e-4, 1e2, 25)
    ridge = [closed_form(reg.x_train, reg.y_train, l2) for l2 in l2s]
    plot_ridge_path(run.path("ridge_path.png"), l2s, np.array([w for w, _ in ridge]),
                    [mse_loss_and_grad(reg.x_train, reg.y_train, w, b)[0] for w, b in ridge],
                    [mse_loss_and_grad(reg.x_test, reg.y_test, w, b)[0] for w, b in ridge],
                    reg.feature_names)
    ridge_l2 = 0.1
    ridge_lr = min(cfg.lr, 0.9 * max_stable_lr(reg.x_train, ridge_l2))
    ridge_gd = train_linear(reg.x_train, reg.y_train, ridge_lr, cfg.epochs, ridge_l2)
    w_ridge, b_ridge = closed_form(reg.x_train, reg.y_train, ridge_l2)
    ridge_diff = float(np.max(np.abs(np.append(ridge_gd.w - w_ridge, ridge_gd.b - b_ridge))))
    print(f"ridge l2={ridge_l2}: |w| {np.linalg.norm(w_ridge):.1f} "
          f"(vs {np.linalg.norm(w_exact):.1f} unpenalized), "
          f"GD vs closed form max |difference| {ridge_diff:.2e}, test MSE "
          f"{mse_loss_and_grad(reg.x_test, reg.y_test, w_ridge, b_ridge)[0]:.1f}")

    # 4. Logistic regression on breast_cancer (trained above).
    train_acc = accuracy(clf.x_train, clf.y_train, logistic.w, logistic.b)
    test_acc = accuracy(clf.x_test, clf.y_test, logistic.w, logistic.b)
    test_bce = logistic_loss_and_grad(clf.x_test, clf.y_test, logistic.w, logistic.b)[0]
    majority = max(clf.y_test.mean(), 1 - clf.y_test.mean())
    print(f"{clf.name} logistic regression, {logistic.steps} steps: train acc {train_acc:.3f}, "
          f"test acc {test_acc:.3f} (always guessing the majority class: {majority:.3f}), "
          f"test BCE {test_bce:.3f}")

    # metrics.csv: the loss of both descents, sampled (100 rows or so).
    every = max(1, max(gd.steps, logistic.steps) // 100)
    for step in range(0, max(gd.steps, logistic.steps) + 1, every):
        run.log(step=step, linear_train_mse=gd.losses[step] if step <= gd.steps else None,
                 logistic_train_bce=logistic.losses[step] if step <= logistic.steps else None)

    # 5. The learning-rate study.
    bound = max_stable_lr(reg.x_train, cfg.l2)
    study = learning_rate_study(reg.x_train, reg.y_train, list(cfg.study_lrs), cfg.study_epochs,
                                cfg.l2)
    print(f"learning-rate study on {reg.name} ({cfg.study_epochs} steps; "
          f"GD is stable only for lr < 2/lambda_max = {bound:.4g}):")
    curves = {}
    for result in study:
        where = f" at step {result['steps']}" if result["status"] == "diverged" else ""
        print(f"  lr={result['lr']:<8g} {result['status']}{where}: "
              f"final loss {result['final_loss']:.4g}")
        curves[f"lr={result['lr']:g} ({result['status']}{where})"] = result["losses"]
    plot_curves(curves, run.path("lr_study.png"), xlabel="step", ylabel="train MSE", logy=True,
                title=f"learning rates on {reg.name} (stable below {bound:.3g})")

    # 6. The loss landscape with the descent path.
    plot_landscape(run.path("loss_landscape.png"), cfg.landscape_steps, cfg.seed)

    # 7. Overfitting: polynomial degree vs train and validation error.
    x_train, y_train = curve_data(cfg.poly_train, seed=cfg.seed)
    x_val, y_val = curve_data(500, seed=cfg.seed + 1)
    degrees = list(range(1, cfg.max_degree + 1))
    train_mse, val_mse = degree_study(x_train, y_train, x_val, y_val, degrees)
    best_degree = degrees[int(np.argmin(val_mse))]
    shown = sorted({1, best_degree, cfg.max_degree})
    fits = {d: closed_form(polynomial_features(x_train, d), y_train) for d in shown}
    plot_degree_study(run.path("overfitting.png"), degrees, train_mse, val_mse, x_train, y_train,
                      fits)
    print("polynomial degree:  " + " ".join(f"{d:>6d}" for d in degrees))
    print("  train MSE:        " + " ".join(f"{v:6.3f}" for v in train_mse))
    print("  validation MSE:   " + " ".join(f"{v:6.3f}" for v in val_mse))

    return run.finish(
        grad_check_mse_rel_error=check_mse,
        grad_check_bce_rel_error=check_bce,
        gd_steps=gd.steps,
        gd_seconds=round(gd.seconds, 4),
        gd_vs_closed_form_max_abs_weight_diff=weight_diff,
        gd_test_mse=gd_test_mse,
        closed_form_test_mse=exact_test_mse,
        ridge_gd_vs_closed_form_max_abs_diff=ridge_diff,
        logistic_train_acc=train_acc,
        logistic_test_acc=test_acc,
        logistic_test_bce=test_bce,
        logistic_majority_acc=majority,
        max_stable_lr=bound,
        lr_study=", ".join(f"{r['lr']:g}: {r['status']}" for r in study),
        best_degree=best_degree,
        best_degree_train_mse=train_mse[degrees.index(best_degree)],
        best_degree_val_mse=min(val_mse),
        max_degree_val_mse=val_mse[-1],
        max_degree_train_mse=train_mse[-1],
    )


if __name__ == "__main__":
    launch(main, Config)
