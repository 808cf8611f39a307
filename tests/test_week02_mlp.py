"""Week 2: the NumPy MLP's hand-written backprop equals PyTorch's autograd (float64), each
initialization has the variance its formula says and the effect on deep nets the lab claims,
and the training scripts learn (loss falls, accuracy beats chance)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import parse_config
from common.errors import DataUnavailable, NonFiniteLoss
from common.parity import assert_close, torch_reference
from tests.conftest import run_lab
from week02_mlp import iris_cv, optimizers, part1, part2, report, sweep

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------
# Hand backprop == autograd, layer by layer
# ----------------------------------------------------------------------------------------
def test_linear_forward_and_backward_match_torch():
    x, upstream = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 3))
    layer = part1.Linear(5, 3, init="xavier", rng=np.random.default_rng(1))
    layer.b = RNG.normal(size=3)
    out = layer.forward(x)
    dx = layer.backward(upstream)
    expected, (ex, eW, eb) = torch_reference(lambda x, W, b: x @ W + b, x, layer.W, layer.b,
                                             upstream=upstream)
    assert_close(out, expected, "Linear forward")
    assert_close(dx, ex, "Linear dL/dx")
    assert_close(layer.dW, eW, "Linear dL/dW")
    assert_close(layer.db, eb, "Linear dL/db")


@pytest.mark.parametrize("name, torch_fn", [("relu", torch.relu), ("sigmoid", torch.sigmoid),
                                            ("tanh", torch.tanh)])
def test_activation_forward_and_backward_match_torch(name, torch_fn):
    # Large magnitudes: the sigmoid must not overflow at -800 nor lose its gradient. Exact zeros
    # (0.0 and -0.0): ReLU's gradient there is 0 by PyTorch's convention (x > 0, not x >= 0).
    x = np.concatenate([RNG.normal(size=(4, 8)) * 3,
                        [[-800.0, -30.0, -1e-3, 0.0, -0.0, 1e-3, 30.0, 800.0]], np.zeros((1, 8))])
    upstream = RNG.normal(size=x.shape)
    layer = part1.ACTIVATIONS[name]()
    with np.errstate(over="raise"):
        out = layer.forward(x)
    dx = layer.backward(upstream)
    expected, (ex,) = torch_reference(torch_fn, x, upstream=upstream)
    assert_close(out, expected, f"{name} forward")
    assert_close(dx, ex, f"{name} dL/dx")


def test_softmax_cross_entropy_matches_torch_and_is_stable():
    logits = RNG.normal(size=(8, 10)) * 4
    logits[0] += 1000.0  # naive exp() would overflow to inf here; log-sum-exp must not
    logits[1, 3] = -1000.0
    logits[2] = 0.0  # all logits equal: softmax is exactly uniform
    # A tie for the largest logit (the row max used for stability).
    logits[3, [2, 7]] = logits[3].max() + 1.0
    logits[4] = 1000.0  # equal and large
    labels = RNG.integers(0, 10, size=8)
    labels[3] = 7  # the label on one of the tied maxima
    loss_fn = part1.SoftmaxCrossEntropy()
    with np.errstate(over="raise"):
        loss = loss_fn.forward(logits, labels)
    grad = loss_fn.backward()
    expected, (eg,) = torch_reference(lambda z: F.cross_entropy(z, torch.tensor(labels)), logits)
    assert math.isfinite(loss)
    assert_close(loss, expected, "cross-entropy")
    assert_close(grad, eg, "dL/dlogits = (softmax - onehot) / N")


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_whole_mlp_matches_an_equal_torch_model(activation):
    """Same weights in a torch nn.Sequential: loss, every dW, db and dL/dx agree."""
    sizes = [7, 16, 12, 5]
    net = part1.MLP(sizes, activation=activation, init="xavier", seed=3)
    for layer in net.linears:
        layer.b = RNG.normal(size=layer.b.shape) * 0.1
    net.linears[0].b[::2] = 0.0
    x, labels = RNG.normal(size=(9, 7)), RNG.integers(0, 5, size=9)
    x[0] = 0.0  # row 0's first pre-activations are b exactly: exact zeros where b = 0, ReLU's kink

    act = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}[activation]
    model = torch.nn.Sequential(torch.nn.Linear(7, 16), act(), torch.nn.Linear(16, 12), act(),
                                torch.nn.Linear(12, 5)).double()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for mine, theirs in zip(net.linears, linears):
            theirs.weight.copy_(torch.from_numpy(mine.W.T))  # torch stores (out, in)
            theirs.bias.copy_(torch.from_numpy(mine.b))
    xt = torch.tensor(x, requires_grad=True)
    torch_loss = F.cross_entropy(model(xt), torch.tensor(labels))
    torch_loss.backward()

    loss = net.loss(x, labels)
    dx = net.backward()
    assert_close(loss, torch_loss.item(), "MLP loss")
    assert_close(dx, xt.grad.numpy(), "MLP dL/dx")
    for i, (mine, theirs) in enumerate(zip(net.linears, linears)):
        assert_close(mine.dW, theirs.weight.grad.numpy().T, f"layer {i} dL/dW")
        assert_close(mine.db, theirs.bias.grad.numpy(), f"layer {i} dL/db")


def test_gradient_check_against_finite_differences():
    # Finite differences, not rounding: O(eps^2) truncation + O(1e-16/eps) cancellation, ~1e-7 here.
    assert part1.gradient_check(seed=1) < 1e-6


# ----------------------------------------------------------------------------------------
# Initialization: the variances of the formulas, and what they do to deep nets
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme, variance", [
    ("small", 0.01**2),
    ("xavier", 2 / (1000 + 500)),
    ("he", 2 / 1000),
])
def test_init_variance_matches_formula(scheme, variance):
    # 500k draws: ~0.3% sampling error.
    W = part1.init_weights(scheme, 1000, 500, np.random.default_rng(0))
    assert W.shape == (1000, 500)
    assert abs(W.mean()) < 0.01 * math.sqrt(variance)
    assert W.var() == pytest.approx(variance, rel=0.03)


def test_zeros_init_is_zero_and_stays_symmetric():
    net = part1.MLP([8, 6, 6, 3], init="zeros")
    x, labels = RNG.normal(size=(20, 8)), RNG.integers(0, 3, size=20)
    for _ in range(5):
        net.loss(x, labels)
        net.backward()
        net.sgd_step(0.5)
    assert all(part1.distinct_units(layer.W) == 1 for layer in net.linears[:-1])
    assert not net.linears[0].W.any(), \
        "zero weights into a ReLU get exactly zero gradient: they never move"


def _deep_relu_activation_stds(init: str) -> list[float]:
    net = part1.MLP([256] * 11 + [10], activation="relu", init=init, seed=0)
    x = np.random.default_rng(1).normal(size=(512, 256))
    return [float(np.std(h)) for h in part1.hidden_outputs(net, x)]


def test_he_init_keeps_relu_activations_steady_while_small_normal_shrinks_them():
    he = _deep_relu_activation_stds("he")
    small = _deep_relu_activation_stds("small")
    assert 0.5 < he[-1] / he[0] < 2.0, \
        f"He init: std went from {he[0]:.3g} to {he[-1]:.3g} over 10 layers"
    assert small[-1] / small[0] < 1e-6, \
        f"small N(0, 0.01^2): std only went from {small[0]:.3g} to {small[-1]:.3g}"


def test_deep_sigmoid_net_gradient_vanishes_towards_the_input():
    net = part1.MLP([64] + [64] * 10 + [10], activation="sigmoid", init="xavier", seed=0)
    rng = np.random.default_rng(2)
    _, grad_std = part1.layer_statistics(net, rng.normal(size=(256, 64)),
                                         rng.integers(0, 10, size=256))
    ratio = grad_std[0] / grad_std[-1]
    assert ratio < 1e-2, f"first/last layer gradient std ratio {ratio:.2g}"


# ----------------------------------------------------------------------------------------
# Learning: the NumPy MLP on digits, the torch MLP on the synthetic MNIST twin and Iris
# ----------------------------------------------------------------------------------------
def test_part1_stops_with_a_message_when_the_loss_becomes_nan(tmp_path):
    """A step size that blows up the digits MLP must end the run, not finish it on NaN weights."""
    cfg = parse_config(part1.Config, ["--smoke", "--lr", "5", "--out", str(tmp_path / "runs")])
    with pytest.raises(NonFiniteLoss, match="in epoch 1 with --lr 5: the step is too large"):
        part1.main(cfg)


def test_numpy_mlp_learns_digits():
    digits = part1.load_digits("", seed=0)  # bundled with scikit-learn: offline
    net = part1.MLP([64, 64, 10], activation="relu", init="he", seed=0)
    rng = np.random.default_rng(0)
    losses = [part1.train_epoch(net, digits.x_train, digits.y_train, 0.05, 32, rng)
              for _ in range(4)]
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall enough: {losses}"
    assert part1.accuracy(net, digits.x_test, digits.y_test) > 0.85  # chance is 0.10



# ----------------------------------------------------------------------------------------
# Part 2: the loop, the presets, the bad inputs
# ----------------------------------------------------------------------------------------
def test_train_one_epoch_is_the_plain_sgd_loop_with_a_per_batch_schedule():
    """Three batches of a linear model: the weights a hand-written loop gives (fresh gradients
    every step, lr from the schedule), and one scheduler step per batch. Forgetting zero_grad
    accumulates gradients; stepping the schedule per epoch leaves the lr unchanged."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.tensor([0, 1, 2] * 4)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    model = torch.nn.Linear(5, 3)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    metrics = part2.train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer,
                                    scheduler)
    losses, lr = [], 0.5
    for xb, yb in batches:
        w_, b_ = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = F.cross_entropy(xb @ w_.T + b_, yb)
        gw, gb = torch.autograd.grad(loss, (w_, b_))
        w, b, lr = w - lr * gw, b - lr * gb, lr * 0.5
        losses.append(loss.item())
    assert torch.allclose(model.weight, w, atol=1e-6) and torch.allclose(model.bias, b, atol=1e-6)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 8)
    assert metrics["loss"] == pytest.approx(np.mean(losses), rel=1e-6)


