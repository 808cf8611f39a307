"""Week 11: find the bottleneck of a training step with torch.profiler, fix it, measure each fix.

Part 2's training step is marked with ``record_function`` regions: data, forward, backward,
optimizer. The profiler records a few steps of it in three versions, each a fix on the last:

    per_image      --loading per_sample: the classic Dataset. DataLoader calls dataset[i] once per
                   image (a float conversion and a normalization each: a handful of tiny ops) and
                   stacks the B results: B x (several ops) per batch, all driven from Python.
    batched        --loading batched: dataset[list of B indices] gathers and normalizes the whole
                   batch at once. Same batches, same numbers, far fewer calls in the data region.
    channels_last  batched, and the CNN's weights (so its activations) stored channels-last (NHWC):
                   on CPUs, oneDNN's convolutions and max-pooling run on that layout natively,
                   on NCHW only after reorders, which the top-ops table shows as the costliest ops.

Which fix matters depends on the machine: on a GPU a step's compute takes a few ms and per-image
loading can dominate it; on this CPU the convolutions dominate. For each version the run folder
gets the Chrome/Perfetto trace (trace_<name>.json: open it in https://ui.perfetto.dev or
chrome://tracing), the top-ops table (top_ops_<name>.txt) and, timed without the profiler, the
step time and images per second; bottleneck.png puts them side by side, region by region.

Run: python week11_distributed/profiling.py [--smoke] [--help]
     python week11_distributed/profiling.py --data-dir DATA --batch-size 128
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, schedule

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, prepare_model, seed_everything
from common.distributed import DistInfo
from common.errors import LabError
from common.plots import save
from common.runner import launch
from common.runs import Run
from week03_cnn.part2 import CNN
from week11_distributed.data import Images
from week11_distributed.part2 import make_loader, shard_sampler, train_step

REGIONS = ("data", "forward", "backward", "optimizer")
# name -> (--loading, channels_last): each a fix on the one before
VARIANTS = {"per_image": ("per_sample", False), "batched": ("batched", False),
            "channels_last": ("batched", True)}


@dataclass
class Config(BaseConfig):
    """Week 11: profile Part 2's training step: per-image vs batched loading, channels-last."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"  # which 28x28 image data set to train on
    batch_size: Annotated[int, Range(1)] = 128  # images per step
    width: Annotated[int, Range(1, 512)] = 16  # channels of the first conv block (Part 2's CNN)
    blocks: Annotated[int, Range(1, 4)] = 3  # conv blocks
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # AdamW learning rate
    profile_steps: Annotated[int, Range(1)] = 10  # steps recorded (after 1 skipped, 2 warm-up)
    timed_steps: Annotated[int, Range(1)] = 30  # steps timed unprofiled, for images per second
    workers: Annotated[int, Range(0, 64)] = 0  # DataLoader worker processes

    SMOKE: ClassVar[dict] = {"batch_size": 32, "width": 8, "profile_steps": 2, "timed_steps": 3}


def forever(loader):
    """Batches without end: the profiler's steps need not fit in one epoch."""
    epoch = 0
    while True:
        shard_sampler(loader).set_epoch(epoch)
        yield from loader
        epoch += 1


def setup_training(cfg: Config, data, device: torch.device, loading: str, channels_last: bool):
    """Part 2's model, optimizer and DataLoader for one process, from the same seed every time."""
    seed_everything(cfg.seed)
    dataset = Images(data.x_train, data.y_train, data.mean[0], data.std[0])
    loader = make_loader(dataset, cfg.batch_size, DistInfo(device=device), cfg.seed, loading,
                         cfg.workers)
    model = CNN(1, data.num_classes, tuple(cfg.width * 2**i for i in range(cfg.blocks)))
    # Weights in NHWC make every conv's output NHWC too (prepare_model does this on CUDA only).
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model, device, channels_last=channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    return model, forever(loader), optimizer


def profile_steps(cfg: Config, data, device: torch.device, variant: tuple[str, bool], run: Run,
                  name: str) -> dict:
    """Record ``profile_steps`` steps; save the trace and the top-ops table; region ms per step."""
    model, batches, optimizer = setup_training(cfg, data, device, *variant)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = run.path(f"trace_{name}.json")
    # wait 1 step, warm up 2 (recorded, thrown away: first-call costs), then record profile_steps.
    plan = schedule(wait=1, warmup=2, active=cfg.profile_steps, repeat=1)
    save_trace = lambda p: p.export_chrome_trace(str(trace))
    with profile(activities=activities, schedule=plan, on_trace_ready=save_trace) as prof:
        for _ in range(3 + cfg.profile_steps):
            train_step(model, batches, optimizer, None, 1, device)
            prof.step()
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=20)
    run.path(f"top_ops_{name}.txt").write_text(table + "\n")
    ms = {event.key: event.cpu_time_total / 1e3 / cfg.profile_steps for event in averages
          if event.key in REGIONS}
    calls = sum(event.count for event in averages
                if event.key.startswith("aten::")) / cfg.profile_steps
    print(f"--- {name}: top ops by self time ---\n{table}")
    return {**{f"{r}_ms": round(ms.get(r, 0.0), 3) for r in REGIONS},
            "aten_calls_per_step": round(calls, 1)}


def time_steps(cfg: Config, data, device: torch.device, variant: tuple[str, bool]) -> float:
    """Seconds per training step, without the profiler (its bookkeeping costs time too)."""
    model, batches, optimizer = setup_training(cfg, data, device, *variant)
    for _ in range(2):
        train_step(model, batches, optimizer, None, 1, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(cfg.timed_steps):
        train_step(model, batches, optimizer, None, 1, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / cfg.timed_steps


def plot_regions(results: dict[str, dict], path, title: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    left = np.zeros(len(names))
    for region in REGIONS:
        widths = np.array([results[n][f"{region}_ms"] for n in names])
        ax.barh(names, widths, left=left, label=region)
        left += widths
    for i, n in enumerate(names):
        ax.text(left[i], i, f"  {results[n]['images_per_s']:,.0f} images/s", va="center")
    ax.set(xlabel="ms per training step (profiled)", title=title, xlim=(0, left.max() * 1.45))
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def main(cfg: Config) -> dict:
    device = pick_device(cfg.device)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    if len(data.x_train) < cfg.batch_size:
        raise LabError(f"--batch-size {cfg.batch_size} is more than the {len(data.x_train)} "
                       "training images")
    run = Run.start(cfg, __file__, device)
    results = {}
    for name, variant in VARIANTS.items():
        regions = profile_steps(cfg, data, device, variant, run, name)
        step_s = time_steps(cfg, data, device, variant)
        results[name] = {**regions, "step_ms": round(step_s * 1e3, 3),
                         "images_per_s": round(cfg.batch_size / step_s, 1)}
        run.log(variant=name, loading=variant[0], channels_last=variant[1], **results[name])
        print(f"{name}: " + "  ".join(f"{k}={v}" for k, v in results[name].items()))
    first, last = results["per_image"]["images_per_s"], results["channels_last"]["images_per_s"]
    plot_regions(results, run.path("bottleneck.png"),
                 f"{data.name}, batch {cfg.batch_size}, {device.type}: "
                 f"{last / first:.2f}x the images/s")
    for name in list(VARIANTS)[1:]:
        print(f"{name}: {results[name]['images_per_s'] / first:.2f}x the images per second "
              "of per_image")
    flat = {f"{key}_{name}": value for name, result in results.items()
            for key, value in result.items()}
    return run.finish(**flat, speedup=round(last / first, 3), batch_size=cfg.batch_size)


if __name__ == "__main__":
    launch(main, Config)
