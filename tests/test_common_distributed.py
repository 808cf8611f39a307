"""common.distributed: the same script single-process and under torchrun (gloo, 2 ranks)."""

from __future__ import annotations

import textwrap

import torch

from common.distributed import DistInfo, all_reduce_mean, setup, shard, wrap
from tests.conftest import run_script

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from common.distributed import all_reduce_mean, setup, shard, teardown, wrap

    info = setup("cpu")
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
    mean_loss = all_reduce_mean(loss, info)
    torch.save({"weights": weights, "loss": mean_loss, "n": len(xs)}, f"{sys.argv[1]}/rank{info.rank}.pt")
    del model, opt
    teardown(info)
''')


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


def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_lab.py"
    script.write_text(SCRIPT)
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), tmp_path=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["n"] == r1["n"] == 32
    assert torch.equal(r0["weights"], r1["weights"]), "DDP ranks drifted apart"
    assert torch.equal(r0["loss"], r1["loss"])
    assert r0["loss"].item() < 1.0  # and they learned


def test_teardown_leaves_the_process_group_of_a_world_of_one(monkeypatch):
    """torchrun --nproc_per_node 1 still creates a process group; teardown must destroy it
    (NCCL warns about a leak at exit otherwise: seen on a GPU machine)."""
    import socket

    import torch.distributed as dist

    from common.distributed import teardown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    info = setup("cpu")
    assert dist.is_initialized() and not info.distributed
    teardown(info)
    assert not dist.is_initialized()