def test_predict_and_evaluate_switch_dropout_off():
    torch.manual_seed(0)
    model = part2.MLP(6, (64,), 3, dropout=0.9)
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    model.train()
    first, second = part2.predict(model, batches)[0], part2.predict(model, batches)[0]
    assert torch.equal(first, second) and not model.training, \
        "predict must run in eval mode (dropout off)"
    assert torch.allclose(first, model(x))
    model.train()
    loss = part2.evaluate(model, batches)["loss"]
    assert loss == pytest.approx(F.cross_entropy(model.eval()(x), y).item())


def test_momentum_optimizer_has_momentum_and_sgd_has_none():
    """On loss = w (gradient 1): SGD moves lr per step; momentum v <- mu v + g moves lr, then
    lr (1 + mu)."""
    for name, mu, second_step in [("sgd", 0.0, 0.1), ("momentum", 0.9, 0.19)]:
        w = torch.nn.Parameter(torch.tensor(1.0))
        optimizer = part2.make_optimizer(name, [w], lr=0.1, momentum=0.9)
        assert optimizer.param_groups[0]["momentum"] == mu, name
        positions = []
        for _ in range(2):
            optimizer.zero_grad()
            w.backward()
            optimizer.step()
            positions.append(w.item())
        assert 1.0 - positions[0] == pytest.approx(0.1)
        assert positions[0] - positions[1] == pytest.approx(second_step)


