"""Week 4: NumPy BatchNorm/Dropout/weight decay/schedules vs PyTorch; when each scheduler
steps, early stopping, choosing on validation, exact resume; the pieces of the best-CNN recipe."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import read_checkpoint, save_checkpoint
from common.config import parse_config
from common.data import load, subset
from common.errors import ConfigError
from common.loader import TensorLoader
from common.parity import assert_close
from common.train import evaluate, train_epoch
from tests.conftest import run_lab
from week04_regularization import best_cnn, part1, part2


# ---------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them)
# ---------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["bn_grad_rel_error"] < 1e-6  # analytic vs central differences in float64: ~1e-9
    assert abs(summary["bn_out_std"] - 1) < 1e-3  # BatchNorm output: unit variance per feature
    assert summary["sgd_l2_vs_decoupled"] < 1e-12  # the same update for plain SGD, up to rounding
    assert summary["adam_l2_vs_adamw"] > 0.1  # and clearly different for Adam
    assert abs(summary["dropout_zero_fraction"] - 0.3) < 0.02
    assert abs(summary["dropout_mean"] - 1) < 0.05


def losses_fall(rows: list[dict]) -> None:
    """The training loss of the last epoch is below the first, for every schedule in the rows."""
    for schedule in dict.fromkeys(r.get("schedule", "") for r in rows):
        losses = [float(r["train_loss"]) for r in rows if r.get("schedule", "") == schedule]
        assert len(losses) >= 2 and losses[-1] < losses[0], (
            f"{schedule or 'training'} loss did not fall: {losses}")


def check_part2(summary: dict, rows: list[dict]) -> None:
    losses_fall(rows)
    assert summary["best_schedule"] in part2.SCHEDULES
    # 10 classes: chance is 0.1. Measured (benchmarks/smoke_margins.py): smoke 0.765 val / 0.804
    # test; with --lr 1e-9 (nothing learns) 0.157 / 0.108, at least 0.24 under the threshold.
    assert summary["val_acc"] > 0.4 and summary["test_acc"] > 0.4


def check_best_cnn(summary: dict, rows: list[dict]) -> None:
    losses_fall(rows)
    assert summary["test_acc"] > 0.3 and summary["test_acc_no_tta"] > 0.3  # chance is 0.1
    assert summary["steps"] > 0 and summary["train_time_s"] > 0


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2, "best_cnn.py": check_best_cnn}

# ---------------------------------------------------------------------------------------------
# BatchNorm: NumPy == nn.BatchNorm1d / nn.BatchNorm2d in float64
# ---------------------------------------------------------------------------------------------
BN_CASES = [((16, 5), nn.BatchNorm1d), ((4, 3, 5, 6), nn.BatchNorm2d)]


def _torch_bn(module_cls, channels, gamma, beta, momentum, eps):
    bn = module_cls(channels, momentum=momentum, eps=eps).double()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    return bn


def _torch_step(bn, x, upstream):
    """Forward + backward through the torch module; returns output and the three gradients."""
    bn.zero_grad()
    xt = torch.tensor(x, requires_grad=True)
    out = bn(xt)
    out.backward(torch.from_numpy(upstream))
    return out.detach().numpy(), xt.grad.numpy(), bn.weight.grad.numpy(), bn.bias.grad.numpy()


@pytest.mark.parametrize("shape, module_cls", BN_CASES, ids=["BatchNorm1d", "BatchNorm2d"])
def test_batchnorm_matches_torch_in_training_and_eval(shape, module_cls):
    rng = np.random.default_rng(0)
    channels, momentum, eps = shape[1], 0.2, 1e-3
    mine = part1.BatchNorm(channels, momentum=momentum, eps=eps)
    mine.gamma, mine.beta = rng.uniform(0.5, 2, channels), rng.normal(0, 1, channels)
    ref = _torch_bn(module_cls, channels, mine.gamma, mine.beta, momentum, eps)

    for step in range(4):  # several steps: the running statistics accumulate
        x = rng.normal(3, 2, shape)
        upstream = rng.normal(0, 1, shape)
        if step == 1:  # exact zeros and ties (DESIGN.md 7)
            # a constant channel: var = 0, x_hat = 0 exactly, only eps keeps 1/sqrt finite
            x[:, 0] = 2.5
            x[:, 1] = rng.integers(-1, 2, x[:, 1].shape)  # few distinct values, zeros among them
            upstream[:, 1] = 0.0
        out, dx, dgamma, dbeta = _torch_step(ref.train(), x, upstream)
        assert_close(mine.train().forward(x), out, f"train output, step {step}")
        assert_close(mine.backward(upstream), dx, f"train dL/dx, step {step}")
        assert_close(mine.d_gamma, dgamma, f"train dL/dgamma, step {step}")
        assert_close(mine.d_beta, dbeta, f"train dL/dbeta, step {step}")
        assert_close(mine.running_mean, ref.running_mean.numpy(), f"running mean, step {step}")
        assert_close(mine.running_var, ref.running_var.numpy(),
                     f"running var (unbiased), step {step}")

    x = rng.normal(3, 2, shape)
    upstream = rng.normal(0, 1, shape)
    out, dx, dgamma, dbeta = _torch_step(ref.eval(), x, upstream)
    assert_close(mine.eval().forward(x), out, "eval output")
    assert_close(mine.backward(upstream), dx, "eval dL/dx")
    assert_close(mine.d_gamma, dgamma, "eval dL/dgamma")
    assert_close(mine.d_beta, dbeta, "eval dL/dbeta")
    assert_close(mine.running_mean, ref.running_mean.numpy(), "eval leaves the running mean alone")


def test_batchnorm_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, C, H, W\)"):
        part1.BatchNorm(3).forward(np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_inverted_dropout_keeps_the_expectation(p):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 20)
    samples = np.stack([part1.dropout_forward(x, p, training=True, rng=rng)[0]
                        for _ in range(20_000)])
    # Each output is x / (1-p) with probability 1-p, else 0: std of the mean = |x| sqrt(p/(1-p)/n).
    tolerance = 5 * np.abs(x) * math.sqrt(p / (1 - p) / len(samples)) + 1e-12
    assert np.all(np.abs(samples.mean(0) - x) < tolerance)
    zero_fraction = (samples == 0).mean()
    assert abs(zero_fraction - p) < 0.01
    kept = samples[samples != 0] / np.broadcast_to(x, samples.shape)[samples != 0]
    np.testing.assert_allclose(kept, 1 / (1 - p))  # survivors are scaled by exactly 1/(1-p)


def test_dropout_eval_is_identity_and_backward_uses_the_mask():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (5, 7))
    out, mask = part1.dropout_forward(x, 0.5, training=False)
    np.testing.assert_array_equal(out, x)
    out, mask = part1.dropout_forward(x, 0.5, training=True, rng=rng)
    upstream = rng.normal(0, 1, x.shape)
    np.testing.assert_array_equal(part1.dropout_backward(upstream, mask), upstream * mask)
    np.testing.assert_array_equal(part1.dropout_forward(x, 1.0)[0], np.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        part1.dropout_forward(x, 1.5)


def test_torch_dropout_has_the_same_statistics():
    """nn.Dropout is inverted dropout too: same zero fraction and the same 1/(1-p) scale."""
    torch.manual_seed(0)
    out = nn.Dropout(0.3).train()(torch.ones(200_000, dtype=torch.float64)).numpy()
    mine, _ = part1.dropout_forward(np.ones(200_000), 0.3, rng=np.random.default_rng(0))
    assert abs((out == 0).mean() - (mine == 0).mean()) < 0.01
    assert set(np.unique(out)) == set(np.unique(mine)) == {0.0, 1 / 0.7}


# ---------------------------------------------------------------------------------------------
# Weight decay: L2 vs decoupled, against torch.optim
# ---------------------------------------------------------------------------------------------
CURVATURE, TARGET = np.array([10.0, 1.0, 0.1]), np.array([1.0, -2.0, 3.0])


def _torch_trajectory(make_optimizer, steps=30):
    w = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([w])
    curvature, target = torch.from_numpy(CURVATURE), torch.from_numpy(TARGET)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * (w - target) ** 2).sum().backward()
        optimizer.step()
    return w.detach().numpy()


def _numpy_trajectory(step_fn, steps=30):
    w = np.array([0.5, 0.5, 0.5])
    for _ in range(steps):
        w = step_fn(w, part1.quadratic_grad(w, CURVATURE, TARGET))
    return w


def test_sgd_l2_and_decoupled_decay_are_the_same_and_match_torch():
    lr, wd = 0.05, 0.1
    ref = _torch_trajectory(lambda p: torch.optim.SGD(p, lr=lr, weight_decay=wd))
    coupled = _numpy_trajectory(lambda w, g: part1.sgd_step(w, g, lr, wd, decoupled=False))
    decoupled = _numpy_trajectory(lambda w, g: part1.sgd_step(w, g, lr, wd, decoupled=True))
    assert_close(coupled, ref, "SGD with L2")
    assert_close(decoupled, ref, "SGD with decoupled decay")


@pytest.mark.parametrize("decoupled, torch_cls", [(False, torch.optim.Adam),
                                                  (True, torch.optim.AdamW)])
def test_adam_l2_and_adamw_match_torch(decoupled, torch_cls):
    lr, wd = 0.05, 0.1
    ref = _torch_trajectory(lambda p: torch_cls(p, lr=lr, weight_decay=wd))
    state = part1.AdamState(np.zeros(3), np.zeros(3))
    mine = _numpy_trajectory(lambda w, g: part1.adam_step(w, g, state, lr, weight_decay=wd,
                                                          decoupled=decoupled))
    assert_close(mine, ref, torch_cls.__name__)


@pytest.mark.parametrize("decoupled, torch_cls, weight_decay", [
    (False, torch.optim.Adam, 0.0), (False, torch.optim.Adam, 1e-4),
    (True, torch.optim.AdamW, 0.1)])
def test_adam_matches_torch_step_by_step_with_tiny_gradients(decoupled, torch_cls, weight_decay):
    """Gradients of 1e-4 .. 1e-8 make sqrt(v_hat) comparable to eps = 1e-8, so where eps goes
    (sqrt(v_hat) + eps, not sqrt(v_hat + eps)) changes every step. Weights, m and v are compared
    after each step; one coordinate always gets an exact zero gradient, another now and then."""
    rng = np.random.default_rng(5)
    lr, steps = 1e-3, 12
    w = rng.normal(0, 1e-3, 6)
    state = part1.AdamState(np.zeros(6), np.zeros(6))
    param = torch.tensor(w, requires_grad=True)
    optimizer = torch_cls([param], lr=lr, weight_decay=weight_decay)
    scales = np.array([1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 0.0])
    for step in range(steps):
        grad = scales * rng.normal(0, 1, 6)
        if step % 3 == 0:
            grad[3] = 0.0
        w = part1.adam_step(w, grad, state, lr, weight_decay=weight_decay, decoupled=decoupled)
        param.grad = torch.from_numpy(grad.copy())
        optimizer.step()
        torch_state = optimizer.state[param]
        assert_close(w, param.detach().numpy(), f"{torch_cls.__name__} weights, step {step}")
        assert_close(state.m, torch_state["exp_avg"].numpy(), f"first moment m, step {step}")
        assert_close(state.v, torch_state["exp_avg_sq"].numpy(), f"second moment v, step {step}")


def test_weight_decay_demo_same_for_sgd_different_for_adam():
    finals = part1.weight_decay_demo(steps=100)
    assert np.abs(finals["sgd_l2"] - finals["sgd_decoupled"]).max() < 1e-12
    assert np.abs(finals["adam_l2"] - finals["adamw"]).max() > 0.1


# ---------------------------------------------------------------------------------------------
# Schedules: plain functions == torch.optim.lr_scheduler, step by step
# ---------------------------------------------------------------------------------------------
def _torch_lrs(make_scheduler, steps, base_lr=0.1, momentum=0.9):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr, momentum=momentum)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


S = torch.optim.lr_scheduler
SCHEDULE_CASES = {
    "StepLR": (lambda o: S.StepLR(o, step_size=7, gamma=0.3),
               lambda t: part1.step_lr(t, 0.1, 7, 0.3), 30),
    "ExponentialLR": (lambda o: S.ExponentialLR(o, gamma=0.93),
                      lambda t: part1.exponential_lr(t, 0.1, 0.93), 30),
    "CosineAnnealingLR": (lambda o: S.CosineAnnealingLR(o, T_max=25, eta_min=0.001),
                          lambda t: part1.cosine_lr(t, 0.1, 25, 0.001), 26),
    "LinearLR warmup": (lambda o: S.LinearLR(o, start_factor=0.05, end_factor=1.0, total_iters=8),
                        lambda t: part1.linear_warmup_lr(t, 0.1, 0.05, 1.0, 8), 20),
    "OneCycleLR cos": (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=40, pct_start=0.3),
                       lambda t: part1.one_cycle_lr(t, 0.1, 40, 0.3), 40),
    "OneCycleLR linear": (lambda o: S.OneCycleLR(o, max_lr=0.2, total_steps=33, pct_start=0.25,
                                                 div_factor=10, final_div_factor=100,
                                                 anneal_strategy="linear"),
                          lambda t: part1.one_cycle_lr(t, 0.2, 33, 0.25, 10, 100,
                                                       anneal="linear"), 33),
}


@pytest.mark.parametrize("name", SCHEDULE_CASES)
def test_schedule_functions_match_torch_schedulers(name):
    make_scheduler, mine, steps = SCHEDULE_CASES[name]
    expected = _torch_lrs(make_scheduler, steps)
    assert_close([mine(t) for t in range(steps)], expected, name)


@pytest.mark.parametrize("argv", [["--help"], ["--device", "cuda"], ["--data-dir", "x"]])
def test_part1_offers_no_device_or_data_flags_it_would_ignore(argv, capsys):
    """NumPy on the CPU with data drawn in memory: --device cuda would run on the CPU silently."""
    with pytest.raises(SystemExit) as stopped:
        parse_config(part1.Config, argv)
    out, err = capsys.readouterr()
    if argv == ["--help"]:
        assert stopped.value.code == 0 and "--device" not in out and "--data-dir" not in out
    else:
        assert stopped.value.code == 2 and f"unrecognized arguments: {' '.join(argv)}" in err


def test_schedule_curves_share_one_length():
    curves = part1.schedule_curves(50)
    assert len(curves) == 5 and all(len(c) == 50 for c in curves.values())



# ---------------------------------------------------------------------------------------------
# Part 2: when each scheduler steps, early stopping, choosing on validation, resume
# ---------------------------------------------------------------------------------------------
def lab(module, out: Path, *argv: str) -> dict:
    """Run a Week 4 script in this process as its command line would; the summary, or the exit
    status."""
    return run_lab(module.main, module.Config, ["--out", str(out), "--device", "cpu", *argv])


# part2 in about a second (461 training images, batch 32)
TINY = ("--smoke", "--width", "4", "--blocks", "2")
# the twin's 512 images less 10% validation, whole batches
STEPS_PER_EPOCH = (512 - round(0.1 * 512)) // 32


def linear_case():
    """w moves 10% of the way to 10 each epoch: 1, 1.9, 2.71, 3.44, 4.10, ... The validation
    target is 3, so the validation loss is lowest after epoch 3 and rises after it."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    one = torch.ones(1, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05), [(one, 10 * one)], [(one, 3 * one)]


