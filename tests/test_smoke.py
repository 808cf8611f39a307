"""Every runnable script in every week folder, run as a learner would with --smoke, offline,
and judged on the outcome it reports, not only on its exit status.

Scripts are discovered, not listed: a new script without a working --smoke fails here, and so
does one without an outcome check. Each week's test module declares ``SMOKE_OUTCOMES``:
``{"part2.py": check}``, where ``check(summary, rows)`` gets the summary.json and the
metrics.csv rows of the smoke run and asserts what the script claims (a loss that falls,
accuracy above chance on the twin, ...).
"""

from __future__ import annotations

import csv
import importlib
import json
import math

import pytest

from tests.conftest import ROOT, run_script

SCRIPTS = sorted(p for p in ROOT.glob("week[0-9][0-9]_*/*.py")
                 if 'if __name__ == "__main__"' in p.read_text())


def outcome_checks() -> dict[str, object]:
    """``"week02_mlp/part2.py" -> check`` from every tests/test_weekNN_*.py module."""
    checks = {}
    for module_path in sorted(ROOT.glob("tests/test_week[0-9][0-9]_*.py")):
        module = importlib.import_module(f"tests.{module_path.stem}")
        week = module_path.stem.removeprefix("test_")
        for script, check in getattr(module, "SMOKE_OUTCOMES", {}).items():
            checks[f"{week}/{script}"] = check
    return checks


def test_scripts_are_discovered_and_each_has_an_outcome_check():
    assert len(SCRIPTS) >= 3, "expected at least Week 1's scripts"
    checks = outcome_checks()
    missing = [name for name in (f"{p.parent.name}/{p.name}" for p in SCRIPTS)
               if name not in checks]
    assert not missing, f"scripts without an entry in their week's SMOKE_OUTCOMES: {missing}"


def numbers(value, key=""):
    """Every (key, number) in a summary, nested dicts and lists included."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{key}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, value


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_smoke_run(script, tmp_path):
    out = tmp_path / "runs"
    config = importlib.import_module(f"{script.parent.name}.{script.stem}").Config
    # Scripts without the flag run on the CPU.
    device = [] if "device" in config.UNUSED else ["--device", "cpu"]
    result = run_script(script, "--smoke", "--out", str(out), *device, tmp_path=tmp_path)
    assert result.returncode == 0, \
        f"{script.name} --smoke failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    summaries = list(out.glob("*/*/*/summary.json"))
    assert len(summaries) == 1, f"expected one run folder with summary.json, found {summaries}"
    summary = json.loads(summaries[0].read_text())
    assert summary["wall_time_s"] > 0 and summary["device"] == "cpu"
    run_dir = summaries[0].parent
    assert (run_dir / "config.yaml").exists()
    metrics = run_dir / "metrics.csv"
    assert metrics.exists() or any(run_dir.glob("*.png")), "a run should log metrics or plots"
    allowed_nan = set(summary.get("allowed_nan", []))  # e.g. a variant reported as diverged
    bad = [k for k, v in numbers(summary)
           if not math.isfinite(v) and k.split(".")[0] not in allowed_nan]
    assert not bad, f"non-finite figures in summary.json: {bad}"
    rows = list(csv.DictReader(metrics.open())) if metrics.exists() else []
    outcome_checks()[f"{script.parent.name}/{script.name}"](summary, rows)
