"""How far each smoke threshold in the tests stands from a broken run of the same script.

A threshold is only worth something if a real bug falls clearly under it. For each week's
``part2.py`` (and Week 12's ``part1.py``) this runs the ``--smoke`` run the tests run, then the
same run broken (a learning rate of 1e-9: the model does not learn), and prints the figures the
tests' ``check_part2`` thresholds. The tests quote these figures beside each threshold, which
stands at least 0.15 from the broken run's (issue 18). Offline, one thread per run, ~3 minutes:

    python benchmarks/smoke_margins.py                # every week
    python benchmarks/smoke_margins.py week03_cnn     # one week
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# script -> (the flags that break it, the summary figures its smoke check thresholds)
CASES = {
    "week01_regression/part2.py": (["--logistic-lr", "1e-9"],
                                   ["logistic_test_acc", "logistic_majority_acc"]),
    "week02_mlp/part2.py": (["--lr", "1e-9"], ["test_acc"]),
    "week03_cnn/part2.py": (["--lr", "1e-9"], ["test_acc"]),
    "week04_regularization/part2.py": (["--lr", "1e-9"], ["val_acc", "test_acc"]),
    "week05_transfer/part2.py": (["--lr", "1e-9"], ["val_acc", "test_acc"]),
    "week06_rnn/part2.py": (["--lr", "1e-9"], ["test_acc", "majority_baseline"]),
    "week07_transformer/part2.py": (["--lr", "1e-9"], ["val_acc", "test_acc"]),
    "week08_autoencoder/part2.py": (["--lr", "1e-9"], ["test_mse", "mean_image_mse"]),
    "week09_gan/part2.py": (["--lr", "1e-9"], ["fd", "fd_start", "classifier_val_acc"]),
    "week10_deploy/part2.py": (["--lr", "1e-9"], ["test_acc"]),
    "week11_distributed/part2.py": (["--lr", "1e-9"], ["test_acc"]),
    "week12_capstone/part1.py": (["--baseline-lr", "1e-9"],
                                 ["baseline_val_acc", "baseline_test_acc"]),
    "week12_capstone/part2.py": (["--lr", "1e-9"], ["val_acc", "test_acc"]),
}


def smoke(script: str, flags: list[str]) -> dict:
    """The summary.json of ``python script --smoke flags`` run offline on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "DL_LABS_DATA": str(Path(tmp) / "no-data"), "DL_LABS_CACHE": str(Path(tmp) / "c")}
        command = [sys.executable, str(ROOT / script), "--smoke", "--out", tmp, *flags]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"{script} {' '.join(flags)} failed: {result.stderr[-500:]}")
        return json.loads(next(Path(tmp).glob("*/*/*/summary.json")).read_text())


def main(weeks: list[str]) -> None:
    for script, (broken, keys) in CASES.items():
        if weeks and script.split("/")[0] not in weeks:
            continue
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        device = [] if "device" in module.Config.UNUSED else ["--device", "cpu"]
        runs = {"smoke": smoke(script, device), "broken": smoke(script, [*device, *broken])}
        for key in keys:
            figures = "  ".join(f"{name} {runs[name][key]:.3f}" for name in runs)
            print(f"{script:32s} {key:22s} {figures}   (broken: {' '.join(broken)})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
