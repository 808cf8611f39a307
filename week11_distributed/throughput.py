"""Week 11: a throughput sweep: images per second of Part 2's training step for every
batch size x DataLoader workers x mixed precision, plotted, with the best setting named.

Things to look for: bigger batches amortize the per-step overheads (Python, optimizer, kernel
launches) until the compute units are full; worker processes help only when loading is the
slow part and there are spare cores to run them (on 2 shared cores they mostly compete with
training); bf16 autocast pays where the hardware computes in bf16 (recent GPUs, CPUs with
AVX512-BF16/AMX) and costs where it is emulated. Timing is wall time after warm-up steps.

Run: python week11_distributed/throughput.py [--smoke] [--help]
     python week11_distributed/throughput.py --data-dir DATA --batch-sizes 32 512 --workers 0 1 2
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch

from common.config import BaseConfig, Range
from common.data import load
from common.device import cpu_has_native_bf16, pick_device, prepare_model, seed_everything
from common.distributed import DistInfo
from common.errors import ConfigError, LabError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from week03_cnn.part2 import CNN
from week11_distributed.data import Images
from week11_distributed.part2 import make_loader, train_step


@dataclass
class Config(BaseConfig):
    """Week 11: training throughput for each batch size x DataLoader workers x mixed precision."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"  # which 28x28 image data set to train on
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)  # batch sizes to measure
    workers: tuple[int, ...] = (0, 1, 2)  # DataLoader worker process counts to measure
    amp: bool = True  # also measure bf16 autocast, where the device computes bf16 natively
    width: Annotated[int, Range(1, 512)] = 16  # channels of the first conv block (Part 2's CNN)
    blocks: Annotated[int, Range(1, 4)] = 3  # conv blocks
    warmup_steps: Annotated[int, Range(0)] = 3  # untimed steps first (worker start-up, first calls)
    steps: Annotated[int, Range(1)] = 20  # timed steps per setting

    SMOKE: ClassVar[dict] = {"batch_sizes": (16, 32), "workers": (0, 1), "width": 8,
                             "warmup_steps": 1, "steps": 3}

    def check(self) -> None:
        for name, values, lo, hi in (("batch-sizes", self.batch_sizes, 1, 1 << 20),
                                     ("workers", self.workers, 0, 64)):
            if not values or any(not lo <= v <= hi for v in values):
                raise ConfigError(f"--{name}: give one or more values in [{lo}, {hi}], "
                                  f"got {list(values)}")


def precisions(device: torch.device, amp: bool) -> list[str]:
    """fp32 always; bf16 where it is computed natively (emulated bf16 is slower than fp32)."""
    native = (device.type == "cuda" and torch.cuda.is_bf16_supported()
              or device.type == "cpu" and cpu_has_native_bf16())
    return ["fp32", "bf16"] if amp and native else ["fp32"]


def measure(data, device: torch.device, batch_size: int, workers: int, precision: str,
            cfg: Config) -> float:
    """Images per second of ``steps`` training steps, after ``warmup_steps``."""
    seed_everything(cfg.seed)
    dataset = Images(data.x_train, data.y_train, data.mean[0], data.std[0])
    loader = make_loader(dataset, batch_size, DistInfo(device=device), cfg.seed, "batched", workers)
    widths = tuple(cfg.width * 2**i for i in range(cfg.blocks))
    model = prepare_model(CNN(1, data.num_classes, widths), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = iter(loader)
    cpu_bf16 = precision == "bf16" and device.type == "cpu"  # on CUDA train_step autocasts itself
    for _ in range(cfg.warmup_steps):
        train_step(model, batches, optimizer, None, 1, device, cpu_bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        train_step(model, batches, optimizer, None, 1, device, cpu_bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del batches  # stops the worker processes
    return cfg.steps * batch_size / seconds


def main(cfg: Config) -> dict:
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    most = max(cfg.batch_sizes) * (cfg.warmup_steps + cfg.steps)
    if most > len(data.x_train):
        raise LabError(f"batch size {max(cfg.batch_sizes)} x {cfg.warmup_steps + cfg.steps} "
                       f"steps needs {most} images in one epoch; {data.name} has "
                       f"{len(data.x_train)}: fewer --steps or smaller batches")
    run = Run.start(cfg, __file__, device)
    kinds = precisions(device, cfg.amp)
    if cfg.amp and kinds == ["fp32"]:
        print(f"bf16 is not computed natively on this {device.type}: measuring fp32 only")
    curves: dict[str, list] = {}
    results = []
    for precision in kinds:
        for workers in cfg.workers:
            label = f"{precision}, {workers} worker{'s' if workers != 1 else ''}"
            for batch_size in cfg.batch_sizes:
                rate = measure(data, device, batch_size, workers, precision, cfg)
                print(f"{label:>18s}  batch {batch_size:5d}: {rate:9,.0f} images/s")
                run.log(precision=precision, workers=workers, batch_size=batch_size,
                        images_per_s=round(rate, 1))
                curves.setdefault(label, []).append((batch_size, rate))
                results.append((rate, precision, workers, batch_size))
    plot_curves(curves, run.path("throughput.png"), xlabel="batch size",
                ylabel="training images per second",
                title=f"{data.name}, {device.type}, {torch.get_num_threads()} thread(s)")
    best, worst = max(results), min(results)
    print(f"best: {best[0]:,.0f} images/s with {best[1]}, {best[2]} workers, batch {best[3]} "
          f"({best[0] / worst[0]:.1f}x the slowest setting)")
    return run.finish(best_images_per_s=round(best[0], 1), best_precision=best[1],
                      best_workers=best[2], best_batch_size=best[3],
                      slowest_images_per_s=round(worst[0], 1), settings=len(results),
                      precisions=kinds)


if __name__ == "__main__":
    launch(main, Config)
