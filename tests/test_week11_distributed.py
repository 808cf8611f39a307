"""Week 11: gradient averaging and the cost model against their formulas, ring all-reduce ==
dist.all_reduce across gloo processes, and DDP under torchrun: 2 ranks with batch B end with the
weights of 1 process with batch 2B and hold identical copies; a rank killed mid-run under
torchrun --max-restarts is restarted from the last checkpoint and ends with the uninterrupted
weights; Ctrl-C + --resume in one process does the same; the profiler trace has the regions.

The torchrun runs are shared between tests (a module fixture): each costs several seconds of
start-up (one agent and two workers importing torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import read_checkpoint, save_checkpoint
from common.parity import assert_close
from tests.conftest import offline_env, run_lab
from week11_distributed import part1, part2, profiling

REGIONS = ("data", "forward", "backward", "optimizer")


# ------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them as one process)
# ------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    assert summary["grad_avg_max_diff"] < 1e-12 and summary["uneven_shards_max_diff"] > 0.01, summary
    assert summary["ring_ints_equal"] is True, "the ring's integer sums must equal dist.all_reduce's exactly"
    # float64: the ring adds the ranks' values in another order than gloo, so rounding-level differences.
    assert summary["ring_float_max_diff"] < 1e-12 and summary["ring_vs_exact_sum_max_diff"] < 1e-12, summary
    assert summary["ring_sent_elements"] == summary["ring_sent_formula"], "each rank sends 2(N-1)/N of the vector"
    assert summary["ps_time_s_at_max"] > 10 * summary["ring_time_s_at_max"], "at 64 workers the ring wins"
    assert summary["dataparallel_same_output"] is True


def check_part2(summary: dict, rows: list[dict]) -> None:
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert summary["test_acc"] > 0.3, summary  # 10 classes: chance is 0.1
    assert summary["weights_spread"] == 0 and summary["world_size"] >= 1


def check_profiling(summary: dict, rows: list[dict]) -> None:
    run_dir = Path(summary["run_dir"])
    for name in profiling.VARIANTS:
        trace = json.loads((run_dir / f"trace_{name}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert set(REGIONS) <= names, f"trace_{name}.json lacks regions: {set(REGIONS) - names}"
        assert "aten::convolution_backward" in (run_dir / f"top_ops_{name}.txt").read_text()
        assert all(summary[f"{r}_ms_{name}"] > 0 for r in REGIONS), summary
    # Counts, not times: per-image loading runs its few ops once per image, batched loading once per batch.
    assert summary["aten_calls_per_step_per_image"] > summary["aten_calls_per_step_batched"] + summary["batch_size"]
    assert (run_dir / "bottleneck.png").exists() and len(rows) == 3


def check_throughput(summary: dict, rows: list[dict]) -> None:
    assert summary["settings"] == len(rows) == 4 * len(summary["precisions"]), (summary, rows)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert summary["best_images_per_s"] == max(float(r["images_per_s"]) for r in rows)
    assert (Path(summary["run_dir"]) / "throughput.png").exists()


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2, "profiling.py": check_profiling,
                  "throughput.py": check_throughput}


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
    plain = np.mean([part1.mse_gradient(w, x[:5], y[:5]), part1.mse_gradient(w, x[5:], y[5:])], axis=0)
    weighted = (5 * part1.mse_gradient(w, x[:5], y[:5]) + 25 * part1.mse_gradient(w, x[5:], y[5:])) / 30
    assert np.abs(plain - part1.mse_gradient(w, x, y)).max() > 1e-3
    assert_close(weighted, part1.mse_gradient(w, x, y), "size-weighted average")


def test_ring_all_reduce_equals_dist_all_reduce_on_an_odd_ring():
    """3 gloo processes; lengths shorter than the ring (empty chunks), uneven chunks, int64 exact."""
    sizes = [1, 2, 3, 7, 100]
    ranks = part1.run_ring(3, sizes, timed_elements=64)
    for rank in ranks:
        for row in rank["results"]:
            if row["equal_ints"] is not None:
                assert row["equal_ints"], row
            # float64: the same sums added in another order, so rounding-level differences only.
            assert row["max_abs_diff"] < 1e-12 and row["max_abs_diff_expected"] < 1e-12, row
    sent = {row["n"]: row["sent"] for row in ranks[0]["results"]}
    assert sent[3] == 4 and sent[100] == 2 * (34 + 33), sent  # 2(N-1) chunks; rank 0's chunks are 34, 33, 33


def test_cost_model_formulas():
    n = np.array([1, 2, 4, 100])
    ps_worker, ps_link, ps_time = part1.parameter_server_cost(n, 1e6, 1e9, 0.0)
    ring_worker, _, ring_time = part1.ring_cost(n, 1e6, 1e9, 0.0)
    np.testing.assert_allclose(ps_link, 2e6 * n)  # the server's link carries every worker's push and pull
    np.testing.assert_allclose(ps_time, 2e-3 * n)
    np.testing.assert_allclose(ring_worker, [0.0, 1e6, 1.5e6, 1.98e6])  # 2(N-1)/N M -> 2M
    np.testing.assert_allclose(ring_time, [0.0, 1e-3, 1.5e-3, 1.98e-3])
    _, _, with_latency = part1.ring_cost(n, 1e6, 1e9, 1e-5)
    np.testing.assert_allclose(with_latency - ring_time, 2 * (n - 1) * 1e-5)  # latency grows with N
    assert np.all(ps_worker == 2e6)


# ------------------------------------------------------------------------------------------
# Part 2 under torchrun: equivalence, identical ranks, kill and restart
# ------------------------------------------------------------------------------------------
def torchrun(tmp: Path, *args: str, restarts: int = 0):
    import subprocess

    tmp.mkdir(parents=True, exist_ok=True)
    env = offline_env(tmp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.1", str(Path(part2.__file__)),
           "--smoke", "--device", "cpu", "--out", str(tmp / "runs"), *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)


DDP_ARGS = ("--batch-size", "8", "--accumulate", "2", "--epochs", "2")  # per rank: 16 images per step


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """2 ranks uninterrupted, and 2 ranks where rank 1 dies after step 6 (checkpoints every 4)."""
    tmp = tmp_path_factory.mktemp("ddp")
    straight = torchrun(tmp / "straight", *DDP_ARGS)
    crashed = torchrun(tmp / "crashed", *DDP_ARGS, "--crash-at-step", "6", "--crash-rank", "1", restarts=1)
    return straight, crashed, tmp


def final(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    (summary_path,) = out.glob("runs/week11/part2/*/summary.json")
    return json.loads(summary_path.read_text()), read_checkpoint(summary_path.parent / "checkpoint.pt")["model"]


def lab(tmp_path: Path, *argv: str) -> dict:
    return run_lab(part2.main, part2.Config, ["--out", str(tmp_path / "runs"), "--device", "cpu", *argv])


SINGLE_ARGS = ("--smoke", "--batch-size", "32", "--epochs", "2")  # 2B, no accumulation: 14 steps per epoch


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, batch 32 (= 2 ranks x 8 x 2 accumulated), run in this process."""
    tmp = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in offline_env(tmp).items():
            patch.setenv(key, value)
        return lab(tmp, *SINGLE_ARGS), tmp


