"""Week 12, Part 1: planning the capstone as code: scope, data audit, baseline, compute budget.

Before training anything big, a plan answers four questions, each with a number:

    scope       what is built and what counts as success (the metric, and its uncertainty)
    data        how many images, how balanced, what they look like, and whether any image is
                in two splits (a duplicate across train/val/test inflates every score)
    baseline    the simplest model that works (softmax regression on pixels): the score to beat
    compute     parameters and FLOPs per image of each candidate, the time per epoch that
                implies on this CPU and on one GPU, checked against a short measured run

All of it goes into plan.md (with a sample grid) in the run folder; summary.json has the numbers.
The math written from scratch (the FLOP formulas here, the Wilson interval in report.py, which
Part 2's report uses too) is checked in the tests against torch.utils.flop_counter and scipy.

Run: python week12_capstone/part1.py [--smoke] [--help]
     python week12_capstone/part1.py --data-dir ../shared/data --budget-minutes 5
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.config import BaseConfig, Range
from common.data import ImageData, load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader, normalizer, split
from common.plots import plot_images
from common.runner import launch
from common.runs import Run
from common.train import evaluate, fit
from week12_capstone import part2
from week12_capstone.build import make_model
from week12_capstone.report import wilson_interval


@dataclass
class Config(BaseConfig):
    """Week 12, Part 1: the capstone plan: scope, data audit, baseline, compute budget."""

    baseline_epochs: Annotated[int, Range(1)] = 5  # epochs of the softmax-regression baseline
    baseline_lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # AdamW lr of the baseline
    batch_size: Annotated[int, Range(1)] = 256  # images per step: baseline and timing probe
    probe_steps: Annotated[int, Range(1, 1000)] = 4  # timed training steps per model (+1 warm-up)
    budget_minutes: Annotated[float, Range(0, 10_000, lo_open=True)] = 5.0  # training per model
    gpu_tflops: Annotated[float, Range(0, 10_000, lo_open=True)] = 100.0  # assumed for one GPU
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # as in part2: held out

    SMOKE: ClassVar[dict] = {"baseline_epochs": 3, "batch_size": 32, "probe_steps": 1}


# =========================================================================================
#                                      Data audit
# =========================================================================================
def image_hashes(images: torch.Tensor) -> list[str]:
    """A SHA-1 of each image's bytes: equal hashes = byte-identical images (exact duplicates)."""
    flat = images.contiguous().view(len(images), -1).numpy()
    return [hashlib.sha1(row.tobytes()).hexdigest() for row in flat]


def duplicate_report(splits: dict[str, torch.Tensor]) -> dict[str, int]:
    """Exact duplicates inside each split (images beyond the first copy) and images shared by two
    splits (leakage: a test image seen in training measures memory, not generalization)."""
    hashes = {name: image_hashes(x) for name, x in splits.items()}
    report = {f"dup_within_{name}": len(h) - len(set(h)) for name, h in hashes.items()}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            report[f"shared_{a}_{b}"] = len(set(hashes[a]) & set(hashes[b]))
    return report


def audit(data: ImageData, val_fraction: float, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Sizes, class counts and duplicates of train / validation (held out as part2 holds it out,
    with the same function and seed) / test."""
    x_train, y_train, x_val, y_val = split(data.x_train, data.y_train, val_fraction, seed)
    labels = {"train": y_train, "val": y_val, "test": data.y_test}
    counts = {name: torch.bincount(y, minlength=data.num_classes).tolist()
              for name, y in labels.items()}
    facts = {"n_train": len(y_train), "n_val": len(y_val), "n_test": len(data.y_test),
             "image_shape": list(data.x_train.shape[1:]), "class_counts": counts,
             "imbalance_train": max(counts["train"]) / max(min(counts["train"]), 1),
             **duplicate_report({"train": x_train, "val": x_val, "test": data.x_test})}
    return facts, {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}


def sample_grid(data: ImageData, path, per_class: int = 8) -> None:
    """``per_class`` random training images of every class, one row per class."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(data.num_classes):
        members = torch.nonzero(data.y_train == k).squeeze(1)
        rows.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    picks = torch.cat(rows)
    titles = [data.classes[int(data.y_train[i])] for i in picks]
    plot_images(data.x_train[picks].numpy(), path, titles=titles, ncols=per_class,
                title="training images, one row per class")


# =========================================================================================
#                                       Baseline
# =========================================================================================
def baseline_model(data: ImageData) -> nn.Module:
    """Softmax regression on the normalized pixels: one linear layer, 10 x 3072 weights. It
    cannot see shapes, only colour statistics at fixed places: the floor a real model must clear."""
    c, h, w = data.x_train.shape[1:]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, data.num_classes))


