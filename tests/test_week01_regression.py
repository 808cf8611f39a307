"""Week 1: hand gradients == finite differences == autograd, gradient descent == closed form,
the claims the lab makes (divergence above 2/lambda_max, overfitting with degree, ...), and
the command line as a learner meets it (bad values: one line, exit 2, nothing on disk)."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import parse_config
from common.errors import LabError, NonFiniteLoss
from common.loader import TensorLoader
from common.parity import assert_close, max_relative_error, numerical_grad, torch_reference
from tests.conftest import ROOT, run_script
from week01_regression import introspect, manual_vs_autograd, part1, part2, pipeline

PART1 = ROOT / "week01_regression" / "part1.py"

# Tolerances (float64). Hand-derived vs autograd: the same arithmetic in another order, so
# only rounding differs. Finite differences carry O(eps^2) truncation + O(1e-16/eps) rounding.
AUTOGRAD_RTOL, AUTOGRAD_ATOL = 1e-10, 1e-12
FINITE_DIFF_MAX_REL_ERROR = 1e-7


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them; rows are metrics.csv)
# ------------------------------------------------------------------------------------------
def column(rows: list[dict], key: str) -> list[float]:
    """A metrics.csv column as numbers, skipping the rows where it is empty."""
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def falls(values: list[float], factor: float) -> None:
    assert len(values) >= 2 and values[-1] < factor * values[0], values


def check_part1(summary: dict, rows: list[dict]) -> None:
    # Hand-derived gradients vs central differences: truncation + rounding ~1e-7 at worst.
    assert summary["grad_check_mse_rel_error"] < 1e-6, summary
    assert summary["grad_check_bce_rel_error"] < 1e-6, summary
    # GD lands on the closed form (6000 smoke steps: ~2e-7 on weights up to ~30), with its test
    # error.
    assert summary["gd_vs_closed_form_max_abs_weight_diff"] < 1e-5, summary
    assert summary["gd_test_mse"] == pytest.approx(summary["closed_form_test_mse"], rel=1e-6)
    assert summary["ridge_gd_vs_closed_form_max_abs_diff"] < 1e-6, summary
    assert summary["logistic_test_acc"] > max(0.9, summary["logistic_majority_acc"] + 0.2), summary
    falls(column(rows, "linear_train_mse"), 0.2)  # from mean(y^2) ~ 29000 to ~2800
    bce = column(rows, "logistic_train_bce")
    assert bce[0] == pytest.approx(np.log(2)) and bce[-1] < 0.2, bce  # w = 0: p = 0.5 for everyone
    # The learning-rate study: exactly the rates above 2/lambda_max diverge.
    study = dict(item.split(": ") for item in summary["lr_study"].split(", "))
    assert study, summary["lr_study"]
    for lr, status in study.items():
        assert (status == "diverged") == (float(lr) >= summary["max_stable_lr"]), (lr, status)
    # Overfitting: the highest degree fits the training points better and new points worse.
    assert summary["max_degree_train_mse"] <= summary["best_degree_train_mse"], summary
    assert summary["max_degree_val_mse"] > 1.5 * summary["best_degree_val_mse"], summary


def check_part2(summary: dict, rows: list[dict]) -> None:
    assert summary["poly_grad_autograd"] == pytest.approx(summary["poly_grad_manual"], rel=1e-12,
                                                          abs=1e-12)
    assert summary["poly_grad_accumulated"] == 2 * summary["poly_grad_autograd"], \
        "backward adds into .grad"
    # float64, gradients ~100: rounding only.
    assert summary["linear_grad_max_abs_diff"] < 1e-10, summary
    falls(column(rows, "linear_train_mse"), 0.5)
    falls(column(rows, "logistic_train_bce"), 0.5)
    # Minibatch SGD with a constant step jitters around the least-squares minimum (up to ~30% above
    # it at the last epoch); predicting the training mean would be ~2x the minimum.
    assert summary["linear_test_mse"] < 1.5 * summary["closed_form_test_mse"], summary
    # Measured (benchmarks/smoke_margins.py): 0.974; with --logistic-lr 1e-9 0.675 (the
    # majority class is 0.632), 0.22 under the threshold.
    assert summary["logistic_test_acc"] > max(0.9, summary["logistic_majority_acc"] + 0.2), summary
    assert summary["bce_with_logits_loss_z40"] == pytest.approx(40.0)
    assert summary["bce_after_sigmoid_loss_z40"] == pytest.approx(100.0)  # log(0), clamped


def check_manual_vs_autograd(summary: dict, rows: list[dict]) -> None:
    assert summary["dtype"] == "float64"
    # The same float64 arithmetic in three codes: parameters (up to ~30) agree to rounding.
    assert summary["max_abs_diff_torch_by_hand"] < 1e-10, summary
    assert summary["max_abs_diff_autograd"] < 1e-10, summary
    losses = column(rows, "loss")
    falls(losses, 0.2)
    assert losses[-1] == pytest.approx(summary["final_loss"])


def check_pipeline(summary: dict, rows: list[dict]) -> None:
    falls(column(rows, "loss"), 0.1)
    assert summary["final_loss"] < 1.25 * summary["least_squares_loss"], summary
    assert summary["final_w"] == pytest.approx(summary["least_squares_w"], abs=0.1)
    assert summary["final_b"] == pytest.approx(summary["least_squares_b"], abs=0.1)


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2,
                  "manual_vs_autograd.py": check_manual_vs_autograd, "pipeline.py": check_pipeline}


def smoke_config(module, tmp_path: Path, *flags: str):
    """The config a ``--smoke`` run gets (presets are applied by parsing, not by the dataclass)."""
    device = [] if "device" in module.Config.UNUSED else ["--device", "cpu"]
    return parse_config(module.Config,
                        ["--smoke", "--out", str(tmp_path / "runs"), *device, *flags])


def metrics_rows(summary: dict) -> list[dict]:
    return list(csv.DictReader((Path(summary["run_dir"]) / "metrics.csv").open()))


def regression_problem(n: int = 30, d: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.7 + 0.1 * rng.normal(size=n)
    return X, y, rng.normal(size=d), float(rng.normal())


def classification_problem(n: int = 40, d: int = 5, seed: int = 1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    return X, y, rng.normal(size=d), float(rng.normal())


def check_gradients(loss_and_grad, torch_loss, w, b):
    """hand == finite differences (max relative error) and hand == autograd (values too)."""
    loss, grad_w, grad_b = loss_and_grad(w, b)
    numeric = numerical_grad(lambda t: loss_and_grad(t[:-1], t[-1])[0], np.append(w, b))
    assert max_relative_error(np.append(grad_w, grad_b), numeric) < FINITE_DIFF_MAX_REL_ERROR
    out, (auto_w, auto_b) = torch_reference(torch_loss, w, np.array(b))
    assert_close(loss, out, "loss", AUTOGRAD_RTOL, AUTOGRAD_ATOL)
    assert_close(grad_w, auto_w, "dL/dw", AUTOGRAD_RTOL, AUTOGRAD_ATOL)
    assert_close(grad_b, auto_b, "dL/db", AUTOGRAD_RTOL, AUTOGRAD_ATOL)


# ----------------------------------------------------------------------------------------
# Part 1: gradients
# ----------------------------------------------------------------------------------------
def with_zeros_and_ties(X, y, b, zero_bias):
    """Exact zeros and ties among the inputs (DESIGN.md 7): an all-zero row (its prediction is
    exactly b, so exactly 0 when b = 0: sigma(0), a zero residual) and two equal rows."""
    X, y = X.copy(), y.copy()
    X[0], y[0] = 0.0, 0.0
    X[1], y[1] = X[2], y[2]
    return X, y, 0.0 if zero_bias else b


@pytest.mark.parametrize("zero_bias", [False, True])
@pytest.mark.parametrize("l2", [0.0, 0.7])
def test_mse_gradient_matches_finite_differences_and_autograd(l2, zero_bias):
    X, y, w, b = regression_problem()
    X, y, b = with_zeros_and_ties(X, y, b, zero_bias)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    check_gradients(lambda w, b: part1.mse_loss_and_grad(X, y, w, b, l2),
                    lambda w, b: F.mse_loss(Xt @ w + b, yt) + l2 * (w * w).sum(), w, b)


@pytest.mark.parametrize("zero_bias", [False, True])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_logistic_gradient_matches_finite_differences_and_autograd(l2, zero_bias):
    X, y, w, b = classification_problem()
    X, y, b = with_zeros_and_ties(X, y, b, zero_bias)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    check_gradients(lambda w, b: part1.logistic_loss_and_grad(X, y, w, b, l2),
                    lambda w, b: (F.binary_cross_entropy_with_logits(Xt @ w + b, yt)
                                  + l2 * (w * w).sum()), w, b)


def test_logistic_loss_is_stable_for_extreme_logits():
    X, y, w, b = classification_problem()
    # Logits in the tens of thousands: exp(z) would overflow, sigmoid would round to 0/1.
    w_huge = 1e4 * w
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or divide-by-zero warning allowed
        loss, grad_w, _ = part1.logistic_loss_and_grad(X, y, w_huge, b)
        p = part1.sigmoid(np.array([-1e4, -30.0, 0.0, 30.0, 1e4]))
    expected = F.binary_cross_entropy_with_logits(torch.from_numpy(X @ w_huge + b),
                                                  torch.from_numpy(y)).item()
    assert np.isfinite(loss) and np.all(np.isfinite(grad_w))
    assert loss == pytest.approx(expected, rel=1e-12)
    z = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4], dtype=torch.float64)
    assert_close(p, torch.sigmoid(z).numpy(), "sigmoid", rtol=1e-12, atol=0)


def test_gradient_check_helper_reports_small_error_for_right_and_large_for_wrong_gradient():
    X, y, w, b = regression_problem()
    right = part1.gradient_check(lambda w, b: part1.mse_loss_and_grad(X, y, w, b), w, b)

    def wrong(w, b):  # forgot the factor 2 of the derivative of the square
        loss, grad_w, grad_b = part1.mse_loss_and_grad(X, y, w, b)
        return loss, grad_w / 2, grad_b / 2

    assert right < FINITE_DIFF_MAX_REL_ERROR
    assert part1.gradient_check(wrong, w, b) > 0.1


# ----------------------------------------------------------------------------------------
# Part 1: gradient descent, closed form, ridge
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diabetes():
    return part1.load_arrays("diabetes")


def test_features_are_standardized_with_training_statistics(diabetes):
    assert_close(diabetes.x_train.mean(axis=0), np.zeros(10), "train mean", atol=1e-12)
    assert_close(diabetes.x_train.std(axis=0), np.ones(10), "train std", atol=1e-12)
    # The test set is scaled with the training statistics, not its own.
    assert not np.allclose(diabetes.x_test.mean(axis=0), 0, atol=1e-3)


def test_gradient_descent_converges_to_the_closed_form(diabetes):
    descent = part1.train_linear(diabetes.x_train, diabetes.y_train, lr=0.2, steps=10000)
    w, b = part1.closed_form(diabetes.x_train, diabetes.y_train)
    assert not descent.diverged
    # Iterative, not exact: 10000 steps bring GD to ~1e-12 of the closed form here (weights up
    # to ~30); 1e-9 leaves room for another BLAS's rounding.
    assert np.max(np.abs(descent.w - w)) < 1e-9 and abs(descent.b - b) < 1e-9
    assert descent.losses[-1] < descent.losses[0] / 5


def test_closed_form_zeroes_the_gradient_even_with_dependent_columns():
    X, y, _, _ = regression_problem()
    X = np.hstack([X, X[:, :1]])  # a duplicated column: X^T X is singular, inv() would fail
    w, b = part1.closed_form(X, y)
    _, grad_w, grad_b = part1.mse_loss_and_grad(X, y, w, b)
    assert np.max(np.abs(grad_w)) < 1e-10 and abs(grad_b) < 1e-10


@pytest.mark.parametrize("l2", [0.05, 2.0])
def test_ridge_closed_form_matches_gradient_descent_with_l2(l2):
    X, y, _, _ = regression_problem(n=50, d=6)
    w_exact, b_exact = part1.closed_form(X, y, l2)
    descent = part1.train_linear(X, y, lr=0.5 * part1.max_stable_lr(X, l2), steps=5000, l2=l2)
    # Iterative: GD ends within ~1e-15 of the exact ridge solution here; 1e-10 allows for
    # rounding elsewhere.
    assert np.max(np.abs(descent.w - w_exact)) < 1e-10 and abs(descent.b - b_exact) < 1e-10
    # The penalty shrinks the weights compared with plain least squares.
    assert np.linalg.norm(w_exact) < np.linalg.norm(part1.closed_form(X, y)[0])


def test_gradient_descent_stops_early_at_the_tolerance():
    X, y, _, _ = regression_problem()
    descent = part1.train_linear(X, y, lr=0.1, steps=100000, tol=1e-6)
    _, grad_w, grad_b = part1.mse_loss_and_grad(X, y, descent.w, descent.b)
    assert descent.steps < 100000 and np.sqrt(grad_w @ grad_w + grad_b**2) < 1e-6


# ----------------------------------------------------------------------------------------
# Part 1: logistic regression, learning rates, overfitting
# ----------------------------------------------------------------------------------------
def test_logistic_regression_beats_chance_on_breast_cancer():
    data = part1.load_arrays("breast_cancer")
    descent = part1.train_logistic(data.x_train, data.y_train, lr=0.5, steps=500, l2=1e-3)
    majority = max(data.y_test.mean(), 1 - data.y_test.mean())
    assert part1.accuracy(data.x_test, data.y_test, descent.w, descent.b) > max(0.9, majority + 0.2)
    # w = 0 predicts p = 0.5 for everyone: BCE = log 2.
    assert descent.losses[0] == pytest.approx(np.log(2))
    assert descent.losses[-1] < 0.2


def test_logistic_regression_separates_a_separable_set():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    X = rng.normal(size=(200, 2)) + np.where(y[:, None] == 1, 3.0, -3.0)
    descent = part1.train_logistic(X, y.astype(np.float64), lr=0.5, steps=300)
    assert part1.accuracy(X, y, descent.w, descent.b) == 1.0


def test_learning_rate_study_flags_too_small_good_and_diverging(diabetes):
    bound = part1.max_stable_lr(diabetes.x_train)
    assert 0.2 < bound < 0.3  # 2 / lambda_max of the Hessian (2/n) A^T A on standardized diabetes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divergence is detected, not an overflow warning or a crash
        lrs = [0.002, 0.1, 0.95 * bound, 1.05 * bound, 10.0]
        results = part1.learning_rate_study(diabetes.x_train, diabetes.y_train, lrs, steps=1000)
    assert [r["status"] for r in results] == ["too slow", "converged", "converged", "diverged",
                                              "diverged"]
    assert results[-1]["steps"] < 20 and all(np.isfinite(r["losses"]).all() for r in results)


def test_polynomial_features():
    x = np.array([-2.0, 0.5, 3.0])
    assert_close(part1.polynomial_features(x, 3), np.stack([x, x**2, x**3], axis=1), "features")


def test_training_error_falls_with_degree_while_validation_error_rises():
    x_train, y_train = part1.curve_data(20, seed=0)
    x_val, y_val = part1.curve_data(500, seed=1)
    train_mse, val_mse = part1.degree_study(x_train, y_train, x_val, y_val, list(range(1, 16)))
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(train_mse, train_mse[1:]))
    best = int(np.argmin(val_mse))
    assert 1 <= best < 10  # a line underfits sin(3x); a moderate degree is best
    assert val_mse[-1] > 3 * val_mse[best] and train_mse[-1] < train_mse[best]  # degree 15 overfits


def test_part1_main_smoke_summary(tmp_path):
    summary = part1.main(smoke_config(part1, tmp_path))
    check_part1(summary, metrics_rows(summary))
    assert 2000 < summary["closed_form_test_mse"] < 4500  # predicting the mean gives ~6000 here
    assert summary["lr_study"] == "0.002: too slow, 0.1: converged, 0.3: diverged"
    run_dir = Path(summary["run_dir"])
    for name in ("gd_convergence.png", "lr_study.png", "loss_landscape.png", "overfitting.png",
                 "ridge_path.png"):
        assert (run_dir / name).stat().st_size > 0, name
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["logistic_test_acc"] == summary["logistic_test_acc"]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.3"], "linear regression diverged at step 23 with --lr 0.3; "
                      "stable step sizes are below 0.2455"),
    (["--logistic-lr", "1e300"], "logistic regression diverged at step 1 "
                                 "with --logistic-lr 1e+300"),
    # Here the penalty, not the data, overshoots: w <- w (1 - 2 lr l2) grows when lr * l2 > 1.
    (["--logistic-l2", "10"], "with --logistic-lr 0.5 and --logistic-l2 10; the penalty alone "
                              "needs --logistic-lr x --logistic-l2 < 1"),
])
def test_part1_step_size_too_large_stops_before_the_run_folder(flags, message, tmp_path):
    with pytest.raises(LabError, match=re.escape(message)):
        part1.main(smoke_config(part1, tmp_path, *flags))
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------
# Part 2 and the self-work scripts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("x", [-1.5, 0.0, 2.0, 3.7])
def test_polynomial_autograd_matches_the_hand_derivative(x):
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    part2.polynomial(t).backward()
    assert t.grad.item() == pytest.approx(part2.polynomial_grad(x), rel=1e-12, abs=1e-12)


def test_autograd_demo_shows_the_graph_and_accumulation(capsys):
    result = part2.autograd_demo(2.0)
    assert result["poly_grad_autograd"] == result["poly_grad_manual"] == 29.0
    assert result["poly_grad_accumulated"] == 58.0
    x = torch.tensor(1.0, requires_grad=True)
    chain = introspect.graph_chain(part2.polynomial(x).grad_fn)
    assert chain[0] == "AddBackward0" and any("PowBackward0" in n for n in chain)
    assert sum("AccumulateGrad" in n for n in chain) == 3  # x is used in three terms
    assert "AccumulateGrad" in capsys.readouterr().out


def test_part2_manual_linear_gradients_equal_autograd():
    X, y, w, b = regression_problem()
    args = [torch.from_numpy(a) for a in (X, y, w, np.array(b))]
    for manual, auto in zip(part2.manual_mse_grads(*args), part2.autograd_mse_grads(*args)):
        assert_close(manual.numpy(), auto.numpy(), "gradient", AUTOGRAD_RTOL, AUTOGRAD_ATOL)


def test_bce_with_logits_stays_exact_where_sigmoid_then_bce_saturates():
    result = part2.bce_stability_demo()
    assert result["bce_with_logits_loss_z40"] == pytest.approx(40.0)
    assert result["bce_after_sigmoid_loss_z40"] == pytest.approx(100.0)  # log(0) clamped by BCELoss


def test_part2_main_learns_both_models_with_a_negative_x(tmp_path):
    summary = part2.main(smoke_config(part2, tmp_path, "--x", "-1.5"))
    check_part2(summary, metrics_rows(summary))
    assert summary["poly_grad_manual"] == 9 * 2.25 + 6 + 1  # f'(x) = 9x^2 - 4x + 1 at x = -1.5
    assert summary["env_torch"] == torch.__version__ and summary["env_device"] == "cpu"


def test_part2_training_loop_stops_on_a_diverging_loss():
    x = torch.linspace(-1, 1, 64)[:, None]
    model = torch.nn.Linear(1, 1)
    with pytest.raises(NonFiniteLoss, match="lr=1e\\+20: the step is too large"):
        part2.train(model, TensorLoader(x, 100 * x, 8), torch.nn.MSELoss(),
                    torch.optim.SGD(model.parameters(), lr=1e20), epochs=3, evaluate=dict)


def test_three_implementations_follow_the_same_trajectory():
    X, y, _, _ = regression_problem(n=60, d=5)
    runs = manual_vs_autograd.compare(X, y, lr=0.1, steps=200)
    reference = runs["numpy, by hand"]
    for trajectory in runs.values():
        assert trajectory.params.shape == (201, 6)
        assert np.max(manual_vs_autograd.max_abs_diff_per_step(reference, trajectory)) < 1e-10
    assert reference.losses[-1] < reference.losses[0] / 10


def test_manual_vs_autograd_refuses_a_diverging_step_before_the_run_folder(tmp_path):
    with pytest.raises(LabError, match="stable only for lr < 2/lambda_max = 0.2455"):
        manual_vs_autograd.main(smoke_config(manual_vs_autograd, tmp_path, "--lr", "0.25"))
    assert not (tmp_path / "runs").exists()


def test_pipeline_loss_falls_towards_least_squares(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--steps", "60"]
    summary = pipeline.main(parse_config(pipeline.Config, argv))
    assert summary["final_loss"] < summary["first_loss"] / 10
    assert summary["final_loss"] < 1.01 * summary["least_squares_loss"]
    assert summary["final_w"] == pytest.approx(summary["least_squares_w"], abs=0.05)
    assert summary["final_b"] == pytest.approx(summary["least_squares_b"], abs=0.05)
    out = capsys.readouterr().out
    assert "shape=(16, 1)" in out and "grad_fn=MseLossBackward0" in out


def test_pipeline_stops_when_the_loss_overflows(tmp_path):
    with pytest.raises(NonFiniteLoss, match="--lr 1e\\+06 is too large"):
        argv = ["--out", str(tmp_path), "--device", "cpu", "--lr", "1e6"]
        pipeline.main(parse_config(pipeline.Config, argv))


# ----------------------------------------------------------------------------------------
# The command line, as a learner meets it
# ----------------------------------------------------------------------------------------
SCRIPTS = [part1, part2, manual_vs_autograd, pipeline]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__.split(".")[-1])
def test_help_lists_every_field_with_its_default(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(module.Config, ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--resume" not in text  # seconds-long runs: nothing to resume, so no flag that pretends
    for f in dataclasses.fields(module.Config):
        if f.name in module.Config.UNUSED:  # a flag the script would ignore is not offered
            assert "--" + f.name.replace("_", "-") + " " not in text, f.name
            continue
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert f"(default: {shown}" in text, f.name


@pytest.mark.parametrize("module, argv, message", [
    (part1, ["--epochs", "0"], "argument --epochs: must be >= 1, got '0'"),
    (part1, ["--lr", "-1"], "argument --lr: must be > 0, got '-1'"),
    (part1, ["--lr", "0"], "argument --lr: must be > 0, got '0'"),
    (part1, ["--lr", "nan"], "argument --lr: must be a finite number"),
    (part1, ["--l2", "-0.1"], "argument --l2: must be in [0, 1000000]"),
    (part1, ["--seed", "123456789012345678901234"], "argument --seed: must be in [0, 4294967295]"),
    (part1, ["--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
    (part1, ["--study-lrs", "0.1", "abc"], "argument --study-lrs: expected a float, got 'abc'"),
    (part1, ["--study-lrs", "0.1", "-0.2"], "argument --study-lrs: must be > 0, got '-0.2'"),
    (part1, ["--study-lrs"], "--study-lrs needs at least one learning rate"),
    (part1, ["--max-degree", "0"], "argument --max-degree: must be in [1, 30]"),
    (part1, ["--poly-train", "1"], "argument --poly-train: must be in [2, 100000]"),
    # --l2 1e308 was a LinAlgError traceback.
    (part1, ["--l2", "1e308"], "argument --l2: must be in [0, 1000000]"),
    (part1, ["--logistic-l2", "1e308"], "argument --logistic-l2: must be in [0, 1000000]"),
    (part2, ["--batch-size", "0"], "argument --batch-size: must be >= 1, got '0'"),
    (part2, ["--epochs", "2.5"], "argument --epochs: expected an int, got '2.5'"),
    (part2, ["--logistic-lr", "-1"], "argument --logistic-lr: must be in (0, 1000000]"),
    # Above float32's 3.4e38 the optimizer cannot even represent the step: a RuntimeError traceback.
    (part2, ["--lr", "1e308"], "argument --lr: must be in (0, 1000000]"),
    (part2, ["--logistic-lr", "1e39"], "argument --logistic-lr: must be in (0, 1000000]"),
    (part2, ["--x", "1e200"], "argument --x: must be in [-1000000, 1000000]"),
    (part2, ["--x", "inf"], "argument --x: must be a finite number"),
    (part2, ["--resume", "checkpoint.pt"], "unrecognized arguments: --resume"),
    (manual_vs_autograd, ["--steps", "0"], "argument --steps: must be >= 1"),
    (manual_vs_autograd, ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (pipeline, ["--n-points", "1"], "argument --n-points: must be in [2, 1000000]"),
    (pipeline, ["--noise", "-1"], "argument --noise: must be in [0, 100]"),
    (pipeline, ["--detailed-steps", "-1"], "argument --detailed-steps: must be >= 0"),
    (pipeline, ["--lr", "1e308"], "argument --lr: must be in (0, 1000000]"),
])
def test_silly_values_fail_in_parsing_with_one_line_and_exit_2(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(module.Config, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_negative_x_and_list_flags_parse():
    # A point on the axis: negatives are fine.
    assert parse_config(part2.Config, ["--x", "-1"]).x == -1.0
    assert parse_config(part2.Config, ["--x", "-0.5"]).x == -0.5
    assert parse_config(part1.Config, ["--study-lrs", "0.01", "0.2"]).study_lrs == (0.01, 0.2)


def test_bad_flag_from_the_shell_is_one_line_exit_2_and_nothing_on_disk(tmp_path):
    result = run_script(PART1, "--epochs", "0", "--out", str(tmp_path / "runs"), tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "part1.py: error: argument --epochs: must be >= 1, got '0' (see --help)"]
    assert not (tmp_path / "runs").exists()  # failed in parsing, before any work


def test_script_copied_to_another_folder_runs(tmp_path):
    copy = tmp_path / "my_experiments" / "regression.py"
    copy.parent.mkdir()
    shutil.copy(PART1, copy)
    out = tmp_path / "runs"
    result = run_script(copy, "--smoke", "--out", str(out), tmp_path=tmp_path, cwd=copy.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = list(out.glob("my_experiments/regression/*/summary.json"))
    assert len(summaries) == 1
    assert json.loads(summaries[0].read_text())["logistic_test_acc"] > 0.9
