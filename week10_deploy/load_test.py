"""Week 10: load-test the service on this machine: throughput and latency percentiles.

Two ways to load a server, and why both are needed:

    closed loop   N clients, each sends its next request when the previous answer arrives.
                  Measures the most the server does (requests/s); latency is then just
                  N / throughput (Little's law), so it says little about the server.
    open loop     requests leave on a fixed schedule (``--rate`` per second) whether or not
                  earlier ones came back, as real users do. Latency is counted from the moment
                  a request was DUE, so a stalled server cannot hide its queue (a closed loop
                  would just send less: "coordinated omission").

Each phase is bounded in time (``--duration``, then ``--timeout`` for the last answers).
Only loopback addresses are accepted: this is a tool for your own machine, not for load on
someone else's server.

This client is a lesson, not a capacity meter: Python and httpx cost far more CPU per request
than the server does, and on the same cores that cost is what the closed loop measures.
Against the MNIST CNN service on 2 cores (benchmarks/run.py serve_mnist_hey) its closed loop of
50 clients reached 298 requests/s where wrk reached 1,529 (3.7 ms of CPU per request here,
0.03 ms in wrk: it saturated a core). At 100 requests/s open loop it is close: p99 6.6 ms vs
hey's 5.3 ms, at a quarter of a core. For capacity figures, use wrk or hey (week README).

Run: python week10_deploy/load_test.py [--smoke] --url http://127.0.0.1:8000
         [--concurrency 50] [--rate 100]
     (--smoke serves a tiny untrained model itself and loads it for a second or two)
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np

from common.config import BaseConfig, Range
from common.errors import ConfigError, LabError
from common.runner import launch

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass
class Config(BaseConfig):
    """Load-test a running service: closed loop (N clients) and open loop (a fixed rate)."""

    url: str = "http://127.0.0.1:8000"  # base URL; loopback only (127.0.0.0/8, ::1, localhost)
    mode: Literal["both", "closed", "open"] = "both"  # N clients back to back, fixed rate, or both
    concurrency: Annotated[int, Range(1, 1000)] = 50  # closed loop: clients, each awaits its answer
    rate: Annotated[float, Range(0, 10000, lo_open=True)] = 100.0  # open loop: requests per second
    duration: Annotated[float, Range(0, 600, lo_open=True)] = 10.0  # seconds of load per phase
    warmup: Annotated[float, Range(0, 60)] = 1.0  # seconds of closed-loop load first (not counted)
    max_requests: Annotated[int, Range(0)] = 0  # stop a phase after this many (0: duration decides)
    payload: Literal["png", "json"] = "png"  # send an image file (image/png) or JSON pixels
    timeout: Annotated[float, Range(0, 120, lo_open=True)] = 5.0  # seconds before a request fails

    SMOKE: ClassVar[dict] = {"duration": 0.3, "concurrency": 4, "rate": 40.0, "warmup": 0.1}
    UNUSED: ClassVar[tuple] = ("device", "data_dir")

    def check(self) -> None:
        check_loopback(self.url)


def check_loopback(url: str) -> None:
    """Refuse any host that is not this machine (ConfigError, exit 2)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r} must look like http://127.0.0.1:8000")
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() in LOOPBACK_NAMES
    if not loopback:
        raise ConfigError(f"--url {url}: this load test only targets this machine "
                          f"(127.0.0.1, ::1, localhost), not {host}")


# ---- What is sent ----
def request_body(shape: list[int], payload: str, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    """One random image of the model's input shape, as a PNG file or as JSON pixels."""
    from PIL import Image

    channels, height, width = shape
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels),
                                                  dtype=np.uint8)
    if payload == "json":
        import json

        values = (pixels.transpose(2, 0, 1) / 255).round(4).tolist()
        return json.dumps({"pixels": values}).encode(), {"content-type": "application/json"}
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue(), {"content-type": "image/png"}


# ---- The two loads ----
def _stats(phase: str, latencies: list[float], errors: dict[str, int], elapsed: float) -> dict:
    """requests/s and latency percentiles (ms) of the answered requests; errors by kind."""
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    n_errors = sum(errors.values())
    return {f"{phase}_requests": len(latencies) + n_errors, f"{phase}_ok": len(latencies),
            f"{phase}_errors": n_errors, f"{phase}_error_kinds": dict(errors),
            f"{phase}_rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
            f"{phase}_p50_ms": float(np.percentile(ms, 50)),
            f"{phase}_p95_ms": float(np.percentile(ms, 95)),
            f"{phase}_p99_ms": float(np.percentile(ms, 99)), f"{phase}_max_ms": float(ms.max()),
            f"{phase}_seconds": elapsed}


async def _send(client: httpx.AsyncClient, path: str, body: bytes, headers: dict,
                errors: dict) -> bool:
    try:
        r = await client.post(path, content=body, headers=headers)
        if r.status_code == 200:
            return True
        key = f"http {r.status_code}"
    except httpx.HTTPError as e:
        key = type(e).__name__
    errors[key] = errors.get(key, 0) + 1
    return False


def _client(url: str, connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # trust_env=False: no proxy from the environment may carry loopback traffic elsewhere
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False)


