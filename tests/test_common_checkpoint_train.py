"""common.checkpoint and common.train: round trip, exact resume, damaged files, NaN guard,
Ctrl-C, SIGTERM."""

from __future__ import annotations

import io
import json
import random
import zipfile

import pytest
import torch
from torch import nn

from common.checkpoint import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from common.errors import CheckpointError, NonFiniteLoss
from common.loader import TensorLoader
from common.runs import Run
from common.train import check_finite, evaluate, fit, predict, train_epoch
from tests import tiny_lab
from tests.conftest import ROOT, run_lab, run_script


class Tiny(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)


class Other(Tiny):
    """The same layers under another class name."""


def setup(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = tiny_lab.blobs(96)
    return model, opt, TensorLoader(x, y, 16, shuffle=True), TensorLoader(x, y, 48)


def lab(tmp_path, *argv: str) -> dict:
    """Run tests/tiny_lab.py in this process as its command line would; the summary or the exit
    code."""
    return run_lab(tiny_lab.main, tiny_lab.Config, ["--out", str(tmp_path), *argv])


def final_weights(summary: dict) -> dict:
    from pathlib import Path

    return torch.load(Path(summary["run_dir"]) / "final_weights.pt", weights_only=True)


def checkpoint_of(tmp_path):
    (path,) = tmp_path.glob("*/tiny_lab/*/checkpoint.pt")
    return path


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def test_round_trip_restores_model_optimizer_scheduler_epoch_config_and_rng(tmp_path):
    model, opt, train, val = setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        train_epoch(model, train, opt)
        sched.step()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "c.pt", model, opt, sched, epoch=2,
                           config={"lr": 0.1, "p": tmp_path})
    expected_draw = torch.rand(3)
    model2 = Tiny()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    torch.manual_seed(123)
    payload = load_checkpoint(path, model2, opt2, sched2)
    assert payload["epoch"] == 2 and payload["config"] == {"lr": 0.1, "p": str(tmp_path)}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    buffer = opt.state_dict()["state"][0]["momentum_buffer"]
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(buffer)
    assert sched2.last_epoch == sched.last_epoch
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(torch.rand(3), expected_draw)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "the atomic write leaves no temp file"


