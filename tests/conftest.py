"""Shared test fixtures: an offline environment for subprocess runs, and the repo root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.train import Callback, fit

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
    """Run ``python script args`` offline, capturing text output."""
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd or tmp_path, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def pytest_configure(config):
    """pytest-xdist runs one worker per core: torch in each worker must not also use every core,
    or the workers fight over them (measured: Week 4's tests 3x slower under load)."""
    import torch

    torch.set_num_threads(1)


def run_lab(main, config_cls, argv: list[str]) -> dict:
    """A script's command line run in this process (``common.config.run``): its summary, or
    ``{"exit": code}`` when it stopped with an error line or an interrupt."""
    from common.config import run

    try:
        return run(main, config_cls, argv)
    except SystemExit as e:
        return {"exit": e.code}


class CtrlC(Callback):
    """Ctrl-C (KeyboardInterrupt) right after optimizer step ``at_step`` (0: never); records the
    steps it saw. The resume tests interrupt a lab with it, then check ``--resume``."""

    def __init__(self, at_step: int = 0):
        self.at_step, self.steps = at_step, []

    def on_step_end(self, loop) -> None:
        self.steps.append(loop.step)
        if loop.step == self.at_step:
            raise KeyboardInterrupt


def fit_with(callback: Callback):
    """``common.train.fit`` with one more callback after the lab's own, to monkeypatch into a lab
    as its ``fit``."""
    return lambda *args, callbacks=(), **kwargs: fit(*args, callbacks=[*callbacks, callback], **kwargs)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The same offline environment for code run inside the test process."""
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return tmp_path
