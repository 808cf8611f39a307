"""common.distributed: the same code single-process and in a group of 2 gloo processes (forked,
each joining through torchrun's environment variables, with a timeout: no test can hang)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from common.distributed import (
    DistInfo,
    all_reduce_mean,
    check_world_size,
    setup,
    shard,
    spawn,
    teardown,
    threads_per_rank,
    wrap,
)
from common.errors import ConfigError, LabError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun puts in each worker's environment (OMP_NUM_THREADS=1: its default when it
    starts several workers)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def own_values(rank: int) -> torch.Tensor:
    """A different vector on every rank (the mean of ranks 0 and 1 is not either one)."""
    return torch.tensor([1.5 + rank, -4.0 * rank, 7.0])


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: DDP on its shard of a linear regression, then all_reduce_mean of its own values."""
    os.environ.update(torchrun_env(rank, world, port))
    info = setup("cpu", timeout_s=30)  # a rank that waits 30 s for the other fails, not hangs
    torch.manual_seed(info.rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = wrap(nn.Linear(3, 1), info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
    xs, ys = shard(x, y, info)
    for _ in range(20):
        opt.zero_grad()
        loss = ((model(xs).squeeze(1) - ys) ** 2).mean()
        loss.backward()
        opt.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    own = own_values(info.rank)
    mean = all_reduce_mean(own, info)
    torch.save({"weights": weights, "loss": all_reduce_mean(loss.detach(), info), "n": len(xs),
                "own": own, "mean": mean, "threads": torch.get_num_threads()},
               f"{out}/rank{info.rank}.pt")
    del model, opt
    teardown(info)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results of one 2-process gloo group (one start for the tests below)."""
    out = tmp_path_factory.mktemp("gloo")
    spawn(ddp_worker, 2, args=(2, free_port(), str(out)), timeout_s=90)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_gloo_ranks_end_with_identical_weights(two_ranks):
    r0, r1 = two_ranks
    assert r0["n"] == r1["n"] == 32
    assert torch.equal(r0["weights"], r1["weights"]), "DDP ranks drifted apart"
    assert torch.equal(r0["loss"], r1["loss"])
    assert r0["loss"].item() < 1.0  # and they learned


def test_all_reduce_mean_is_the_mean_of_the_ranks_own_values(two_ranks):
    """Not their sum (logged losses and Week 12's validation figures would be x world size)."""
    expected = (own_values(0) + own_values(1)) / 2
    for rank, result in enumerate(two_ranks):
        assert torch.equal(result["own"], own_values(rank)), "the input must be left as it was"
        torch.testing.assert_close(result["mean"], expected, rtol=0, atol=1e-6)


def test_each_rank_gets_its_share_of_the_cores(two_ranks):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert [r["threads"] for r in two_ranks] == [max(1, cores // 2)] * 2


def test_threads_per_rank(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's own default: replaced by the share
    assert threads_per_rank() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert threads_per_rank() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_rank() == 1


def hang(rank: int) -> None:
    if rank == 1:
        time.sleep(600)


def test_spawn_kills_a_group_that_does_not_finish_in_time():
    start = time.monotonic()
    with pytest.raises(LabError, match="did not finish in 2 s"):
        spawn(hang, 2, timeout_s=2)
    assert time.monotonic() - start < 30


def test_single_process_is_a_world_of_one(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert wrap(model, info) is model
    x, y = torch.zeros(5, 2), torch.zeros(5)
    assert shard(x, y, info)[0] is x
    assert all_reduce_mean(torch.tensor(3.0), info).item() == 3.0


def test_shard_gives_disjoint_equal_slices():
    x, y = torch.arange(11).view(11, 1), torch.arange(11)
    parts = [shard(x, y, DistInfo(rank=r, world_size=3))[1] for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == list(range(9))


def test_check_world_size_refuses_another_number_of_ranks(tmp_path):
    from common.checkpoint import save_checkpoint

    two = save_checkpoint(tmp_path / "two.pt", nn.Linear(2, 2), world_size=2)
    old = save_checkpoint(tmp_path / "old.pt", nn.Linear(2, 2))  # no world_size: one process
    check_world_size(str(two), DistInfo(world_size=2), "lab.py")
    check_world_size(str(old), DistInfo(), "lab.py")
    check_world_size("", DistInfo(world_size=3), "lab.py")
    with pytest.raises(ConfigError, match=r"that run had 2 rank\(s\), this one has 1; .* "
                                          r"torchrun --nproc_per_node 2 lab.py --resume"):
        check_world_size(str(two), DistInfo(), "lab.py")
    with pytest.raises(ConfigError, match=r"had 1 rank\(s\), this one has 2; .* python lab.py"):
        check_world_size(str(old), DistInfo(world_size=2), "lab.py")


def test_teardown_leaves_the_process_group_of_a_world_of_one(monkeypatch):
    """torchrun --nproc_per_node 1 still creates a process group; teardown must destroy it
    (NCCL warns about a leak at exit otherwise: seen on a GPU machine)."""
    for key, value in torchrun_env(0, 1, free_port()).items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        info = setup("cpu", timeout_s=30)
        assert dist.is_initialized() and not info.distributed
        teardown(info)
        assert not dist.is_initialized()
    finally:
        torch.set_num_threads(threads)  # setup gave this process the cores of a world of one