def test_mlp_shapes_he_init_and_no_hidden_layer():
    model = part2.MLP(784, (64, 32), 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 10)]
    # He: Var = 2 / fan_in.
    assert linears[0].weight.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.05)
    assert not any(m.bias.any() for m in linears)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    softmax_regression = part2.MLP(4, (), 3)
    assert [type(m).__name__ for m in softmax_regression.layers] == ["Flatten", "Linear"]


def test_iris_preset_fills_what_the_user_did_not_say():
    cfg = parse_config(part2.Config, ["--dataset", "iris", "--epochs", "7"])
    assert (cfg.hidden, cfg.batch_size, cfg.lr, cfg.epochs) == ((16,), 16, 1e-2, 7)
    assert parse_config(part2.Config, []) == part2.Config()  # MNIST: the Config defaults as written
    smoke = parse_config(part2.Config, ["--smoke", "--batch-size", "8"])
    assert (smoke.epochs, smoke.batch_size, smoke.hidden) == (part2.Config.SMOKE["epochs"], 8,
                                                              (1024, 1024))


def test_part2_mlp_learns_iris(offline):
    argv = ["--dataset", "iris", "--out", str(offline / "runs"), "--device", "cpu"]
    summary = part2.main(parse_config(part2.Config, argv))
    assert summary["test_acc"] >= 0.8, summary  # 3 classes: chance is 0.33
    assert summary["last_train_loss"] < 0.5 * summary["first_train_loss"]