def run_epochs(model, optimizer, train, val, epochs: int, early=None, scheduler=None) -> list[dict]:
    """The loop of part2.train_schedule on a regression case: train, validate, step a per-epoch
    scheduler (step_per_epoch), let early stopping decide. A row per epoch (with the LR it
    trained with)."""
    rows = []
    for epoch in range(1, epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_epoch(model, train, optimizer, loss_fn=F.mse_loss)
        val_loss = evaluate(model, val, F.mse_loss)["loss"]
        rows.append({"epoch": epoch, "lr": lr, "val_loss": val_loss})
        if scheduler is not None:
            part2.step_per_epoch(scheduler, rows[-1]["val_loss"])
        if early is not None and early.update(rows[-1]["val_loss"], epoch):
            break
    return rows


def test_early_stopping_stops_and_restores_the_best_epoch():
    model, optimizer, train, val = linear_case()
    early = part2.EarlyStopping(model, patience=2)
    rows = run_epochs(model, optimizer, train, val, 20, early)
    assert len(rows) == 5 and early.best_epoch == 3  # epochs 4 and 5 did not improve: stop after 5
    assert model.weight.item() == pytest.approx(10 * (1 - 0.9**5), rel=1e-6)  # not restored yet
    assert early.restore_best() == 3
    assert model.weight.item() == pytest.approx(10 * (1 - 0.9**3), rel=1e-6)  # epoch 3's weight
    assert early.state_dict()["best_weights"]["weight"].item() == pytest.approx(
        10 * (1 - 0.9**3), rel=1e-6)


def test_early_stopping_restores_the_best_weights_on_the_last_epoch_too():
    model, optimizer, train, val = linear_case()
    early = part2.EarlyStopping(model, patience=10)
    assert len(run_epochs(model, optimizer, train, val, 4, early)) == 4  # never stopped
    assert early.restore_best() == 3
    assert model.weight.item() == pytest.approx(10 * (1 - 0.9**3), rel=1e-6)


def test_early_stopping_state_survives_a_checkpoint():
    """What a resumed run needs: the best loss, epoch and weights, so that it stops and restores
    as the uninterrupted run would (the exact-resume tests below check it end to end)."""
    model, optimizer, train, val = linear_case()
    early = part2.EarlyStopping(model, patience=2)
    run_epochs(model, optimizer, train, val, 4, early)  # best epoch 3, then one not lower
    resumed = part2.EarlyStopping(model, patience=2)
    resumed.load_state_dict(early.state_dict())
    assert (resumed.best_epoch, resumed.best_loss) == (3, early.best_loss)
    assert not resumed.update(early.best_loss + 1, 4) and resumed.update(early.best_loss + 1, 5)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    assert resumed.restore_best() == 3
    assert model.weight.item() == pytest.approx(10 * (1 - 0.9**3), rel=1e-6)
    # nothing seen: nothing restored
    assert part2.EarlyStopping(model, patience=2).restore_best() == 0
    assert model.weight.item() == pytest.approx(10 * (1 - 0.9**3), rel=1e-6)


def test_reduce_on_plateau_is_handed_the_validation_loss_once_per_epoch():
    """Inputs of 0 give the weight no gradient, so the validation loss is exactly flat."""
    model = nn.Linear(1, 1, bias=False)
    train, val = [(torch.zeros(4, 1), torch.ones(4, 1))], [(torch.ones(4, 1), torch.zeros(4, 1))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler, per_batch = part2.make_scheduler("plateau", optimizer, epochs=6, steps_per_epoch=1)
    assert not per_batch
    rows = run_epochs(model, optimizer, train, val, 6, scheduler=scheduler)
    # epoch 1 sets the best; 2 and 3 do not improve (> patience 1): x0.1 from epoch 4, again from
    # epoch 6
    assert [row["lr"] for row in rows] == pytest.approx([0.5, 0.5, 0.5, 0.05, 0.05, 0.005])

    # A falling validation loss (w moves toward the target 10 every epoch) is never cut; a
    # scheduler handed anything but that loss (a constant, the training loss of 0) would be.
    model, optimizer, train, _ = linear_case()
    scheduler, _ = part2.make_scheduler("plateau", optimizer, epochs=6, steps_per_epoch=1)
    rows = run_epochs(model, optimizer, train, [(torch.ones(1, 1), 10 * torch.ones(1, 1))], 6,
                      scheduler=scheduler)
    assert [row["lr"] for row in rows] == [0.05] * 6 and optimizer.param_groups[0]["lr"] == 0.05


def test_one_cycle_steps_after_every_batch_and_cosine_after_every_epoch():
    torch.manual_seed(0)
    batches = TensorLoader(torch.randn(24, 2), torch.randint(0, 2, (24,)), 8)  # 3 batches per epoch
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    one_cycle, per_batch = part2.make_scheduler("onecycle", optimizer, epochs=2, steps_per_epoch=3)
    assert per_batch
    for _ in range(2):
        row = part2.train_one_epoch(model, batches, optimizer, one_cycle, per_batch)
    assert one_cycle.last_epoch == 6  # stepped once per batch: its plan of 2 x 3 steps is complete
    assert set(row) == {"train_loss", "train_acc"} and 0 <= row["train_acc"] <= 1

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cosine, per_batch = part2.make_scheduler("cosine", optimizer, epochs=4, steps_per_epoch=3)
    assert not per_batch
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        part2.train_one_epoch(model, batches, optimizer, cosine, per_batch)
        assert optimizer.param_groups[0]["lr"] == lrs[-1], (
            "train_one_epoch must not step a per-epoch schedule")
        part2.step_per_epoch(cosine, val_loss=1.0)
    # Part 1's formula at t = epochs done: the rate each epoch trained with (per batch would
    # fall 3x faster)
    assert lrs == pytest.approx([part1.cosine_lr(t, 0.1, 4) for t in range(4)])


def test_train_one_epoch_reports_the_mean_loss_and_accuracy_of_the_pass():
    """Two batches of 4 with a model that ignores its input: the mean loss is ln 2 (uniform
    logits), and it gets the class-0 rows right (argmax picks the first of tied classes)."""
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    y = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1])
    batches = TensorLoader(torch.randn(8, 3), y, 4, shuffle=True)
    row = part2.train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), None,
                                False)
    assert row["train_loss"] == pytest.approx(math.log(2))
    assert row["train_acc"] == pytest.approx(3 / 8)


