"""Week 3: NumPy convolution and max-pooling == PyTorch (values and gradients), the CNN lab
(learning, exact resume after Ctrl-C, settings checked before any work) and the BN/Dropout
comparison.

All parity checks run in float64 (common.parity), so the tolerance measures our math, not
float32 rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import read_checkpoint, save_checkpoint
from common.config import parse_config
from common.loader import TensorLoader
from common.parity import assert_close, max_relative_error, numerical_grad, torch_reference
from common.plots import confusion_matrix
from common.train import predict
from tests.conftest import run_lab
from week03_cnn import bn_dropout, part1, part2
from week03_cnn.part2 import CNN, per_class_accuracy, training_augment


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them; rows are metrics.csv)
# ------------------------------------------------------------------------------------------
def train_losses(rows: list[dict], **match) -> list[float]:
    return [float(r["train_loss"]) for r in rows if all(r.get(k) == v for k, v in match.items())]


def check_part1(summary: dict, rows: list[dict]) -> None:
    # float64 NumPy loops vs im2col: the same sums in another order, so rounding-level
    # differences only.
    assert summary["forward_max_abs_diff"] < 1e-10, summary
    assert summary["backward_max_abs_diff"] < 1e-10, summary
    assert summary["forward_speedup"] > 1 and summary["backward_speedup"] > 1, (
        "im2col should beat the loops")
    assert summary["pool_grad_nonzero"] == summary["pool_windows"], (
        "max-pool: one gradient per window")


def check_part2(summary: dict, rows: list[dict]) -> None:
    # Chance is 0.1 on the 10-class twin. Measured (benchmarks/smoke_margins.py): 0.598; with
    # --lr 1e-9 (nothing learns) 0.108, 0.19 under the threshold.
    assert summary["test_acc"] > 0.3, summary
    losses = train_losses(rows)
    assert len(losses) == summary["epochs_done"] and losses[-1] < 0.8 * losses[0], losses
    assert float(rows[-1]["lr"]) < 0.01 * max(float(r["lr"]) for r in rows), (
        "one-cycle anneals to ~0")


def check_bn_dropout(summary: dict, rows: list[dict]) -> None:
    for key, variant in (("plain", "plain"), ("bn", "BN"), ("dropout", "Dropout"),
                         ("bn_dropout", "BN+Dropout")):
        # chance is 0.1: every variant learns the twin
        assert summary[f"test_acc_{key}"] > 0.2, summary
        losses = train_losses(rows, variant=variant)
        assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], (variant, losses)
    bn, plain = train_losses(rows, variant="BN"), train_losses(rows, variant="plain")
    assert bn[-1] < plain[-1], (
        "BN trains faster (lower training loss after the same steps): the script's claim")
    assert summary["diverged"] == [] and summary["allowed_nan"] == []
    assert [r["variant"] for r in rows if r["variant"] in VARIANTS] == [
        v for v in VARIANTS for _ in range(12)], "every variant logs every epoch, in order"
    assert (Path(summary["run_dir"]) / "bn_dropout.png").exists()
    assert summary["step_loss_jitter_bn"] > 0


VARIANTS = ("plain", "BN", "Dropout", "BN+Dropout")
SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2,
                  "bn_dropout.py": check_bn_dropout}

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
    x = rng.standard_normal((n, c, h, w))
    weight, bias = rng.standard_normal((f, c, k, k)), rng.standard_normal(f)
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
                               part1.conv2d_forward_loops(x, weight, bias, s, p),
                               rtol=1e-12, atol=1e-12)
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
    (28, 3, 1, 1), (32, 3, 2, 1), (7, 2, 2, 0), (9, 5, 3, 2), (10, 4, 3, 0), (5, 5, 1, 0),
    (6, 1, 2, 0),
])
def test_output_size_formula_matches_torch(size, kernel, stride, padding):
    y = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel),
                 stride=stride, padding=padding)
    assert y.shape[-1] == part1.conv_output_size(size, kernel, stride, padding)


def test_output_size_rejects_a_window_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        part1.conv_output_size(2, 5)


# (batch, channels, height, width, kernel, stride, padding): stride < kernel overlaps windows
POOL_CASES = [(2, 3, 8, 8, 2, 2, 0), (1, 2, 7, 9, 3, 2, 1), (2, 1, 6, 6, 3, 1, 1),
              (1, 4, 9, 7, 3, 3, 0), (2, 2, 5, 5, 2, 1, 0)]
POOL_IDS = [f"c{c}-{h}x{w}-k{k}-s{s}-p{p}" for _, c, h, w, k, s, p in POOL_CASES]


@pytest.mark.parametrize("values", ["normal", "ties"])
@pytest.mark.parametrize("case", POOL_CASES, ids=POOL_IDS)
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
    ([[1.0, 5.0], [5.0, 2.0]], (0, 1)),  # a tie: the first maximum (row-major) wins, as in torch
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
    _, (torch_dx,) = torch_reference(lambda a: F.max_pool2d(a, 2), x,
                                     upstream=np.array([[[[7.0]]]]))
    np.testing.assert_array_equal(torch_dx, expected)  # the same tie rule as PyTorch's


def test_worked_example_and_sobel_on_a_step_edge(capsys):
    _, _, out = part1.worked_example()
    assert out.shape == (3, 3) and out[0, 0] == -4  # (1*1 + 0*2 + 2*1) - (0*1 + 3*2 + 1*1) = 3 - 7
    assert "y[2,2]" in capsys.readouterr().out
    step = np.zeros((5, 6))
    step[:, :3] = 1.0  # bright left half, dark right half: one vertical edge
    kernels = part1.EDGE_FILTERS
    sobel_x = part1.conv2d_forward(step[None, None],
                                   kernels["Sobel x (vertical edges)"][None, None], np.zeros(1))
    sobel_y = part1.conv2d_forward(step[None, None],
                                   kernels["Sobel y (horizontal edges)"][None, None], np.zeros(1))
    assert np.all(sobel_x[0, 0, :, 1:3] == 4) and np.all(sobel_x[0, 0, :, [0, 3]] == 0)
    assert np.all(sobel_y == 0)  # no horizontal edges



# ------------------------------------------------------------------------------------------
# The CNN
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("widths", [(8, 16), (8, 16, 32)])
@pytest.mark.parametrize("head_pool", [1, 3])
def test_cnn_output_shape(in_channels, size, widths, head_pool):
    model = CNN(in_channels, 10, widths, head_pool=head_pool)
    assert model(torch.zeros(4, in_channels, size, size)).shape == (4, 10)
    assert model.head.in_features == widths[-1] * head_pool**2


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


def test_cnn_predictions_use_running_statistics_and_no_dropout():
    """In training mode BN normalizes with the batch's own statistics and Dropout is random:
    a prediction would depend on the other images in the batch, and change from call to call."""
    torch.manual_seed(0)
    model = CNN(1, 10, (4, 8), batch_norm=True, dropout=0.5)
    x = torch.randn(8, 1, 28, 28)
    model.train()
    model(3 * x + 1)  # move the running statistics away from their initial values
    batches = TensorLoader(x, torch.zeros(8, dtype=torch.long), 3)  # batches of 3, 3, 2
    logits, _ = predict(model, batches)
    assert torch.allclose(logits, model.eval()(x), atol=1e-6)


def test_per_class_accuracy_divides_by_the_true_class_counts():
    true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    # class 0: 2 of 4 right, class 1: 2 of 2, class 2: 2 of 3
    pred = np.array([0, 0, 1, 1, 1, 1, 0, 2, 2])
    matrix = confusion_matrix(true, pred, 3)
    assert matrix[0, 1] == 2 and matrix[2, 0] == 1, "rows are true classes, columns predictions"
    # column sums: 3, 4, 2
    np.testing.assert_allclose(per_class_accuracy(matrix), [2 / 4, 2 / 2, 2 / 3])


def shifts_of(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    padded = F.pad(image.float()[None], (padding,) * 4, mode="reflect")[0]
    size = image.shape[-1]
    offsets = range(2 * padding + 1)
    return [padded[:, dy:dy + size, dx:dx + size] for dy in offsets for dx in offsets]


def test_digits_are_shifted_but_never_mirrored_and_photos_are_flipped():
    g = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=g)
    out = training_augment("mnist")(digits, torch.Generator().manual_seed(1)).float()
    for image, augmented in zip(digits, out):
        assert any(torch.equal(augmented, s) for s in shifts_of(image, 2)), (
            "a digit may only be shifted")
    photos = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = training_augment("cifar10")(photos, torch.Generator().manual_seed(1)).float()
    flipped = sum(any(torch.equal(augmented, s) for s in shifts_of(image.flip(-1), 4))
                  for image, augmented in zip(photos, out))
    assert 5 <= flipped <= 27, f"about half the photos should be mirrored, got {flipped} of 32"


# ------------------------------------------------------------------------------------------
# The lab: learning, settings, resume
# ------------------------------------------------------------------------------------------
def lab(tmp_path: Path, *argv: str, main=part2.main, cls=part2.Config) -> dict:
    """A script run in this process as its command line would; its summary, or {"exit": code}."""
    return run_lab(main, cls, ["--out", str(tmp_path / "runs"), "--device", "cpu", *argv])


def test_cnn_learns_the_synthetic_cifar_twin(tmp_path, offline):
    summary = lab(tmp_path, "--smoke")
    rows = read_checkpoint(Path(summary["run_dir"]) / "checkpoint.pt")["extra"]["rows"]
    check_part2(summary, rows)
    assert set(summary["per_class_acc"]) == {"airplane", "automobile", "bird", "cat", "deer",
                                             "dog", "frog", "horse", "ship", "truck"}
    assert {"confusion.png", "curves.png", "feature_maps_block1.png", "metrics.csv",
            "checkpoint.pt"} <= {p.name for p in Path(summary["run_dir"]).iterdir()}


@pytest.mark.parametrize("argv, message", [
    (["--blocks", "9"], "--blocks: must be in [1, 5]"),
    (["--dataset", "mnist", "--blocks", "5"], "28-pixel mnist images, so use at most 4"),
    (["--head-pool", "5"], "after 3 blocks the feature maps are 4x4, so use at most 4"),
    (["--dropout", "1"], "--dropout: must be in [0, 1)"),
    (["--width", "0"], "--width: must be in [1, 512]"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--lr", "0"], "--lr: must be in (0, 1000000]"),
    # above float32's range: a torch traceback before
    (["--lr", "1e308"], "--lr: must be in (0, 1000000]"),
    (["--val-fraction", "0.9"], "--val-fraction: must be in [0, 0.5]"),
])
def test_impossible_settings_fail_in_parsing_with_one_line(tmp_path, argv, message, capsys):
    assert lab(tmp_path, *argv) == {"exit": 2}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_batch_larger_than_the_training_set_stops_before_the_run_folder(tmp_path, offline,
                                                                          capsys):
    """A setting that cannot work with the data is a ConfigError (exit 2), found before
    anything is written."""
    assert lab(tmp_path, "--smoke", "--batch-size", "5000") == {"exit": 2}
    err = capsys.readouterr().err
    assert "--batch-size 5000 is more than the 461 training images" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights(tmp_path, offline, monkeypatch,
                                                                 capsys, ctrl_c):
    # 14 steps per epoch; one-cycle stepped per batch, dropout, BN
    args = ["--smoke", "--epochs", "3"]
    straight = lab(tmp_path / "straight", *args)
    ctrl_c(20)  # in epoch 2
    assert lab(tmp_path / "cut", *args) == {"exit": 130}
    err = capsys.readouterr().err
    (checkpoint,) = (tmp_path / "cut" / "runs").glob("week03/part2/*/checkpoint.pt")
    assert err == (f"interrupted: stopped; the checkpoint of epoch 1 is {checkpoint} (continue "
                   f"with --resume {checkpoint}; the unfinished epoch is redone)\n")
    steps = ctrl_c(0)
    resumed = lab(tmp_path / "cut", "--resume", str(checkpoint))
    assert steps.steps == 28, "the resumed run trains epochs 2 and 3 only (14 steps each)"
    assert resumed["run_dir"] == str(checkpoint.parent) and resumed["epochs_done"] == 3
    weights = read_checkpoint(checkpoint)["model"]
    expected = read_checkpoint(Path(straight["run_dir"]) / "checkpoint.pt")["model"]
    for name, value in expected.items():
        assert torch.equal(value, weights[name]), name
    assert resumed["test_acc"] == straight["test_acc"]
    capsys.readouterr()
    again = lab(tmp_path / "cut", "--resume", str(checkpoint))
    assert again["test_acc"] == straight["test_acc"] and "nothing to do" in capsys.readouterr().out


def test_resume_refuses_another_scripts_or_another_models_checkpoint(tmp_path, offline, capsys):
    foreign = save_checkpoint(tmp_path / "foreign" / "checkpoint.pt", CNN(), script="week04/part2")
    assert lab(tmp_path, "--smoke", "--resume", str(foreign)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "written by week04/part2, not week03/part2" in err and err.count("\n") == 1, err
    other_model = save_checkpoint(tmp_path / "other" / "checkpoint.pt", nn.Linear(2, 2),
                                  script="week03/part2")
    assert lab(tmp_path, "--smoke", "--resume", str(other_model)) == {"exit": 1}
    err = capsys.readouterr().err
    assert "holds a Linear, not a CNN" in err and err.count("\n") == 1, err
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert lab(tmp_path, "--smoke", "--resume", str(tmp_path / "notes.txt")) == {"exit": 2}
    err = capsys.readouterr().err
    assert "not a PyTorch file" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------
# BatchNorm and Dropout, side by side
# ------------------------------------------------------------------------------------------
def test_a_diverged_variant_is_reported_and_its_nan_figures_declared(tmp_path, offline):
    # the plain network at lr 1000 blows up
    summary = lab(tmp_path, "--smoke", "--epochs", "1", "--batch-size", "32", "--lr", "0.5",
                  "--high-lr-factor", "2000", main=bn_dropout.main, cls=bn_dropout.Config)
    assert summary["diverged"] == ["plain, high lr"]
    assert math.isnan(summary["test_acc_plain_high_lr"])
    assert "test_acc_plain_high_lr" in summary["allowed_nan"]
    assert all(key.endswith("_plain_high_lr") for key in summary["allowed_nan"])
    assert math.isfinite(summary["test_acc_bn_high_lr"])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e308"], "--lr: must be in (0, 1000000]"),
    # lr x factor overflowed float32
    (["--high-lr-factor", "1e308"], "--high-lr-factor: must be in [0, 1000000]"),
])
def test_bn_dropout_learning_rates_torch_cannot_represent_fail_in_parsing(tmp_path, argv, message,
                                                                          capsys):
    assert lab(tmp_path, "--smoke", *argv, main=bn_dropout.main,
               cls=bn_dropout.Config) == {"exit": 2}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bn_dropout_has_no_resume_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(bn_dropout.Config, ["--help"])
    assert "--resume" not in capsys.readouterr().out
