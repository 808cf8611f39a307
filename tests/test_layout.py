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
SCRIPTS = sorted(p for p in ROOT.glob("week[0-9][0-9]_*/*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_there_are_weeks():
    assert WEEKS, "no week folders found"


@pytest.mark.parametrize("week", WEEKS, ids=lambda p: p.name)
def test_week_folder_has_the_required_files(week):
    assert re.fullmatch(r"week\d\d_[a-z0-9_]+", week.name), "week folders must be valid Python identifiers"
    for name in ("__init__.py", "part1.py", "part2.py", "README.md"):
        assert (week / name).is_file(), f"{week.name}/{name} is missing"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_anatomy(script):
    tree = ast.parse(script.read_text())
    doc = ast.get_docstring(tree)
    assert doc and f"python {script.parent.name}/{script.name}" in doc, \
        f"the module docstring should say how to run it: 'Run: python {script.parent.name}/{script.name} ...'"
    module = importlib.import_module(f"{script.parent.name}.{script.stem}")
    assert callable(getattr(module, "main", None)), "a script defines main(cfg) -> dict"
    config = getattr(module, "Config", None)
    assert config is not None and issubclass(config, BaseConfig), "a script's Config subclasses BaseConfig"
    comments = field_comments(config)
    missing = [f.name for f in dataclasses.fields(config) if f.name not in comments]
    assert not missing, f"Config fields without a '# comment' (their --help text): {missing}"
