"""Week 12 benchmark: the capstone's headline figure on real CIFAR-10 (the JPEG copy) at a stated
training budget. In ONE run: the part1 baseline (softmax regression on pixels), then the residual
CNN and the ViT, each trained by the whole week12_capstone/part2.py pipeline (early stopping,
evaluation, ONNX export checked against eager, served by the Week 10 service) for as many whole
epochs as a timed probe of part2's own training step says fit in the budget (the
one-cycle schedule is sized to them).

    python benchmarks/run.py cifar10_capstone --data-dir ../shared/data --set threads=2
                                                    # CPU: 600 s per model, Week 4's recipe budget
    python benchmarks/run.py cifar10_capstone --data-dir ../shared/data --device cuda  # GPU: 60 s
    python benchmarks/run.py cifar10_vit_sweep --data-dir ../shared/data --set threads=2
                                                    # ViT shapes, 300 s each, chosen on validation

part2's training loop autocasts to bf16 on CUDA and on CPUs with native bf16 (``--set
bf16=false``: float32), and the CNN and its batches are channels_last. ``value`` is the test
accuracy of the model that validation prefers; both models' figures, their 95% Wilson intervals
(one view, and with flip TTA), validation accuracy after each epoch, and the baseline are in the
result.

Options (``--set key=value``): ``budget_s`` (training seconds per model), ``models`` (e.g.
``vit``), ``threads`` (torch CPU threads, default 1: on a shared CPU one thread was faster),
and any week12_capstone.part2 Config field (e.g. ``train_subset=20000``, ``dim=96``).
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.run import Benchmark, config_options
from common.data import load
from common.device import pick_device, prepare_model, seed_everything
from common.distributed import DistInfo
from week04_regularization.part2 import make_decay_optimizer
from week12_capstone import part1, part2
from week12_capstone.build import make_loaders, make_model


def epochs_for_budget(cfg: part2.Config, budget_s: float, device: torch.device,
                      n_images: int) -> tuple[int, float]:
    """Whole epochs of ``cfg``'s model that fit in ``budget_s``, timed with part2's own pieces on
    twin images of the real shape: its loaders (augmentation, normalization, layout), its
    ``train_one_epoch`` (after a warm-up pass) and its validation, scaled to the training and
    validation images part2 splits from ``n_images`` (or from ``cfg.train_subset`` of them)."""
    n_used = cfg.train_subset or n_images
    n_val = round(n_used * cfg.val_fraction)
    n_train, steps = n_used - n_val, 8
    data = load("cifar10", synthetic=True,
                n_synthetic=math.ceil(steps * cfg.batch_size / (1 - cfg.val_fraction)) + 1)
    train, val, _ = make_loaders(cfg, data, DistInfo(device=device))
    model = prepare_model(make_model(cfg, data), device, channels_last=cfg.model == "resnet")
    optimizer = make_decay_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay,
                                     no_decay_lr_scale=cfg.bias_lr_scale)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    times = []
    for _ in range(2):  # the first pass warms up (oneDNN picks its kernels)
        start = time.perf_counter()  # no scheduler: a constant LR costs the same time
        part2.train_one_epoch(model, train, optimizer, None, False, loss_fn, cfg.bf16)
        times.append((time.perf_counter() - start) / len(train))
    start = time.perf_counter()
    part2.validate(model, val, loss_fn, DistInfo(device=device))
    val_s_per_image = (time.perf_counter() - start) / len(val.x)
    epoch_s = times[-1] * (n_train // cfg.batch_size) + val_s_per_image * n_val
    return max(1, min(200, math.floor(budget_s / epoch_s))), epoch_s


def capstone(data_dir: str, device: str, options: dict) -> dict:
    fields, extra = config_options(options, part2.Config, default_threads=1,
                                   extra_keys=("budget_s", "models"))
    dev = pick_device(device)
    budget_s = float(extra.get("budget_s", 60.0 if dev.type == "cuda" else 600.0))
    models = str(extra.get("models", "resnet,vit")).split(",")
    result = {"data": "CIFAR-10, JPEG copy (lossy: compare only with runs on the same copy)",
              "budget_s": budget_s, "torch_threads": torch.get_num_threads(),
              "load_average_start": os.getloadavg()[0]}

    # The baseline from the plan (part1), on the same validation split and test set.
    data = load("cifar10", data_dir)
    seed_everything(0)
    plan = part1.Config(data_dir=data_dir, device=device)
    _, arrays = part1.audit(data, plan.val_fraction, plan.seed)
    baseline = part1.train_baseline(data, arrays, plan, dev)
    result.update({f"baseline_{k}": v for k, v in baseline.items() if k != "rows"})

    val_acc = {}
    keep = ("test_acc", "test_acc_low", "test_acc_high", "test_acc_tta", "test_acc_tta_low",
            "test_acc_tta_high", "val_acc", "params", "epochs_done",
            "kept_epoch", "train_time_s", "onnx_max_prob_diff", "served_same_answer")
    with tempfile.TemporaryDirectory() as out:
        for name in models:
            settings = {**part2.Config.PRESETS["model"].get(name, {}), **fields, "model": name}
            where = {"data_dir": data_dir, "device": device, "out": out}
            probe = part2.Config(**settings, **where)
            epochs, epoch_s = epochs_for_budget(probe, budget_s, dev, len(data.y_train))
            summary = part2.main(part2.Config(**{**settings, "epochs": epochs}, **where))
            val_acc[name] = summary["val_acc"]
            result[f"{name}_val_acc_by_epoch"] = val_by_epoch(summary["run_dir"])
            result.update({f"{name}_{k}": summary[k] for k in keep if k in summary})
            result.update({f"{name}_epochs_planned": epochs,
                           f"{name}_probe_epoch_s": round(epoch_s, 1),
                           f"{name}_settings": settings})
    chosen = max(val_acc, key=val_acc.get)  # chosen on validation, never on test
    result["load_average_end"] = os.getloadavg()[0]
    return {"metric": "test_acc", "value": result[f"{chosen}_test_acc"],
            "chosen_on_validation": chosen,
            "over_baseline": result[f"{chosen}_test_acc"] - baseline["test_acc"], **result}


def val_by_epoch(run_dir: str) -> list[float]:
    """The validation accuracy after each epoch of a part2 run (its metrics.csv)."""
    with open(Path(run_dir) / "metrics.csv") as f:
        return [round(float(row["val_acc"]), 4) for row in csv.DictReader(f)]


CIFAR10_TRAINING_IMAGES = 50_000

# The ViT shapes tried for the CPU budget: part2's default, narrower, wider, bigger patches
# (16 tokens, so a deeper and wider model costs less), and without the random shifts.
VIT_SHAPES = {
    "p4 d128 L4 (part2)": {},
    "p4 d96 L4": {"dim": 96},
    "p4 d192 L4": {"dim": 192, "heads": 6},
    "p8 d192 L6": {"patch": 8, "dim": 192, "depth": 6, "heads": 6},
    "p4 d128 L4, no shifts": {"translate": 0},
}


def vit_sweep(data_dir: str, device: str, options: dict) -> dict:
    """Each ViT shape of VIT_SHAPES trained by part2 for the epochs that fit ``budget_s``; the
    shape is chosen on validation accuracy (the test figures stay unread)."""
    fields, extra = config_options(options, part2.Config, default_threads=1,
                                   extra_keys=("budget_s",))
    dev = pick_device(device)
    budget_s = float(extra.get("budget_s", 60.0 if dev.type == "cuda" else 300.0))
    result = {"data": "CIFAR-10, JPEG copy", "budget_s": budget_s,
              "torch_threads": torch.get_num_threads(), "shapes": {}}
    with tempfile.TemporaryDirectory() as out:
        for label, shape in VIT_SHAPES.items():
            settings = {**part2.Config.PRESETS["model"]["vit"], **shape, **fields, "model": "vit",
                        "deploy": False, "tta": False, "worst": 0}
            where = {"data_dir": data_dir, "device": device, "out": out}
            probe = part2.Config(**settings, **where)
            epochs, epoch_s = epochs_for_budget(probe, budget_s, dev, CIFAR10_TRAINING_IMAGES)
            summary = part2.main(part2.Config(**{**settings, "epochs": epochs}, **where))
            result["shapes"][label] = {
                "settings": shape, "params": summary["params"], "epochs": epochs,
                "probe_epoch_s": round(epoch_s, 1), "train_time_s": summary["train_time_s"],
                "val_acc": summary["val_acc"], "val_acc_by_epoch": val_by_epoch(summary["run_dir"])}
            print(f"{label}: val_acc {summary['val_acc']:.4f} after {epochs} epochs")
    chosen = max(result["shapes"], key=lambda k: result["shapes"][k]["val_acc"])
    return {"metric": "val_acc", "value": result["shapes"][chosen]["val_acc"], "chosen": chosen,
            **result}


ENTRIES = {
    "cifar10_capstone": Benchmark(
        capstone, "Week 12 capstone on CIFAR-10 (JPEG copy): residual CNN vs ViT through the "
                  "whole pipeline at a training budget per model (CPU 600 s, GPU 60 s), with the "
                  "part1 baseline in the same run"),
    "cifar10_vit_sweep": Benchmark(
        vit_sweep, "Week 12: ViT shapes (patch, width, depth, shifts) at a CPU training budget "
                   "each (300 s), chosen on validation accuracy"),
}