@pytest.mark.parametrize("argv, message", [
    (["--dropout", "1.5"], "--dropout: must be in [0, 1)"),
    (["--label-smoothing", "2"], "--label-smoothing: must be in [0, 1)"),
    (["--shift", "100"], "--shift: must be in [0, 8]"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--seed", "12345678901234567890"], "--seed: must be in [0, 4294967295]"),
    (["--hidden", "0"], "--hidden: must be in [1, 8192]"),
    (["--lr", "0"], "--lr: must be in (0, 1000000]"),
    # Above float32's range: a torch traceback before.
    (["--lr", "1e308"], "--lr: must be in (0, 1000000]"),
    (["--momentum", "1"], "--momentum: must be in (0, 1)"),
    (["--val-fraction", "0.9"], "--val-fraction: must be in [0, 0.5]"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
])
def test_part2_bad_values_stop_in_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(part2.Config, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_worst_mistakes_are_the_confident_wrong_ones():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]])
    targets = torch.tensor([0, 0, 1, 1])  # rows 1, 2, 3 are wrong, with confidence 0.8, 0.6, 0.99
    assert report.worst_mistakes(probs, targets, k=2).tolist() == [3, 1]


def test_part2_without_mnist_offline_says_what_to_do(offline):
    with pytest.raises(DataUnavailable, match="--data-dir PATH.*--smoke"):
        part2.main(part2.Config(out=str(offline / "runs"), device="cpu"))
    assert not (offline / "runs").exists(), "no run folder is created when the data is missing"


# ----------------------------------------------------------------------------------------
# Part 2: Ctrl-C at any step, then the printed --resume, ends with the uninterrupted weights
# ----------------------------------------------------------------------------------------
TINY = ["--smoke", "--hidden", "32", "--epochs", "3", "--device", "cpu"]
STEPS_PER_EPOCH = 15  # TINY's steps per epoch on the twin


def lab(out, *argv: str) -> dict:
    """part2.py's command line, in this process; the summary, or {"exit": code}."""
    return run_lab(part2.main, part2.Config, ["--out", str(out), *argv])


def checkpoint_in(out):
    (path,) = out.glob("week02/part2/*/checkpoint.pt")
    return path


def weights(checkpoint) -> dict:
    return torch.load(checkpoint, weights_only=True)["model"]


def ctrl_c_after_step(monkeypatch, n: int) -> None:
    """Simulate Ctrl-C right after the n-th optimizer step (before that step's schedule step)."""
    step, count = torch.optim.Adam.step, [0]

    def interrupted_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted_step)


def metrics_without_times(run_dir) -> list[str]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0].endswith(",epoch_time_s")
    return [line.rsplit(",", 1)[0] for line in lines]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    summary = lab(out, *TINY)
    assert summary["epochs"] == 3
    return checkpoint_in(out)


@pytest.mark.parametrize("stop_at", [
    STEPS_PER_EPOCH + 5,       # mid epoch 2: OneCycle part way through its schedule
    2 * STEPS_PER_EPOCH,       # the last step of epoch 2, before its checkpoint
    3 * STEPS_PER_EPOCH,       # the very last step of the run
])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, capsys,
                                                                 straight_run, stop_at):
    ctrl_c_after_step(monkeypatch, stop_at)
    assert lab(tmp_path, *TINY) == {"exit": 130}
    err = capsys.readouterr().err
    checkpoint = checkpoint_in(tmp_path)
    epoch_saved = (stop_at - 1) // STEPS_PER_EPOCH
    assert err.startswith(f"interrupted: stopped; the checkpoint of epoch {epoch_saved} is ") and \
        err.count("\n") == 1 and f"--resume {checkpoint}" in err
    monkeypatch.undo()
    resumed = lab(tmp_path, "--resume", str(checkpoint))  # the command the message prints
    assert resumed["run_dir"] == str(checkpoint.parent), "a resumed run continues its own folder"
    assert resumed["epochs"] == 3
    for name, value in weights(straight_run).items():
        assert torch.equal(value, weights(checkpoint)[name]), name
    assert metrics_without_times(checkpoint.parent) == metrics_without_times(straight_run.parent)


