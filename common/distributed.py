"""Distributed data parallel (DDP) that also runs as a plain single process.

Launched by ``torchrun --nproc_per_node N script.py``, each process gets RANK, LOCAL_RANK and
WORLD_SIZE in its environment; started as ``python script.py`` there are none and everything
below degrades to a world of one. The backend is NCCL on GPUs and gloo on the CPU.

    dist_info = setup("auto")
    model = wrap(prepare_model(Net(), dist_info.device), dist_info)
    x, y = shard(x_train, y_train, dist_info)         # each rank trains on its own slice
    ... train; log and save only ``if dist_info.is_main`` ...
    del model                                          # drop the DDP model first (see teardown)
    teardown(dist_info)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from common.device import pick_device


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


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    if not launched_by_torchrun():
        return DistInfo(device=pick_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                **restart_store(rank, world))
    return DistInfo(rank, local_rank, world, device)


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
    return {"store": dist.PrefixStore(f"attempt{attempt}", store), "rank": rank, "world_size": world}


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