def test_two_ranks_with_batch_b_end_with_the_weights_of_one_process_with_batch_2b(ddp_runs, single_run):
    """Per rank: micro-batches of 8, 2 accumulated under no_sync, so B = 16 per step; one process: 32."""
    straight, _, tmp = ddp_runs
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "Traceback" not in straight.stderr, "clean teardown: no error at exit"
    summary, weights = final(tmp / "straight")
    assert summary["world_size"] == 2 and summary["global_batch"] == 32 and summary["restarts"] == 0
    assert summary["weights_spread"] == 0, "both ranks must hold identical weights"
    one, single_dir = single_run
    _, single = final(single_dir)
    assert one["world_size"] == 1 and one["steps"] == summary["steps"]
    init = part2.make_model(part2.Config(smoke=True, width=16), 10).state_dict()
    for name, value in single.items():
        assert (value - init[name]).abs().max() > 1e-3, f"{name} did not train"  # else equality proves nothing
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5, msg=name)


def test_a_rank_killed_under_torchrun_restarts_from_the_checkpoint_and_ends_with_the_same_weights(ddp_runs):
    straight, crashed, tmp = ddp_runs
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "fault injection: rank 1 exits abruptly after step 6" in crashed.stderr
    assert "restart 1, from step 4" in crashed.stdout, crashed.stdout[-2000:]
    summary, weights = final(tmp / "crashed")
    reference, expected = final(tmp / "straight")
    assert summary["restarts"] == 1 and summary["steps"] == reference["steps"]
    for name, value in expected.items():
        assert torch.equal(weights[name], value), name
    assert summary["test_acc"] == reference["test_acc"] and summary["final_train_loss"] == reference["final_train_loss"]
    # The crash came mid-epoch 1: its logged loss must still average both ranks' batches, not rank 0's twice.
    assert summary["first_train_loss"] == reference["first_train_loss"], (summary, reference)
    assert not list(tmp.glob("crashed/runs/week11/part2/.torchrun-*")), "the restart pointer is removed at the end"


