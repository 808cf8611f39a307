"""Week 11 self-work: a rank dies mid-run; torchrun starts every rank again and training goes on.

Part 2's training (its loader, train_step and model, imported), with what a crash takes:

    checkpoints by step   every --checkpoint-every optimizer steps, mid-epoch too: the weights,
                          AdamW's moments, the schedule, the epoch, its steps done, its losses
    the restart           torchrun --max-restarts R starts every rank again after one dies; rank 0
                          finds this job's run folder (noted under TORCHELASTIC_RUN_ID, the same
                          for every attempt of one job) and tells the others; every rank loads
                          the checkpoint and skips the batches of the epoch already trained on
    fault injection       --crash-at-step S --crash-rank R: rank R vanishes after step S

Nothing in a step is random apart from the batch order, a function of (seed, epoch): the
restarted run ends with the weights of an uninterrupted one, bit for bit (the tests check it).

Run: torchrun --standalone --nproc_per_node 2 --max-restarts 1 week11_distributed/restart.py \\
         --smoke --crash-at-step 6 --crash-rank 1
     python week11_distributed/restart.py --smoke      (one process; Ctrl-C, then --resume)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import torch
import torch.distributed as dist

from common.checkpoint import resume_state
from common.config import Range
from common.data import load
from common.device import prepare_model, seed_everything
from common.distributed import DistInfo, all_reduce_mean, check_world_size, setup, teardown, wrap
from common.errors import ConfigError, Interrupted, LabError, one_line
from common.plots import plot_history
from common.runner import interruption, launch
from common.runs import Run, week_and_script
from common.train import check_finite
from week11_distributed import part2
from week11_distributed.data import make_datasets


@dataclass
class Config(part2.Config):
    """Week 11: Part 2's training surviving a killed rank (torchrun --max-restarts)."""

    checkpoint_every: Annotated[int, Range(1)] = 100  # optimizer steps between checkpoints
    crash_at_step: Annotated[int, Range(0)] = 0  # fault injection: a rank dies after this step
    crash_rank: Annotated[int, Range(0)] = 0  # the rank that dies (first attempt only)

    SMOKE: ClassVar[dict] = {**part2.Config.SMOKE, "checkpoint_every": 4}
    RESUME_MAY_CHANGE: ClassVar[tuple] = (*part2.Config.RESUME_MAY_CHANGE, "checkpoint_every",
                                          "crash_at_step", "crash_rank")

    def check(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; 1 for a plain process
        if self.crash_at_step and self.crash_rank >= world:
            raise ConfigError(f"--crash-rank {self.crash_rank}: this run has {world} rank(s), "
                              "numbered from 0")


@dataclass
class Progress:
    """Where training is; saved with every checkpoint."""

    step: int = 0  # optimizer steps since the start
    batches_done: int = 0  # optimizer steps done in the epoch in progress
    losses: list = dataclasses.field(default_factory=list)  # that epoch's step losses so far
    saved_step: int = 0  # the step of the last checkpoint


def train(cfg: Config, info: DistInfo, model, net, loader, val_set, optimizer, scheduler,
          run: Run | None, start_epoch: int, progress: Progress, first_attempt: bool) -> None:
    """The epochs from ``start_epoch`` on, checkpointing every ``checkpoint_every`` steps."""
    steps = len(loader) // cfg.accumulate
    per_step = cfg.batch_size * cfg.accumulate  # examples per rank per optimizer step
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        part2.shard_sampler(loader).set_epoch(epoch)  # the epoch's order, the same after a restart
        # After a restart: past the batches of this epoch that were already trained on.
        batches = itertools.islice(iter(loader), progress.batches_done * cfg.accumulate, None)
        t0, timed = time.perf_counter(), 0
        while progress.batches_done < steps:
            loss = part2.train_step(model, batches, optimizer, scheduler, cfg.accumulate,
                                    info.device)
            progress.losses.append(loss)
            progress.step, progress.batches_done, timed = (progress.step + 1,
                                                           progress.batches_done + 1, timed + 1)
            if progress.step % cfg.checkpoint_every == 0 and progress.batches_done < steps:
                save(run, net, optimizer, scheduler, info, progress, epochs_done=epoch - 1)
            if first_attempt and progress.step == cfg.crash_at_step and info.rank == cfg.crash_rank:
                crash(progress.step, info.rank)
        del batches  # ends the DataLoader's worker processes (if any) before evaluating
        seconds = time.perf_counter() - t0
        train_loss = all_reduce_mean(stacked(progress.losses, info).mean(), info).item()
        check_finite(train_loss, epoch)
        val = part2.evaluate_shards(net, val_set, info)
        progress.batches_done, progress.losses = 0, []
        if run is not None:
            run.log(show=True, epoch=epoch, step=progress.step, train_loss=train_loss,
                    val_loss=val["loss"], val_acc=val["acc"], lr=scheduler.get_last_lr()[0],
                    epoch_time_s=round(seconds, 3),
                    images_per_s=round(timed * per_step * info.world_size / seconds, 1))
        save(run, net, optimizer, scheduler, info, progress, epochs_done=epoch)


def save(run: Run | None, net, optimizer, scheduler, info: DistInfo, progress: Progress,
         epochs_done: int) -> None:
    """Rank 0 writes the checkpoint (atomically: a crash mid-write leaves the previous one).
    Each rank's losses are its own shard's: the checkpoint keeps their mean over the ranks, or a
    resumed epoch's train_loss would count rank 0's batches N times (every rank joins that)."""
    if progress.losses:
        progress.losses = all_reduce_mean(stacked(progress.losses, info), info).tolist()
    if run is not None:
        run.save_checkpoint(net, optimizer, scheduler, epoch=epochs_done, step=progress.step,
                            batches_done=progress.batches_done, losses=progress.losses,
                            world_size=info.world_size)
    progress.saved_step = progress.step


def crash(step: int, rank: int) -> None:
    """A machine failure: the process vanishes (no exception, no cleanup, no checkpoint)."""
    print(f"fault injection: rank {rank} exits abruptly after step {step}", file=sys.stderr,
          flush=True)
    os._exit(17)


def stacked(losses: list, info: DistInfo) -> torch.Tensor:
    """Step losses (tensors, or floats read back from a checkpoint) as one tensor on the device."""
    return torch.stack([torch.as_tensor(x, device=info.device) for x in losses])


# ---- Where a restarted rank finds the last checkpoint ----
def pointer_file(cfg: Config) -> Path | None:
    """torchrun gives every attempt of one job the same TORCHELASTIC_RUN_ID; rank 0 notes the
    run folder under it, so that the ranks torchrun starts again after a crash find it."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    week, script = week_and_script(__file__)
    return Path(cfg.out).expanduser() / week / script / f".torchrun-{run_id}"


def restart_checkpoint(cfg: Config, info: DistInfo) -> str:
    """After a restart: this job's checkpoint (rank 0 looks and tells the others), or "" when
    the crash came before the first checkpoint."""
    path, pointer = "", pointer_file(cfg)
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
    words = ("Connection reset", "Connection closed", "Broken pipe", "NCCL communicator")
    return isinstance(e, dist.DistError) or any(word in str(e) for word in words)


def stopped(e: KeyboardInterrupt, info: DistInfo, progress: Progress,
            run: Run | None) -> Interrupted:
    """Ctrl-C / SIGTERM: one line per rank; rank 0 names the checkpoint to go on from."""
    what, code = interruption(e)
    checkpoint = run.path("checkpoint.pt") if run is not None else None
    if checkpoint is None:
        message = f"{what}: rank {info.rank} stopped at step {progress.step}"
    elif checkpoint.is_file():
        message = (f"{what} at step {progress.step}; the checkpoint of step {progress.saved_step} "
                   f"is {checkpoint} (continue with --resume {checkpoint}; training goes on from "
                   "that step)")
    else:
        message = f"{what} at step {progress.step}, before the first checkpoint; nothing to resume"
    error = Interrupted(message)
    error.exit_code = code
    return error


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    train_set, val_set, test_set = make_datasets(cfg, data)
    info = setup(cfg.device)
    restarted = restart_count() > 0
    if restarted and not cfg.resume:
        cfg = dataclasses.replace(cfg, resume=restart_checkpoint(cfg, info))
    check_world_size(cfg.resume, info, __file__)
    net = prepare_model(part2.make_model(cfg, data.num_classes), info.device)
    model = wrap(net, info)
    loader = part2.make_loader(train_set, cfg.batch_size, info, cfg.seed, cfg.loading,
                               cfg.workers)
    steps = len(loader) // cfg.accumulate
    if steps == 0:
        raise LabError(f"each of the {info.world_size} rank(s) gets "
                       f"{len(train_set) // info.world_size} training images, fewer than one "
                       f"optimizer step's {cfg.batch_size * cfg.accumulate}")
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, pct_start=0.25,
                                                    total_steps=cfg.epochs * steps)
    run = Run.start(cfg, __file__, info.device) if info.is_main else None
    state = (run.restore(net, optimizer, scheduler) if run
             else resume_state(cfg.resume, net, optimizer, scheduler))
    progress = Progress(state.get("step", 0), state.get("batches_done", 0),
                        state.get("losses", []), state.get("step", 0))
    # A mid-epoch checkpoint holds the epochs done before the one in progress.
    start_epoch = state["epoch"] + 1
    if run is not None:
        if pointer_file(cfg) is not None:
            pointer_file(cfg).write_text(str(run.dir))
        again = f"; restart {restart_count()}, from step {progress.step}" if restarted else ""
        print(f"{info.world_size} rank(s); {steps} steps per epoch; checkpoints every "
              f"{cfg.checkpoint_every} steps{again}")
    try:
        train(cfg, info, model, net, loader, val_set, optimizer, scheduler, run, start_epoch,
              progress, first_attempt=not cfg.resume and not restarted)
        test = part2.evaluate_shards(net, test_set, info)
        spread = part2.weights_spread(net, info)
    except KeyboardInterrupt as e:
        raise stopped(e, info, progress, run) from None
    except RuntimeError as e:
        if not (info.distributed and lost_peer(e)):
            raise
        # torchrun is about to stop this rank with SIGTERM: let the signal end the process
        # as is, not raise in whatever Python code runs then (an atexit callback: a traceback).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise LabError(f"rank {info.rank} lost contact with another rank at step "
                       f"{progress.step} ({one_line(e, 100)}); torchrun --max-restarts N starts "
                       "every rank again from the last checkpoint") from None
    del model, loader  # the DDP model goes before the process group
    teardown(info)
    if run is None:
        return {"rank": info.rank, "test_acc": test["acc"]}
    rows = run.rows
    title = f"CNN on {data.name}, {info.world_size} rank(s)"
    plot_history(rows, run.path("curves.png"), title=title)
    if pointer_file(cfg) is not None:
        pointer_file(cfg).unlink(missing_ok=True)
    return run.finish(test_acc=test["acc"], final_val_acc=rows[-1]["val_acc"],
                      final_train_loss=rows[-1]["train_loss"],
                      first_train_loss=rows[0]["train_loss"], steps=progress.step,
                      world_size=info.world_size,
                      global_batch=cfg.batch_size * cfg.accumulate * info.world_size,
                      restarts=restart_count(), weights_spread=spread,
                      images_per_s=rows[-1]["images_per_s"])


if __name__ == "__main__":
    launch(main, Config)
