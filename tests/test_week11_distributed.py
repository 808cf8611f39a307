"""Week 11: gradient averaging and the cost model against their formulas, ring all-reduce ==
dist.all_reduce across gloo processes (with a timeout: a wrong ring fails, it does not hang),
and DDP under torchrun: 2 ranks with batch B end with the weights of 1 process with batch 2B and
hold identical copies; every epoch trains on a new order; a rank killed mid-run under torchrun
--max-restarts (restart.py) is restarted from its step checkpoint and ends with Part 2's
uninterrupted weights; Ctrl-C + --resume in one process does the same; a 2-rank checkpoint is
not resumed by one process; the profiler trace has the regions.

Each torchrun start costs seconds (an agent and two workers importing torch): one per script,
in module fixtures shared by the tests, with a timeout that kills the agent and its ranks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.checkpoint import read_checkpoint, save_checkpoint
from common.distributed import DistInfo
from common.parity import assert_close
from tests.conftest import ROOT, offline_env, run_lab
from week11_distributed import part1, part2, profiling, restart
from week11_distributed.data import Images

REGIONS = ("data", "forward", "backward", "optimizer")


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them as one process)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["grad_avg_max_diff"] < 1e-12, summary
    assert summary["uneven_shards_max_diff"] > 0.01, summary
    assert summary["ring_ints_equal"] is True, "the ring's int sums must equal dist.all_reduce's"
    # float64: the ring adds the ranks' values in another order than gloo: rounding differences.
    assert summary["ring_float_max_diff"] < 1e-12, summary
    assert summary["ring_vs_exact_sum_max_diff"] < 1e-12, summary
    assert summary["ring_sent_elements"] == summary["ring_sent_formula"], "2(N-1)/N of the vector"
    assert summary["ps_time_s_at_max"] > 10 * summary["ring_time_s_at_max"], "at 64 workers"
    assert summary["dataparallel_same_output"] is True


def check_part2(summary: dict, rows: list[dict]) -> None:
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    # 10 classes: chance is 0.1. Measured (benchmarks/smoke_margins.py): 0.549; with --lr 1e-9
    # (nothing learns) 0.039, 0.26 under the threshold.
    assert summary["test_acc"] > 0.3, summary
    assert summary["weights_spread"] == 0 and summary["world_size"] >= 1


def check_restart(summary: dict, rows: list[dict]) -> None:
    check_part2(summary, rows)
    assert summary["restarts"] == 0 and summary["steps"] == int(rows[-1]["step"]), summary


def check_profiling(summary: dict, rows: list[dict]) -> None:
    run_dir = Path(summary["run_dir"])
    for name in profiling.VARIANTS:
        trace = json.loads((run_dir / f"trace_{name}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert set(REGIONS) <= names, f"trace_{name}.json lacks regions: {set(REGIONS) - names}"
        assert "aten::convolution_backward" in (run_dir / f"top_ops_{name}.txt").read_text()
        assert all(summary[f"{r}_ms_{name}"] > 0 for r in REGIONS), summary
    # Counts, not times: per-image loading runs its ops once per image, batched once per batch.
    assert summary["aten_calls_per_step_per_image"] > \
        summary["aten_calls_per_step_batched"] + summary["batch_size"]
    assert (run_dir / "bottleneck.png").exists() and len(rows) == 3


def check_throughput(summary: dict, rows: list[dict]) -> None:
    assert summary["settings"] == len(rows) == 4 * len(summary["precisions"]), (summary, rows)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert summary["best_images_per_s"] == max(float(r["images_per_s"]) for r in rows)
    assert (Path(summary["run_dir"]) / "throughput.png").exists()


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2, "restart.py": check_restart,
                  "profiling.py": check_profiling, "throughput.py": check_throughput}


# ------------------------------------------------------------------------------------------
# Part 1: the math, the ring, the cost model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_averaged_shard_gradients_equal_the_big_batch_gradient_of_torch(workers):
    rng = np.random.default_rng(workers)
    x, y, w = rng.normal(size=(24, 4)), rng.normal(size=24), rng.normal(size=4)
    x[::5, 1] = 0.0  # exact zeros among the inputs
    y[3::4] = x[3::4] @ w  # and residuals that are exactly zero
    wt = torch.tensor(w, requires_grad=True)
    ((torch.from_numpy(x) @ wt - torch.from_numpy(y)) ** 2).mean().backward()
    assert_close(part1.averaged_gradient(w, x, y, workers), wt.grad.numpy(), "averaged gradient")
    assert_close(part1.mse_gradient(w, x, y), wt.grad.numpy(), "big-batch gradient")


def test_a_plain_average_of_unequal_shards_is_not_the_big_batch_gradient():
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(30, 3)), rng.normal(size=30), rng.normal(size=3)
    small, big = part1.mse_gradient(w, x[:5], y[:5]), part1.mse_gradient(w, x[5:], y[5:])
    plain = np.mean([small, big], axis=0)
    weighted = (5 * small + 25 * big) / 30
    assert np.abs(plain - part1.mse_gradient(w, x, y)).max() > 1e-3
    assert_close(weighted, part1.mse_gradient(w, x, y), "size-weighted average")


def test_ring_all_reduce_equals_dist_all_reduce_on_an_odd_ring():
    """3 gloo processes; lengths shorter than the ring (empty chunks), uneven chunks, int64
    exact. A wrong chunk index deadlocks the ring: run_ring's timeout fails it instead."""
    sizes = [1, 2, 3, 7, 100]
    ranks = part1.run_ring(3, sizes, timed_elements=64, timeout_s=30)
    for rank in ranks:
        for row in rank["results"]:
            if row["equal_ints"] is not None:
                assert row["equal_ints"], row
            # float64: the same sums added in another order, so rounding-level differences only.
            assert row["max_abs_diff"] < 1e-12 and row["max_abs_diff_expected"] < 1e-12, row
    sent = {row["n"]: row["sent"] for row in ranks[0]["results"]}
    # 2(N-1) chunks; rank 0's chunks are 34, 33, 33
    assert sent[3] == 4 and sent[100] == 2 * (34 + 33), sent


