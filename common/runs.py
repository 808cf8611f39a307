"""One folder per run, and an index of runs to compare them.

    <out>/<weekNN>/<script>/<timestamp>/
        config.yaml    the resolved config, library versions, device
        metrics.csv    one row per epoch (or step)
        summary.json   final metrics, wall time, device (tests and benchmarks read this)
        *.png          plots
        checkpoint.pt  where there is a model

``<out>/index.jsonl`` gets one line per finished run. ``python -m common.runs`` prints the
index as a table (only the config fields that differ between runs) and plots a metric
of the chosen runs on one figure: the curriculum's "experiment log".
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from common.device import describe
from common.io import atomic_write_text


def week_and_script(script_file: str | Path) -> tuple[str, str]:
    """``.../week03_cnn/part2.py`` -> ("week03", "part2"); a copied script outside a week
    folder is filed under its folder's name."""
    path = Path(script_file).resolve()
    match = re.match(r"(week\d\d)", path.parent.name)
    return (match.group(1) if match else path.parent.name or "scripts"), path.stem


class Run:
    """The output folder of one run. Create it with ``Run.start(cfg, __file__, device)``."""

    current: Run | None = None  # the run in progress: Ctrl-C's message names its checkpoint

    def __init__(self, directory: Path, out: Path, week: str, script: str, config: dict,
                 device: torch.device):
        self.dir, self.out, self.week, self.script = directory, out, week, script
        self.config, self.device = config, device
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self.prefix, self.extra_columns = "", {}
        self.started = time.perf_counter()

    @property
    def name(self) -> str:
        """"week03/part2": checkpoints carry it, so a resume can refuse another script's file."""
        return f"{self.week}/{self.script}"

    @classmethod
    def start(cls, cfg, script_file: str | Path, device: torch.device, quiet: bool = False) -> Run:
        """A new run folder, or, when ``cfg.resume`` names a checkpoint, that run's own folder:
        a resumed run goes on in it, with the metrics rows saved up to the checkpoint."""
        week, script = week_and_script(script_file)
        config = cfg.to_dict()
        resume = getattr(cfg, "resume", "")
        if resume:
            from common.checkpoint import read_checkpoint
            from common.errors import CheckpointError

            payload = read_checkpoint(resume)
            # Checked before touching its folder.
            if payload.get("script") and payload["script"] != f"{week}/{script}":
                raise CheckpointError(f"{resume} was written by {payload['script']}, not "
                                      f"{week}/{script}; resume it with that script, "
                                      "or pass a checkpoint of this one")
            directory = Path(resume).parent
            resolved = directory.resolve()
            # <out>/<week>/<script>/<stamp>/checkpoint.pt: the index is <out>'s; a checkpoint moved
            # elsewhere keeps its own index beside it rather than writing into an unrelated folder.
            in_place = resolved.parent.name == script and resolved.parent.parent.name == week
            out = resolved.parents[2] if in_place else resolved
            rows = payload["extra"].get("rows", [])
            earlier_s = float(payload["extra"].get("wall_time_s", 0.0))
        else:
            out, earlier_s = Path(cfg.out).expanduser(), 0.0
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            directory = out / week / script / stamp
            n = 1
            while directory.exists():  # two runs in the same second get -2, -3, ...
                n += 1
                directory = out / week / script / f"{stamp}-{n}"
            try:
                directory.mkdir(parents=True)
            except OSError as e:
                from common.errors import LabError

                raise LabError(f"cannot create the run folder {directory} ({e.strerror or e}); "
                               "pass a writable --out") from None
            rows = []
        run = cls(directory, out, week, script, config, device)
        run.started -= earlier_s  # wall time of a resumed run counts its earlier processes too
        meta = {"script": run.name, "started": datetime.now().isoformat(timespec="seconds"),
                "config": config, "environment": describe(device)}
        if resume:
            meta["resumed_from"] = str(resume)
        atomic_write_text(directory / "config.yaml", yaml.safe_dump(meta, sort_keys=False))
        for row in rows:  # metrics.csv again holds exactly the epochs the checkpoint has seen
            run.log(**row)
        if not rows:
            (directory / "metrics.csv").unlink(missing_ok=True)
        if not quiet:
            settings = " ".join(f"{k}={v}" for k, v in config.items() if k != "device")
            print(f"[{run.name}] device={device} {settings}")
            print(f"[{run.name}] {'continuing in' if resume else 'writing to'} {directory}")
        Run.current = run
        return run

    def sub(self, prefix: str, **columns: Any) -> Run:
        """A view of this run for one of several models trained in it (e.g. one per schedule):
        file names get ``prefix_`` and every metrics row gets ``columns``; same folder and CSV."""
        view = copy.copy(self)
        view.prefix, view.extra_columns = f"{prefix}_", columns
        return view

    @staticmethod
    def interrupted_message(resuming: str = "", resumable: bool = True) -> str:
        """What Ctrl-C / SIGTERM prints: where the last checkpoint is and how to go on.
        ``resuming``: the checkpoint being resumed, still intact if we stopped before training;
        ``resumable``: whether the script has --resume at all (if not, never offer it)."""
        run = Run.current
        rank = int(os.environ.get("RANK") or 0)  # set by torchrun; rank 0 alone writes files
        if rank > 0 and run is None:
            return f"stopped (rank {rank}; rank 0 says what was saved and how to go on)"
        if not resumable:
            kept = f"what it finished is in {run.dir}" if run else "nothing was written"
            return f"stopped; {kept} (this script has no --resume: run it again to redo it)"
        checkpoints = sorted(run.dir.glob("*checkpoint.pt"),
                             key=lambda p: p.stat().st_mtime) if run else []
        if not checkpoints and resuming:
            return f"stopped; {resuming} is unchanged (continue with --resume {resuming})"
        if not checkpoints:
            return "stopped before a checkpoint was saved; nothing to resume"
        from common.checkpoint import read_checkpoint
        from common.errors import CheckpointError

        try:
            epoch = read_checkpoint(checkpoints[-1])["epoch"]
        except CheckpointError:
            return f"stopped; {checkpoints[-1]} could not be read back"
        return (f"stopped; the checkpoint of epoch {epoch} is {checkpoints[-1]} "
                f"(continue with --resume {checkpoints[-1]}; the unfinished epoch is redone)")

    def restore(self, model, optimizer=None, scheduler=None) -> dict[str, Any]:
        """The loop's starting point: ``{"epoch": 0}`` for a new run; for ``--resume`` the model,
        optimizer, scheduler and random-number state are loaded from the checkpoint and the
        dict holds its epoch and whatever the loop saved with it (early stopping's best, ...)."""
        from common.checkpoint import resume_state

        resume = self.config.get("resume", "")
        state = resume_state(resume, model, optimizer, scheduler, script=self.name)
        if resume:
            print(f"resumed from {resume} after epoch {state['epoch']}")
        return state

    def save_checkpoint(self, model, optimizer=None, scheduler=None, epoch: int = 0,
                        **extra: Any) -> Path:
        """``checkpoint.pt`` in this run's folder, with the config, the script's name and the
        metrics rows so far (a resumed run rewrites metrics.csv from them)."""
        from common.checkpoint import save_checkpoint

        rows = [r for r in self.rows if not self.extra_columns or
                all(r.get(k) == v for k, v in self.extra_columns.items())]
        return save_checkpoint(self.path("checkpoint.pt"), model, optimizer, scheduler, epoch=epoch,
                               config=self.config, script=self.name, rows=rows,
                               wall_time_s=round(time.perf_counter() - self.started, 3), **extra)

    def write_comparison(self, summaries: dict[str, dict], metrics: list[str],
                         column: str = "variant") -> str:
        """One model per key of ``summaries`` (a schedule, a mode, a setting...), compared in a
        table (``compare_table``): printed and written to ``comparison.txt``."""
        entries = [{"week": self.week, "script": self.script, "dir": name, "summary": summary,
                    "config": {**self.config, column: name}} for name, summary in summaries.items()]
        table = compare_table(entries, metrics=metrics)
        atomic_write_text(self.dir / "comparison.txt", table + "\n")
        print(table)
        return table

    def path(self, name: str) -> Path:
        return self.dir / (self.prefix + name)

    def log(self, show: bool = False, **metrics: Any) -> None:
        """Append one row (e.g. epoch=3, train_loss=..., val_acc=...) to metrics.csv, and print it
        as one line when ``show``.

        Rows are appended; only when a row brings a new column is the file rewritten (with the
        new header), so logging every step stays cheap.
        """
        row = {**self.extra_columns, **{k: _scalar(v) for k, v in metrics.items()}}
        self.rows.append(row)
        if show:
            print(format_row(row))
        path = self.dir / "metrics.csv"
        if self.columns and set(row) <= set(self.columns):
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
            return
        # In place: the list is shared with sub() views.
        self.columns[:] = list(dict.fromkeys([*self.columns, *row]))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(path, buffer.getvalue())

    def history(self, key: str) -> list:
        return [row[key] for row in self.rows if key in row]

    def finish(self, **summary: Any) -> dict:
        """Write summary.json, add the run to the index, and return the summary."""
        summary = {k: _scalar(v) for k, v in summary.items()}
        summary.update(wall_time_s=round(time.perf_counter() - self.started, 3),
                       device=str(self.device), run_dir=str(self.dir))
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        entry = {"week": self.week, "script": self.script, "dir": str(self.dir.resolve()),
                 "config": self.config, "summary": summary}
        with open(self.out / "index.jsonl", "a") as index:
            index.write(json.dumps(entry) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if k != "run_dir")
        print(f"[{self.name}] done: {shown}")
        Run.current = None
        return summary


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()  # NumPy scalars
    return value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_row(row: dict[str, Any]) -> str:
    """A metrics row as one line: ``epoch=3  train_loss=0.4121  val_acc=0.8533``."""
    return "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if not isinstance(v, (dict, list)))


