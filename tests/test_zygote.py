"""The warm interpreter behind run_script (tests/zygote.py) runs a script as ``python`` would:
the same argv, folder, environment, __main__, sys.path[0], output, exit status and atexit."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.conftest import run_script

PROBE = """
import atexit, json, os, sys
atexit.register(lambda: print("atexit ran"))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "name": __name__,
                  "path0": sys.path[0], "data": os.environ["DL_LABS_DATA"],
                  "stdin": sys.stdin.read(), "tty": sys.stdout.isatty()}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_forked_run_is_what_a_fresh_python_gives(tmp_path, monkeypatch, fork):
    monkeypatch.setenv("DL_LABS_TEST_FORK", fork)
    script = tmp_path / "folder" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    result = run_script(script, "3", "a b", tmp_path=tmp_path, cwd=script.parent)
    assert result.returncode == 3 and result.stderr == "to stderr\n"
    first, last = result.stdout.splitlines()
    assert json.loads(first) == {
        "argv": [str(script), "3", "a b"], "cwd": str(script.parent), "name": "__main__",
        "path0": str(script.parent), "data": str(tmp_path / "empty-data-root"), "stdin": "",
        "tty": False}
    assert last == "atexit ran"


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(tmp_path):
    script = tmp_path / "boom.py"
    script.write_text("def f():\n    raise ValueError('boom')\nf()\n")
    result = run_script(script, tmp_path=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("ValueError: boom")


def test_a_run_past_its_timeout_is_killed_and_the_zygote_serves_the_next(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(script, tmp_path=tmp_path, timeout=1)
    assert time.monotonic() - start < 10
    script.write_text("print('next')\n")
    assert run_script(script, tmp_path=tmp_path).stdout == "next\n"
