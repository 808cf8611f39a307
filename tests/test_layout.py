"""The contract of DESIGN.md 1-2 for every week folder and script, checked mechanically."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re

import pytest

from common.config import BaseConfig, field_comments
from tests.conftest import ROOT

WEEKS = sorted(p for p in ROOT.glob("week[0-9][0-9]_*") if p.is_dir())
SCRIPTS = sorted(p for p in ROOT.glob("week[0-9][0-9]_*/*.py")
                 if 'if __name__ == "__main__"' in p.read_text())


def test_there_are_weeks():
    assert WEEKS, "no week folders found"


@pytest.mark.parametrize("week", WEEKS, ids=lambda p: p.name)
def test_week_folder_has_the_required_files(week):
    assert re.fullmatch(r"week\d\d_[a-z0-9_]+", week.name), \
        "week folders must be valid Python identifiers"
    for name in ("__init__.py", "part1.py", "part2.py", "README.md"):
        assert (week / name).is_file(), f"{week.name}/{name} is missing"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_anatomy(script):
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree)
    command = f"python {script.parent.name}/{script.name}"
    assert doc and command in doc, \
        f"the module docstring should say how to run it: 'Run: {command} ...'"
    module = importlib.import_module(f"{script.parent.name}.{script.stem}")
    assert callable(getattr(module, "main", None)), "a script defines main(cfg) -> dict"
    config = getattr(module, "Config", None)
    assert config is not None and issubclass(config, BaseConfig), \
        "a script's Config subclasses BaseConfig"
    comments = field_comments(config)
    missing = [f.name for f in dataclasses.fields(config) if f.name not in comments]
    assert not missing, f"Config fields without a '# comment' (their --help text): {missing}"


PART2S = sorted(ROOT.glob("week[0-9][0-9]_*/part2.py"))
# Weeks whose Part 2 trains a network: the epoch loop is written out in the file the learner runs.
TRAINING_PART2S = PART2S


def test_part2s_are_short_enough_to_read():
    """DESIGN 8: a Part 2 is a lesson first: at most 300 lines, most about 250."""
    lengths = {p.parent.name: len(p.read_text().splitlines()) for p in PART2S}
    assert max(lengths.values()) <= 300, {k: v for k, v in lengths.items() if v > 300}
    assert sorted(lengths.values())[len(lengths) // 2] <= 250, lengths


@pytest.mark.parametrize("script", TRAINING_PART2S, ids=lambda p: p.parent.name)
def test_the_training_step_is_written_in_the_part2(script):
    """The loop in the lesson: backward() and an optimizer step in the file itself, not in
    common."""
    text = script.read_text()
    stepped = re.search(r"\w*optimizer\w*\.step\(\)|opt_\w+\.step\(\)", text)
    assert ".backward()" in text and stepped, \
        f"{script.parent.name}/part2.py should write its training step out " \
        "(backward, optimizer.step)"


def test_common_is_plumbing_that_imports_no_week():
    for path in sorted((ROOT / "common").glob("*.py")):
        imports = re.findall(r"^\s*(?:from|import) (week\d\d\w*)", path.read_text(), flags=re.M)
        assert not imports, \
            f"common/{path.name} imports a week ({imports}): lessons never live in common"


def test_a_copied_part2_runs_its_own_edited_loop(tmp_path):
    """A learner copies week03_cnn/part2.py elsewhere and changes one line of its loop: the copy
    runs that line (the loop is the file's own, not common's)."""
    import shutil

    from tests.conftest import run_script

    copy = tmp_path / "mine" / "cnn.py"
    copy.parent.mkdir()
    shutil.copy(ROOT / "week03_cnn" / "part2.py", copy)
    text = copy.read_text()
    line = "        scheduler.step()"
    assert text.count(line) == 1
    copy.write_text(text.replace(line, line + "; print('my step')", 1))
    out = tmp_path / "runs"
    result = run_script(copy, "--smoke", "--epochs", "1", "--out", str(out), tmp_path=tmp_path,
                        cwd=copy.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = len(list(out.glob("mine/cnn/*/summary.json")))
    assert steps == 1 and result.stdout.count("my step") > 1
