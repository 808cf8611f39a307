"""Week 10 benchmarks: ONNX Runtime vs eager PyTorch at batch 1, and the service under load.

    python benchmarks/run.py serve_mnist --data-dir DATA [--set duration=10 --set epochs=1]
    python benchmarks/run.py serve_cifar10 --data-dir DATA [--set epochs=2]

Each entry, in one run:
1. trains the served model with week10_deploy/part2.py (the Week 3 CNN, real data, a few
   epochs; accuracy is reported, but the speed figures below do not depend on it) and writes
   its bundle;
2. times one image (batch 1) through the eager ``nn.Module`` (+ normalization) and through ONNX
   Runtime, both on one thread (how the service runs them), and reports the ratio;
3. starts the README's uvicorn command as a separate process for each backend (onnx, torch) and
   loads it from this process over loopback, both sharing the machine's cores: a closed loop
   of ``concurrency`` clients (requests/s, errors) and an open loop at ``rate`` requests/s
   (p50/p95/p99 latency counted from when each request was due), PNG uploads.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from benchmarks.run import Benchmark

ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {"epochs": {"mnist": 1, "cifar10": 1}, "duration": 10.0, "concurrency": 50, "rate": 100.0,
            "repeats": 2000, "warmup": 2.0}


def train_and_bundle(dataset: str, data_dir: str, epochs: int, out: str) -> tuple[dict, Path, torch.nn.Module]:
    from common.config import parse_config
    from common.data import load
    from week10_deploy import part2

    cfg = parse_config(part2.Config, ["--dataset", dataset, "--data-dir", data_dir, "--epochs", str(epochs),
                                      "--out", out, "--load-seconds", "0", "--n-check", "1000", "--device", "cpu"])
    summary = part2.main(cfg)
    data = load(dataset, data_dir)
    model = part2.checkpoint_model(str(Path(summary["run_dir"]) / "checkpoint.pt"), data).eval()
    return summary, Path(summary["bundle"]), model


def reuse_run(run_dir: Path, dataset: str, data_dir: str) -> tuple[dict, Path, torch.nn.Module]:
    import json

    from common.data import load
    from week10_deploy import part2

    summary = json.loads((run_dir / "summary.json").read_text())
    model = part2.checkpoint_model(str(run_dir / "checkpoint.pt"), load(dataset, data_dir)).eval()
    return summary, run_dir / "bundle", model


def batch1_latency(bundle: Path, model: torch.nn.Module, repeats: int) -> dict:
    """Median ms for one image: eager PyTorch (normalize + nn.Module) vs ONNX Runtime, 1 thread each."""
    from common.export import read_bundle
    from week10_deploy.part1 import median_ms
    from week10_deploy.standalone.predict_onnx import OnnxClassifier

    meta = read_bundle(bundle)
    torch.set_num_threads(1)
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    x = torch.rand(1, *meta["input_shape"])

    def eager(t):
        with torch.inference_mode():
            return model((t - mean) / std)

    onnx = OnnxClassifier(bundle, meta, threads=1)
    eager_ms = median_ms(eager, x, repeats)
    onnx_ms = median_ms(onnx.logits, x.numpy(), repeats)
    program = torch.export.load(bundle / "model.pt2").module()
    with torch.inference_mode():
        pt2_ms = median_ms(program, x, repeats)
    return {"eager_ms_batch1": eager_ms, "onnx_ms_batch1": onnx_ms, "pt2_ms_batch1": pt2_ms,
            "onnx_speedup_batch1": eager_ms / onnx_ms}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(bundle: Path, backend: str, opts: dict) -> dict:
    """The README's uvicorn command for ``backend``, loaded closed-loop then open-loop."""
    from week10_deploy.load_test import closed_loop, load, request_body
    from week10_deploy.service import free_port

    port = free_port()
    env = {**os.environ, "DL_LABS_BUNDLE": str(bundle), "DL_LABS_BACKEND": backend, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "week10_deploy.service:app_from_env", "--factory",
                               "--port", str(port), "--log-level", "warning", "--no-access-log"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                meta = httpx.get(url + "/metadata", timeout=2, trust_env=False).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: the {backend} service did not start") from None
                time.sleep(0.2)
        body, headers = request_body(meta["input_shape"], "png")
        results = {}
        asyncio.run(closed_loop(url, body, headers, opts["concurrency"], opts["warmup"]))  # warm-up, not counted
        for mode in ("closed", "open"):
            server_cpu, client_cpu = cpu_seconds(server.pid), cpu_seconds()
            results.update(asyncio.run(load(url, body, headers, mode, opts["concurrency"], opts["rate"],
                                            opts["duration"])))
            answered = results[f"{mode}_requests"]
            # CPU time per request, server and load client: what the cores cost whatever else runs on them
            results[f"{mode}_server_cpu_ms_per_request"] = 1000 * (cpu_seconds(server.pid) - server_cpu) / answered
            results[f"{mode}_client_cpu_ms_per_request"] = 1000 * (cpu_seconds() - client_cpu) / answered
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {f"{backend}_{k}": v for k, v in results.items()}


def serving_benchmark(dataset: str):
    def bench(data_dir: str, device: str, options: dict) -> dict:
        opts = {**DEFAULTS, **options}
        epochs = int(opts["epochs"][dataset] if isinstance(opts["epochs"], dict) else opts["epochs"])
        uptime_before = Path("/proc/loadavg").read_text().split()[:3]
        if opts.get("run_dir"):  # a part2 run to serve again (its bundle and checkpoint): no training
            summary, bundle, model = reuse_run(Path(opts["run_dir"]), dataset, data_dir)
        else:
            summary, bundle, model = train_and_bundle(dataset, data_dir, epochs, opts.get("out", "runs"))
        result = {"dataset": dataset, "epochs": epochs, "test_acc": summary["test_acc"],
                  "service_agrees_with_eager": summary["service_agrees_with_eager"], "bundle": str(bundle)}
        result.update(batch1_latency(bundle, model, int(opts["repeats"])))
        for backend in ("onnx", "torch"):
            result.update(serve(bundle, backend, opts))
        result["onnx_vs_torch_service_rps"] = result["onnx_closed_rps"] / max(result["torch_closed_rps"], 1e-9)
        result["loadavg_before"] = uptime_before
        result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
        result.update({k: opts[k] for k in ("duration", "concurrency", "rate")})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
        return {"metric": "onnx_closed_rps", "value": result["onnx_closed_rps"], **result}

    return bench


ENTRIES = {
    "serve_mnist": Benchmark(serving_benchmark("mnist"),
                             "Week 10: MNIST CNN served on loopback: ONNX vs eager at batch 1 (goal >= 2x), closed "
                             "loop 50 clients (goal >= 500 req/s, 0 errors), open loop 100 req/s (goal p99 <= 20 ms)"),
    "serve_cifar10": Benchmark(serving_benchmark("cifar10"),
                               "Week 10: CIFAR-10 CNN served on loopback: the same figures as serve_mnist"),
}
