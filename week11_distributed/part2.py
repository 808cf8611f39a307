"""Week 11, Part 2: data-parallel training with DistributedDataParallel, and surviving a crash.

The same script runs as one process or as N processes started by torchrun (gloo on the CPU,
NCCL on GPUs, chosen by the device). What each of the N processes ("ranks") does:

    setup          join the process group (common.distributed.setup reads torchrun's RANK, WORLD_SIZE)
    shard          DistributedSampler: each rank its own slice of the data, reshuffled every epoch (set_epoch)
    wrap           DistributedDataParallel(model): rank 0's weights are broadcast at the start and the
                   gradients are averaged during backward(), so every rank takes the same step
    accumulate     model.no_sync() on all but the last micro-batch: one all-reduce per optimizer step
    rank 0 alone   prints, logs metrics, writes checkpoints (every --checkpoint-every steps)
    restart        torchrun --max-restarts 1 starts every rank again after one dies; the script finds
                   its last checkpoint and goes on, ending with the weights an uninterrupted run has

Run: python week11_distributed/part2.py [--smoke] [--help]
     torchrun --standalone --nproc_per_node 2 week11_distributed/part2.py --smoke
     torchrun --standalone --nproc_per_node 2 --max-restarts 1 week11_distributed/part2.py --smoke --crash-at-step 6
     python week11_distributed/part2.py --resume runs/week11/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from common.checkpoint import load_checkpoint
from common.config import Range, ResumableConfig
from common.data import ImageData, load
from common.device import autocast, prepare_model, seed_everything
from common.distributed import DistInfo, all_reduce_mean, launched_by_torchrun, setup, shard
from common.errors import ConfigError, Interrupted, LabError, NonFiniteLoss, one_line
from common.loader import split
from common.plots import plot_history
from common.runner import Terminated, launch
from common.runs import Run, week_and_script
from week03_cnn.part2 import CNN


@dataclass
class Config(ResumableConfig):
    """Week 11, Part 2: the Week 3 CNN trained with DistributedDataParallel (torchrun or one process)."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"  # which 28x28 image data set to learn
    epochs: Annotated[int, Range(1)] = 2  # passes over the training data
    batch_size: Annotated[int, Range(1)] = 64  # images per rank per micro-batch (global batch: x accumulate x ranks)
    accumulate: Annotated[int, Range(1)] = 1  # micro-batches per optimizer step (gradient accumulation with no_sync)
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 4e-3  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: Annotated[float, Range(0, 1)] = 5e-4  # AdamW decoupled weight decay
    width: Annotated[int, Range(1, 512)] = 16  # channels of the first conv block; each next block doubles them
    blocks: Annotated[int, Range(1, 4)] = 3  # conv blocks (conv-ReLU-pool), each halves the 28-pixel images
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # share of the training images held out
    loading: Literal["batched", "per_sample"] = "batched"  # batched: one gather per batch; per_sample: the classic way
    workers: Annotated[int, Range(0, 64)] = 0  # DataLoader worker processes per rank (0: load in the training process)
    checkpoint_every: Annotated[int, Range(1)] = 100  # optimizer steps between checkpoints (also one per epoch end)
    crash_at_step: Annotated[int, Range(0)] = 0  # fault injection: --crash-rank dies after this step (0: never)
    crash_rank: Annotated[int, Range(0)] = 0  # the rank that crashes (only on the first attempt, never after a resume)

    SMOKE: ClassVar[dict] = {"epochs": 3, "batch_size": 16, "width": 16, "lr": 1e-2, "checkpoint_every": 4}
    # Settings that do not change what is computed may differ on resume.
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*ResumableConfig.RESUME_MAY_CHANGE, "loading", "workers",
                                          "checkpoint_every", "crash_at_step", "crash_rank")

    def check(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; 1 for a plain process
        if self.crash_at_step and self.crash_rank >= world:
            raise ConfigError(f"--crash-rank {self.crash_rank}: this run has {world} rank(s), numbered from 0")


# ---- Data: an in-memory Dataset, sharded across ranks by DistributedSampler ----
class Images(Dataset):
    """uint8 images (N, 1, 28, 28) held in memory, handed out normalized.

    ``dataset[i]`` is one example: a classic Dataset, which DataLoader calls B times per batch
    and then stacks (``--loading per_sample``). ``dataset[list_of_indices]`` is a whole batch in
    one gather (``--loading batched``): the fix for the bottleneck profiling.py finds."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: float, std: float):
        self.x, self.y, self.mean, self.std = x, y, mean, std

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        return self.normalize(self.x[index]), self.y[index]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std


class ShardSampler(DistributedSampler):
    """DistributedSampler (rank r gets examples r, r + N, r + 2N, ... of a shuffle that depends
    on seed + epoch only, so all ranks agree) that can start part way into an epoch: after a
    restart, the ``skip`` examples already trained on are passed over without being loaded."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def make_loader(dataset: Images, batch_size: int, info: DistInfo, seed: int, loading: str = "batched",
                workers: int = 0) -> DataLoader:
    """A DataLoader over this rank's shard. drop_last everywhere: every rank must run the same
    number of steps, or the others wait forever in an all-reduce the short one never joins."""
    sampler = ShardSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                           drop_last=True)
    common = dict(num_workers=workers, pin_memory=info.device.type == "cuda")
    if loading == "per_sample":  # B calls of dataset[i], then default_collate stacks them
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, **common)
    # batch_size=None turns off automatic batching: the sampler yields lists of indices, the
    # dataset answers each list with one gathered batch.
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=True), **common)


