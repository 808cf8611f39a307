"""Distributed data parallel (DDP) that also runs as a plain single process.

Launched by ``torchrun --nproc_per_node N script.py``, each process gets RANK, LOCAL_RANK and
WORLD_SIZE in its environment; started as ``python script.py`` there are none and everything
below degrades to a world of one. The backend is NCCL on GPUs and gloo on the CPU.

    info = setup("auto")                           # also: each rank's share of the CPU cores
    check_world_size(cfg.resume, info, __file__)   # a checkpoint resumes with its own world size
    model = wrap(prepare_model(Net(), info.device), info)
    x, y = shard(x_train, y_train, info)           # each rank trains on its own slice
    ... train; log and save only ``if info.is_main`` (save world_size=info.world_size) ...
    del model                                      # drop the DDP model first (see teardown)
    teardown(info)

``spawn(fn, n, args, timeout_s)`` runs ``fn(rank, *args)`` in n local processes (Week 11's ring,
tests) and kills them if they have not finished in time: a deadlocked group never hangs.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from common.device import pick_device
from common.errors import ConfigError, LabError, one_line


@dataclass
class DistInfo:
    rank: int = 0  # this process's index among all processes
    local_rank: int = 0  # its index on this machine: which GPU it drives
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes files, so N processes don't write N copies."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a world of one.
    ``timeout_s``: how long a collective may wait for the other ranks before it fails (torch's
    default: 30 minutes for gloo, 10 for NCCL); tests pass a short one so a deadlock fails."""
    if not launched_by_torchrun():
        return DistInfo(device=pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    torch.set_num_threads(threads_per_rank())
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend=backend, device_id=device_id, **timeout,
                                **restart_store(rank, world))
    return DistInfo(rank, local_rank, world, device)


def threads_per_rank() -> int:
    """CPU threads for one of the ranks torchrun started on this machine.

    torch's default is one thread per core in every process, so N ranks would run N threads per
    core and wait on each other's descheduled threads. torchrun therefore sets OMP_NUM_THREADS=1
    for its workers when it starts several, which leaves cores idle on a bigger machine. Each rank
    takes its share of the cores this process may run on (LOCAL_WORLD_SIZE ranks share them); an
    OMP_NUM_THREADS other than torchrun's 1 is the user's own choice and wins."""
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 1:
        return int(chosen)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def restart_store(rank: int, world: int) -> dict:
    """After ``torchrun --max-restarts`` started the workers again: a store whose keys are
    prefixed with the attempt number, for ``init_process_group(**restart_store(...))``.

    torchrun's agent keeps one key-value store for the whole job. Each rank publishes its
    address in it under the same key on every attempt, so on a restart a fast rank could read
    the address a dead rank published last time and fail with "Connection refused" (seen with
    gloo here). On a first attempt this returns {} and the default env:// rendezvous is used."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or "MASTER_ADDR" not in os.environ:
        return {}
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_it)
    return {"store": dist.PrefixStore(f"attempt{attempt}", store), "rank": rank,
            "world_size": world}


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel when there is more than one process: it broadcasts rank 0's
    weights at construction and all-reduces (averages) gradients during ``backward()``, so every
    rank takes the same optimizer step and the copies stay identical."""
    if not info.distributed:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(x: torch.Tensor, y: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of an in-memory data set: examples rank, rank + W, rank + 2W, ...
    Trimmed to equal sizes, because DDP deadlocks if one rank runs an extra step."""
    if not info.distributed:
        return x, y
    per_rank = len(x) // info.world_size
    idx = torch.arange(info.rank, per_rank * info.world_size, info.world_size)
    return x[idx], y[idx]


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over all ranks (e.g. a metric each rank computed on its shard)."""
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def check_world_size(resume: str, info: DistInfo, script_file: str | Path) -> None:
    """Refuse to resume a checkpoint with another number of ranks than the run that wrote it
    (saved as ``world_size`` with the checkpoint; one rank when absent). The global batch and the
    steps per epoch depend on it: one process going on from a 2-rank checkpoint would train with
    half the batch and twice the steps, and overwrite the checkpoint. Call it before the run
    folder is touched."""
    if not resume:
        return
    from common.checkpoint import read_checkpoint

    saved = int(read_checkpoint(resume)["extra"].get("world_size", 1))
    if saved == info.world_size:
        return
    script = os.path.relpath(script_file)
    how = f"torchrun --nproc_per_node {saved} {script}" if saved > 1 else f"python {script}"
    raise ConfigError(f"--resume {resume}: that run had {saved} rank(s), this one has "
                      f"{info.world_size}; the global batch and the steps per epoch depend on it, "
                      f"so resume it the same way: {how} --resume {resume}")


def teardown(info: DistInfo) -> None:
    """Leave the process group cleanly. Delete your DDP model *before* calling this (``del
    model``): gloo can abort at interpreter exit if a DDP model's communicators outlive the
    process group. A function cannot drop the caller's own reference for it, so it is the
    caller's line to write; here we collect what was dropped, wait for every rank and leave."""
    gc.collect()
    if dist.is_initialized():  # also a world of one started by torchrun: it has a process group too
        if info.distributed:
            dist.barrier()
        dist.destroy_process_group()


def spawn(fn, nprocs: int, args: tuple = (), timeout_s: float = 120) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` new processes and wait for all of them, at most
    ``timeout_s`` seconds: a deadlocked group (a rank waiting for a message that nobody sends)
    is killed and reported instead of waited on forever. A process that fails or dies raises
    LabError with its error. On Linux the processes are forked: no second import of torch."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = mp.start_processes(fn, args=args, nprocs=nprocs, start_method=method, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=5):
            if time.monotonic() >= deadline:
                raise LabError(f"{nprocs} processes did not finish in {timeout_s:g} s (a deadlock: "
                               "a rank waits for a message that never comes); they were killed")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        lines = str(e).strip().splitlines()  # a child's error: its traceback's last line says it
        raise LabError(f"a process failed: {one_line(ValueError(lines[-1] if lines else e), 300)}")\
            from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
