"""A warm Python for the tests' script runs (``tests.conftest.run_script``).

Each ``python week03_cnn/part2.py --smoke`` spends about 3 CPU-seconds importing torch,
torchvision, matplotlib and the export and service libraries before the lesson starts; the suite
runs some fifty such scripts. This process imports those libraries once (none of them starts a
thread at import, and it runs no torch op, so it is safe to fork) and then forks one child per
request. The child becomes the script as ``python SCRIPT ARGS`` would run it: its own argv,
working folder, environment, ``sys.path[0]``, ``__main__`` module, stdin from /dev/null, stdout
and stderr to files, atexit handlers and exit status. Only the libraries are shared: the
project's own modules are imported fresh in each child, so a setting read at import time sees
the child's environment.

Protocol, one JSON line per request on stdin:
``{"argv": [script, ...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path}``;
answers on stdout: ``pid N`` when the child starts, then ``exit CODE`` when it ends (a signal
as a negative code, as subprocess reports it). EOF on stdin ends the zygote.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys
import traceback

PRELOAD = ("matplotlib.pyplot", "numpy", "yaml", "scipy.optimize", "sklearn.datasets",
           "sklearn.linear_model", "torch", "torch.export._trace", "torchvision",
           "torch.onnx._internal.exporter._core", "onnx", "onnxscript.function_libs.torch_lib.ops",
           "fastapi", "httpx", "uvicorn")
os.environ.setdefault("MPLBACKEND", "Agg")
for name in PRELOAD:
    with contextlib.suppress(ImportError):  # an extra not installed: its scripts import it
        importlib.import_module(name)


def become(request: dict) -> None:
    """In the forked child: turn into ``python argv...`` and never return."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    sys.exit(code)  # the normal interpreter exit: atexit handlers, flushed streams


def serve() -> None:
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        reply.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            become(request)  # raises SystemExit: the child leaves this loop and exits
        print(f"pid {pid}", file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"exit {code}", file=reply, flush=True)


if __name__ == "__main__":
    serve()
