"""Week 3: NumPy convolution and max-pooling == PyTorch (values and gradients), and the CNN lab.

All parity checks run in float64 (common.parity), so the tolerance measures our math, not
float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import LabError
from common.parity import assert_close, max_relative_error, numerical_grad, torch_reference
from week03_cnn import part1
from week03_cnn.part2 import CNN, Config, main, one_cycle

# (batch, in channels, out channels, height, width, kernel, stride, padding)
CONV_CASES = [
    (1, 1, 1, 5, 5, 3, 1, 0),
    (2, 3, 4, 7, 7, 3, 1, 1),
    (2, 2, 3, 8, 6, 3, 2, 1),
    (1, 3, 2, 9, 9, 5, 2, 2),
    (3, 4, 5, 6, 7, 2, 2, 0),
    (2, 1, 2, 7, 8, 3, 3, 2),
    (1, 2, 2, 6, 6, 1, 1, 0),
]
CONV_IDS = [f"n{n}-c{c}-f{f}-{h}x{w}-k{k}-s{s}-p{p}" for n, c, f, h, w, k, s, p in CONV_CASES]


def conv_inputs(n, c, f, h, w, k, s, p, seed=0):
    rng = np.random.default_rng(seed)
    x, weight, bias = rng.standard_normal((n, c, h, w)), rng.standard_normal((f, c, k, k)), rng.standard_normal(f)
    x[..., ::3, ::2] = 0.0  # exact zeros among the inputs (DESIGN.md 7), as after a ReLU
    weight.flat[::4] = 0.0
    oh, ow = part1.conv_output_size(h, k, s, p), part1.conv_output_size(w, k, s, p)
    upstream = rng.standard_normal((n, f, oh, ow))  # a random dL/dy tests every output's path
    return x, weight, bias, upstream


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("impl", ["loops", "vectorized"])
def test_conv2d_matches_torch(case, impl):
    *_, s, p = case
    x, weight, bias, upstream = conv_inputs(*case)
    forward, backward = {
        "loops": (part1.conv2d_forward_loops, part1.conv2d_backward_loops),
        "vectorized": (part1.conv2d_forward, part1.conv2d_backward),
    }[impl]
    expected, (gx, gw, gb) = torch_reference(lambda a, b, c: F.conv2d(a, b, c, stride=s, padding=p),
                                             x, weight, bias, upstream=upstream)
    assert_close(forward(x, weight, bias, s, p), expected, "conv forward")
    dx, dw, db = backward(upstream, x, weight, s, p)
    assert_close(dx, gx, "dL/dx")
    assert_close(dw, gw, "dL/dw")
    assert_close(db, gb, "dL/db")


@pytest.mark.parametrize("case", CONV_CASES[1:4], ids=CONV_IDS[1:4])
def test_vectorized_conv_equals_loops(case):
    *_, s, p = case
    x, weight, bias, upstream = conv_inputs(*case, seed=1)
    np.testing.assert_allclose(part1.conv2d_forward(x, weight, bias, s, p),
                               part1.conv2d_forward_loops(x, weight, bias, s, p), rtol=1e-12, atol=1e-12)
    for fast, slow in zip(part1.conv2d_backward(upstream, x, weight, s, p),
                          part1.conv2d_backward_loops(upstream, x, weight, s, p)):
        np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


def test_conv_weight_gradient_matches_finite_differences():
    x, weight, bias, upstream = conv_inputs(1, 2, 2, 5, 5, 3, 2, 1, seed=2)
    loss = lambda w: float(np.sum(part1.conv2d_forward(x, w, bias, 2, 1) * upstream))
    _, dw, _ = part1.conv2d_backward(upstream, x, weight, 2, 1)
    # Finite differences, not rounding: O(eps^2) truncation + O(1e-16/eps) cancellation error.
    assert max_relative_error(dw, numerical_grad(loss, weight)) < 1e-7


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (28, 3, 1, 1), (32, 3, 2, 1), (7, 2, 2, 0), (9, 5, 3, 2), (10, 4, 3, 0), (5, 5, 1, 0), (6, 1, 2, 0),
])
def test_output_size_formula_matches_torch(size, kernel, stride, padding):
    y = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel), stride=stride, padding=padding)
    assert y.shape[-1] == part1.conv_output_size(size, kernel, stride, padding)


def test_output_size_rejects_a_window_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        part1.conv_output_size(2, 5)


# (batch, channels, height, width, kernel, stride, padding): stride < kernel overlaps windows
POOL_CASES = [(2, 3, 8, 8, 2, 2, 0), (1, 2, 7, 9, 3, 2, 1), (2, 1, 6, 6, 3, 1, 1), (1, 4, 9, 7, 3, 3, 0),
              (2, 2, 5, 5, 2, 1, 0)]


@pytest.mark.parametrize("values", ["normal", "ties"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[f"c{c}-{h}x{w}-k{k}-s{s}-p{p}" for _, c, h, w, k, s, p in POOL_CASES])
def test_maxpool_matches_torch(case, values):
    n, c, h, w, k, s, p = case
    rng = np.random.default_rng(3)
    if values == "normal":
        x = rng.standard_normal((n, c, h, w))
    else:  # few distinct values: most windows have a tied maximum, some are all zero or all -1
        x = rng.integers(-1, 2, size=(n, c, h, w)).astype(np.float64)
        x[0, 0, :3, :3] = 0.0
        x[-1, -1, -3:, -3:] = -1.0
    y, argmax = part1.maxpool2d_forward(x, k, s, p)
    upstream = rng.standard_normal(y.shape)
    expected, (gx,) = torch_reference(lambda a: F.max_pool2d(a, k, s, p), x, upstream=upstream)
    assert_close(y, expected, "max-pool forward")
    assert_close(part1.maxpool2d_backward(upstream, argmax, x.shape, k, s, p), gx, "max-pool dL/dx")


@pytest.mark.parametrize("window, winner", [
    ([[1.0, 5.0], [3.0, 2.0]], (0, 1)),
    ([[1.0, 5.0], [5.0, 2.0]], (0, 1)),  # a tie: the first maximum in row-major order wins, as in PyTorch
    ([[0.0, 0.0], [0.0, 0.0]], (0, 0)),
])
def test_maxpool_gradient_goes_only_to_the_max(window, winner):
    x = np.array([[window]])
    y, argmax = part1.maxpool2d_forward(x, 2)
    dx = part1.maxpool2d_backward(np.array([[[[7.0]]]]), argmax, x.shape, 2)
    expected = np.zeros((1, 1, 2, 2))
    expected[(0, 0, *winner)] = 7.0
    assert y.item() == np.max(window)
    np.testing.assert_array_equal(dx, expected)
    _, (torch_dx,) = torch_reference(lambda a: F.max_pool2d(a, 2), x, upstream=np.array([[[[7.0]]]]))
    np.testing.assert_array_equal(torch_dx, expected)  # the same tie rule as PyTorch's


def test_worked_example_and_sobel_on_a_step_edge(capsys):
    _, _, out = part1.worked_example()
    assert out.shape == (3, 3) and out[0, 0] == -4  # (1*1 + 0*2 + 2*1) - (0*1 + 3*2 + 1*1) = 3 - 7
    assert "y[2,2]" in capsys.readouterr().out
    step = np.zeros((5, 6))
    step[:, :3] = 1.0  # bright left half, dark right half: one vertical edge
    kernels = part1.EDGE_FILTERS
    sobel_x = part1.conv2d_forward(step[None, None], kernels["Sobel x (vertical edges)"][None, None], np.zeros(1))
    sobel_y = part1.conv2d_forward(step[None, None], kernels["Sobel y (horizontal edges)"][None, None], np.zeros(1))
    assert np.all(sobel_x[0, 0, :, 1:3] == 4) and np.all(sobel_x[0, 0, :, [0, 3]] == 0)
    assert np.all(sobel_y == 0)  # no horizontal edges


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("widths", [(8, 16), (8, 16, 32)])
@pytest.mark.parametrize("head_pool", [1, 3])
def test_cnn_output_shape(in_channels, size, widths, head_pool):
    model = CNN(in_channels, 10, widths, head_pool=head_pool)
    assert model(torch.zeros(4, in_channels, size, size)).shape == (4, 10)
    assert model.head.in_features == widths[-1] * head_pool**2


def test_one_cycle_warms_up_then_anneals_to_zero_when_steps_or_time_run_out():
    def lrs(budget_s, steps):
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
        scheduler = one_cycle(optimizer, Config(epochs=2, lr=1.0, budget_s=budget_s), steps_per_epoch=50)
        values = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            values.append(optimizer.param_groups[0]["lr"])
        return values

    for budget_s in (0.0, 1e6):  # epoch-based OneCycleLR, and the clock-aware one with time to spare
        values = lrs(budget_s, 99)  # the rates used by the 2nd..100th of 100 steps
        assert values[0] < 0.3 and max(values) == pytest.approx(1.0, abs=0.05) and values[-1] < 0.01
        peak = int(np.argmax(values))
        assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))  # only down after the peak
    assert lrs(1e-9, 3)[-1] == 0.0  # the time budget is already spent: the rate is annealed


def test_batch_norm_and_dropout_flags_add_those_layers():
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    plain, both = CNN(3, 10, (8, 16, 32)), CNN(3, 10, (8, 16, 32), batch_norm=True, dropout=0.3)
    assert count(plain, nn.BatchNorm2d) == 0 and count(plain, nn.Dropout) == 0
    assert count(both, nn.BatchNorm2d) == 3 and count(both, nn.Dropout) == 1
    assert next(m for m in both.modules() if isinstance(m, nn.Dropout)).p == 0.3
    # A conv followed by BatchNorm needs no bias: BN subtracts the mean anyway.
    assert all(m.bias is None for m in both.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_cnn_learns_the_synthetic_cifar_twin(tmp_path, offline):
    torch.set_num_threads(1)
    summary = main(Config(smoke=True, out=str(tmp_path / "runs"), device="cpu"))
    assert summary["test_acc"] > 0.3, summary  # chance is 0.1
    assert set(summary["per_class_acc"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                             "horse", "ship", "truck"}
    run_dir = tmp_path / "runs" / "week03" / "part2"
    (run_dir,) = run_dir.iterdir()
    assert {"confusion.png", "curves.png", "feature_maps_block1.png"} <= {p.name for p in run_dir.iterdir()}


@pytest.mark.parametrize("override,message", [({"blocks": 6}, "use 1 to 5 blocks"), ({"dropout": 1.0}, "below 1"),
                                              ({"head_pool": 0}, "at least 1")])
def test_impossible_settings_fail_with_a_clear_message(tmp_path, override, message):
    with pytest.raises(LabError, match=message):
        main(Config(smoke=True, out=str(tmp_path / "runs"), device="cpu", **override))
    assert not (tmp_path / "runs").exists()  # stopped before any run folder was made
