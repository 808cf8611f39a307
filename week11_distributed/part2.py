"""Week 11, Part 2: data-parallel training with DistributedDataParallel (DDP).

One process (python) or N processes, "ranks", started by torchrun (gloo on CPUs, NCCL on GPUs):

    shard        DistributedSampler: rank r trains on examples r, r + N, r + 2N, ... of one
                 shuffle; set_epoch(epoch) makes a new shuffle each epoch, the same on every rank
    accumulate   model.no_sync() on all but the last micro-batch: one all-reduce per step
    wrap         DistributedDataParallel(net): rank 0's weights are broadcast at the start and
                 the gradients averaged during backward(), so every rank takes the same step
    rank 0       alone prints, logs and writes the checkpoint (after every epoch)

Run: python week11_distributed/part2.py [--smoke] [--help]
     torchrun --standalone --nproc_per_node 2 week11_distributed/part2.py --smoke
     python week11_distributed/part2.py --resume runs/week11/part2/<time>/checkpoint.pt
A rank killed mid-run, restarted by torchrun from a checkpoint taken by step: restart.py.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from common.checkpoint import resume_state
from common.config import Range, ResumableConfig
from common.data import load
from common.device import autocast, prepare_model, seed_everything
from common.distributed import (
    DistInfo,
    all_reduce_mean,
    check_world_size,
    setup,
    shard,
    teardown,
    wrap,
)
from common.errors import LabError
from common.plots import plot_history
from common.runner import launch
from common.runs import Run
from common.train import check_finite
from week03_cnn.part2 import CNN
from week11_distributed.data import Images, make_datasets


@dataclass
class Config(ResumableConfig):
    """Week 11, Part 2: the Week 3 CNN trained with DistributedDataParallel (torchrun or python)."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"  # which 28x28 image data set to learn
    epochs: Annotated[int, Range(1)] = 2  # passes over the training data
    batch_size: Annotated[int, Range(1)] = 64  # images per rank per micro-batch
    accumulate: Annotated[int, Range(1)] = 1  # micro-batches per optimizer step (no_sync)
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 4e-3  # one-cycle peak learning rate
    weight_decay: Annotated[float, Range(0, 1)] = 5e-4  # AdamW decoupled weight decay
    width: Annotated[int, Range(1, 512)] = 16  # channels of the first conv block, then doubled
    blocks: Annotated[int, Range(1, 4)] = 3  # conv blocks, each halves the 28-pixel images
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # training images held out
    loading: Literal["batched", "per_sample"] = "batched"  # per_sample: the classic Dataset way
    workers: Annotated[int, Range(0, 64)] = 0  # DataLoader worker processes per rank

    SMOKE: ClassVar[dict] = {"epochs": 3, "batch_size": 16, "width": 16, "lr": 1e-2}
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*ResumableConfig.RESUME_MAY_CHANGE, "loading", "workers")


def make_loader(dataset: Images, batch_size: int, info: DistInfo, seed: int,
                loading: str = "batched", workers: int = 0) -> DataLoader:
    """This rank's shard in batches. drop_last everywhere: every rank must run the same number
    of steps, or the others wait forever in an all-reduce the short one never joins."""
    # Rank r of N: examples r, r + N, ... of a shuffle seeded by seed + epoch: no talk, no overlap.
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    options = dict(num_workers=workers, pin_memory=info.device.type == "cuda")
    if loading == "per_sample":  # B calls of dataset[i], then default_collate stacks them
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, **options)
    batches = BatchSampler(sampler, batch_size, drop_last=True)  # lists of B indices
    return DataLoader(dataset, batch_size=None, sampler=batches, **options)  # one gather each


def shard_sampler(loader: DataLoader) -> DistributedSampler:
    """The DistributedSampler of a ``make_loader`` loader (inside a BatchSampler when batched)."""
    return loader.sampler.sampler if isinstance(loader.sampler, BatchSampler) else loader.sampler