def train_baseline(data: ImageData, arrays: dict, cfg: Config, device: torch.device) -> dict:
    """Train the baseline with common.fit (the plain loop of every Part 2; AdamW, 5 epochs),
    validating on the held-out validation split; then the test accuracy, once, with its Wilson
    interval (the comparison number for the capstone's benchmark)."""
    seed_everything(cfg.seed)
    normalize = normalizer(data.mean, data.std)
    train = TensorLoader(arrays["x_train"], arrays["y_train"], cfg.batch_size, shuffle=True,
                         transform=normalize, device=device, seed=cfg.seed)
    val = TensorLoader(arrays["x_val"], arrays["y_val"], 1024, transform=normalize, device=device)
    model = baseline_model(data).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.baseline_lr, weight_decay=1e-4)
    start = time.perf_counter()
    rows = fit(model, optimizer, train, val, cfg.baseline_epochs)  # validation: never the test set
    seconds = time.perf_counter() - start
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalize, device=device)
    test_acc = evaluate(model, test)["acc"]  # the test set, touched once, at the end
    n_test = len(data.y_test)
    low, high = wilson_interval(np.array(round(test_acc * n_test)), np.array(n_test))
    return {"val_acc": rows[-1]["val_acc"], "test_acc": test_acc, "test_acc_low": float(low),
            "test_acc_high": float(high), "train_s": round(seconds, 2), "rows": rows}


# =========================================================================================
#                                    Compute budget
# =========================================================================================
def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """y = x W^T for ``tokens`` rows: one multiply and one add per weight per row (bias ignored,
    as FlopCounterMode ignores it): 2 * tokens * d_in * d_out."""
    return 2 * tokens * d_in * d_out


def conv_flops(h_out: int, w_out: int, c_in: int, c_out: int, kernel: int) -> int:
    """A convolution: every output pixel of every output channel is a dot product of length
    c_in * k^2, i.e. 2 * h_out * w_out * c_out * c_in * k^2."""
    return 2 * h_out * w_out * c_out * c_in * kernel**2


def vit_flops(image_size: int, channels: int, classes: int, patch: int, dim: int, depth: int,
              mlp_ratio: int) -> int:
    """Forward FLOPs of vit.py's ViT per image (matrix products only, as FlopCounterMode counts):

        patches    conv with kernel = stride = patch: L patches x (C p^2 -> dim)
        per block  qkv (T x dim -> 3 dim), scores Q K^T (T x T x dim), weights x V (T x T x dim),
                   output projection (dim -> dim), MLP (dim -> r dim -> dim); T = L + 1 tokens
        head       dim -> classes, on the class token only
    LayerNorm, softmax, GELU and additions are O(T dim): a few percent, left out."""
    side = math.ceil(image_size / patch)
    tokens = side * side + 1
    embed = conv_flops(side, side, channels, dim, patch)
    attention = (linear_flops(tokens, dim, 3 * dim) + 2 * (2 * tokens * tokens * dim)
                 + linear_flops(tokens, dim, dim))
    mlp = linear_flops(tokens, dim, mlp_ratio * dim) + linear_flops(tokens, mlp_ratio * dim, dim)
    return embed + depth * (attention + mlp) + linear_flops(1, dim, classes)


def speednet_flops(image_size: int, channels: int, classes: int, widths: tuple[int, ...]) -> int:
    """Forward FLOPs of Week 4's SpeedNet per image: a 2x2 whitening stem (no padding: the map
    shrinks by one), then per group a 3x3 conv at the group's input size, a 2x2 max-pool (floor),
    a 3x3 conv at the pooled size; a linear head on the global max."""
    size, c_in = image_size - 1, 2 * channels * 4
    total = conv_flops(size, size, channels, c_in, 2)
    for width in widths:
        total += conv_flops(size, size, c_in, width, 3)
        size //= 2
        total += conv_flops(size, size, width, width, 3)
        c_in = width
    return total + linear_flops(1, c_in, classes)