class CtrlCAt:
    """Wraps part2.train_step: Ctrl-C after ``step`` steps; records the steps it ran."""

    def __init__(self, step: int = 0):
        self.step, self.calls, self.original = step, 0, part2.train_step

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            raise KeyboardInterrupt
        return self.original(*args, **kwargs)


def test_ctrl_c_then_resume_in_one_process_ends_with_the_uninterrupted_weights(single_run, tmp_path, offline,
                                                                              monkeypatch, capsys):
    straight, straight_dir = single_run  # 14 steps per epoch, checkpoints every 4 steps
    monkeypatch.setattr(part2, "train_step", CtrlCAt(17))  # in epoch 2, right after the checkpoint of step 16
    assert lab(tmp_path / "cut", *SINGLE_ARGS) == {"exit": 130}
    (checkpoint,) = (tmp_path / "cut" / "runs").glob("week11/part2/*/checkpoint.pt")
    err = capsys.readouterr().err
    assert f"interrupted at step 16; the checkpoint of step 16 is {checkpoint}" in err and err.count("\n") == 1, err
    monkeypatch.setattr(part2, "train_step", steps := CtrlCAt())
    resumed = lab(tmp_path / "cut", "--resume", str(checkpoint))
    assert steps.calls == 28 - 16, "the resumed run trains the remaining steps only"
    monkeypatch.undo()
    _, expected = final(straight_dir)
    weights = read_checkpoint(checkpoint)["model"]
    for name, value in expected.items():
        assert torch.equal(weights[name], value), name
    assert resumed["test_acc"] == straight["test_acc"] and resumed["run_dir"] == str(checkpoint.parent)


@pytest.mark.parametrize("argv, message, code", [
    (["--crash-at-step", "3", "--crash-rank", "1"], "--crash-rank 1: this run has 1 rank(s)", 2),
    (["--batch-size", "500"], "fewer than one optimizer step's 500", 1),
    (["--lr", "0"], "--lr: must be in (0, 1000000]", 2),
])
def test_impossible_settings_stop_with_one_line(tmp_path, offline, capsys, argv, message, code):
    assert lab(tmp_path, "--smoke", *argv) == {"exit": code}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "week11").exists()


def test_resume_refuses_a_foreign_or_damaged_checkpoint(tmp_path, offline, capsys):
    foreign = save_checkpoint(tmp_path / "f" / "checkpoint.pt", torch.nn.Linear(2, 2), script="week03/part2")
    assert lab(tmp_path, "--resume", str(foreign)) == {"exit": 2}
    assert "written by week03/part2, not week11/part2" in capsys.readouterr().err
    damaged = tmp_path / "d" / "checkpoint.pt"
    damaged.parent.mkdir()
    damaged.write_bytes(foreign.read_bytes()[:300])
    assert lab(tmp_path, "--resume", str(damaged)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "corrupt or not a PyTorch file" in err and err.count("\n") == 1, err
