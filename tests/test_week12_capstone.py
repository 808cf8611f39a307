"""Week 12: the capstone. The plan's math (Wilson interval vs scipy, FLOP formulas vs
torch.utils.flop_counter, the duplicate check, a baseline that validates on validation data),
the ViT's pieces (patch order, padding, positions, attention vs nn.MultiheadAttention), and the
whole chain on the synthetic twin: every artifact, the served model answering like the eager one,
settings refused before anything is written, exact resume after Ctrl-C."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from common.checkpoint import read_checkpoint, save_checkpoint
from common.config import parse_config
from common.data import load
from common.distributed import DistInfo
from common.loader import TensorLoader, normalizer
from common.parity import assert_close
from tests.conftest import run_lab
from week04_regularization.best_cnn import SpeedNet
from week12_capstone import build, deploy, part1, part2, report, vit


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    # 10 classes: chance is 0.1. Measured (benchmarks/smoke_margins.py): smoke 0.327 val / 0.325
    # test; with --baseline-lr 1e-9 (nothing learns) 0.083 / 0.081, 0.17 under the threshold.
    assert summary["baseline_test_acc"] > 0.25 and summary["baseline_val_acc"] > 0.25
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    for name in ("resnet", "vit", "baseline"):  # the formulas agree with FlopCounterMode exactly
        assert summary[f"flops_formula_{name}"] == summary[f"flops_counted_{name}"] > 0
        assert summary[f"measured_epoch_s_{name}"] > 0 and summary[f"params_{name}"] > 0
    assert summary["n_train"] + summary["n_val"] == 2048 and summary["shared_train_test"] == 0
    folder = Path(summary["run_dir"])
    assert (folder / "plan.md").exists() and (folder / "samples.png").exists()


def check_chain(summary: dict, rows: list[dict]) -> None:
    """Every artifact of the chain, and the exported and served model answering like eager."""
    folder = Path(summary["run_dir"])
    for name in ("checkpoint.pt", "report.md", "model_card.md", "curves.png", "confusion.png",
                 "worst_errors.png", "bundle/model.onnx", "bundle/model.pt2",
                 "bundle/metadata.json"):
        assert (folder / name).is_file(), f"{name} is missing"
    text = (folder / "report.md").read_text()
    assert f"{summary['test_acc']:.2%}" in text and "confusion.png" in text
    assert "worst_errors.png" in text
    card = (folder / "model_card.md").read_text()
    assert "Wilson" in card and "ONNX vs eager" in card
    assert summary["onnx_same_argmax"] and summary["onnx_max_prob_diff"] < 1e-4  # float32 vs eager
    assert summary["served_same_answer"] and summary["served_max_prob_diff"] < 1e-4
    assert summary["test_acc_low"] < summary["test_acc"] < summary["test_acc_high"]


def check_part2(summary: dict, rows: list[dict]) -> None:
    check_chain(summary, rows)
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == summary["epochs_done"] and losses[-1] < 0.9 * losses[0], losses
    # 10 classes: chance is 0.1. Measured (benchmarks/smoke_margins.py, Week 4's recipe): smoke
    # 0.853 test / 0.902 val; with --lr 1e-9 (a model that does not learn) 0.078 / 0.176, at
    # least 0.22 under these.
    assert summary["test_acc"] > 0.4 and summary["val_acc"] > 0.4


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2}


def lab(module, out: Path, *argv: str) -> dict:
    """A Week 12 script's command line run in this process: its summary, or {"exit": code}."""
    return run_lab(module.main, module.Config, ["--out", str(out), "--device", "cpu", *argv])


