"""common.runs and common.plots: the run folder, the index, the comparison."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from common.config import BaseConfig
from common.plots import confusion_matrix, plot_confusion, plot_curves, plot_history, plot_images
from common.runs import Run, compare_plot, compare_table, read_index, week_and_script
from common.runs import main as compare_main


@dataclass
class Config(BaseConfig):
    lr: float = 0.1  # step size


def start(tmp_path, lr=0.1, script="/x/week07_transformers/part2.py"):
    return Run.start(Config(lr=lr, out=str(tmp_path)), script, torch.device("cpu"), quiet=True)


def test_week_and_script_names():
    assert week_and_script("/a/week03_cnn/part2.py") == ("week03", "part2")
    assert week_and_script("/home/me/experiments/my_lab.py") == ("experiments", "my_lab")


def test_run_folder_has_config_metrics_and_summary(tmp_path):
    run = start(tmp_path)
    assert run.dir.parent == tmp_path / "week07" / "part2"
    meta = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert meta["config"]["lr"] == 0.1 and meta["environment"]["device"] == "cpu"
    assert meta["environment"]["torch"] == str(torch.__version__)
    run.log(epoch=1, loss=torch.tensor(2.5))
    run.log(epoch=2, loss=np.float64(1.5), acc=0.75)  # a new column appears later
    rows = list(csv.DictReader((run.dir / "metrics.csv").open()))
    assert rows == [{"epoch": "1", "loss": "2.5", "acc": ""},
                    {"epoch": "2", "loss": "1.5", "acc": "0.75"}]
    assert run.history("loss") == [2.5, 1.5]
    summary = run.finish(test_acc=0.9)
    on_disk = json.loads((run.dir / "summary.json").read_text())
    assert on_disk == summary and summary["test_acc"] == 0.9 and summary["wall_time_s"] >= 0
    assert summary["device"] == "cpu"


def test_two_runs_in_one_second_get_separate_folders(tmp_path):
    assert start(tmp_path).dir != start(tmp_path).dir


def test_index_and_comparison_table_and_plot(tmp_path, capsys):
    for lr in (0.1, 0.01):
        run = start(tmp_path, lr=lr)
        run.log(epoch=1, val_acc=0.5)
        run.log(epoch=2, val_acc=0.6 if lr == 0.1 else 0.7)
        run.finish(val_acc=0.6 if lr == 0.1 else 0.7)
    entries = read_index(tmp_path, "week07/part2")
    assert [e["config"]["lr"] for e in entries] == [0.1, 0.01]
    table = compare_table(entries)
    header = table.splitlines()[0].split()
    # Only the config fields that differ between the runs.
    assert header[:2] == ["run", "lr"] and "val_acc" in header and "seed" not in header
    assert "0.01" in table and "0.7" in table
    png = compare_plot(entries, "val_acc", tmp_path / "cmp.png")
    assert png.stat().st_size > 1000
    assert compare_main(["--out", str(tmp_path), "--plot", "val_acc"]) == 0
    assert "val_acc" in capsys.readouterr().out
    assert read_index(tmp_path / "nothing") == []


def test_plots_write_pngs(tmp_path):
    curves = {"a": [3, 2, 1], "b": [(1, 2), (2, 1)]}
    assert plot_curves(curves, tmp_path / "c.png", logy=True).stat().st_size > 0
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "train_acc": 0.5, "val_acc": 0.4},
            {"epoch": 2, "train_loss": 0.5, "val_loss": 0.9, "train_acc": 0.8, "val_acc": 0.6}]
    assert plot_history(rows, tmp_path / "h.png").exists()
    assert plot_images(np.random.rand(5, 3, 8, 8), tmp_path / "i.png",
                       titles=list("abcde")).exists()
    assert plot_confusion(np.eye(3) * 5, ["x", "y", "z"], tmp_path / "m.png").exists()
    assert not list(Path(tmp_path).glob(".*tmp")), "atomic writes leave no temp files"


def test_confusion_matrix_counts():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_compare_rejects_a_non_positive_last(capsys):
    import pytest

    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            compare_main(["--last", bad])
        assert "expected a whole number >= 1" in capsys.readouterr().err


def test_a_damaged_index_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = start(tmp_path)
    run.finish(acc=0.5)
    with open(tmp_path / "index.jsonl", "a") as f:
        f.write('{"week": "week07", "scr')  # a process killed mid-write
    assert len(read_index(tmp_path)) == 1
    assert "line 2 is damaged" in capsys.readouterr().err


def test_compare_plot_draws_one_line_per_model_of_a_run(tmp_path, monkeypatch):
    import common.plots

    run = start(tmp_path)
    for schedule in ("step", "cosine"):
        view = run.sub(schedule, schedule=schedule)
        for epoch in (1, 2):
            view.log(epoch=epoch, val_acc=0.5 + 0.1 * epoch)
    run.finish(acc=0.7)
    drawn = {}
    monkeypatch.setattr(common.plots, "plot_curves",
                        lambda curves, path, **kw: drawn.update(curves) or path)
    compare_plot(read_index(tmp_path), "val_acc", tmp_path / "p.png")
    assert sorted(label.split()[-1] for label in drawn) == ["cosine", "step"]
    assert all(len(points) == 2 for points in drawn.values())


def test_write_comparison_prints_and_saves_one_row_per_model(tmp_path, capsys):
    run = Run.start(BaseConfig(out=str(tmp_path)), "/x/week04_regularization/part2.py",
                    torch.device("cpu"), quiet=True)
    table = run.write_comparison({"cosine": {"val_loss": 1.25, "test_acc": 0.5},
                                  "step": {"val_loss": 1.5, "test_acc": 0.25}}, ["val_loss"],
                                 column="schedule")
    lines = table.splitlines()
    assert lines[0].split() == ["run", "schedule", "val_loss"] and len(lines) == 4
    assert lines[2].split()[1:] == ["cosine", "1.25"] and lines[3].split()[1:] == ["step", "1.5"]
    assert (run.dir / "comparison.txt").read_text() == table + "\n"
    assert table in capsys.readouterr().out


def test_log_shows_a_row_on_one_line_only_when_asked(tmp_path, capsys):
    run = Run.start(BaseConfig(out=str(tmp_path)), "/x/week03_cnn/part2.py", torch.device("cpu"),
                    quiet=True)
    run.log(epoch=1, train_loss=0.5)
    assert capsys.readouterr().out == ""
    run.log(show=True, epoch=2, train_loss=0.123456, per_class={"a": 1})
    assert capsys.readouterr().out == "epoch=2  train_loss=0.1235\n"
    assert [r["epoch"] for r in csv.DictReader((run.dir / "metrics.csv").open())] == ["1", "2"]