def shard_sampler(loader: DataLoader) -> ShardSampler:
    """The ShardSampler inside a loader from ``make_loader`` (wrapped in a BatchSampler when batched)."""
    return loader.sampler.sampler if isinstance(loader.sampler, BatchSampler) else loader.sampler


def make_datasets(cfg: Config, data: ImageData) -> tuple[Images, Images, Images]:
    """Training, validation (held out from the training images, same split on every rank) and test."""
    x, y, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    mean, std = data.mean[0], data.std[0]
    return Images(x, y, mean, std), Images(x_val, y_val, mean, std), Images(data.x_test, data.y_test, mean, std)


def make_model(cfg: Config, num_classes: int) -> CNN:
    """Week 3's CNN without BatchNorm or Dropout: BatchNorm would normalize with each rank's own
    batch statistics (SyncBatchNorm shares them, on GPUs), so N ranks would no longer compute what
    one process with an N times larger batch computes, which is what this lab shows."""
    return CNN(1, num_classes, tuple(cfg.width * 2**i for i in range(cfg.blocks)))


# ---- One optimizer step, with the regions the profiler shows ----
def train_step(model: nn.Module, batches, optimizer: torch.optim.Optimizer, scheduler, accumulate: int,
               device: torch.device, cpu_bf16: bool = False) -> torch.Tensor:
    """``accumulate`` micro-batches, one optimizer step; returns the mean loss (detached).

    Under DDP every backward() all-reduces the gradients. The first ``accumulate - 1``
    backward passes run inside ``model.no_sync()``: gradients add up locally, and the last
    backward all-reduces the sum once. The loss is divided by ``accumulate`` so the sum of the
    micro-batch gradients is the gradient of the mean over all of them. Mixed precision: bf16
    autocast on CUDA; on the CPU only with ``cpu_bf16`` (throughput.py measures it)."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro in range(accumulate):
        with record_function("data"):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = micro == accumulate - 1
        skip_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with skip_sync:  # forward and backward both inside: DDP prepares its hooks in forward
            with record_function("forward"), autocast(device, cpu_bf16=cpu_bf16):
                loss = nn.functional.cross_entropy(model(x), y) / accumulate
            with record_function("backward"):
                loss.backward()
        total += loss.detach()
    with record_function("optimizer"):
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return total


@torch.inference_mode()
def evaluate_shards(net: nn.Module, dataset: Images, info: DistInfo) -> dict[str, float]:
    """Loss and accuracy on ``dataset``, each rank evaluating its own shard; sums all-reduced."""
    net.eval()
    x, y = shard(dataset.x, dataset.y, info)  # equal slices (the last few images may be left out)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, right answers, count
    for start in range(0, len(x), 1024):
        xb, yb = dataset.normalize(x[start:start + 1024]).to(info.device), y[start:start + 1024].to(info.device)
        with autocast(info.device):
            logits = net(xb).float()
        sums[0] += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        sums[1] += (logits.argmax(1) == yb).sum()
        sums[2] += len(yb)
    if info.distributed:
        dist.all_reduce(sums)
    return {"loss": (sums[0] / sums[2]).item(), "acc": (sums[1] / sums[2]).item()}


def weights_spread(net: nn.Module, info: DistInfo) -> float:
    """The largest difference between any weight on any rank and rank 0's copy (0: identical)."""
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    if not info.distributed:
        return 0.0
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    spread = (flat - reference).abs().max()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return spread.item()


