"""Week 2: the NumPy MLP's hand-written backprop equals PyTorch's autograd (float64), each
initialization has the variance its formula says and the effect on deep nets the lab claims,
and the training scripts learn (loss falls, accuracy beats chance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import DataUnavailable, LabError
from common.parity import assert_close, torch_reference
from week02_mlp import iris_cv, part1, part2, sweep

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
    expected, (ex, eW, eb) = torch_reference(lambda x, W, b: x @ W + b, x, layer.W, layer.b, upstream=upstream)
    assert_close(out, expected, "Linear forward")
    assert_close(dx, ex, "Linear dL/dx")
    assert_close(layer.dW, eW, "Linear dL/dW")
    assert_close(layer.db, eb, "Linear dL/db")


@pytest.mark.parametrize("name, torch_fn", [("relu", torch.relu), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh)])
def test_activation_forward_and_backward_match_torch(name, torch_fn):
    # Large magnitudes: the sigmoid must not overflow at -800 nor lose its gradient. Exact zeros
    # (0.0 and -0.0): ReLU's gradient there is 0 by PyTorch's convention (x > 0, not x >= 0).
    x = np.concatenate([RNG.normal(size=(4, 8)) * 3, [[-800.0, -30.0, -1e-3, 0.0, -0.0, 1e-3, 30.0, 800.0]],
                        np.zeros((1, 8))])
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
    logits[3, [2, 7]] = logits[3].max() + 1.0  # a tie for the largest logit (the row max used for stability)
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
    W = part1.init_weights(scheme, 1000, 500, np.random.default_rng(0))  # 500k draws: ~0.3% sampling error
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
    assert not net.linears[0].W.any(), "zero weights into a ReLU get exactly zero gradient: they never move"


def _deep_relu_activation_stds(init: str) -> list[float]:
    net = part1.MLP([256] * 11 + [10], activation="relu", init=init, seed=0)
    x = np.random.default_rng(1).normal(size=(512, 256))
    return [float(np.std(h)) for h in part1.hidden_outputs(net, x)]


def test_he_init_keeps_relu_activations_steady_while_small_normal_shrinks_them():
    he = _deep_relu_activation_stds("he")
    small = _deep_relu_activation_stds("small")
    assert 0.5 < he[-1] / he[0] < 2.0, f"He init: std went from {he[0]:.3g} to {he[-1]:.3g} over 10 layers"
    assert small[-1] / small[0] < 1e-6, f"small N(0, 0.01^2): std only went from {small[0]:.3g} to {small[-1]:.3g}"


def test_deep_sigmoid_net_gradient_vanishes_towards_the_input():
    net = part1.MLP([64] + [64] * 10 + [10], activation="sigmoid", init="xavier", seed=0)
    rng = np.random.default_rng(2)
    _, grad_std = part1.layer_statistics(net, rng.normal(size=(256, 64)), rng.integers(0, 10, size=256))
    assert grad_std[0] / grad_std[-1] < 1e-2, f"first/last layer gradient std ratio {grad_std[0] / grad_std[-1]:.2g}"


# ----------------------------------------------------------------------------------------
# Learning: the NumPy MLP on digits, the torch MLP on the synthetic MNIST twin and Iris
# ----------------------------------------------------------------------------------------
def test_numpy_mlp_learns_digits():
    digits = part1.load_digits("", seed=0)  # bundled with scikit-learn: offline
    net = part1.MLP([64, 64, 10], activation="relu", init="he", seed=0)
    rng = np.random.default_rng(0)
    losses = [part1.train_epoch(net, digits.x_train, digits.y_train, 0.05, 32, rng) for _ in range(4)]
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall enough: {losses}"
    assert part1.accuracy(net, digits.x_test, digits.y_test) > 0.85  # chance is 0.10


def test_part2_mlp_beats_chance_on_the_mnist_twin(offline):
    summary = part2.main(part2.Config(smoke=True, out=str(offline / "runs"), device="cpu"))
    assert summary["test_acc"] > 0.2, summary  # 10 classes: chance is 0.10
    run_dir = offline / "runs" / "week02" / "part2"
    assert len(list(run_dir.glob("*/confusion.png"))) == 1 and len(list(run_dir.glob("*/worst_mistakes.png"))) == 1


def test_part2_mlp_learns_iris(offline):
    cfg = part2.Config(dataset="iris", out=str(offline / "runs"), device="cpu")
    summary = part2.main(cfg)
    assert summary["test_acc"] >= 0.8, summary  # 3 classes: chance is 0.33


def test_bad_hidden_widths_give_a_clear_error():
    with pytest.raises(LabError, match="--hidden"):
        part2.parse_hidden("256,abc")
    assert part2.parse_hidden("") == []
    assert part2.parse_hidden("256, 128") == [256, 128]


def test_worst_mistakes_are_the_confident_wrong_ones():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.99, 0.01]])
    targets = torch.tensor([0, 0, 1, 1])  # rows 1, 2, 3 are wrong, with confidence 0.8, 0.6, 0.99
    assert part2.worst_mistakes(probs, targets, k=2).tolist() == [3, 1]


# ----------------------------------------------------------------------------------------
# Self-work helpers
# ----------------------------------------------------------------------------------------
def test_stratified_folds_partition_the_data_and_keep_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 50 + [2] * 50)[torch.randperm(150, generator=torch.Generator()
                                                                           .manual_seed(0))]
    folds = iris_cv.stratified_folds(labels, k=5, seed=0)
    everything = torch.cat(folds).sort().values
    assert torch.equal(everything, torch.arange(150)), "folds must cover every row exactly once"
    for fold in folds:
        assert torch.bincount(labels[fold], minlength=3).tolist() == [10, 10, 10]


def test_sweep_marks_a_divergent_run_instead_of_crashing(offline):
    data = sweep.load_subset(sweep.Config(smoke=True, device="cpu"))
    cfg = part2.Config(dataset="mnist", hidden="32", epochs=1, batch_size=64, optimizer="sgd", lr=1e6,
                       schedule="constant", dropout=0.0, device="cpu")
    cell = sweep.sweep_cell(cfg, data, torch.device("cpu"))
    assert cell.verdict == "nan" and math.isnan(cell.val_acc), "a learning rate of 1e6 must overflow the loss"
    assert math.isfinite(cell.initial_val_loss)


def test_sweep_verdicts():
    assert sweep.CellResult(0.9, 0.3, 2.5, 0.12).verdict == "stable"
    assert sweep.CellResult(0.1, 40.0, 2.5, 0.3).verdict == "diverged"
    assert sweep.CellResult(0.11, 2.31, 2.5, 1.0).verdict == "collapsed"


def test_sweep_rejects_bad_grids():
    with pytest.raises(LabError, match="--lrs"):
        sweep.parse_numbers("0.1,fast", float, "--lrs")
    with pytest.raises(LabError, match="--batch-sizes"):
        sweep.parse_numbers("0,64", int, "--batch-sizes")


def test_part2_without_mnist_offline_says_what_to_do(offline):
    with pytest.raises(DataUnavailable, match="--data-dir PATH.*--smoke"):
        part2.main(part2.Config(out=str(offline / "runs"), device="cpu"))
    assert not (offline / "runs").exists(), "no run folder is created when the data is missing"