def counted_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs per image as torch.utils.flop_counter counts them (matmuls and convs)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() // len(example)


def matmul_flops_per_s(device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """What this device sustains on a large float32 matrix product: the most FLOP/s a training
    step can hope for here (real steps reach a fraction: small layers, memory traffic, Python)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done * 2 * size**3 / (time.perf_counter() - start)


def measured_step_s(model: nn.Module, batch_size: int, shape: tuple[int, ...], steps: int,
                    device: torch.device) -> float:
    """Median seconds of ``steps`` training steps (forward, backward, AdamW) on random images,
    after one warm-up step."""
    from common.device import autocast

    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast(device):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def candidates(data: ImageData, smoke: bool) -> dict[str, tuple[nn.Module, int]]:
    """The two capstone models at part2's settings (its smoke sizes under --smoke), each with
    its FLOP count from the formulas above."""
    channels, size = data.x_train.shape[1], data.x_train.shape[2]
    out = {}
    for name in ("resnet", "vit"):
        settings = {"model": name, **part2.Config.PRESETS["model"].get(name, {}),
                    **(part2.Config.SMOKE if smoke else {})}
        p2 = part2.Config(**settings)
        if name == "vit":
            formula = vit_flops(size, channels, data.num_classes, p2.patch, p2.dim, p2.depth,
                                p2.mlp_ratio)
        else:
            widths = (p2.width, 2 * p2.width, 4 * p2.width)
            formula = speednet_flops(size, channels, data.num_classes, widths)
        out[name] = (make_model(p2, data), formula)
    pixels = int(np.prod(data.x_train.shape[1:]))
    out["baseline"] = (baseline_model(data), linear_flops(1, pixels, data.num_classes))
    return out


def compute_budget(data: ImageData, n_train: int, cfg: Config,
                   device: torch.device) -> dict[str, dict]:
    """Per candidate: parameters, forward FLOPs per image (formula and FlopCounterMode), the
    expected epoch time here (3x forward FLOPs per image for forward + backward, at the measured
    matmul rate: a lower bound) and on one GPU (at the assumed ``gpu_tflops``), the epoch time
    a short measured run implies, and how many epochs fit the budget."""
    shape = tuple(data.x_train.shape[1:])
    rate = matmul_flops_per_s(device)
    budget = {}
    for name, (model, formula) in candidates(data, cfg.smoke).items():
        flops = counted_flops(model, torch.randn(2, *shape))
        epoch_flops = 3 * flops * n_train
        step_s = measured_step_s(model, cfg.batch_size, shape, cfg.probe_steps, device)
        measured_epoch_s = step_s * math.ceil(n_train / cfg.batch_size)
        budget[name] = {"params": sum(p.numel() for p in model.parameters()),
                        "flops_formula": formula, "flops_counted": flops,
                        "expected_epoch_s_here": epoch_flops / rate,
                        "expected_epoch_s_gpu": epoch_flops / (cfg.gpu_tflops * 1e12),
                        "measured_epoch_s": measured_epoch_s,
                        "utilization": epoch_flops / rate / measured_epoch_s,
                        "epochs_in_budget": cfg.budget_minutes * 60 / measured_epoch_s}
    budget["_device"] = {"matmul_gflops": rate / 1e9, "device": str(device),
                         "load_average": os.getloadavg()[0], "threads": torch.get_num_threads()}
    return budget


# =========================================================================================
#                                     The plan report
# =========================================================================================
def write_plan(path, cfg: Config, data: ImageData, facts: dict, baseline: dict,
               budget: dict) -> None:
    device, counts, b = budget["_device"], facts["class_counts"], baseline
    duplicates = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items()
                           if k.startswith(("dup_", "shared_")))
    lines = [
        "# Capstone plan: CIFAR-10, a small Vision Transformer vs a residual CNN", "",
        "## Scope and success metric",
        "- Build: one command (`week12_capstone/part2.py`) that trains either model, evaluates "
        "it, exports it to ONNX and serves it with the Week 10 service; `--smoke` runs the whole "
        "chain offline in seconds.",
        "- Question: at a small, fixed CPU budget, does a ViT (no convolutional prior) get near a "
        "ResNet-style CNN (Week 4's recipe)? Both must clearly beat the baseline below.",
        "- Metric: test accuracy with a 95% Wilson interval, the test set touched once per model; "
        "model selection (early stopping, schedules) on a validation split held out of the "
        "training set.",
        f"- Budget: {cfg.budget_minutes:g} min of training per model on this machine "
        f"({device['device']}).", "",
        f"## Data audit ({data.name})",
        f"- Sizes: train {facts['n_train']}, validation {facts['n_val']}, test "
        f"{facts['n_test']}; images {' x '.join(map(str, facts['image_shape']))} uint8.",
        f"- Largest / smallest training class: {facts['imbalance_train']:.2f} (1.00 = balanced).",
        "", "| class | train | val | test |", "|---|---:|---:|---:|",
        *[f"| {c} | {counts['train'][i]} | {counts['val'][i]} | {counts['test'][i]} |"
          for i, c in enumerate(data.classes)], "",
        f"- Exact duplicates (SHA-1 of the pixels): {duplicates}",
        "", "![samples](samples.png)", "",
        "## Baseline: softmax regression on pixels",
        f"- {cfg.baseline_epochs} epochs, {b['train_s']:.1f} s: validation accuracy "
        f"{b['val_acc']:.2%}, test accuracy {b['test_acc']:.2%} (95% interval "
        f"{b['test_acc_low']:.2%} to {b['test_acc_high']:.2%}). "
        f"Chance is {1 / data.num_classes:.0%}.", "",
        "## Compute budget",
        f"- This device sustains {device['matmul_gflops']:.1f} GFLOP/s on a 1024 x 1024 float32 "
        f"matmul ({device['threads']} torch thread(s), load average "
        f"{device['load_average']:.1f} while measuring: on a shared machine every time here moves "
        f"with the load). One GPU is assumed at {cfg.gpu_tflops:g} TFLOP/s (an assumption, not "
        "measured here; models this small are limited on a GPU by kernel launches and memory "
        "traffic more than by FLOPs, so read the GPU column as a lower bound).",
        "- Expected epoch = 3 x forward FLOPs x training images / rate (a lower bound); measured "
        f"= the median of {cfg.probe_steps} training steps at batch {cfg.batch_size} x steps per "
        "epoch.", "",
        "| model | params | MFLOPs/image (formula / counted) | expected epoch here | "
        "measured epoch | utilization | expected epoch, 1 GPU | epochs in budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in budget.items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {m['params']:,} | {m['flops_formula'] / 1e6:.2f} / "
                     f"{m['flops_counted'] / 1e6:.2f} | {m['expected_epoch_s_here']:.1f} s | "
                     f"{m['measured_epoch_s']:.1f} s | {m['utilization']:.0%} | "
                     f"{m['expected_epoch_s_gpu']:.3f} s | {m['epochs_in_budget']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    # Under --smoke, a 2,048-image twin: on 512 the baseline overfits to ~0.3 validation accuracy,
    # too close to what a model that learns nothing gets for a test to tell them apart.
    data = load("cifar10", cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed, n_synthetic=2048)
    facts, arrays = audit(data, cfg.val_fraction, cfg.seed)
    if cfg.batch_size > facts["n_train"]:  # refused before Run.start writes anything
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {facts['n_train']} "
                          "training images left after validation")
    run = Run.start(cfg, __file__, device)
    sample_grid(data, run.path("samples.png"))
    baseline = train_baseline(data, arrays, cfg, device)
    for row in baseline.pop("rows"):
        run.log(**row)
    budget = compute_budget(data, facts["n_train"], cfg, device)
    write_plan(run.path("plan.md"), cfg, data, facts, baseline, budget)
    print(run.path("plan.md").read_text())
    per_model = {f"{key}_{name}": value for name, m in budget.items() if not name.startswith("_")
                 for key, value in m.items()}
    return run.finish(**{k: v for k, v in facts.items() if k != "class_counts"},
                      class_counts=facts["class_counts"],
                      **{f"baseline_{k}": v for k, v in baseline.items()}, **per_model,
                      matmul_gflops=budget["_device"]["matmul_gflops"])


if __name__ == "__main__":
    launch(main, Config)