# ---- Fault tolerance: where a restarted rank finds the last checkpoint ----
def pointer_file(cfg: Config) -> Path | None:
    """torchrun gives every attempt of one job the same TORCHELASTIC_RUN_ID; rank 0 notes the
    run folder under it, so that the ranks torchrun starts again after a crash find it."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    week, script = week_and_script(__file__)
    return Path(cfg.out).expanduser() / week / script / f".torchrun-{run_id}"


def restart_checkpoint(cfg: Config, info: DistInfo) -> str:
    """On a torchrun restart: the checkpoint of this job's run folder (rank 0 looks, and tells the
    others), or "" when the crash came before the first checkpoint."""
    path = ""
    pointer = pointer_file(cfg)
    if info.is_main and pointer is not None and pointer.is_file():
        checkpoint = Path(pointer.read_text().strip()) / "checkpoint.pt"
        path = str(checkpoint) if checkpoint.is_file() else ""
    if info.distributed:
        message = [path]
        dist.broadcast_object_list(message, src=0)
        path = message[0]
    return path


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another rank died (its sockets closed under us)."""
    return isinstance(e, dist.DistError) or any(word in str(e) for word in ("Connection reset", "Connection closed",
                                                                          "Broken pipe", "NCCL communicator"))


def crash(step: int, rank: int) -> None:
    """A machine failure: the process vanishes (no exception, no cleanup, no checkpoint)."""
    print(f"fault injection: rank {rank} exits abruptly after step {step}", file=sys.stderr, flush=True)
    os._exit(17)


# ---- The training run ----
@dataclass
class Progress:
    epoch: int = 1  # the epoch in progress
    batches_done: int = 0  # optimizer steps done in that epoch
    step: int = 0  # optimizer steps since the start
    saved_step: int = 0  # the step of the last checkpoint
    rows: list = dataclasses.field(default_factory=list)
    losses: list = dataclasses.field(default_factory=list)  # this epoch's step losses so far


def save(run: Run | None, net: nn.Module, optimizer, scheduler, progress: Progress, epochs_done: int) -> None:
    """Rank 0 writes the checkpoint (atomically: a crash mid-write leaves the previous one). The
    other ranks hold the same weights: writing N copies would only waste disk and time."""
    if run is None:
        return
    run.save_checkpoint(net, optimizer, scheduler, epoch=epochs_done, step=progress.step,
                         next_epoch=progress.epoch, batches_done=progress.batches_done,
                         losses=[float(loss) for loss in progress.losses])  # + the metrics rows
    progress.saved_step = progress.step


