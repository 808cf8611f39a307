"""Benchmarks: accuracy and time on real data (not run in CI, never a timed test).

    python benchmarks/run.py --list
    python benchmarks/run.py NAME [--data-dir DIR] [--device auto] [--repeat 3]
                                  [--set key=value ...]

Entries live in ``benchmarks/weekNN.py`` files, each with a dict ``ENTRIES`` of
``name -> Benchmark``. Every repeat runs in a fresh subprocess (so peak memory is per run);
the result file ``benchmarks/results/NAME.json`` holds the median metric, the median wall time,
every run, the peak resident memory, device, hardware, torch version and git commit, and one
line is printed. Targets of the form "faster than X" run X inside the same entry and report
the ratio, because this machine's absolute speed drifts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# A 1-minute load average above this is a busy machine; set for 2 cores.
BUSY_LOAD = float(os.environ.get("DL_LABS_BUSY_LOAD", 1.5))


@dataclass
class Benchmark:
    """``run(data_dir, device, options) -> {"metric": name, "value": number, ...extras}``."""

    run: Callable[[str, str, dict], dict]
    description: str
    higher_is_better: bool = True


def entries() -> dict[str, Benchmark]:
    found: dict[str, Benchmark] = {}
    sys.path.insert(0, str(HERE.parent))
    for module_file in sorted(HERE.glob("week[0-9][0-9]*.py")):
        module = importlib.import_module(f"benchmarks.{module_file.stem}")
        for name, bench in getattr(module, "ENTRIES", {}).items():
            if name in found:
                raise SystemExit(f"benchmark {name!r} is defined twice")
            found[name] = bench
    return found


def hardware() -> dict:
    info = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    import torch

    info["torch"] = str(torch.__version__)
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []  # Linux only
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def config_options(options: dict, config_cls: type, default_threads: int = 0,
                   extra_keys: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Split an entry's ``--set`` options into (fields of ``config_cls``, the entry's own keys).

    ``threads=N`` (default ``default_threads``; 0 keeps torch's default) sets torch's CPU
    threads here; any key that is neither a Config field nor in ``extra_keys`` stops the run
    with the list of known fields.
    """
    import dataclasses

    import torch

    options = dict(options)
    extra = {k: options.pop(k) for k in (*extra_keys, "threads") if k in options}
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(options) - known
    if unknown:
        raise SystemExit(f"error: unknown option(s) {sorted(unknown)}; "
                         f"Config fields: {sorted(known)}")
    threads = int(extra.get("threads", default_threads))
    if threads > 0:
        torch.set_num_threads(threads)
    return options, extra


def run_once(name: str, data_dir: str, device: str, options: dict) -> dict:
    """Run one benchmark in this process; returns its result with wall time and peak memory."""
    bench = entries()[name]
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    result = bench.run(data_dir, device, options)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    # CPU time of this process and the processes it waited for (an entry may time whole child
    # processes): steadier than wall time when others load the machine.
    own, children = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    result["cpu_s"] = round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 2)
    result["load_start"], result["load_end"] = round(load_start, 2), round(os.getloadavg()[0], 2)
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    result["peak_rss_mib"] = round(peak / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--data-dir", default="", help="data root holding the real data sets")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs (each a fresh process); the median is kept")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="an option for the entry (e.g. --set budget_s=60)")
    parser.add_argument("--once", metavar="JSON_OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    table = entries()
    if args.list:
        for name, bench in table.items():
            print(f"{name:22s} {bench.description}")
        return 0
    if args.name not in table:
        parser.error(f"unknown benchmark {args.name!r}; run with --list to see them")
    options = parse_options(args.options)
    if args.once:  # child process: run and hand the result back through a file
        result = run_once(args.name, args.data_dir, args.device, options)
        Path(args.once).write_text(json.dumps(result))
        return 0
    load_before = os.getloadavg()[0]
    if load_before > BUSY_LOAD:
        print(f"warning: load average {load_before:.2f} before the run (> {BUSY_LOAD}): "
              "wall times will be inflated; wait for a quiet machine, or compare cpu_s",
              file=sys.stderr)
    runs = []
    for i in range(max(args.repeat, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), args.name,
                   "--data-dir", args.data_dir, "--device", args.device, "--once", str(out),
                   *sum((["--set", o] for o in args.options), [])]
            child = subprocess.run(cmd)
            if child.returncode != 0:
                print(f"error: benchmark {args.name} run {i + 1} failed "
                      f"(exit {child.returncode})", file=sys.stderr)
                return child.returncode
            runs.append(json.loads(out.read_text()))
    bench = table[args.name]
    values = [r["value"] for r in runs]
    command = argv if argv is not None else sys.argv[1:]
    record = {
        "name": args.name,
        "description": bench.description,
        "metric": runs[0]["metric"],
        "value": statistics.median(values),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        # The 1-minute load average before and after: a figure measured on a busy machine is
        # not a result.
        "load_start": round(load_before, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "busy": load_before > BUSY_LOAD,  # the load during and after includes our own runs
        "repeats": len(runs),
        "runs": runs,
        "command": "python benchmarks/run.py " + " ".join(command),
        "device": args.device,
        "hardware": hardware(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    from common.io import atomic_write_text

    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(record, indent=2) + "\n")
    spread = f" (runs: {', '.join(f'{v:.4g}' for v in values)})" if len(values) > 1 else ""
    print(f"{args.name}: {record['metric']}={record['value']:.4g}{spread} wall={record['wall_s']}s "
          f"cpu={record['cpu_s']}s load={record['load_start']}->{record['load_end']} "
          f"peak_rss={record['peak_rss_mib']}MiB -> {RESULTS / (args.name + '.json')}")
    if record["busy"]:
        print(f"warning: the machine was busy (load above {BUSY_LOAD}) before {args.name}: "
              "its wall time is not a result; run it again alone", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