def test_cost_model_formulas():
    n = np.array([1, 2, 4, 100])
    ps_worker, ps_link, ps_time = part1.parameter_server_cost(n, 1e6, 1e9, 0.0)
    ring_worker, _, ring_time = part1.ring_cost(n, 1e6, 1e9, 0.0)
    np.testing.assert_allclose(ps_link, 2e6 * n)  # the server's link: every push and pull
    np.testing.assert_allclose(ps_time, 2e-3 * n)
    np.testing.assert_allclose(ring_worker, [0.0, 1e6, 1.5e6, 1.98e6])  # 2(N-1)/N M -> 2M
    np.testing.assert_allclose(ring_time, [0.0, 1e-3, 1.5e-3, 1.98e-3])
    _, _, with_latency = part1.ring_cost(n, 1e6, 1e9, 1e-5)
    np.testing.assert_allclose(with_latency - ring_time, 2 * (n - 1) * 1e-5)  # latency grows with N
    assert np.all(ps_worker == 2e6)


# ------------------------------------------------------------------------------------------
# Part 2 in one process: every epoch a new order, Ctrl-C and --resume
# ------------------------------------------------------------------------------------------
def lab(tmp_path: Path, *argv: str, script=part2) -> dict:
    return run_lab(script.main, script.Config,
                   ["--out", str(tmp_path / "runs"), "--device", "cpu", *argv])


def final(out: Path, script: str = "part2") -> tuple[dict, dict[str, torch.Tensor]]:
    """The summary and final weights of the one run under ``out``."""
    (summary_path,) = out.glob(f"runs/week11/{script}/*/summary.json")
    checkpoint = read_checkpoint(summary_path.parent / "checkpoint.pt")
    return json.loads(summary_path.read_text()), checkpoint["model"]