def test_missing_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    model = Tiny()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", model)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by these labs"):
        load_checkpoint(tmp_path / "bare.pt", model)
    torch.save({"format": FORMAT, "model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(tmp_path / "partial.pt")


def damaged_files(good: bytes, seed: int = 0):
    """Truncations at many offsets, random bytes, text, flipped bytes, zips with wrong members."""
    rng = random.Random(seed)
    random_cuts = {rng.randrange(len(good)) for _ in range(12)}
    for cut in sorted({0, 1, 6, 100, 300, 1000, 5000, len(good) // 2, len(good) - 1} | random_cuts):
        if cut < len(good):
            yield f"truncated at {cut}", good[:cut]
    for n in (6, 64, 4096):
        yield f"{n} random bytes", bytes(rng.randrange(256) for _ in range(n))
    yield "text", b"hello\n"
    yield "yaml", b"format: dl-labs-checkpoint/1\nmodel: {}\n"
    for i in range(10):
        flipped = bytearray(good)
        for _ in range(8):
            flipped[rng.randrange(len(flipped))] ^= 0xFF
        yield f"flipped bytes {i}", bytes(flipped)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    yield "zip with a junk pickle", buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("something/else.txt", b"hi")
    yield "zip with other members", buffer.getvalue()


def test_fuzz_every_damaged_file_is_a_checkpoint_error_with_a_readable_reason(tmp_path):
    model = Tiny()
    opt = torch.optim.Adam(model.parameters())
    good = save_checkpoint(tmp_path / "good.pt", model, opt, epoch=3,
                           config={"lr": 1e-3}).read_bytes()
    loaded = 0
    for name, data in damaged_files(good):
        path = tmp_path / "bad.pt"
        path.write_bytes(data)
        try:
            load_checkpoint(path, Tiny(), torch.optim.Adam(Tiny().parameters()))
            loaded += 1  # a flip inside tensor data can leave a valid file: that is fine
        except CheckpointError as e:
            message = str(e)
            assert "\n" not in message and str(path) in message, f"{name}: {message!r}"
            endings = ("without --resume", "...)", "labs", "this run", "model")
            assert message.rstrip().endswith(endings) or ")" in message, \
                f"{name}: reason cut badly: {message!r}"
    assert loaded <= 10, "almost every damaged file must be refused"


def test_checkpoint_of_another_model_or_script_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", Tiny(hidden=8), script="week03/part2")
    with pytest.raises(CheckpointError, match="holds a Tiny, not a Other"):
        load_checkpoint(path, Other())
    with pytest.raises(CheckpointError, match="another shape"):
        load_checkpoint(path, Tiny(hidden=16))
    with pytest.raises(CheckpointError, match="written by week03/part2, not week02/part2"):
        load_checkpoint(path, Tiny(), script="week02/part2")


def test_pickled_code_is_not_executed_on_load(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        read_checkpoint(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------
def test_loss_falls_and_accuracy_beats_chance():
    model, opt, train, val = setup()
    rows = fit(model, opt, train, val, epochs=5)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 2
    assert rows[-1]["val_acc"] > 0.8
    metrics = evaluate(model, val)
    outputs, targets = predict(model, val)
    assert outputs.shape == (96, 3)
    assert (outputs.argmax(1) == targets).sum().item() / 96 == metrics["acc"]


def test_evaluate_and_predict_switch_to_eval_mode():
    """Dropout on during evaluation would give noisy, lower numbers; BN would use batch
    statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Dropout(0.9), nn.Linear(64, 3))
    x, y = tiny_lab.blobs(96)
    batches = TensorLoader(x, y, 32)
    model.train()
    first, second = predict(model, batches)[0], predict(model, batches)[0]
    assert torch.equal(first, second) and not model.training
    model.train()
    loss = evaluate(model, batches)["loss"]
    assert loss == pytest.approx(nn.functional.cross_entropy(model.eval()(x), y).item())


def test_check_finite_passes_numbers_and_stops_nan_and_inf():
    check_finite(torch.tensor(3.0), 1)
    check_finite(0.0, 1)
    message = r"loss became .* in epoch 4; stopped, keeping the last checkpoint"
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteLoss, match=message):
            check_finite(torch.tensor(bad), 4)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """Weights poisoned with NaN after step 8 (in epoch 2 of 6 steps each): the run stops with
    one line and exit 1, and the checkpoint on disk is epoch 1's, all finite."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []

    def poison(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 8:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))

    handle = register_optimizer_step_post_hook(poison)
    try:
        assert lab(tmp_path, "--epochs", "3", "--schedule", "none") == {"exit": 1}
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert "loss became nan in epoch 2; stopped, keeping the last checkpoint" in err
    payload = read_checkpoint(checkpoint_of(tmp_path))
    assert payload["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_a_run_writes_metrics_and_checkpoint(tmp_path):
    summary = lab(tmp_path, "--epochs", "2")
    run_dir = checkpoint_of(tmp_path).parent
    header = "epoch,train_loss,train_acc,val_loss,val_acc,lr"
    assert (run_dir / "metrics.csv").read_text().startswith(header)
    assert summary["epochs_done"] == 2 and summary["val_acc"] > 0.6
    payload = read_checkpoint(run_dir / "checkpoint.pt")
    assert payload["script"] == "tests/tiny_lab"
    assert [r["epoch"] for r in payload["extra"]["rows"]] == [1, 2]


def test_ctrl_c_on_a_rank_other_than_0_leaves_the_checkpoint_news_to_rank_0(monkeypatch):
    monkeypatch.setattr(Run, "current", None)  # under torchrun, rank 0 alone has a Run
    monkeypatch.setenv("RANK", "1")
    message = Run.interrupted_message()
    assert message.startswith("stopped (rank 1;") and "nothing to resume" not in message
    monkeypatch.setenv("RANK", "0")
    assert Run.interrupted_message() == "stopped before a checkpoint was saved; nothing to resume"


# ------------------------------------------------------------------------------------------
# Resume: Ctrl-C at any step, then --resume, ends with the uninterrupted run's weights
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, patience, stop_at", [
    ("onecycle", 0, 3),     # per-batch schedule, Ctrl-C in epoch 1 (no checkpoint yet)
    ("onecycle", 0, 9),     # ... in epoch 2, mid-epoch
    ("onecycle", 0, 18),    # ... on the last step of epoch 3
    ("step", 0, 14),        # per-epoch schedule (a callback)
    ("none", 1, 8),         # early stopping (a callback with state)
])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path, schedule, patience,
                                                                   stop_at, capsys, ctrl_c):
    args = ["--schedule", schedule, "--patience", str(patience), "--epochs", "4"]
    straight = lab(tmp_path / "straight", *args)
    ctrl_c(stop_at)
    assert lab(tmp_path / "cut", *args) == {"exit": 130}
    err = capsys.readouterr().err
    assert err.startswith("interrupted: stopped") and err.count("\n") == 1
    if stop_at <= 6:  # 6 steps per epoch: stopped before the first checkpoint
        assert "nothing to resume" in err
        return
    checkpoint = checkpoint_of(tmp_path / "cut")
    assert f"--resume {checkpoint}" in err
    steps = ctrl_c(0)
    resumed = lab(tmp_path / "cut", "--resume", str(checkpoint))
    done = (stop_at - 1) // 6 * 6  # the steps of the epochs in the checkpoint
    assert steps.steps == straight["epochs_done"] * 6 - done, \
        "the resumed run trains only what was left"
    assert resumed["run_dir"] == str(checkpoint.parent), "a resumed run continues its own folder"
    for name, value in final_weights(straight).items():
        assert torch.equal(value, final_weights(resumed)[name]), name
    assert resumed["epochs_done"] == straight["epochs_done"]
    rows = (checkpoint.parent / "metrics.csv").read_text().splitlines()
    straight_csv = checkpoint_of(tmp_path / "straight").parent / "metrics.csv"
    straight_rows = straight_csv.read_text().splitlines()
    # The last column, epoch_time_s, differs between any two runs.
    strip_time = lambda lines: [",".join(line.split(",")[:-1]) for line in lines]  # noqa: E731
    assert strip_time(rows) == strip_time(straight_rows), \
        "metrics.csv holds every epoch once, as uninterrupted"
    from common.runs import read_index

    assert [e["dir"] for e in read_index(tmp_path / "cut")] == [str(checkpoint.parent)], \
        "one run in the log"


def test_resume_of_a_finished_run_says_nothing_to_do_and_can_train_on(tmp_path, capsys):
    lab(tmp_path, "--epochs", "2")
    checkpoint = checkpoint_of(tmp_path)
    capsys.readouterr()
    again = lab(tmp_path, "--resume", str(checkpoint))
    out = capsys.readouterr().out
    assert "nothing to do" in out and "finished its epochs at epoch 2" in out and "--epochs" in out
    assert again["epochs_done"] == 2
    # The run's OneCycle was planned for 2 epochs.
    more = lab(tmp_path, "--resume", str(checkpoint), "--epochs", "4")
    assert more["epochs_done"] == 4
    lines = (checkpoint.parent / "metrics.csv").read_text().splitlines()[1:]
    lrs = [float(line.split(",")[5]) for line in lines]
    assert len(lrs) == 4 and lrs[3] < lrs[2], \
        "the schedule was stretched to the new total and anneals again"
    from common.runs import read_index

    assert len(read_index(tmp_path)) == 1


def test_resume_refuses_changed_settings_and_foreign_checkpoints(tmp_path, capsys):
    lab(tmp_path, "--epochs", "1")
    checkpoint = checkpoint_of(tmp_path)
    capsys.readouterr()
    assert lab(tmp_path, "--resume", str(checkpoint), "--lr", "0.5") == {"exit": 2}
    assert "--lr 0.5 differs from the run being resumed" in capsys.readouterr().err
    foreign = save_checkpoint(tmp_path / "foreign.pt", Tiny(), script="week03/part2")
    assert lab(tmp_path, "--resume", str(foreign), "--epochs", "3") == {"exit": 2}
    assert "written by week03/part2, not tests/tiny_lab" in capsys.readouterr().err
    assert lab(tmp_path, "--resume", str(checkpoint), "--epochs", "0") == {"exit": 2}
    capsys.readouterr()
    (tmp_path / "junk.pt").write_bytes(b"junk!!")
    before = sorted(p for p in tmp_path.rglob("*"))
    assert lab(tmp_path, "--resume", str(tmp_path / "junk.pt")) == {"exit": 2}
    assert "corrupt or not a PyTorch file" in capsys.readouterr().err
    assert sorted(p for p in tmp_path.rglob("*")) == before, "a failed --resume creates nothing"


def test_sigterm_saves_and_exits_with_one_line(tmp_path):
    result = run_script(ROOT / "tests" / "tiny_lab.py", "--out", str(tmp_path / "runs"),
                        "--signal-at", "15", tmp_path=tmp_path)
    assert result.returncode == 143, result.stderr
    assert result.stderr.startswith("terminated: stopped; the checkpoint of epoch 2") and \
        result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    (checkpoint,) = (tmp_path / "runs").glob("*/tiny_lab/*/checkpoint.pt")
    resumed = run_script(ROOT / "tests" / "tiny_lab.py", "--resume", str(checkpoint),
                         "--signal-at", "0", tmp_path=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((checkpoint.parent / "summary.json").read_text())["epochs_done"] == 4


def test_damaged_file_messages_say_what_is_wrong(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)
    good = save_checkpoint(tmp_path / "good.pt", Tiny()).read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(tmp_path / "cut.pt")


def test_ctrl_c_while_a_resume_starts_says_the_checkpoint_is_intact(tmp_path, capsys, monkeypatch):
    lab(tmp_path, "--epochs", "1")
    checkpoint = checkpoint_of(tmp_path)
    capsys.readouterr()

    def interrupted_start(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the data loads, before the run folder is opened

    monkeypatch.setattr(tiny_lab.Run, "start", interrupted_start)
    assert lab(tmp_path, "--resume", str(checkpoint), "--epochs", "2") == {"exit": 130}
    err = capsys.readouterr().err
    assert f"{checkpoint} is unchanged" in err and "nothing to resume" not in err


def test_a_longer_plan_replays_its_steps_from_the_start_not_from_the_decayed_rate():
    """--resume --epochs 12 of a cosine run planned for 6: the rate must be where a 12-epoch
    cosine has it after 6 epochs (half the peak), not replayed from the saved rate of ~0."""
    from common.checkpoint import restore_scheduler

    def cosine(t_max):
        opt = torch.optim.SGD(Tiny().parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)

    old_opt, old = cosine(6)
    for _ in range(6):
        old_opt.step()
        old.step()
    assert old_opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    new_opt, new = cosine(12)
    new_opt.load_state_dict(old_opt.state_dict())  # what load_checkpoint does first
    restore_scheduler(new, old.state_dict())
    assert new_opt.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-9)


def test_flipped_bytes_inside_the_weights_are_caught_by_the_zip_checksums(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", Tiny(hidden=256)).read_bytes()  # mostly weights
    damaged = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 16):  # the middle of the file: tensor data
        damaged[i] ^= 0x55
    (tmp_path / "bad.pt").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="checksum|corrupt"):
        read_checkpoint(tmp_path / "bad.pt")


def test_a_changed_switch_on_resume_is_named_as_typed(tmp_path, capsys):
    lab(tmp_path, "--epochs", "1", "--smoke")
    capsys.readouterr()
    assert lab(tmp_path, "--resume", str(checkpoint_of(tmp_path)), "--no-smoke") == {"exit": 2}
    assert "--no-smoke differs from the run being resumed (smoke=True)" in capsys.readouterr().err


def test_ctrl_c_in_a_script_without_resume_never_offers_resume(tmp_path, capsys):
    """A self-work script with no --resume flag (BaseConfig) may still save a checkpoint; after
    Ctrl-C its line says where the work is, never "continue with --resume"."""
    from dataclasses import dataclass

    from common.config import BaseConfig
    from common.runs import Run

    @dataclass
    class Config(BaseConfig):
        """No --resume here."""

    def main(cfg):
        run = Run.start(cfg, "/x/week05_transfer/data_size.py", torch.device("cpu"), quiet=True)
        run.save_checkpoint(Tiny(), epoch=1)
        raise KeyboardInterrupt

    assert run_lab(main, Config, ["--out", str(tmp_path)]) == {"exit": 130}
    err = capsys.readouterr().err
    assert err.startswith("interrupted: stopped; what it finished is in ") and "--resume" in err
    assert "continue with --resume" not in err and "has no --resume" in err
