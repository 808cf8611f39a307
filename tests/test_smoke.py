"""Every runnable script in every week folder, run as a learner would with --smoke, offline.

Scripts are discovered, not listed: a new script without a working --smoke fails here.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_script

SCRIPTS = sorted(p for p in ROOT.glob("week[0-9][0-9]_*/*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_scripts_are_discovered():
    assert len(SCRIPTS) >= 3, "expected at least Week 1's scripts"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_smoke_run(script, tmp_path):
    out = tmp_path / "runs"
    result = run_script(script, "--smoke", "--out", str(out), "--device", "cpu", tmp_path=tmp_path)
    assert result.returncode == 0, f"{script.name} --smoke failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    summaries = list(out.glob("*/*/*/summary.json"))
    assert len(summaries) == 1, f"expected one run folder with summary.json, found {summaries}"
    summary = json.loads(summaries[0].read_text())
    assert summary["wall_time_s"] > 0 and summary["device"] == "cpu"
    run_dir = summaries[0].parent
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "metrics.csv").exists() or any(run_dir.glob("*.png")), "a run should log metrics or plots"
    assert "Traceback" not in result.stderr