def train(cfg: Config, info: DistInfo, model: nn.Module, net: nn.Module, loader: DataLoader, steps_per_epoch: int,
          val: Images, optimizer, scheduler, progress: Progress, run: Run | None, first_attempt: bool) -> None:
    """The epochs from ``progress`` on: rank 0 logs a row and saves a checkpoint after each."""
    sampler = shard_sampler(loader)
    per_step = cfg.batch_size * cfg.accumulate  # examples per rank per optimizer step
    for epoch in range(progress.epoch, cfg.epochs + 1):
        progress.epoch = epoch
        sampler.set_epoch(epoch)  # the same new shuffle on every rank; without it every epoch repeats epoch 0's
        sampler.skip = progress.batches_done * per_step  # after a restart: the examples already trained on
        batches = iter(loader)
        model.train()
        t0, timed = time.perf_counter(), 0
        while progress.batches_done < steps_per_epoch:
            loss = train_step(model, batches, optimizer, scheduler, cfg.accumulate, info.device)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss.item()} at step {progress.step + 1} on rank {info.rank}; "
                                    "stopped, keeping the last checkpoint. Try a smaller --lr")
            progress.losses.append(loss)
            timed += 1
            progress.step, progress.batches_done = progress.step + 1, progress.batches_done + 1
            if progress.step % cfg.checkpoint_every == 0 and progress.batches_done < steps_per_epoch:
                # Each rank's losses are its own shard's; the checkpoint (rank 0's) keeps the mean over
                # the ranks, or a resumed epoch's train_loss would count rank 0's batches N times.
                # (After a resume the losses read from the checkpoint are floats, hence float().)
                step_losses = torch.tensor([float(loss) for loss in progress.losses], device=info.device)
                progress.losses = list(all_reduce_mean(step_losses, info).unbind())
                save(run, net, optimizer, scheduler, progress, epochs_done=epoch - 1)
            if cfg.crash_at_step == progress.step and info.rank == cfg.crash_rank and first_attempt:
                crash(progress.step, info.rank)
        del batches  # ends the DataLoader's worker processes (if any) before evaluating
        seconds = time.perf_counter() - t0
        mean_loss = torch.tensor([float(loss) for loss in progress.losses]).mean().to(info.device)
        train_loss = all_reduce_mean(mean_loss, info).item()  # the mean over every rank's batches
        metrics = evaluate_shards(net, val, info)
        images = timed * per_step * info.world_size
        row = {"epoch": epoch, "step": progress.step, "train_loss": train_loss, "val_loss": metrics["loss"],
               "val_acc": metrics["acc"], "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": round(seconds, 3),
               "images_per_s": round(images / seconds, 1)}
        progress.rows.append(row)
        progress.epoch, progress.batches_done, progress.losses = epoch + 1, 0, []
        if run is not None:
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            run.log(**row)
            save(run, net, optimizer, scheduler, progress, epochs_done=epoch)


