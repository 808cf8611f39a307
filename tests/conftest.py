"""Shared test fixtures: an offline environment for subprocess runs, and the repo root."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail at once


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a script run as a learner would, but with no network and no data:
    every proxy points at a closed local port and the data root is an empty folder."""
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = CLOSED_PORT
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    env["DL_LABS_DATA"] = str(tmp_path / "empty-data-root")
    env["DL_LABS_CACHE"] = str(tmp_path / "cache")
    env["MPLBACKEND"] = "Agg"
    # Two pytest workers share 2 cores: one thread per script avoids oversubscription.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_script(script: Path | str, *args: str, tmp_path: Path, cwd: Path | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python script args`` offline, capturing text output. The run is a child forked
    from a warm interpreter that has torch and the other libraries imported (tests/zygote.py),
    which saves ~3 CPU-s per run. Elsewhere than Linux (no fork on Windows; macOS libraries are
    not fork-safe) or with ``DL_LABS_TEST_FORK=0``, a fresh ``python`` runs it instead."""
    argv, env = [str(script), *args], offline_env(tmp_path)
    if sys.platform != "linux" or os.environ.get("DL_LABS_TEST_FORK", "1") == "0":
        return subprocess.run([sys.executable, *argv], cwd=cwd or tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return Zygote.get().run(argv, cwd or tmp_path, env, tmp_path, timeout)


class Zygote:
    """One warm interpreter per pytest process (tests/zygote.py), started on first use and
    ended with it (EOF on its stdin)."""

    _instance: Zygote | None = None

    def __init__(self):
        env = offline_env(Path(os.devnull))  # the run-independent part of a script's env
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        text=True, bufsize=1)
        self.pending = b""
        atexit.register(self.close)

    def close(self) -> None:
        """EOF ends the zygote; waiting for it counts its CPU time in ``time pytest``."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    @classmethod
    def get(cls) -> Zygote:
        if cls._instance is None or cls._instance.process.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def _answer(self, word: str, deadline: float | None) -> int:
        """The next ``word N`` line from the zygote, read from its raw pipe (a buffered reader
        could hold the line while select() waits on the pipe)."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            assert chunk, "the zygote ended (see the test's stderr)"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        assert line.startswith(word.encode() + b" "), f"zygote answered {line!r}"
        return int(line.split()[1])

    def run(self, argv: list[str], cwd: Path, env: dict, tmp_path: Path,
            timeout: float) -> subprocess.CompletedProcess:
        fd, out = tempfile.mkstemp(prefix="stdout-", dir=tmp_path)
        os.close(fd)
        err = out.replace("stdout-", "stderr-")
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": out, "stderr": err}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = self._answer("pid", deadline)
        try:
            code = self._answer("exit", deadline)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._answer("exit", None)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout) from None
        text = [Path(p).read_text(errors="replace") for p in (out, err)]
        for p in (out, err):
            os.unlink(p)
        return subprocess.CompletedProcess([sys.executable, *argv], code, *text)


def pytest_configure(config):
    """pytest-xdist runs one worker per core: torch in each worker must not also use every core,
    or the workers fight over them (measured: Week 4's tests 3x slower under load)."""
    import torch

    torch.set_num_threads(1)


def run_lab(main, config_cls, argv: list[str]) -> dict:
    """A script's command line run in this process (``common.runner.launch``): its summary, or
    ``{"exit": code}`` when it stopped with an error line or an interrupt."""
    from common.runner import launch

    try:
        return launch(main, config_cls, argv)
    except SystemExit as e:
        return {"exit": e.code}


class CtrlC:
    """Ctrl-C (KeyboardInterrupt) right after optimizer step ``at_step`` of this process (every
    optimizer's steps counted, 0: never), before the loop's ``scheduler.step()``; ``steps``
    counts the steps it saw. The resume tests interrupt a lab with it, then check ``--resume``.
    ``sigterm``: send this process a real SIGTERM instead, as ``kill`` would (only for a lab run
    through ``launch``/``run_lab``, whose handler turns it into ``Terminated``)."""

    def __init__(self, at_step: int = 0, sigterm: bool = False):
        self.at_step, self.sigterm, self.steps = at_step, sigterm, 0

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps == self.at_step and self.sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.steps == self.at_step:
            raise KeyboardInterrupt


@pytest.fixture
def ctrl_c():
    """``ctrl_c(at_step)`` hooks a CtrlC into every optimizer's ``step()`` (torch's global
    step hook), so a lab's own written-out loop is interrupted without changing its code.
    The hooks are removed when the test ends."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handles = []

    def install(at_step: int = 0, sigterm: bool = False) -> CtrlC:
        for handle in handles:  # one at a time: a new one replaces the last
            handle.remove()
        handles.clear()
        hook = CtrlC(at_step, sigterm)
        handles.append(register_optimizer_step_post_hook(hook))
        return hook

    yield install
    for handle in handles:
        handle.remove()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The same offline environment for code run inside the test process."""
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return tmp_path