# ------------------------------------------------------------------------------------------
# Part 1: the success metric's interval, the FLOP formulas, the data audit, the baseline
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (7, 10), (1, 1), (5, 10), (8000, 10000),
                                  (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = report.wilson_interval(np.array(k), np.array(n))
    assert_close([float(low), float(high)], [expected.low, expected.high], f"Wilson {k}/{n}")


def test_wilson_interval_is_vectorized_stays_in_0_1_and_covers_n_0():
    low, high = report.wilson_interval(np.array([0, 3, 5, 0]), np.array([5, 3, 10, 0]))
    assert low[0] == 0 and high[1] == pytest.approx(1) and (low >= 0).all() and (high <= 1).all()
    assert (low[3], high[3]) == (0.0, 1.0)  # no trials: nothing is known
    wide = report.wilson_interval(np.array(500), np.array(1000))
    assert high[2] - low[2] > wide[1] - wide[0]  # more data, narrower


@pytest.mark.parametrize("size, patch, dim, depth, ratio",
                         [(32, 4, 48, 2, 2), (32, 5, 32, 1, 4), (28, 8, 16, 3, 1)])
def test_vit_flop_formula_matches_flop_counter(size, patch, dim, depth, ratio):
    model = vit.ViT(image_size=size, patch=patch, dim=dim, depth=depth, heads=2, mlp_ratio=ratio)
    counted = part1.counted_flops(model, torch.randn(2, 3, size, size))
    assert part1.vit_flops(size, 3, 10, patch, dim, depth, ratio) == counted


@pytest.mark.parametrize("widths", [(16, 32, 64), (8, 8, 24)])
def test_speednet_flop_formula_matches_flop_counter(widths):
    counted = part1.counted_flops(SpeedNet(widths), torch.randn(2, 3, 32, 32))
    assert part1.speednet_flops(32, 3, 10, widths) == counted


def test_duplicate_report_finds_copies_within_and_across_splits():
    data = load("cifar10", smoke=True)
    train, test = data.x_train[:50].clone(), data.x_test[:20].clone()
    assert set(part1.duplicate_report({"train": train, "test": test}).values()) == {0}
    train[3] = test[7]  # a test image leaked into training
    train[10] = train[11]  # an exact copy inside training
    test[0, 0, 0, 0] ^= 1  # one bit differs in the first byte: not an exact duplicate
    # Copies that differ only in the LAST row of the last channel: the hash must cover the whole
    # image (hashing a prefix would call these duplicates).
    train[20], train[21] = test[9], train[22]
    train[20, -1, -1, :] ^= 1
    train[21, -1, -1, -1] ^= 1
    report_ = part1.duplicate_report({"train": train, "test": test})
    assert report_ == {"dup_within_train": 1, "dup_within_test": 0, "shared_train_test": 1}


def test_audit_checks_the_validation_split_part2_trains_with():
    data = load("cifar10", smoke=True)
    cfg = parse_config(part2.Config, ["--smoke"])
    _, val, _ = build.make_loaders(cfg, data, DistInfo())
    facts, arrays = part1.audit(data, cfg.val_fraction, cfg.seed)
    assert torch.equal(arrays["y_val"], val.y)
    normalized = normalizer(data.mean, data.std)(arrays["x_val"])
    assert torch.equal(normalized, val.transform(val.x))  # the same images, not just the labels
    assert facts["n_train"] + facts["n_val"] == len(data.x_train)
    assert sum(facts["class_counts"]["val"]) == len(val.y)


def test_the_baseline_never_sees_the_test_split_before_its_final_evaluation(monkeypatch):
    """Every pass over a data split is recorded: training and validation alternate for each
    epoch, and the test split is read once, last (validating on it would choose on it)."""
    data = load("cifar10", smoke=True)
    cfg = part1.Config(smoke=True, baseline_epochs=2, batch_size=64)
    _, arrays = part1.audit(data, cfg.val_fraction, cfg.seed)
    names = {arrays["y_train"].data_ptr(): "train", arrays["y_val"].data_ptr(): "val",
             data.y_test.data_ptr(): "test"}
    passes, real_iter = [], TensorLoader.__iter__

    def recorded(loader):
        passes.append(names.get(loader.y.data_ptr(), "other"))
        return real_iter(loader)

    monkeypatch.setattr(TensorLoader, "__iter__", recorded)
    baseline = part1.train_baseline(data, arrays, cfg, torch.device("cpu"))
    assert passes == ["train", "val", "train", "val", "test"]
    assert [row["epoch"] for row in baseline["rows"]] == [1, 2]
    assert baseline["val_acc"] == baseline["rows"][-1]["val_acc"]


def test_part1_refuses_a_batch_larger_than_the_training_set_before_writing(tmp_path, capsys):
    assert lab(part1, tmp_path, "--smoke", "--batch-size", "100000000") == {"exit": 2}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than the 1843 training images" in err
    assert not tmp_path.joinpath("week12").exists()


def test_part1_plans_with_part2_and_part2_does_not_import_part1():
    """One direction only: the plan (part1) measures part2's models; part2 and the modules it
    uses never import part1 (an import circle breaks as soon as either is run first)."""
    import ast

    for name in ("part2", "vit", "report", "deploy"):
        tree = ast.parse((Path(part2.__file__).parent / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and "part1" in m}, name
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "week12_capstone"
                       and any(a.name == "part1" for a in n.names) for n in ast.walk(tree)), name


# ------------------------------------------------------------------------------------------
# The ViT: patches in reading order, padding, what positions are for, attention
# ------------------------------------------------------------------------------------------
def test_patch_embedding_cuts_patches_in_reading_order():
    torch.manual_seed(0)
    embed = vit.PatchEmbedding(3, patch=4, dim=8)
    x = torch.randn(2, 3, 32, 32)
    tokens = embed(x)
    assert tokens.shape == (2, 64, 8)
    for row, col in [(0, 0), (0, 1), (1, 0), (5, 7)]:  # token 8r + c: the patch at row r, col c
        patch = x[:, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4].flatten(1)
        expected = patch @ embed.proj.weight.flatten(1).T + embed.proj.bias
        torch.testing.assert_close(tokens[:, 8 * row + col], expected)


def test_patch_embedding_pads_a_side_that_is_not_a_multiple_of_the_patch():
    torch.manual_seed(0)
    embed = vit.PatchEmbedding(3, patch=4, dim=8)
    x = torch.randn(1, 3, 30, 29)
    tokens = embed(x)
    assert tokens.shape == (1, 8 * 8, 8)  # ceil(30/4) x ceil(29/4)
    padded = torch.zeros(1, 3, 32, 32)
    padded[:, :, :30, :29] = x
    torch.testing.assert_close(tokens, embed(padded))  # zero padding on the right and bottom only
    small = vit.ViT(in_channels=1, image_size=28, patch=8, dim=8, depth=1, heads=2)
    assert vit.num_patches(28, 8) == 16 and small(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def shuffle_patches(x: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    """The same image with its patch x patch squares moved to other places."""
    n, c, h, w = x.shape
    side = h // patch
    blocks = x.unfold(2, patch, patch).unfold(3, patch, patch).reshape(n, c, side * side, patch,
                                                                       patch)
    blocks = blocks[:, :, order].reshape(n, c, side, side, patch, patch)
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


@torch.no_grad()
def test_without_positions_a_vit_sees_a_bag_of_patches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    shuffled = shuffle_patches(x, 4, torch.randperm(16))
    assert not torch.allclose(shuffled, x)
    sizes = {"image_size": 16, "patch": 4, "dim": 16, "depth": 2, "heads": 2}
    bag = vit.ViT(**sizes, positional=False).double().eval()
    assert (bag(shuffled) - bag(x)).abs().max() < 1e-12  # permutation-invariant (float64 rounding)
    placed = vit.ViT(**sizes).double().eval()
    placed.load_state_dict(bag.state_dict(), strict=False)  # the same weights, plus positions
    assert (placed(shuffled) - placed(x)).abs().max() > 1e-6  # where a patch sits now matters


def test_attention_matches_torch_multihead_attention_in_float64():
    torch.manual_seed(0)
    mine = vit.Attention(dim=12, heads=3).double()
    reference = nn.MultiheadAttention(12, 3, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(mine.qkv.weight)
        reference.in_proj_bias.copy_(mine.qkv.bias)
        reference.out_proj.weight.copy_(mine.proj.weight)
        reference.out_proj.bias.copy_(mine.proj.bias)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    x[0, 1] = 0.0  # an all-zero token, and two equal tokens (ties in the scores)
    x[1, 3] = x[1, 2]
    expected = reference(x, x, x, need_weights=False)[0]
    assert_close(mine(x).detach().numpy(), expected.detach().numpy(), "multi-head attention")


# ------------------------------------------------------------------------------------------
# Part 2: the chain, settings, resume, ranks
# ------------------------------------------------------------------------------------------
TINY = ("--smoke", "--width", "4", "--epochs", "2")  # resnet on the twin, well under a second/epoch


def test_the_whole_chain_writes_every_artifact_and_the_served_model_answers_like_eager(tmp_path):
    summary = lab(part2, tmp_path, *TINY, "--worst", "4")
    check_chain(summary, [])
    metadata = json.loads((Path(summary["run_dir"]) / "bundle" / "metadata.json").read_text())
    assert metadata["extra"]["test_acc"] == summary["test_acc"]  # the served model: one view
    assert metadata["classes"][0] == "airplane"
    assert summary["test_acc_tta_low"] < summary["test_acc_tta"] < summary["test_acc_tta_high"]
    report_text = (Path(summary["run_dir"]) / "report.md").read_text()
    assert f"flip test-time augmentation (each image and its mirror, as Week 4 does): " \
           f"{summary['test_acc_tta']:.2%}" in report_text


def test_flip_tta_averages_each_image_with_its_left_right_mirror():
    class LeftMinusRight(nn.Module):  # class 1 when the left half is brighter: a mirror flips it
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = self.scale * (x[..., :16].mean((1, 2, 3)) - x[..., 16:].mean((1, 2, 3)))
            return torch.stack([-d, d], dim=1)

    x = torch.rand(5, 3, 32, 32)
    model = LeftMinusRight()
    assert model(x).abs().min() > 0
    assert torch.allclose(report.FlipAverage(model)(x), torch.zeros(5, 2), atol=1e-6)
    up_down = torch.rand(5, 3, 32, 32)
    up_down[..., :16] += 1  # left half brighter; an up-down flip would keep it so
    assert report.FlipAverage(model)(up_down).abs().max() < 1e-5


def test_vit_learns_the_twin(tmp_path):
    """Loss falls and training accuracy beats chance. (On 461 twin images a ViT generalizes far
    worse than the CNN: no built-in translation invariance, the capstone's point; test accuracy
    is not asserted.)"""
    summary = lab(part2, tmp_path, "--smoke", "--model", "vit", "--no-deploy", "--epochs", "5",
                  "--lr", "3e-3", "--no-tta")
    assert "test_acc_tta" not in summary
    rows = list(csv.DictReader(next(tmp_path.glob("week12/part2/*/metrics.csv")).open()))
    assert float(rows[-1]["train_loss"]) < 0.9 * float(rows[0]["train_loss"])
    assert float(rows[-1]["train_acc"]) > 0.2  # chance is 0.1
    expected = vit.ViT(patch=4, dim=48, depth=2, heads=2, mlp_ratio=2)  # the smoke presets
    assert summary["params"] == sum(p.numel() for p in expected.parameters())


def test_settings_are_checked_before_a_run_folder_exists(tmp_path, capsys):
    assert lab(part2, tmp_path, "--smoke", "--dim", "48", "--heads", "5") == {"exit": 2}
    assert "must divide --dim 48" in capsys.readouterr().err
    assert lab(part2, tmp_path, "--data-dir", str(tmp_path / "nowhere")) == {"exit": 1}
    assert "cifar10" in capsys.readouterr().err
    assert not (tmp_path / "week12").exists()


@pytest.mark.parametrize("deploy_flag", ["--deploy", "--no-deploy"])
def test_an_absurd_batch_size_is_refused_with_exit_2_before_anything_is_written(
        tmp_path, capsys, deploy_flag):
    for batch in ("1000", "100000000"):
        assert lab(part2, tmp_path, "--smoke", "--batch-size", batch, deploy_flag) == {"exit": 2}
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "more than the 461 training images" in err, err
    assert list(tmp_path.iterdir()) == []  # no run folder, no index, no config.yaml


def test_missing_deploy_extra_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(deploy.importlib.util, "find_spec", lambda name: None)
    assert lab(part2, tmp_path, "--smoke") == {"exit": 1}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-deploy" in err and not (tmp_path / "week12").exists()


def test_resume_after_ctrl_c_ends_exactly_like_an_uninterrupted_run(tmp_path, ctrl_c):
    argv = ("--smoke", "--width", "4", "--epochs", "2", "--no-deploy", "--patience", "1",
            "--lr", "0.02")
    whole = lab(part2, tmp_path / "whole", *argv)
    steps_per_epoch = (512 - round(0.1 * 512)) // 32  # 14
    ctrl_c(steps_per_epoch + 5)  # in epoch 2
    assert lab(part2, tmp_path / "cut", *argv) == {"exit": 130}
    (checkpoint,) = (tmp_path / "cut").glob("week12/part2/*/checkpoint.pt")
    assert read_checkpoint(checkpoint)["epoch"] == 1
    assert not (checkpoint.parent / "summary.json").exists()
    hook = ctrl_c(0)
    resumed = lab(part2, tmp_path / "cut", "--resume", str(checkpoint))
    assert hook.steps == steps_per_epoch  # epoch 2 alone was trained again
    for key in ("test_acc", "val_acc", "kept_epoch", "epochs_done", "stopped_early"):
        assert resumed[key] == whole[key], key
    expected, got = (read_checkpoint(next(p.glob("week12/part2/*/checkpoint.pt")))["model"]
                     for p in (tmp_path / "whole", tmp_path / "cut"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bit for bit
    rows = list(csv.DictReader((checkpoint.parent / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # and the run itself learned: loss fell
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (checkpoint.parent / "report.md").exists()  # the resumed run finished in its folder


def test_validation_figures_are_averaged_over_the_ranks_before_anything_decides(monkeypatch):
    monkeypatch.setattr(part2, "evaluate", lambda model, val, loss_fn: {"loss": 0.25, "acc": 0.5})
    assert part2.validate(None, None, None, DistInfo()) == {"val_loss": 0.25, "val_acc": 0.5}
    sent = []

    def fake_all_reduce_mean(value, info):  # as if the other rank had measured 1.0 for both
        sent.append(value.item())
        return (value + 1.0) / 2

    monkeypatch.setattr(part2, "all_reduce_mean", fake_all_reduce_mean)
    figures = part2.validate(None, None, None, DistInfo(world_size=2))
    assert sent == [0.25, 0.5]  # both validation figures go through the all-reduce
    assert figures == {"val_loss": 0.625, "val_acc": 0.75}  # and their means are what decides


def test_under_torchrun_a_rank_other_than_0_prints_and_writes_nothing(tmp_path, capsys,
                                                                      monkeypatch):
    rank1 = DistInfo(rank=1, world_size=2)  # a pretend second rank: no process group needed
    monkeypatch.setattr(part2, "setup", lambda device: rank1)
    monkeypatch.setattr(part2, "wrap", lambda net, info: net)
    monkeypatch.setattr(part2, "teardown", lambda info: None)
    monkeypatch.setattr(part2, "all_reduce_mean", lambda value, info: value)
    trained = []
    monkeypatch.setattr(part2, "check_finite", lambda loss, epoch: trained.append(epoch))
    assert lab(part2, tmp_path, "--smoke", "--width", "4", "--epochs", "2", "--no-deploy") == \
        {"rank": 1}
    out = capsys.readouterr().out.splitlines()
    assert trained == [1, 2]  # it trained, and printed nothing but launch's preset note
    assert [line for line in out if not line.startswith("--smoke preset")] == [], out
    assert list(tmp_path.iterdir()) == []


def test_damaged_or_foreign_checkpoint_is_one_line(tmp_path, capsys):
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(b"not a checkpoint")
    assert lab(part2, tmp_path / "out", "--resume", str(damaged)) == {"exit": 2}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt or not a PyTorch file" in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_saved_under_torchrun_is_refused_by_a_single_process_in_one_line(tmp_path,
                                                                                      capsys):
    class DistributedDataParallel(nn.Module):  # what a checkpoint written under torchrun holds
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(1, 1)

    config = part2.Config(smoke=True, width=4, deploy=False, out=str(tmp_path)).to_dict()
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", DistributedDataParallel(), epoch=1,
                                 config=config, script="week12/part2")
    assert lab(part2, tmp_path, "--resume", str(checkpoint), "--epochs", "3") == {"exit": 1}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "saved under torchrun" in err
    assert "torchrun --nproc_per_node" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # nothing beside it
