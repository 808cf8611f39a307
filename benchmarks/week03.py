"""Week 3 benchmarks: the Part 2 CNN on real MNIST (against the classic PyTorch recipe, in the same
run) and on the JPEG copy of CIFAR-10 (a fixed number of epochs).

    python benchmarks/run.py mnist_cnn --data-dir DATA [--repeat 3] [--set threads=1]
    python benchmarks/run.py cifar10_cnn --data-dir DATA [--set epochs=14]

``mnist_cnn`` runs two whole processes one after the other and times each from start to exit
(Python start, imports, data loading, training, testing): the classic recipe
(``benchmarks/classic_mnist.py``: pytorch/examples' two-conv net, Adadelta, one epoch, a
DataLoader with per-image transforms) and ours (``python -m benchmarks.week03 mnist``: the
Week 3 CNN with the speed switches a benchmark may use: data in memory, channels_last, bf16
autocast on CPUs with native bf16). It reports our accuracy, the classic accuracy and how many
times faster ours finished; ours must also reach at least the classic accuracy.

``--set key=value`` overrides a field of week03_cnn.part2.Config for our run (e.g. ``epochs=3``);
``threads=N`` sets torch's CPU threads in both processes (0: torch's default). On a CPU shared
with other busy processes one thread can be faster than two: a multi-threaded op waits for its
slowest thread, and that thread is often descheduled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.run import Benchmark, config_options
from week03_cnn import part2 as week3

ROOT = Path(__file__).resolve().parents[1]

# The settings measured in week03_cnn/README.md.
MNIST = dict(dataset="mnist", epochs=1, batch_size=128, lr=8e-3, width=16, blocks=3, head_pool=3,
             batch_norm=True, dropout=0.0, augment=False, val_fraction=0.0)
CIFAR10 = dict(dataset="cifar10", epochs=14, batch_size=128, lr=4e-3, width=32, blocks=4,
               batch_norm=True, dropout=0.1, augment=True, val_fraction=0.0)


def train_fast(settings: dict, data_dir: str, device: str) -> dict:
    """The Week 3 CNN trained with the benchmark's speed switches: channels_last memory layout
    (measured 1.6-2x faster convolutions on this CPU) and bfloat16 autocast on CPUs that have it
    in hardware (``common.device.CpuBFloat16``); on CUDA, Part 2's loop autocasts by itself. The
    loop is Part 2's own ``train_one_epoch`` (imported, not copied)."""
    from common.data import load
    from common.device import CpuBFloat16, pick_device, seed_everything
    from common.train import predict

    cfg = week3.Config(**settings, data_dir=data_dir, device=device)
    seed_everything(cfg.seed)
    dev = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir)
    train, val, test = week3.make_loaders(cfg, data, dev)
    model = fast_model(week3.make_model(cfg, data), dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=len(train), pct_start=0.25)
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        train.set_epoch(epoch)
        week3.train_one_epoch(model, train, optimizer, scheduler, dev)
    train_s = time.perf_counter() - t0
    logits, targets = predict(model, test)
    return {"test_acc": (logits.argmax(1) == targets).float().mean().item(),
            "train_s": round(train_s, 2), "epochs": cfg.epochs,
            "params": sum(p.numel() for p in model.parameters()),
            "bf16": isinstance(model, CpuBFloat16), "threads": torch.get_num_threads()}


def fast_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` in channels_last layout, under bf16 autocast on a CPU that has bf16
    in hardware (on CUDA, Part 2's loop autocasts by itself)."""
    from common.device import CpuBFloat16, cpu_has_native_bf16

    model = model.to(device, memory_format=torch.channels_last)
    return CpuBFloat16(model) if device.type == "cpu" and cpu_has_native_bf16() else model


def _timed(cmd: list[str], threads: int) -> tuple[dict, float]:
    """Run ``cmd`` as a fresh process; its last stdout line (JSON) and its whole wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads > 0 else None
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), round(wall, 2)


def mnist_vs_classic(data_dir: str, device: str, options: dict) -> dict:
    fields, extra = config_options(options, week3.Config)
    threads = int(extra.get("threads", 0))
    settings = {**MNIST, **fields}
    classic, classic_wall = _timed([sys.executable, "benchmarks/classic_mnist.py",
                                    "--data-dir", data_dir, "--threads", str(threads)], threads)
    ours, ours_wall = _timed([sys.executable, "-m", "benchmarks.week03", "mnist", data_dir, device,
                              json.dumps(settings), str(threads)], threads)
    return {"metric": "test_acc", "value": ours["test_acc"], "wall_s_ours": ours_wall,
            "classic_test_acc": classic["test_acc"], "wall_s_classic": classic_wall,
            "times_faster": round(classic_wall / ours_wall, 2),
            "reaches_classic_accuracy": ours["test_acc"] >= classic["test_acc"],
            "ours": ours, "classic": classic, "config": settings}


def cifar10(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, week3.Config, default_threads=1)
    settings = {**CIFAR10, **fields}
    result = train_fast(settings, data_dir, device)
    return {"metric": "test_acc", "value": result["test_acc"], **result, "config": settings}


ENTRIES = {
    "mnist_cnn": Benchmark(mnist_vs_classic,
                           "Week 3 CNN on MNIST vs the classic PyTorch recipe, whole processes "
                           "timed in the same run (goal: >= 0.99 and >= 3x faster)"),
    "cifar10_cnn": Benchmark(cifar10,
                             "Week 3 CNN on CIFAR-10 (JPEG copy), 14 epochs: test accuracy"),
}


# python -m benchmarks.week03 mnist DATA_DIR DEVICE SETTINGS_JSON THREADS
if __name__ == "__main__":
    _, _, data_dir_arg, device_arg, settings_json, threads_arg = sys.argv
    if int(threads_arg) > 0:
        torch.set_num_threads(int(threads_arg))
    print(json.dumps(train_fast(json.loads(settings_json), data_dir_arg, device_arg)))