def train_step(model: nn.Module, batches, optimizer: torch.optim.Optimizer, scheduler,
               accumulate: int, device: torch.device, cpu_bf16: bool = False) -> torch.Tensor:
    """One optimizer step over ``accumulate`` micro-batches; their mean loss (detached).

    Under DDP every backward() all-reduces the gradients. The first ``accumulate - 1`` backward
    passes run inside ``model.no_sync()``: gradients add up locally, and the last backward
    all-reduces their sum once. Each loss is divided by ``accumulate``, so that sum is the
    gradient of the mean over all micro-batches. The named regions are for profiling.py."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro in range(accumulate):
        with record_function("data"):
            x, y = next(batches)  # x: (B, 1, 28, 28) normalized, y: (B,)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro == accumulate - 1
        ddp = isinstance(model, DistributedDataParallel)
        # forward and backward both inside no_sync: DDP prepares its hooks in forward
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            with record_function("forward"), autocast(device, cpu_bf16=cpu_bf16):
                loss = F.cross_entropy(model(x), y) / accumulate  # model(x): (B, 10)
            with record_function("backward"):
                loss.backward()  # on the last micro-batch: gradients averaged over the ranks
        total += loss.detach()
    with record_function("optimizer"):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()  # one-cycle is planned in optimizer steps
    return total


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer, scheduler, epoch: int,
                    accumulate: int, device: torch.device) -> dict:
    """One pass over this rank's shard: the mean loss of its steps (this rank's batches only)."""
    model.train()
    # A new shuffle each epoch, the same on every rank; without it every epoch repeats the first.
    shard_sampler(loader).set_epoch(epoch)
    batches, steps = iter(loader), len(loader) // accumulate
    total = torch.zeros((), device=device)
    for _ in range(steps):
        total += train_step(model, batches, optimizer, scheduler, accumulate, device)
    return {"train_loss": total / steps}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)  # every rank: the same initial weights, the same shuffles
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)  # before joining
    train_set, val_set, test_set = make_datasets(cfg, data)
    info = setup(cfg.device)  # torchrun: join the process group; python: a world of one
    check_world_size(cfg.resume, info, __file__)  # a checkpoint goes on with its own ranks
    net = prepare_model(make_model(cfg, data.num_classes), info.device)
    # DistributedDataParallel(net) when there are several ranks (net itself in one process): it
    # broadcasts rank 0's weights now, then averages the gradients during every backward().
    model = wrap(net, info)
    loader = make_loader(train_set, cfg.batch_size, info, cfg.seed, cfg.loading, cfg.workers)
    steps = len(loader) // cfg.accumulate  # optimizer steps per epoch, the same on every rank
    per_step = cfg.batch_size * cfg.accumulate  # examples per rank per optimizer step
    if steps == 0:
        raise LabError(f"each of the {info.world_size} rank(s) gets "
                       f"{len(train_set) // info.world_size} training images, fewer than one "
                       f"optimizer step's {per_step} (--batch-size x --accumulate)")
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, pct_start=0.25,
                                                    total_steps=cfg.epochs * steps)
    run = Run.start(cfg, __file__, info.device) if info.is_main else None  # rank 0 writes
    start = (run.restore(net, optimizer, scheduler) if run  # ranks > 0: no run folder
             else resume_state(cfg.resume, net, optimizer, scheduler))["epoch"]
    if run is not None:
        backend = dist.get_backend() if info.distributed else "none"
        print(f"{info.world_size} rank(s), backend {backend}; global batch "
              f"{per_step * info.world_size} = {cfg.batch_size} x {cfg.accumulate} accumulated x "
              f"{info.world_size} rank(s); {steps} steps per epoch")

    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        row = train_one_epoch(model, loader, optimizer, scheduler, epoch, cfg.accumulate,
                              info.device)
        train_loss = all_reduce_mean(row["train_loss"], info).item()  # each rank's shard: mean
        seconds = time.perf_counter() - t0
        check_finite(train_loss, epoch)  # the same value on every rank: all stop together
        val = evaluate_shards(net, val_set, info)
        if run is not None:
            run.log(show=True, epoch=epoch, step=epoch * steps, train_loss=train_loss,
                    val_loss=val["loss"], val_acc=val["acc"], lr=scheduler.get_last_lr()[0],
                    epoch_time_s=round(seconds, 3),
                    images_per_s=round(steps * per_step * info.world_size / seconds, 1))
            run.save_checkpoint(net, optimizer, scheduler, epoch=epoch, world_size=info.world_size)
    test = evaluate_shards(net, test_set, info)  # touched once, at the end
    spread = weights_spread(net, info)
    del model, loader  # the DDP model goes before the process group (DESIGN.md 5)
    teardown(info)
    if run is None:
        return {"rank": info.rank, "test_acc": test["acc"]}

    rows, last = run.rows, run.rows[-1]
    plot_history(rows, run.path("curves.png"),
                 title=f"CNN on {data.name}, {info.world_size} rank(s)")
    print(f"largest weight difference between ranks: {spread:.3g}")
    return run.finish(test_acc=test["acc"], final_val_acc=last["val_acc"], steps=last["step"],
                      final_train_loss=last["train_loss"], first_train_loss=rows[0]["train_loss"],
                      world_size=info.world_size, global_batch=per_step * info.world_size,
                      weights_spread=spread, images_per_s=last["images_per_s"])


def make_model(cfg: Config, num_classes: int) -> CNN:
    """Week 3's CNN without BatchNorm or Dropout: BatchNorm would normalize with each rank's own
    batch statistics, so N ranks would no longer compute what one process with an N times
    larger batch computes, which is what this lab shows (SyncBatchNorm shares them, on GPUs)."""
    return CNN(1, num_classes, tuple(cfg.width * 2**i for i in range(cfg.blocks)))


@torch.inference_mode()
def evaluate_shards(net: nn.Module, dataset: Images, info: DistInfo) -> dict[str, float]:
    """Loss and accuracy on ``dataset``, each rank evaluating its own shard; sums all-reduced."""
    net.eval()
    x, y = shard(dataset.x, dataset.y, info)  # equal slices (the last few images may be left out)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, right, count
    for start in range(0, len(x), 1024):
        xb = dataset.normalize(x[start:start + 1024]).to(info.device)  # (b, 1, 28, 28)
        yb = y[start:start + 1024].to(info.device)
        with autocast(info.device):
            logits = net(xb).float()  # (b, 10)
        sums[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        sums[1] += (logits.argmax(1) == yb).sum()
        sums[2] += len(yb)
    if info.distributed:
        dist.all_reduce(sums)
    return {"loss": (sums[0] / sums[2]).item(), "acc": (sums[1] / sums[2]).item()}


def weights_spread(net: nn.Module, info: DistInfo) -> float:
    """The largest difference between any weight on any rank and rank 0's copy (0: identical)."""
    if not info.distributed:
        return 0.0
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    spread = (flat - reference).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


if __name__ == "__main__":
    launch(main, Config)