def test_make_scheduler_knows_which_step_per_batch():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    kinds = {name: part2.make_scheduler(name, optimizer, 5, 10)[1] for name in part2.SCHEDULES}
    assert kinds == {"step": False, "plateau": False, "onecycle": True, "cosine": False}
    with pytest.raises(ValueError, match="unknown schedule"):
        part2.make_scheduler("warp", optimizer, 5, 10)


def test_one_weight_decay_split_for_the_week_no_decay_on_batchnorm_and_biases():
    model = part2.CNN(3, 10, (4, 8), batch_norm=True, dropout=0.1)
    decayed, free = part2.make_decay_optimizer(model, "adamw", 1e-3, 0.05).param_groups
    assert decayed["weight_decay"] == 0.05 and all(p.ndim > 1 for p in decayed["params"])
    assert free["weight_decay"] == 0.0 and all(p.ndim == 1 for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    # the speed recipe uses the same one
    assert best_cnn.make_decay_optimizer is part2.make_decay_optimizer
    speed = best_cnn.SpeedNet((4, 8, 8))
    sgd = part2.make_decay_optimizer(speed, "sgd", 0.4, 5e-4, momentum=0.85, no_decay_lr_scale=16)
    weights, others = sgd.param_groups
    assert weights["lr"] == 0.4 and others["lr"] == pytest.approx(6.4)
    assert others["weight_decay"] == 0
    assert weights["momentum"] == 0.85 and weights["nesterov"]
    # whitening filters, BN gammas
    frozen = {id(p) for p in speed.parameters() if not p.requires_grad}
    assert frozen and not frozen & {id(p) for g in sgd.param_groups for p in g["params"]}


def test_part2_chooses_the_schedule_on_validation_not_on_test(tmp_path, monkeypatch):
    val_loss = {"step": 0.9, "plateau": 0.5, "onecycle": 0.7, "cosine": 0.6}
    # the test set would pick step
    test_acc = {"step": 0.9, "plateau": 0.2, "onecycle": 0.5, "cosine": 0.4}

    def fake(schedule, make_model, train, val, test, cfg, device, log):
        row = {"epoch": 1, "train_loss": 1.0, "val_loss": val_loss[schedule], "val_acc": 0.5,
               "lr": 0.1}
        log.log(**row)
        return [row], {"val_loss": val_loss[schedule], "test_acc": test_acc[schedule]}

    monkeypatch.setattr(part2, "train_schedule", fake)
    summary = part2.main(parse_config(part2.Config,
                                      ["--out", str(tmp_path), *TINY, "--schedule", "all"]))
    assert summary["best_schedule"] == "plateau" and summary["test_acc"] == 0.2


def test_part2_compares_all_schedules_in_one_run_and_meets_the_test_set_once_each(tmp_path,
                                                                                   monkeypatch):
    test_passes = []
    real_make_loaders = part2.make_loaders

    def counting(cfg, data, device):
        train, val, test = real_make_loaders(cfg, data, device)

        class CountedLoader(type(test)):
            def __iter__(self):
                test_passes.append(1)
                return super().__iter__()

        test.__class__ = CountedLoader
        return train, val, test

    monkeypatch.setattr(part2, "make_loaders", counting)
    summary = lab(part2, tmp_path, *TINY, "--schedule", "all", "--epochs", "2", "--lr", "0.02")
    assert len(test_passes) == len(part2.SCHEDULES)  # once per trained model, at the end
    (folder,) = (tmp_path / "week04" / "part2").iterdir()
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [r["schedule"] for r in rows] == [s for s in part2.SCHEDULES for _ in range(2)]
    for s in part2.SCHEDULES:
        assert (folder / f"{s}_checkpoint.pt").exists() and (folder / f"{s}_curves.png").exists()
        # the kept model's validation loss is that of the epoch it kept (the best one, restored)
        kept = next(r for r in rows
                    if r["schedule"] == s and int(r["epoch"]) == summary[f"kept_epoch_{s}"])
        assert summary[f"val_loss_{s}"] == pytest.approx(float(kept["val_loss"]), rel=1e-5)
        assert summary[f"val_loss_{s}"] == pytest.approx(min(float(r["val_loss"]) for r in rows
                                                             if r["schedule"] == s), rel=1e-5)
    assert summary["best_schedule"] == min(part2.SCHEDULES, key=lambda s: summary[f"val_loss_{s}"])
    assert summary["test_acc"] == summary[f"test_acc_{summary['best_schedule']}"]
    assert all((folder / f"schedules_{key}.png").exists() for key in ("val_loss", "val_acc", "lr"))
    comparison = (folder / "comparison.txt").read_text()
    assert all(f"week04/part2/{s}" in comparison for s in part2.SCHEDULES)


def test_train_subset_is_drawn_at_random_so_a_copy_sorted_by_class_keeps_every_class():
    data = load("cifar10", smoke=True)
    order = data.y_train.argsort(stable=True)  # stored class by class, as CIFAR-10's JPEG copy is
    x = data.x_train[order].clone()
    # each image carries its label: pairs must stay together
    x[:, 0, 0, 0] = data.y_train[order].to(torch.uint8)
    small = subset(dataclasses.replace(data, x_train=x, y_train=data.y_train[order]), 200, seed=0)
    assert len(small.y_train) == 200
    assert torch.equal(small.x_train[:, 0, 0, 0].long(), small.y_train)
    # about 20 each; the first 200: 4 classes
    assert torch.bincount(small.y_train, minlength=10).min() >= 10
    assert subset(data, 0, seed=0) is data and subset(data, 10**9, seed=0) is data
    assert part2.subset is subset  # one copy, in common.data (Weeks 4, 8 and 12 use it)


class _Captured(Exception):
    """Raised by a test's stand-in to stop a run at the point being inspected."""


@pytest.mark.parametrize("dataset, mirrors", [("mnist", False), ("cifar10", True)])
def test_part2_never_mirrors_digits_but_does_mirror_photos(dataset, mirrors, tmp_path, monkeypatch):
    """The augmentation part2 really trains with (Week 3's rule), on images with a bright bar
    near the left edge: a shift keeps it on the left, a mirror moves it to the right."""
    trained_on = []

    def capture(model, train, *args, **kwargs):
        trained_on.append(train)
        raise _Captured

    monkeypatch.setattr(part2, "train_one_epoch", capture)
    with pytest.raises(_Captured):
        part2.main(parse_config(part2.Config,
                                ["--out", str(tmp_path), *TINY, "--dataset", dataset]))
    channels, size = (1, 28) if dataset == "mnist" else (3, 32)
    images = torch.zeros(64, channels, size, size, dtype=torch.uint8)
    images[..., 4:6] = 255
    mirrored = 0
    for batch in range(10):
        out = trained_on[0].augment(images, torch.Generator().manual_seed(batch))
        bar_column = out.float().mean(dim=(1, 2)).argmax(dim=1)
        mirrored += int((bar_column > size // 2).sum())
    assert (mirrored > 0) == mirrors, f"{mirrored} of 640 {dataset} images were mirrored"


def model_weights(folder: Path, pattern: str) -> dict:
    (path,) = folder.glob(pattern)
    return read_checkpoint(path)["model"]


@pytest.mark.parametrize("schedule, lr, epochs, interrupt_in_epoch", [
    ("plateau", "0.1", "8", 5),  # best epoch 4, stops after 6: cut after the best, before the stop
    # best epoch 5 of 6: cut in the last epoch, the restore comes after the resume
    ("step", "0.03", "6", 6),
])
def test_part2_resumes_exactly_after_ctrl_c(schedule, lr, epochs, interrupt_in_epoch, tmp_path,
                                            ctrl_c):
    argv = (*TINY, "--schedule", schedule, "--lr", lr, "--epochs", epochs, "--patience", "2")
    whole = lab(part2, tmp_path / "whole", *argv)
    assert whole["kept_epoch"] < whole["epochs_done"], (
        "the case must restore earlier weights at its end")

    ctrl_c((interrupt_in_epoch - 1) * STEPS_PER_EPOCH + 3)  # 3 steps into that epoch
    assert lab(part2, tmp_path / "cut", *argv) == {"exit": 130}
    (checkpoint,) = (tmp_path / "cut").glob("week04/part2/*/*_checkpoint.pt")
    assert read_checkpoint(checkpoint)["epoch"] == interrupt_in_epoch - 1  # the last whole epoch

    steps = ctrl_c(0)  # no more interrupts; counts the resumed run's steps
    # its own --out (a resume keeps it)
    resumed = lab(part2, tmp_path / "cut", "--resume", str(checkpoint))
    # the rest only
    assert steps.steps == (whole["epochs_done"] - interrupt_in_epoch + 1) * STEPS_PER_EPOCH
    for key in ("val_loss", "test_acc", "kept_epoch", "epochs_done", "stopped_early"):
        assert resumed[key] == whole[key], key
    pattern = "week04/part2/*/*_checkpoint.pt"
    expected = model_weights(tmp_path / "whole", pattern)
    got = model_weights(tmp_path / "cut", pattern)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit for bit
    whole_rows, resumed_rows = (
        list(csv.DictReader(next(p.glob("week04/part2/*/metrics.csv")).open()))
        for p in (tmp_path / "whole", tmp_path / "cut"))
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"}  # noqa: E731
                              for r in rows]
    assert drop_time(resumed_rows) == drop_time(whole_rows)  # one run folder with every epoch once


def test_part2_refuses_to_resume_a_schedule_all_comparison(tmp_path, capsys):
    with pytest.raises(ConfigError, match="cannot be resumed"):
        part2.Config(schedule="all", resume="x.pt")
    # a checkpoint as a --schedule all run writes it (its settings say "all")
    config = part2.Config(smoke=True, schedule="all", out=str(tmp_path)).to_dict()
    checkpoint = save_checkpoint(tmp_path / "cosine_checkpoint.pt", part2.CNN(3, 10, (4, 8)),
                                 epoch=1, config=config, script="week04/part2")
    assert lab(part2, tmp_path, "--resume", str(checkpoint)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("sigterm, exit_code", [(False, 130), (True, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_in_a_schedule_all_run_does_not_offer_a_resume_that_is_refused(sigterm, exit_code,
                                                                              tmp_path, ctrl_c,
                                                                              capsys):
    """Ctrl-C / SIGTERM in the second schedule of a comparison: one line, saying it cannot be
    resumed, not common.runner.launch's "--resume <some schedule>_checkpoint.pt" (which is
    refused)."""
    ctrl_c(STEPS_PER_EPOCH + 3, sigterm=sigterm)  # one epoch per schedule: 3 steps into the second
    assert lab(part2, tmp_path, *TINY, "--schedule", "all", "--epochs", "1") == {"exit": exit_code}
    err = capsys.readouterr().err
    (folder,) = (tmp_path / "week04" / "part2").iterdir()
    # the first schedule had finished
    assert (folder / f"{part2.SCHEDULES[0]}_checkpoint.pt").exists()
    assert err.count("\n") == 1 and "cannot be resumed" in err and "--resume" not in err, err
    # where its results are, and what it was doing
    assert str(folder) in err and part2.SCHEDULES[1] in err


def test_part2_checks_settings_before_creating_a_run_folder(tmp_path, capsys):
    assert lab(part2, tmp_path, *TINY, "--dataset", "mnist", "--blocks", "5") == {"exit": 2}
    assert "at most 4" in capsys.readouterr().err
    assert lab(part2, tmp_path, *TINY, "--batch-size", "1000") == {"exit": 2}  # Week 3's check
    err = capsys.readouterr().err
    assert "--batch-size 1000 is more than the 461 training images" in err, err
    assert err.count("\n") == 1, err
    assert lab(part2, tmp_path, "--smoke", "--val-fraction", "0") == {"exit": 2}
    assert not (tmp_path / "week04").exists()


def test_best_cnn_refuses_a_batch_larger_than_the_training_set_before_the_run_folder(
        tmp_path, capsys):
    """No validation split here: all 512 of the twin's training images are the limit."""
    assert lab(best_cnn, tmp_path, "--smoke", "--batch-size", "513") == {"exit": 2}
    err = capsys.readouterr().err
    assert "--batch-size 513 is more than the 512 training images" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "week04").exists()


# ---------------------------------------------------------------------------------------------
# The best-CNN recipe
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rtol", [
    # float32 is the training path (bf16 logits are upcast to it): float32 rounding, ~6e-8 per
    # operation.
    (torch.float32, 1e-6),
    (torch.float64, 1e-10),
], ids=["float32", "float64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.2])
def test_label_smoothing_loss_matches_torch(smoothing, dtype, rtol):
    torch.manual_seed(0)
    logits, target = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 10, (32,))
    logits[0] = 0.0  # equal logits: a uniform softmax
    # a tied maximum, with the target on one of the tied classes
    logits[1, [3, 8]] = logits[1].max() + 1.0
    target[1] = 8
    loss = best_cnn.label_smoothing_loss(logits.to(dtype), target, smoothing)
    expected = F.cross_entropy(logits, target, label_smoothing=smoothing)  # float64 reference
    assert loss.dtype == dtype, f"a {dtype} input gave a {loss.dtype} loss"
    assert_close(loss.item(), expected.item(), f"label-smoothed cross-entropy ({dtype})",
                 rtol=rtol, atol=0)


def test_label_smoothing_loss_upcasts_bf16_logits():
    logits = torch.randn(8, 10).to(torch.bfloat16)
    loss = best_cnn.label_smoothing_loss(logits, torch.zeros(8, dtype=torch.long), 0.1)
    assert loss.dtype == torch.float32


def test_flip_tta_averages_the_two_views_and_is_mirror_invariant():
    torch.manual_seed(0)
    model = best_cnn.SpeedNet((4, 8, 8), whiten=False).eval()
    x = torch.randn(6, 3, 32, 32)
    tta = best_cnn.tta_logits(model, x)
    with torch.no_grad():
        torch.testing.assert_close(tta, 0.5 * (model(x) + model(x.flip(3))))
    torch.testing.assert_close(best_cnn.tta_logits(model, x.flip(3)), tta)


def test_whitening_filters_decorrelate_patches():
    """Correlated random images: after the first half of the whitening filters, the second
    moment of the outputs is diag(lambda / (lambda + eps)), i.e. ~identity for a tiny eps."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 12, 12, generator=g)
    # correlate neighbours
    images = images + 0.8 * images.roll(1, dims=3) + 0.5 * images.mean(1, keepdim=True)
    filters = best_cnn.whitening_filters(images, size=2, eps=1e-9)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    out = F.conv2d(images.double(), filters[:12].double())  # (N, 12, 11, 11)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    second_moment = flat.T @ flat / len(flat)
    torch.testing.assert_close(second_moment, torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_best_cnn_whitens_with_images_of_every_class_even_from_a_copy_stored_class_by_class(
        monkeypatch):
    """CIFAR-10's JPEG copy is stored class by class: its first 1000 training images are all
    airplanes. The whitening statistics must come from a random sample of the training set."""
    data = load("cifar10", synthetic=True, n_synthetic=3000)
    order = data.y_train.argsort(stable=True)
    x = data.x_train[order].clone()
    # each image carries its label in one pixel
    x[:, 0, 0, 0] = 20 * data.y_train[order].to(torch.uint8)
    sorted_copy = dataclasses.replace(data, x_train=x, y_train=data.y_train[order])
    monkeypatch.setattr(best_cnn, "load", lambda *a, **k: sorted_copy)
    whitened = []

    def capture(images, *args, **kwargs):
        whitened.append(images)
        raise _Captured

    monkeypatch.setattr(best_cnn, "whitening_filters", capture)
    with pytest.raises(_Captured):
        best_cnn.main(best_cnn.Config(device="cpu"))
    pixel = whitened[0][:, 0, 0, 0] * data.std[0] + data.mean[0]  # undo the normalization
    labels = torch.round(pixel * 255 / 20).long()
    assert len(whitened[0]) == 1000
    assert torch.bincount(labels, minlength=10).min() >= 50  # ~100 of each class


def test_residual_branches_start_at_zero_and_other_gammas_are_frozen():
    model = best_cnn.SpeedNet((4, 8, 8), whiten=True, residual=True)
    for group in model.groups:
        assert torch.all(group.norm2.weight == 0) and group.norm2.weight.requires_grad
        assert not group.norm1.weight.requires_grad
    assert not model.stem.weight.requires_grad and model.stem.bias.requires_grad
    plain = best_cnn.SpeedNet((4, 8, 8), residual=False)
    assert not any(g.norm2.weight.requires_grad for g in plain.groups)


def test_lr_factor_is_a_triangle():
    factor = lambda p: best_cnn.lr_factor(p, warmup=0.2, start=0.1, end=0.0)  # noqa: E731
    assert factor(0) == pytest.approx(0.1) and factor(0.1) == pytest.approx(0.55)
    assert factor(0.2) == pytest.approx(1.0) and factor(0.6) == pytest.approx(0.5)
    assert factor(1.0) == pytest.approx(0.0) and factor(1.5) == pytest.approx(0.0)


def test_gpu_recipe_fills_in_only_what_the_user_did_not_say():
    gpu = best_cnn.Config.PRESETS["recipe"]["gpu"]
    cfg = parse_config(best_cnn.Config,
                       ["--recipe", "gpu", "--batch-size", "256", "--epochs", "10"])
    # said explicitly: kept, although equal to the defaults
    assert (cfg.batch_size, cfg.epochs) == (256, 10.0)
    # the rest: the recipe
    assert (cfg.width2, cfg.lr, cfg.eval_each_epoch) == (gpu["width2"], gpu["lr"], False)
    assert parse_config(best_cnn.Config, ["--recipe", "gpu"]).batch_size == gpu["batch_size"]
    assert parse_config(best_cnn.Config, []) == best_cnn.Config()  # the CPU recipe is the defaults


def test_cuda_with_the_cpu_recipe_prints_a_hint(monkeypatch, capsys):
    monkeypatch.setattr(best_cnn, "pick_device", lambda name: torch.device("cuda"))  # no GPU needed
    # stop there
    monkeypatch.setattr(best_cnn, "load", lambda *a, **k: (_ for _ in ()).throw(_Captured()))
    for recipe, hint in (("cpu", True), ("gpu", False)):
        with pytest.raises(_Captured):
            best_cnn.main(best_cnn.Config(recipe=recipe))
        assert ("--recipe gpu" in capsys.readouterr().out) == hint


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C at a given training step of best_cnn (its loop calls the loss once per step)."""
    calls = []
    real_loss = best_cnn.label_smoothing_loss

    def loss(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(best_cnn, "label_smoothing_loss", loss)


def test_best_cnn_resumes_exactly_without_a_budget(tmp_path, monkeypatch):
    whole = lab(best_cnn, tmp_path / "whole", "--smoke")
    assert whole["steps"] == 3 * (512 // 64)  # 3 epochs of whole batches
    interrupt_at_step(monkeypatch, 13)  # in epoch 2 (8 steps per epoch)
    assert lab(best_cnn, tmp_path / "cut", "--smoke") == {"exit": 130}
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "cut").glob("week04/best_cnn/*/checkpoint.pt")
    assert read_checkpoint(checkpoint)["extra"]["step"] == 8  # saved at the end of epoch 1
    resumed = lab(best_cnn, tmp_path / "cut", "--resume", str(checkpoint))
    assert (resumed["steps"], resumed["test_acc"]) == (whole["steps"], whole["test_acc"])
    pattern = "week04/best_cnn/*/checkpoint.pt"
    expected = model_weights(tmp_path / "whole", pattern)
    got = model_weights(tmp_path / "cut", pattern)
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit for bit
    rows = next((tmp_path / "cut").glob("week04/best_cnn/*/metrics.csv")).read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["1", "8"], ["2", "16"], ["3", "24"]]


def test_best_cnn_budget_run_that_finished_has_nothing_to_resume(tmp_path, capsys):
    first = lab(best_cnn, tmp_path, "--smoke", "--budget-s", "1e-6")  # used up by the first step
    assert first["steps"] == 1
    checkpoint = next(tmp_path.glob("week04/best_cnn/*/checkpoint.pt"))
    assert lab(best_cnn, tmp_path, "--resume", str(checkpoint)) == json.loads(
        (checkpoint.parent / "summary.json").read_text())
    assert "nothing to do" in capsys.readouterr().out


def test_best_cnn_damaged_or_foreign_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint at all")
    assert lab(best_cnn, tmp_path / "out", "--resume", str(damaged)) == {"exit": 2}
    assert "corrupt or not a PyTorch file" in capsys.readouterr().err
    lab(part2, tmp_path / "p2", *TINY, "--epochs", "1")
    foreign = next((tmp_path / "p2").glob("week04/part2/*/onecycle_checkpoint.pt"))
    before = {p: p.read_bytes() for p in foreign.parent.iterdir()}
    capsys.readouterr()
    # refused with the settings
    assert lab(best_cnn, tmp_path / "out", "--resume", str(foreign)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "written by week04/part2, not week04/best_cnn" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in foreign.parent.iterdir()} == before
    assert not (tmp_path / "out").exists()
