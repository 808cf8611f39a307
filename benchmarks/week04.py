"""Week 4 benchmarks: the best-CNN recipe against the Week 3 CNN, and the LR-schedule comparison.

    python benchmarks/run.py cifar10_best --data-dir DATA [--set budget_s=600]
    python benchmarks/run.py cifar10_schedules --data-dir DATA [--set epochs=8]

cifar10_best trains week04_regularization/best_cnn.py in a training-time budget and then, IN
THE SAME RUN, the Week 3 CNN (benchmarks/week03.py's CIFAR-10 settings and speed switches) for
as many whole epochs as a timed probe says fit in the same budget (its one-cycle schedule is
sized to those epochs, so it anneals properly), and reports both accuracies, both measured
training times and the difference. On the CPU the budget defaults to 600 s; on CUDA the recipe
runs its GPU preset's epochs (no budget) and the Week 3 CNN gets the recipe's measured time.

Options (``--set key=value``): ``budget_s``; ``compare=false`` skips the Week 3 run (for quick
ablations); ``threads=N`` sets torch's CPU threads; any other key is a best_cnn Config field
(e.g. ``--set residual=false``) for cifar10_best, or a part2 Config field for cifar10_schedules.
"""

from __future__ import annotations

import math
import tempfile
import time

import torch

from benchmarks.run import Benchmark, config_options
from benchmarks.week03 import CIFAR10 as WEEK3_CIFAR10
from benchmarks.week03 import fast_model, train_fast
from common.data import load
from common.device import pick_device
from week03_cnn import part2 as week3
from week04_regularization import best_cnn, part2


def week3_epochs_for_budget(budget_s: float, device: torch.device, settings: dict,
                            n_train: int = 50_000) -> int:
    """How many whole epochs of the Week 3 CNN fit in ``budget_s``: time a few training steps
    on random images of CIFAR-10's shape, then scale to an epoch (+10% for evaluation)."""
    cfg = week3.Config(**settings)
    shape_only = load("cifar10", synthetic=True, n_synthetic=64)
    model = fast_model(week3.make_model(cfg, shape_only), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]  # the median after two warm-up steps
    epoch_s = 1.1 * step_s * n_train * (1 - cfg.val_fraction) / cfg.batch_size
    return max(1, math.floor(budget_s / epoch_s))


def best_vs_week3(data_dir: str, device: str, options: dict) -> dict:
    fields, extra = config_options(options, best_cnn.Config, extra_keys=("budget_s", "compare"))
    on_gpu = pick_device(device).type == "cuda"
    budget_s = float(extra.get("budget_s", 0.0 if on_gpu else 600.0))
    preset = best_cnn.Config.PRESETS["recipe"]["gpu"] if on_gpu else {}
    settings = {**preset, **fields, "recipe": "gpu" if on_gpu else "cpu"}
    with tempfile.TemporaryDirectory() as out:
        recipe = best_cnn.main(best_cnn.Config(**settings, budget_s=budget_s, data_dir=data_dir,
                                               device=device, out=out))
    result = {"metric": "test_acc", "value": recipe["test_acc"], "data": "CIFAR-10, JPEG copy",
              "budget_s": budget_s, "recipe_test_acc_no_tta": recipe["test_acc_no_tta"],
              "recipe_train_time_s": recipe["train_time_s"], "recipe_epochs": recipe["epochs_done"],
              "recipe_params": recipe["params"], "recipe_options": settings,
              "torch_threads": torch.get_num_threads()}
    if str(extra.get("compare", True)).lower() in ("false", "0", "no"):
        return result
    week3_budget = budget_s or math.ceil(recipe["train_time_s"])
    week3_epochs = week3_epochs_for_budget(week3_budget, pick_device(device), WEEK3_CIFAR10)
    plain = train_fast({**WEEK3_CIFAR10, "epochs": week3_epochs}, data_dir, device)
    return {**result, "week3_test_acc": plain["test_acc"],
            "difference": recipe["test_acc"] - plain["test_acc"],
            "week3_budget_s": week3_budget, "week3_epochs": week3_epochs,
            "week3_train_time_s": plain["train_s"], "week3_params": plain["params"]}


def schedules(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, part2.Config)
    settings = {"schedule": "all", "epochs": 8, "train_subset": 10_000, **fields}
    with tempfile.TemporaryDirectory() as out:
        summary = part2.main(part2.Config(**settings, data_dir=data_dir, device=device, out=out))
    per_schedule = {k: v for k, v in summary.items()
                    if any(k.endswith(f"_{s}") for s in part2.SCHEDULES)}
    return {"metric": "test_acc", "value": summary["test_acc"],
            "best_schedule": summary["best_schedule"], "data": "CIFAR-10, JPEG copy",
            "settings": settings, **per_schedule, "torch_threads": torch.get_num_threads()}


ENTRIES = {
    "cifar10_best": Benchmark(best_vs_week3,
                              "Week 4 best-CNN recipe on CIFAR-10 (JPEG copy) vs the Week 3 CNN, "
                              "same training-time budget (budget_s, CPU default 600 s)"),
    "cifar10_schedules": Benchmark(schedules,
                                   "Week 4 LR schedules (step/plateau/onecycle/cosine) with early "
                                   "stopping on CIFAR-10 (JPEG copy), 10k training images, "
                                   "8 epochs"),
}