# ----------------------------------------------------------------------------------------
# The experiment log: compare runs from the index
# ----------------------------------------------------------------------------------------
def read_index(out: str | Path, script: str | None = None) -> list[dict]:
    """Runs in ``<out>/index.jsonl``, oldest first; ``script`` filters on "weekNN/name"."""
    index = Path(out) / "index.jsonl"
    if not index.exists():
        return []
    entries = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        try:
            entries.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError:  # a line cut short by a killed process: skip it, say so
            print(f"warning: {index} line {number} is damaged; skipped", file=sys.stderr)
    # A resumed run that finished again (e.g. trained on) is one run: keep its last line.
    entries = list({str(Path(e["dir"]).resolve()): e for e in entries}.values())
    if script:
        entries = [e for e in entries
                   if f"{e['week']}/{e['script']}" == script or e["script"] == script]
    return entries


def compare_table(entries: list[dict], metrics: list[str] | None = None) -> str:
    """A plain-text table: one row per run, the config fields that differ, and metrics."""
    if not entries:
        return "no runs found"
    keys = list(dict.fromkeys(k for e in entries for k in e["config"]))
    varying = [k for k in keys if len({json.dumps(e["config"].get(k)) for e in entries}) > 1
               and k not in ("out", "data_dir")]
    if metrics is None:
        metrics = [k for k in dict.fromkeys(k for e in entries for k in e["summary"])
                   if k not in ("run_dir", "device")
                   and isinstance(entries[-1]["summary"].get(k), (int, float))]
    header = ["run", *varying, *metrics]
    rows = [[f"{e['week']}/{e['script']}/{Path(e['dir']).name}",
             *(_fmt(e["config"].get(k)) for k in varying),
             *(_fmt(e["summary"].get(k, "")) for k in metrics)] for e in entries]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def compare_plot(entries: list[dict], metric: str, path: str | Path,
                 x: str = "epoch") -> Path | None:
    """Plot ``metric`` against ``x`` from each run's metrics.csv on one figure."""
    from common.plots import plot_curves

    curves = {}
    for e in entries:
        csv_path = Path(e["dir"]) / "metrics.csv"
        if not csv_path.exists():
            continue
        for row in csv.DictReader(csv_path.open()):
            if row.get(metric) in (None, "") or not row.get(x):
                continue
            # One line per model: a run that trained several (e.g. one per schedule) has a column
            # naming it, and joining their rows would draw one zig-zag through all of them.
            model = (row.get("schedule") or row.get("variant") or row.get("optimizer")
                     or row.get("model"))
            label = " ".join(filter(None, [Path(e["dir"]).name, e["script"], model]))
            curves.setdefault(label, []).append((float(row[x]), float(row[metric])))
    if not curves:
        return None
    return plot_curves(curves, path, xlabel=x, ylabel=metric, title=f"{metric} by run")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare runs from the run index (the experiment log).")
    parser.add_argument("--out", default="runs",
                        help="the --out folder the runs wrote to (default: runs)")
    parser.add_argument("--script", help="only runs of this script, e.g. week02/optimizers")
    parser.add_argument("--last", type=_positive, default=20,
                        help="show the last N runs (default: 20)")
    parser.add_argument("--plot", metavar="METRIC",
                        help="also plot this metrics.csv column for each run")
    args = parser.parse_args(argv)
    entries = read_index(args.out, args.script)[-args.last:]
    print(compare_table(entries))
    if args.plot and entries:
        path = compare_plot(entries, args.plot, Path(args.out) / f"compare_{args.plot}.png")
        print(f"plot: {path}" if path else f"no run logged {args.plot!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