SINGLE_ARGS = ("--smoke", "--batch-size", "32", "--epochs", "2")  # 14 steps per epoch, 28 in all


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, batch 32 (= 2 ranks x 8 x 2 accumulated), run in this process; it also
    records the indices of every training batch it loads (Images.__getitem__ gets a list)."""
    tmp = tmp_path_factory.mktemp("single")
    seen: list[torch.Tensor] = []
    load_batch = Images.__getitem__

    def spy(self, index):
        seen.append(torch.as_tensor(index).clone())
        return load_batch(self, index)

    with pytest.MonkeyPatch.context() as patch:
        for key, value in offline_env(tmp).items():
            patch.setenv(key, value)
        patch.setattr(Images, "__getitem__", spy)
        return lab(tmp, *SINGLE_ARGS), tmp, seen


def test_every_epoch_of_the_run_trains_on_a_new_order(single_run):
    """Without sampler.set_epoch every epoch repeats the first one's order, and the comparisons
    below (DDP vs one process, restarted vs not) would not see it: both sides share it."""
    _, _, seen = single_run
    assert len(seen) == 28 and all(len(batch) == 32 for batch in seen)
    first, second = torch.cat(seen[:14]), torch.cat(seen[14:])
    assert not torch.equal(first, second), "epoch 2 repeated epoch 1's batch order"
    for order in (first, second):
        assert len(set(order.tolist())) == len(order), "an example came twice in one epoch"


def test_each_rank_sees_its_own_shard_in_a_new_order_every_epoch():
    """train_one_epoch for rank 0 and rank 1 of 2 (no process group needed: a plain model)."""
    seen: dict[tuple[int, int], list[int]] = {}

    class Recorded(Images):
        def __getitem__(self, index):
            seen.setdefault(self.key, []).extend(torch.as_tensor(index).tolist())
            return super().__getitem__(index)

    x = torch.zeros(44, 1, 28, 28, dtype=torch.uint8)
    images = Recorded(x, torch.arange(44) % 10, 0.5, 1.0)
    model = part2.make_model(part2.Config(width=2, blocks=1), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for rank in (0, 1):
        loader = part2.make_loader(images, 4, DistInfo(rank=rank, world_size=2), seed=0)
        for epoch in (1, 2):
            images.key = (rank, epoch)
            part2.train_one_epoch(model, loader, optimizer, None, epoch, 1, torch.device("cpu"))
    for rank in (0, 1):
        assert len(seen[rank, 1]) == 20 and seen[rank, 1] != seen[rank, 2], seen
    for epoch in (1, 2):
        assert not set(seen[0, epoch]) & set(seen[1, epoch]), "the ranks' shards overlap"


class TestResume:
    """Ctrl-C in one process, then --resume: the uninterrupted weights, bit for bit."""

    def test_part2_goes_on_from_the_last_epoch(self, single_run, tmp_path, offline, ctrl_c, capsys):
        straight, straight_dir, _ = single_run
        ctrl_c(17)  # in epoch 2 (14 steps per epoch): the checkpoint is epoch 1's
        assert lab(tmp_path / "cut", *SINGLE_ARGS) == {"exit": 130}
        (checkpoint,) = (tmp_path / "cut" / "runs").glob("week11/part2/*/checkpoint.pt")
        err = capsys.readouterr().err
        assert f"the checkpoint of epoch 1 is {checkpoint}" in err and err.count("\n") == 1, err
        hook = ctrl_c(0)
        resumed = run_lab(part2.main, part2.Config, ["--resume", str(checkpoint)])
        assert hook.steps == 14, "the resumed run trains epoch 2 only"
        self.same_weights(checkpoint, straight_dir)
        assert resumed["test_acc"] == straight["test_acc"]
        assert resumed["run_dir"] == str(checkpoint.parent)

    def test_restart_py_goes_on_from_the_step_of_its_checkpoint(self, single_run, tmp_path, offline,
                                                              ctrl_c, capsys):
        """restart.py checkpoints every 4 steps under --smoke, mid-epoch too: Ctrl-C after step
        17 keeps step 16's, and --resume trains the 12 steps left, ending with the weights of
        Part 2's uninterrupted run (the same loader and train_step)."""
        straight, straight_dir, _ = single_run
        ctrl_c(17)
        assert lab(tmp_path / "cut", *SINGLE_ARGS, script=restart) == {"exit": 130}
        (checkpoint,) = (tmp_path / "cut" / "runs").glob("week11/restart/*/checkpoint.pt")
        err = capsys.readouterr().err
        assert f"the checkpoint of step 16 is {checkpoint}" in err and err.count("\n") == 1, err
        hook = ctrl_c(0)
        resumed = run_lab(restart.main, restart.Config, ["--resume", str(checkpoint)])
        assert hook.steps == 28 - 16, "the resumed run trains the remaining steps only"
        self.same_weights(checkpoint, straight_dir)
        assert resumed["test_acc"] == straight["test_acc"] and resumed["steps"] == 28
        # The interrupted epoch's loss counts its steps before and after the resume, once each.
        assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)

    @staticmethod
    def same_weights(checkpoint: Path, straight_dir: Path) -> None:
        _, expected = final(straight_dir)
        weights = read_checkpoint(checkpoint)["model"]
        for name, value in expected.items():
            assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("script, argv, message, code", [
    (restart, ["--crash-at-step", "3", "--crash-rank", "1"], "--crash-rank 1: this run has 1", 2),
    (part2, ["--batch-size", "500"], "fewer than one optimizer step's 500", 1),
    (part2, ["--lr", "0"], "--lr: must be in (0, 1000000]", 2),
], ids=["crash-rank", "batch-size", "lr"])
def test_impossible_settings_stop_with_one_line(tmp_path, offline, capsys, script, argv, message,
                                                code):
    assert lab(tmp_path, "--smoke", *argv, script=script) == {"exit": code}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "week11").exists()


