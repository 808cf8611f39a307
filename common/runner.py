"""Running a lab from the command line: ``launch(main, Config)`` is what every script's
``if __name__ == "__main__":`` calls.

It parses the command line into ``Config`` (``common.config``), prints the presets it applied,
answers ``--resume`` of a finished run with its summary, and calls ``main(cfg)``. A ``LabError``
becomes one line on stderr and its exit code; Ctrl-C (exit 130) and SIGTERM (exit 143) print
where the last checkpoint is and how to go on, instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path

from common.config import resolve
from common.errors import Interrupted, LabError


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by ``kill``, ``timeout``, job schedulers): handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def launch(main, cls: type, argv: list[str] | None = None) -> dict:
    """Parse the command line into ``cls``, call ``main(cfg)``, and turn a LabError or Ctrl-C /
    SIGTERM into one line on stderr and a non-zero exit instead of a traceback."""
    from common.runs import Run, week_and_script

    module = sys.modules[main.__module__]
    module_doc = (module.__doc__ or "").strip() or None
    script = "/".join(week_and_script(module.__file__)) if getattr(module, "__file__", None) else ""
    Run.current = None
    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    resuming = ""
    try:
        resolved = resolve(cls, argv, description=module_doc, script=script)
        resuming = getattr(resolved.config, "resume", "")
        for note in resolved.preset_notes:
            print(note)
        finished = finished_run(resolved.config)
        return finished if finished is not None else main(resolved.config)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt as e:
        what, code = interruption(e)
        resumable = any(f.name == "resume" for f in dataclasses.fields(cls))
        print(f"{what}: {Run.interrupted_message(resuming, resumable)}", file=sys.stderr)
        raise SystemExit(code) from None


def finished_run(cfg) -> dict | None:
    """``--resume`` of a run that already finished, with no more epochs asked for: say so and
    return its summary, instead of training zero epochs (or tripping over a finished schedule).
    Finished means: the checkpoint has all its epochs (or was stopped early) and its run wrote
    a summary after that checkpoint; otherwise the script runs on and finishes the run."""
    resume = getattr(cfg, "resume", "")
    if not resume:
        return None
    import json

    from common.checkpoint import read_checkpoint

    payload = read_checkpoint(resume)
    done, stopped = payload["epoch"], bool(payload["extra"].get("stopped"))
    if not stopped and getattr(cfg, "epochs", done) > done:
        return None  # train on to the new total
    summary_path = Path(resume).parent / "summary.json"
    try:
        if summary_path.stat().st_mtime < Path(resume).stat().st_mtime:
            return None  # the checkpoint is newer than the summary: that run never finished
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None  # no summary (e.g. stopped during the final evaluation): finish the run
    why = "stopped early" if stopped else "finished its epochs"
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in summary.items()
                     if not isinstance(v, (dict, list)) and k != "run_dir")
    print(f"nothing to do: the run in {summary_path.parent} {why} at epoch {done}. "
          f"Its summary: {shown}")
    if not stopped:
        print(f"(to train on, pass --epochs with more than {done})")
    return summary


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()



def interruption(e: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the run, and the exit status for it: SIGTERM 143, Ctrl-C 130 (128 + signal)."""
    if isinstance(e, Terminated):
        return "terminated", 143
    return "interrupted", Interrupted.exit_code


def interrupted(e: KeyboardInterrupt, detail: str) -> Interrupted:
    """Ctrl-C / SIGTERM in a script that says itself what was kept (no --resume, or a
    comparison that cannot be resumed): one line "<interrupted|terminated> <detail>" with the
    matching exit status, raised instead of launch's generic message."""
    word, code = interruption(e)
    stopped = Interrupted(f"{word} {detail}")
    stopped.exit_code = code
    return stopped