def stopped(e: KeyboardInterrupt, info: DistInfo, progress: Progress, run: Run | None) -> Interrupted:
    """Ctrl-C / SIGTERM: one line per rank; rank 0 names the checkpoint to go on from."""
    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    checkpoint = run.path("checkpoint.pt") if run is not None else None
    if checkpoint is None:
        message = f"{what}: rank {info.rank} stopped at step {progress.step}"
    elif checkpoint.is_file():
        message = (f"{what} at step {progress.step}; the checkpoint of step {progress.saved_step} is {checkpoint} "
                   f"(continue with --resume {checkpoint}; training goes on from that step)")
    else:
        message = f"{what} at step {progress.step}, before the first checkpoint; nothing to resume"
    error = Interrupted(message)
    error.exit_code = 143 if isinstance(e, Terminated) else Interrupted.exit_code
    return error


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)  # every rank the same seed: the same initial weights and the same shuffles
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)  # before joining: a missing set stops all
    train_set, val_set, test_set = make_datasets(cfg, data)
    info = setup(cfg.device)  # under torchrun: join the process group (NCCL on GPUs, gloo on the CPU)
    per_step = cfg.batch_size * cfg.accumulate
    if len(train_set) // info.world_size < per_step:
        raise LabError(f"each of the {info.world_size} rank(s) gets {len(train_set) // info.world_size} training "
                       f"images, fewer than one optimizer step's {per_step} (--batch-size x --accumulate)")

    net = prepare_model(make_model(cfg, data.num_classes), info.device)
    # ---- The lesson: one wrapper makes the model data-parallel ----
    # DDP broadcasts rank 0's weights to the others now, and registers hooks that all-reduce
    # (average) each bucket of gradients while backward() is still computing the next ones.
    model = DistributedDataParallel(net, device_ids=[info.local_rank] if info.device.type == "cuda" else None) \
        if info.distributed else net
    loader = make_loader(train_set, cfg.batch_size, info, cfg.seed, cfg.loading, cfg.workers)
    steps_per_epoch = len(loader) // cfg.accumulate
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                    pct_start=0.25)

    restarted = launched_by_torchrun() and restart_count() > 0
    if restarted and not cfg.resume:
        found = restart_checkpoint(cfg, info)
        cfg = dataclasses.replace(cfg, resume=found) if found else cfg
    progress = Progress()
    if cfg.resume:  # every rank loads the same checkpoint (on a cluster: from a shared file system)
        payload = load_checkpoint(cfg.resume, net, optimizer, scheduler, script="/".join(week_and_script(__file__)))
        extra = payload["extra"]
        progress = Progress(extra["next_epoch"], extra["batches_done"], extra["step"], extra["step"], extra["rows"],
                            extra["losses"])
    run = Run.start(cfg, __file__, info.device) if info.is_main else None  # rank 0 alone writes files
    if run is not None:
        pointer = pointer_file(cfg)
        if pointer is not None:
            pointer.write_text(str(run.dir))
        print(f"{info.world_size} rank(s), backend {dist.get_backend() if dist.is_initialized() else 'none'}; "
              f"global batch {per_step * info.world_size} = {cfg.batch_size} x {cfg.accumulate} accumulated x "
              f"{info.world_size} rank(s); {steps_per_epoch} steps per epoch"
              + (f"; restart {restart_count()}, from step {progress.step}" if restarted else ""))
    try:
        train(cfg, info, model, net, loader, steps_per_epoch, val_set, optimizer, scheduler, progress, run,
              first_attempt=not cfg.resume and restart_count() == 0)
        test = evaluate_shards(net, test_set, info)  # touched once, at the end
        spread = weights_spread(net, info)
    except KeyboardInterrupt as e:
        raise stopped(e, info, progress, run) from None
    except RuntimeError as e:
        if not (info.distributed and lost_peer(e)):
            raise
        dist.destroy_process_group()
        raise LabError(f"rank {info.rank} lost contact with another rank at step {progress.step} "
                       f"({one_line(e, 100)}); torchrun --max-restarts N starts every rank again from the last "
                       "checkpoint") from None
    summary = None
    if run is not None:
        plot_history(progress.rows, run.path("curves.png"), title=f"CNN on {data.name}, {info.world_size} rank(s)")
        print(f"largest weight difference between ranks: {spread:.3g}")
        rows = progress.rows
        summary = run.finish(test_acc=test["acc"], final_val_acc=rows[-1]["val_acc"],
                              final_train_loss=rows[-1]["train_loss"], first_train_loss=rows[0]["train_loss"],
                              steps=progress.step, world_size=info.world_size, global_batch=per_step * info.world_size,
                              restarts=restart_count(), weights_spread=spread,
                              images_per_s=rows[-1]["images_per_s"])
        if pointer_file(cfg) is not None:
            pointer_file(cfg).unlink(missing_ok=True)
    # ---- Teardown (DESIGN.md 5): drop the DDP model first, then leave the process group ----
    del model, loader
    gc.collect()
    if dist.is_initialized():
        dist.barrier()  # nobody leaves while another rank still evaluates
        dist.destroy_process_group()
    return summary if summary is not None else {"rank": info.rank, "test_acc": test["acc"]}


if __name__ == "__main__":
    launch(main, Config)
