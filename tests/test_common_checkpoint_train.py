"""common.checkpoint and common.train: round trip, resume, bad files, NaN guard, Ctrl-C."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.checkpoint import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from common.data import TensorLoader
from common.errors import CheckpointError, Interrupted, NonFiniteLoss
from common.runs import Run
from common.train import evaluate, fit, predict


class Tiny(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)


class Other(Tiny):
    """The same layers under another class name."""


def blobs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 3 * nn.functional.one_hot(y, 4).float()
    return x, y


def setup(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = blobs()
    return model, opt, sched, TensorLoader(x, y, 16), TensorLoader(x, y, 48)


class FakeRun:
    def __init__(self, path):
        self.dir, self.rows = path, []

    def path(self, name):
        return self.dir / name

    def log(self, **row):
        self.rows.append(row)


def test_round_trip_restores_model_optimizer_scheduler_epoch_config(tmp_path):
    model, opt, sched, train, val = setup()
    fit(model, train, val, opt, epochs=2, device=torch.device("cpu"), scheduler=sched, verbose=False)
    path = save_checkpoint(tmp_path / "c.pt", model, opt, sched, epoch=2, config={"lr": 0.1, "p": tmp_path})
    model2, opt2, sched2, *_ = setup(seed=1)
    payload = load_checkpoint(path, model2, opt2, sched2)
    assert payload["epoch"] == 2 and payload["config"] == {"lr": 0.1, "p": str(tmp_path)}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "the atomic write leaves no temp file"


def test_resume_continues_exactly_where_training_stopped(tmp_path):
    cpu = torch.device("cpu")
    model, opt, sched, train, val = setup()
    fit(model, train, val, opt, epochs=4, device=cpu, scheduler=sched, verbose=False)
    straight = [p.clone() for p in model.parameters()]

    model, opt, sched, train, val = setup()
    fit(model, train, val, opt, epochs=2, device=cpu, scheduler=sched, run=FakeRun(tmp_path), verbose=False)
    model, opt, sched, train, val = setup(seed=5)  # fresh objects, different init
    result = fit(model, train, val, opt, epochs=4, device=cpu, scheduler=sched, resume=tmp_path / "checkpoint.pt",
                 verbose=False)
    assert [r["epoch"] for r in result.rows] == [3, 4]
    for a, b in zip(straight, model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_missing_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    model = Tiny()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", model)
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        load_checkpoint(tmp_path / "junk.pt", model)
    good = save_checkpoint(tmp_path / "good.pt", model)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:300])  # a truncated download
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by these labs"):
        load_checkpoint(tmp_path / "bare.pt", model)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", Tiny(hidden=8))
    with pytest.raises(CheckpointError, match="holds a Tiny, not a Other"):
        load_checkpoint(path, Other())
    with pytest.raises(CheckpointError, match="another shape"):
        load_checkpoint(path, Tiny(hidden=16))


def test_pickled_code_is_not_executed_on_load(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        read_checkpoint(tmp_path / "evil.pt")


def test_loss_falls_and_accuracy_beats_chance():
    model, opt, _, train, val = setup()
    result = fit(model, train, val, opt, epochs=5, device=torch.device("cpu"), verbose=False)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    assert result.rows[-1]["val_acc"] > 0.8
    metrics = evaluate(model, val, nn.CrossEntropyLoss(), torch.device("cpu"))
    outputs, targets = predict(model, val, torch.device("cpu"))
    assert outputs.shape == (96, 3) and (outputs.argmax(1) == targets).float().mean().item() == metrics["acc"]


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    model, opt, _, train, val = setup()
    calls = {"n": 0}

    def poisoned(output, target):
        calls["n"] += 1  # 6 training batches per epoch; poison the 2nd epoch's 3rd batch
        loss = nn.functional.cross_entropy(output, target)
        return loss * float("nan") if calls["n"] > 6 and model.training and calls["n"] > 9 else loss

    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 2 .*last good checkpoint"):
        fit(model, train, val, opt, epochs=3, device=torch.device("cpu"), loss_fn=poisoned, run=FakeRun(tmp_path),
            verbose=False)
    payload = read_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    model, opt, _, train, val = setup()
    calls = {"n": 0}

    def interrupted(output, target):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(output, target)

    with pytest.raises(Interrupted, match="checkpoint saved to .*--resume") as info:
        fit(model, train, val, opt, epochs=3, device=torch.device("cpu"), loss_fn=interrupted,
            run=FakeRun(tmp_path), verbose=False)
    assert info.value.exit_code == 130
    assert read_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_early_stopping_restores_best_weights(tmp_path):
    model, opt, _, train, _ = setup()
    # Validation labels are a permutation of the truth: as the model learns, val loss rises.
    x, y = blobs()
    wrong = TensorLoader(x, (y + 1) % 3, 48)
    snapshots = {}

    class Spy(FakeRun):
        def log(self, **row):
            snapshots[row["epoch"]] = [p.clone() for p in model.parameters()]

    result = fit(model, train, wrong, opt, epochs=20, device=torch.device("cpu"), patience=2, run=Spy(tmp_path),
                 verbose=False)
    assert result.stopped_early and len(result.rows) == result.best_epoch + 2
    for a, b in zip(snapshots[result.best_epoch], model.parameters()):
        assert torch.equal(a, b)


def test_gradient_clipping_bounds_the_update():
    model, _, _, train, _ = setup()
    before = [p.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = blobs(16)
    fit(model, [(x * 1000, y)], None, opt, epochs=1, device=torch.device("cpu"), clip_grad=0.01, verbose=False)
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(before, model.parameters())))
    assert step.item() == pytest.approx(0.01, rel=1e-3)


def test_plateau_scheduler_gets_the_validation_loss():
    model, opt, _, train, _ = setup()
    x, y = blobs()
    wrong = TensorLoader(x, (y + 1) % 3, 48)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    result = fit(model, train, wrong, opt, epochs=4, device=torch.device("cpu"), scheduler=plateau, verbose=False)
    assert result.rows[-1]["lr"] < 0.1


def test_time_budget_stops_training(tmp_path):
    model, opt, _, train, val = setup()
    result = fit(model, train, val, opt, epochs=1000, device=torch.device("cpu"), time_budget_s=0.2, verbose=False)
    assert result.out_of_time and len(result.rows) < 1000


def test_fit_with_a_real_run_writes_metrics_and_checkpoint(tmp_path):
    from common.config import BaseConfig

    run = Run.start(BaseConfig(out=str(tmp_path)), "/x/week01_regression/demo.py", torch.device("cpu"), quiet=True)
    model, opt, _, train, val = setup()
    fit(model, train, val, opt, epochs=2, device=torch.device("cpu"), run=run, verbose=False)
    assert (run.dir / "checkpoint.pt").exists()
    assert (run.dir / "metrics.csv").read_text().startswith("epoch,train_loss,train_acc,val_loss,val_acc,lr")