def test_resume_of_a_finished_run_says_nothing_to_do_and_can_train_on(tmp_path, capsys):
    lab(tmp_path, *TINY)
    checkpoint = checkpoint_in(tmp_path)
    before = weights(checkpoint)
    capsys.readouterr()
    again = lab(tmp_path, "--resume", str(checkpoint))
    out = capsys.readouterr().out
    assert "nothing to do" in out and "finished its epochs at epoch 3" in out
    assert again["epochs"] == 3
    more = lab(tmp_path, "--resume", str(checkpoint), "--epochs", "5")
    assert more["epochs"] == 5 and more["run_dir"] == str(checkpoint.parent)
    rows = (checkpoint.parent / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5]
    lrs = [float(r.split(",")[5]) for r in rows]
    assert lrs[3] > lrs[2] and lrs[4] < lrs[3], \
        "OneCycle was stretched to 5 epochs: back up, then annealing"
    assert any(not torch.equal(v, weights(checkpoint)[k]) for k, v in before.items()), \
        "it trained on"
    # The summary counts the training time of all 5 epochs, not only of the 2 this process trained.
    epoch_times = [float(r.split(",")[-1]) for r in rows]
    assert more["train_time_s"] == round(sum(epoch_times), 2), (more["train_time_s"], epoch_times)


def test_resume_refuses_another_scripts_checkpoint_and_touches_nothing(tmp_path, capsys):
    from common.checkpoint import save_checkpoint

    foreign_dir = tmp_path / "runs" / "week03" / "part2" / "20260101-000000"
    foreign_dir.mkdir(parents=True)
    (foreign_dir / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    # The fields Week 3's CNN lab saves (those part2 lacks are ignored).
    week03_config = {"dataset": "mnist", "epochs": 4, "batch_size": 32, "lr": 2e-3,
                     "dropout": 0.1, "width": 16, "smoke": True}
    foreign = save_checkpoint(foreign_dir / "checkpoint.pt", part2.MLP(784, (32,), 10), epoch=1,
                              config=week03_config, script="week03/part2",
                              rows=[{"epoch": 1, "loss": 0.5}])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["--resume", str(foreign), "--device", "cpu", "--smoke"]
    assert lab(tmp_path / "out", *argv) == {"exit": 2}
    assert "written by week03/part2, not week02/part2" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, \
        "a refused --resume must not write into the other run's folder (or anywhere)"


# ----------------------------------------------------------------------------------------
# Self-work scripts
# ----------------------------------------------------------------------------------------
def test_fold_splits_test_every_row_once_and_never_train_on_it():
    order = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 50 + [1] * 50 + [2] * 50)[order]
    rounds = iris_cv.fold_splits(labels, k=5, seed=0)
    assert len(rounds) == 5
    tested = torch.cat([test for _, test in rounds]).sort().values
    assert torch.equal(tested, torch.arange(150)), "every row is tested exactly once"
    for train, test in rounds:
        assert not set(train.tolist()) & set(test.tolist()), "a model never trains on its test fold"
        assert len(train) + len(test) == 150 and len(set(train.tolist())) == len(train)
        assert torch.bincount(labels[test], minlength=3).tolist() == [10, 10, 10], "stratified"


def test_iris_cv_trains_each_model_on_everything_but_its_test_rows(monkeypatch, offline):
    """The rows handed to training and testing, as iris_cv.main passes them (no training here)."""
    calls = []

    def record(model_cfg, x_tr, y_tr, x_te, y_te, classes, device):
        calls.append((x_tr, x_te))
        return 1.0

    monkeypatch.setattr(iris_cv, "held_out_accuracy", record)
    argv = ["--folds", "5", "--splits", "2", "--out", str(offline / "runs")]
    iris_cv.main(parse_config(iris_cv.Config, argv))
    rows = lambda x: Counter(map(tuple, x.tolist()))  # noqa: E731  (Iris has duplicate flowers)
    x_tr, x_te = calls[0]
    everything = rows(x_tr) + rows(x_te)
    assert sum(everything.values()) == 150
    for x_tr, x_te in calls:
        assert rows(x_tr) + rows(x_te) == everything and len(x_te) == 30, \
            "train + test = all 150, once each"
    cv_tested = sum((rows(x_te) for _, x_te in calls[:5]), Counter())
    assert cv_tested == everything, "the 5 CV rounds test every flower exactly once"