def test_resume_refuses_a_foreign_or_damaged_checkpoint(tmp_path, offline, capsys):
    foreign = save_checkpoint(tmp_path / "f" / "checkpoint.pt", torch.nn.Linear(2, 2),
                              script="week03/part2")
    assert lab(tmp_path, "--resume", str(foreign)) == {"exit": 2}
    assert "written by week03/part2, not week11/part2" in capsys.readouterr().err
    damaged = tmp_path / "d" / "checkpoint.pt"
    damaged.parent.mkdir()
    damaged.write_bytes(foreign.read_bytes()[:300])
    assert lab(tmp_path, "--resume", str(damaged)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "corrupt or not a PyTorch file" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------
# Under torchrun: two ranks == one process; a killed rank restarted
# ------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; none found elsewhere). torchrun starts its
    ranks in sessions of their own, so killing the agent's process group would miss them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def torchrun(out: Path, script: Path, *args: str, restarts: int = 0, timeout: float = 150):
    """``torchrun --nproc_per_node 2 <script> --smoke ...``, offline. Past ``timeout`` the
    agent and its ranks are killed and the test fails: no test can hang."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.1", str(script), "--smoke",
           "--device", "cpu", "--out", str(out / "runs"), *args]
    agent = subprocess.Popen(cmd, cwd=out, env=offline_env(out), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(agent.pid), agent.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = agent.communicate()
        pytest.fail(f"torchrun {script} did not finish in {timeout} s; it and its ranks were "
                    f"killed. Its stderr ends:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, agent.returncode, stdout, stderr)


DDP_ARGS = ("--batch-size", "8", "--accumulate", "2", "--epochs", "2")  # 16 per rank per step


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Part 2 under torchrun with 2 ranks (one start, shared by the tests below)."""
    out = tmp_path_factory.mktemp("ddp")
    return torchrun(out, ROOT / "week11_distributed" / "part2.py", *DDP_ARGS), out


# restart.py, with rank 0 of the first attempt still exiting when torchrun's SIGTERM comes (a
# moment after rank 1 died): the window in which a Python SIGTERM handler would raise inside an
# atexit callback and print "Exception ignored ... Traceback". Without the sleep it is a race.
SLOW_EXIT = f"""
import atexit, os, runpy, sys, time
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "0":
    atexit.register(time.sleep, 3)
sys.argv[0] = {str(ROOT / "week11_distributed" / "restart.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory):
    """restart.py under torchrun --max-restarts 1: rank 1 dies after step 6 (checkpoints every
    4 steps under --smoke), torchrun starts both ranks again and they go on from step 4."""
    out = tmp_path_factory.mktemp("restarted")
    (out / "restart_slow_exit.py").write_text(SLOW_EXIT)
    crash = ("--crash-at-step", "6", "--crash-rank", "1")
    return torchrun(out, out / "restart_slow_exit.py", *DDP_ARGS, *crash, restarts=1), out


def test_two_ranks_with_batch_b_end_with_the_weights_of_one_process_with_batch_2b(ddp_run,
                                                                                  single_run):
    """Per rank: micro-batches of 8, 2 accumulated under no_sync, so B = 16 per step; one
    process: 32. The same steps on the same examples: the same weights, up to float rounding."""
    result, out = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, "clean teardown: no error at exit"
    summary, weights = final(out)
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["weights_spread"] == 0, "both ranks must hold identical weights"
    one, single_dir, _ = single_run
    _, single = final(single_dir)
    assert one["world_size"] == 1 and one["steps"] == summary["steps"] == 28
    init = part2.make_model(part2.Config(smoke=True, width=16), 10).state_dict()
    for name, value in single.items():
        # (an untrained weight would be equal anyway: the comparison would prove nothing)
        assert (value - init[name]).abs().max() > 1e-3, f"{name} did not train"
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5, msg=name)
    # The logged loss is the mean over both ranks' batches, as one process computes it.
    assert summary["first_train_loss"] == pytest.approx(one["first_train_loss"], abs=1e-5)
    # Each rank used its share of the cores (torchrun's OMP_NUM_THREADS=1 replaced by it).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert meta["environment"]["torch_threads"] == max(1, cores // 2)


def test_one_process_refuses_to_resume_a_two_rank_checkpoint(ddp_run, tmp_path, offline, capsys):
    """It would train with half the global batch and twice the steps, and overwrite the
    checkpoint (after which the 2-rank resume fails too)."""
    _, out = ddp_run
    (checkpoint,) = out.glob("runs/week11/part2/*/checkpoint.pt")
    copy = shutil.copytree(checkpoint.parent, tmp_path / "week11" / "part2" / "run")
    before = {path.name: path.read_bytes() for path in copy.iterdir()}
    resume = str(copy / "checkpoint.pt")
    argv = ["--resume", resume, "--epochs", "3", "--device", "cpu"]
    assert run_lab(part2.main, part2.Config, argv) == {"exit": 2}
    err = capsys.readouterr().err
    assert "that run had 2 rank(s), this one has 1" in err and err.count("\n") == 1, err
    assert "resume it the same way: torchrun --nproc_per_node 2 " in err, err
    assert err.rstrip().endswith(f"part2.py --resume {resume}"), err
    assert {path.name: path.read_bytes() for path in copy.iterdir()} == before, "files changed"


def test_a_rank_killed_under_torchrun_restarts_and_ends_with_the_uninterrupted_weights(
        ddp_run, restarted_run):
    crashed, out = restarted_run
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "fault injection: rank 1 exits abruptly after step 6" in crashed.stderr
    assert "restart 1, from step 4" in crashed.stdout, crashed.stdout[-2000:]
    # The surviving rank is stopped by torchrun's SIGTERM while it exits: no Python traceback.
    assert "Traceback" not in crashed.stderr, crashed.stderr[-3000:]
    assert "Exception ignored" not in crashed.stderr, crashed.stderr[-3000:]
    summary, weights = final(out, "restart")
    # The reference is Part 2's uninterrupted 2-rank run: the same loader and train_step, so
    # a bug restart.py shared with a straight run of itself would still show here.
    reference, expected = final(ddp_run[1])
    assert summary["restarts"] == 1 and summary["steps"] == reference["steps"] == 28
    for name, value in expected.items():
        assert torch.equal(weights[name], value), name
    assert summary["test_acc"] == reference["test_acc"]
    # The crash came mid-epoch 1: its loss still averages both ranks' batches, once each.
    assert summary["first_train_loss"] == pytest.approx(reference["first_train_loss"], rel=1e-5)
    assert not list(out.glob("runs/week11/restart/.torchrun-*")), "the restart note is removed"