async def closed_loop(url: str, body: bytes, headers: dict, concurrency: int, duration: float,
                      max_requests: int = 0, timeout: float = 5.0, warmup: float = 0.0,
                      path: str = "/predict") -> dict:
    """``concurrency`` clients, each sending its next request as soon as its answer arrives."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with _client(url, concurrency, timeout) as client:
        warm_until = time.perf_counter() + warmup
        # open the connections, fill caches: not measured
        while time.perf_counter() < warm_until:
            await asyncio.gather(*(_send(client, path, body, headers, {})
                                   for _ in range(concurrency)))
        start = time.perf_counter()
        stop = start + duration
        sent = 0

        async def one_client() -> None:
            nonlocal sent
            while time.perf_counter() < stop and (not max_requests or sent < max_requests):
                sent += 1
                t0 = time.perf_counter()
                if await _send(client, path, body, headers, errors):
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return _stats("closed", latencies, errors, time.perf_counter() - start)


async def open_loop(url: str, body: bytes, headers: dict, rate: float, duration: float,
                    max_requests: int = 0, timeout: float = 5.0, path: str = "/predict") -> dict:
    """Requests due every 1/rate seconds; each one's latency counts from when it was due."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    n = int(duration * rate) if not max_requests else min(int(duration * rate), max_requests)
    async with _client(url, 1000, timeout) as client:
        await _send(client, path, body, headers, {})  # a connection open before the clock starts

        async def one_request(due: float) -> None:
            if await _send(client, path, body, headers, errors):
                latencies.append(time.perf_counter() - due)

        # Each request is started when it is due, not all created up front: only the requests in
        # flight are held in memory (else --rate 10000 --duration 600 would be 6 million tasks).
        start = time.perf_counter() + 0.05
        in_flight: set[asyncio.Task] = set()
        for i in range(max(n, 1)):
            due = start + i / rate
            await asyncio.sleep(max(due - time.perf_counter(), 0))
            task = asyncio.create_task(one_request(due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        # requests/s answered: below the offered rate when the server fell behind (the last
        # answers came late)
        return _stats("open", latencies, errors, time.perf_counter() - start)


async def load(url: str, body: bytes, headers: dict, mode: str, concurrency: int, rate: float,
               duration: float, max_requests: int = 0, timeout: float = 5.0,
               warmup: float = 0.0) -> dict:
    results: dict = {}
    if mode in ("both", "closed"):
        results.update(await closed_loop(url, body, headers, concurrency, duration, max_requests,
                                         timeout, warmup))
    if mode in ("both", "open"):
        results.update(await open_loop(url, body, headers, rate, duration, max_requests, timeout))
    return results


def report(results: dict) -> str:
    lines = []
    for phase, what in (("closed", "closed loop"), ("open", "open loop")):
        if f"{phase}_requests" in results:
            r = {k.removeprefix(f"{phase}_"): v for k, v in results.items()
                 if k.startswith(f"{phase}_")}
            kinds = f" ({r['error_kinds']})" if r["errors"] else ""
            lines.append(f"{what:>11s}: {r['requests']} requests in {r['seconds']:.1f} s, "
                         f"{r['rps']:.0f} req/s, latency p50 {r['p50_ms']:.1f} ms, "
                         f"p95 {r['p95_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                         f"max {r['max_ms']:.1f} ms, errors {r['errors']}{kinds}")
    return "\n".join(lines)


def _tiny_app():
    """--smoke: a tiny untrained Week 3 CNN on MNIST's shapes, bundled into a temporary folder."""
    import tempfile

    import torch

    from week03_cnn.part2 import CNN
    from week10_deploy.export import write_bundle
    from week10_deploy.service import create_app

    folder = tempfile.mkdtemp(prefix="dl-labs-load-test-")
    model = CNN(1, 10, (4, 8), batch_norm=True)
    write_bundle(folder, model, torch.rand(1, 1, 28, 28), name="tiny_untrained_cnn",
                 classes=[str(i) for i in range(10)], mean=(0.13,), std=(0.31,))
    return create_app(folder), folder


def main(cfg: Config) -> dict:
    if not cfg.smoke:
        return measure(cfg, cfg.url)
    import shutil

    from week10_deploy.service import serving

    app, folder = _tiny_app()
    try:
        with serving(app) as url:
            return measure(cfg, url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def service_metadata(url: str, timeout: float = 5.0) -> dict:
    """GET /metadata: what the service serves (the input shape decides the request body)."""
    try:
        with httpx.Client(base_url=url, timeout=timeout, trust_env=False) as client:
            metadata = client.get("/metadata").json()
    except (httpx.HTTPError, ValueError) as e:
        raise LabError(f"no service answers at {url}/metadata ({type(e).__name__}); "
                       "start it first (see week10_deploy/README.md) or pass --url") from None
    if not isinstance(metadata, dict) or "input_shape" not in metadata:
        raise LabError(f"{url}/metadata is not this project's service (no input_shape)")
    return metadata


def measure(cfg: Config, url: str) -> dict:
    from common.runs import Run

    # before the run folder: an absent service leaves none
    metadata = service_metadata(url, cfg.timeout)
    run = Run.start(cfg, __file__, _cpu())
    body, headers = request_body(metadata["input_shape"], cfg.payload)
    print(f"loading {url}/predict ({metadata.get('name')}, backend {metadata.get('backend')}): "
          f"{cfg.mode} loop, {cfg.duration:g} s per phase, {cfg.payload} payload of "
          f"{len(body):,} bytes")
    results = asyncio.run(load(url, body, headers, cfg.mode, cfg.concurrency, cfg.rate,
                               cfg.duration, cfg.max_requests, cfg.timeout, cfg.warmup))
    print(report(results))
    for phase in ("closed", "open"):
        if f"{phase}_requests" in results:
            run.log(phase=phase, **{k.removeprefix(f"{phase}_"): v for k, v in results.items()
                                     if k.startswith(f"{phase}_")
                                     and not k.endswith("error_kinds")})
    return run.finish(**results, backend=metadata.get("backend"), model=metadata.get("name"),
                       payload_bytes=len(body))


def _cpu():
    import torch

    return torch.device("cpu")


if __name__ == "__main__":
    launch(main, Config)