def test_sweep_marks_a_divergent_run_instead_of_crashing(offline):
    data = sweep.load_subset(parse_config(sweep.Config, ["--smoke"]))
    cfg = part2.Config(hidden=(32,), epochs=1, batch_size=64, optimizer="sgd", lr=1e6,
                       schedule="constant", dropout=0.0, device="cpu")
    cell = sweep.sweep_cell(cfg, data, torch.device("cpu"))
    assert cell.verdict == "nan" and math.isnan(cell.val_acc), \
        "a learning rate of 1e6 must overflow the loss"
    assert math.isfinite(cell.initial_val_loss)


def test_sweep_verdicts():
    assert sweep.CellResult(0.9, 0.3, 2.5, 0.12).verdict == "stable"
    assert sweep.CellResult(0.1, 40.0, 2.5, 0.3).verdict == "diverged"
    assert sweep.CellResult(0.11, 2.31, 2.5, 1.0).verdict == "collapsed"
    assert sweep.CellResult(math.nan, math.nan, 2.5, math.nan).verdict == "nan"


@pytest.mark.parametrize("module, argv, message", [
    (sweep, ["--lrs"], "--lrs and --batch-sizes need at least one value"),
    (sweep, ["--lrs", "0.1", "fast"], "--lrs: expected a float, got 'fast'"),
    (sweep, ["--batch-sizes", "0", "64"], "--batch-sizes: must be >= 1"),
    (iris_cv, ["--folds", "1"], "--folds: must be in [2, 50]"),
    (optimizers, ["--momentum", "0"], "--momentum: must be in (0, 1)"),
    (optimizers, ["--val-fraction", "0"], "--val-fraction: must be in (0, 0.5]"),
    (optimizers, ["--sgd-lr", "1e308"], "--sgd-lr: must be in (0, 1000000]"),
    (optimizers, ["--adam-lr", "1e39"], "--adam-lr: must be in (0, 1000000]"),
    (sweep, ["--lrs", "0.1", "1e308"], "--lrs: must be in (0, 1000000]"),
    (iris_cv, ["--lr", "1e308"], "--lr: must be in (0, 1000000]"),
])
def test_self_work_bad_values_stop_in_parsing(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(module.Config, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err


# ----------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them and calls these)
# ----------------------------------------------------------------------------------------
def loss_falls(rows: list[dict], key: str = "train_loss") -> None:
    first, last = float(rows[0][key]), float(rows[-1][key])
    assert last < first, f"{key} did not fall: {first} -> {last}"


def check_part1(summary, rows):
    loss_falls(rows)
    assert summary["test_acc"] > 0.5, summary  # 10 digits: chance is 0.10
    assert summary["gradient_check_error"] < 1e-6
    assert summary["sigmoid_first_over_last_grad"] < 1e-2, \
        "the deep sigmoid net's gradient should vanish"


def check_part2(summary, rows):
    loss_falls(rows)
    # Chance is 0.1. Measured (benchmarks/smoke_margins.py): smoke 0.50; with --lr 1e-9 (nothing
    # learns) 0.098, 0.2 under the threshold.
    assert summary["chance"] == 0.1 and summary["test_acc"] > 0.3, summary
    assert summary["epochs"] == len(rows) == part2.Config.SMOKE["epochs"]


def check_optimizers(summary, rows):
    for name in ("sgd", "momentum", "adam"):
        loss_falls([r for r in rows if r["optimizer"] == name])
        assert summary[f"{name}_val_acc"] > 1.5 * summary["chance"], (name, summary)
    # Same lr, same start, same batches: momentum's running sum of gradients must go further.
    assert summary["momentum_train_loss"] < summary["sgd_train_loss"], summary


def check_sweep(summary, rows):
    assert summary["stable"] >= 1 and summary["best_val_acc"] > 2 * summary["chance"], summary
    absurd = max(float(r["lr"]) for r in rows)
    verdicts = {r["verdict"] for r in rows if float(r["lr"]) == absurd}
    assert verdicts <= {"diverged", "nan"}, f"lr {absurd} should break every cell, got {verdicts}"


def check_iris_cv(summary, rows):
    assert summary["mlp_cv_mean"] > 0.8 and summary["softmax_cv_mean"] > 0.6, summary  # chance: 1/3
    assert len([r for r in rows if "CV" in r["evaluation"]]) == 2 * iris_cv.Config.SMOKE["folds"]


SMOKE_OUTCOMES = {
    "part1.py": check_part1,
    "part2.py": check_part2,
    "optimizers.py": check_optimizers,
    "sweep.py": check_sweep,
    "iris_cv.py": check_iris_cv,
}
