"""Week 10 as its users meet it, with the real tools: the Docker image built and run
(week10_deploy/docker_check.sh), the Gradio page used in a headless Chromium, and the parsing of
the load generator's report (benchmarks/week10.py runs hey itself).

Each test that needs a tool runs where the tool is present and is skipped with the reason
otherwise: a Docker engine that answers `docker info` and a base image already on the machine
(the build then installs the service's packages with pip inside the image, from the package
index), Chromium + Playwright + Gradio (pip install -e ".[ui]", apt-get install chromium).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests import browser
from tests.conftest import ROOT, offline_env
from week03_cnn.part2 import CNN

CHECK = ROOT / "week10_deploy" / "docker_check.sh"
UI = ROOT / "week10_deploy" / "standalone" / "ui.py"
BASES = ("python:3.11-slim", "dl-labs-base:bookworm-local")  # the README's offline base: this tag


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small untrained CNN (BatchNorm statistics away from 0/1) as a bundle."""
    from week10_deploy.export import write_bundle

    torch.manual_seed(0)
    model = CNN(1, 10, (4, 8), batch_norm=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("tools") / "bundle"
    return write_bundle(folder, model, torch.rand(1, 1, 28, 28), name="tiny_cnn",
                        classes=[f"c{i}" for i in range(10)], mean=(0.25,), std=(0.3,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------
# The image: docker_check.sh builds it from a bundle, runs it on the loopback, checks it
# ------------------------------------------------------------------------------------------
def docker_base() -> tuple[str | None, str]:
    """(base image to build from, or None; the reason when None). The build pip-installs the
    service's packages inside the image, which needs the package registry: tests never use the
    network unless asked, so this one runs only with DL_LABS_DOCKER_TEST=1."""
    if os.environ.get("DL_LABS_DOCKER_TEST") != "1":
        return None, ("the image build installs packages from PyPI (the network): "
                      "set DL_LABS_DOCKER_TEST=1 to run it")
    if shutil.which("docker") is None:
        return None, "no docker command (apt-get install docker.io)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, "docker info did not answer in 30 s"
    if info.returncode != 0:
        return None, "no Docker engine answers docker info (start dockerd)"
    wanted = os.environ.get("DL_LABS_DOCKER_BASE")
    for base in [wanted] if wanted else BASES:
        found = subprocess.run(["docker", "image", "inspect", base], capture_output=True,
                               timeout=30)
        if found.returncode == 0:
            return base, ""
    return None, (f"none of the base images {wanted or ', '.join(BASES)} is on this machine (tests "
                  "pull nothing; the week README makes one offline with debootstrap)")


def test_docker_check_says_what_is_wrong_in_one_line(tmp_path):
    usage = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:"), usage.stderr
    missing = subprocess.run(["bash", str(CHECK), str(tmp_path / "nothing")], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"docker_check: FAILED: no bundle folder {tmp_path / 'nothing'}"), missing.stderr
    (tmp_path / "empty").mkdir()
    empty = subprocess.run(["bash", str(CHECK), str(tmp_path / "empty")], capture_output=True,
                           text=True, timeout=30)
    assert empty.returncode == 1 and "has no metadata.json + model.onnx" in empty.stderr, empty


@pytest.mark.slow
@pytest.mark.timeout(900)  # a first build installs the packages into the image (minutes)
def test_the_image_builds_runs_on_the_loopback_and_answers_like_the_bundle(bundle, tmp_path):
    base, reason = docker_base()
    if base is None:
        pytest.skip(reason)
    env = {**os.environ, "BASE_IMAGE": base, "PYTHON": sys.executable,
           "IMAGE": "dl-labs-serve:test"}
    result = subprocess.run(["bash", str(CHECK), str(bundle)], capture_output=True, text=True,
                            timeout=900, env=env)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "no torch in the image; it runs as uid" in out and "uid 0" not in out, out
    assert '"status":"ok"' in out, out
    assert "equal to predict_onnx.py and eager PyTorch" in out, out  # torch is installed here
    assert "not an image: 400" in out and "wrong content type: 415" in out, out
    assert out.rstrip().splitlines()[-1].startswith("docker_check: OK"), out
    left = subprocess.run(["docker", "ps", "-a", "--filter", "name=dl-labs-check-", "--format",
                           "{{.Names}}"], capture_output=True, text=True, timeout=30).stdout.split()
    assert left == [], f"containers left behind: {left}"


# ------------------------------------------------------------------------------------------
# The page: ui.py in a real (headless) browser shows the service's answer
# ------------------------------------------------------------------------------------------
def page_missing() -> str | None:
    if importlib.util.find_spec("gradio") is None:
        return 'Gradio is not installed (pip install -e ".[ui]")'
    return browser.missing()


def transparent_image(seed: int = 3) -> Image.Image:
    """An RGBA image, not the model's size, half of it transparent over black: the service lays
    it on white. A page that let Gradio convert it to RGB would see black there instead."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, size=(30, 40, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((30, 40)) < 0.5, 0, 255)
    rgba[rgba[..., 3] == 0, :3] = 0
    return Image.fromarray(rgba, mode="RGBA")


@contextlib.contextmanager
def ui_running(bundle: Path, tmp_path: Path):
    """The README's command for the page, on a free loopback port; its URL once it answers."""
    port = free_port()
    loopback = "127.0.0.1,localhost"
    env = {**offline_env(tmp_path), "NO_PROXY": loopback, "no_proxy": loopback}
    page = subprocess.Popen([sys.executable, str(UI), str(bundle), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert page.poll() is None, f"ui.py exited: {page.communicate()[0][-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the page did not come up within 120 s"
            time.sleep(0.3)
        yield url
    finally:
        page.terminate()
        try:
            page.wait(timeout=30)
        except subprocess.TimeoutExpired:
            page.kill()


@pytest.mark.slow
def test_the_page_in_a_real_browser_shows_the_services_classes(bundle, tmp_path):
    reason = page_missing()
    if reason:
        pytest.skip(reason)
    from fastapi.testclient import TestClient

    from week10_deploy.service import create_app

    image = tmp_path / "transparent.png"
    transparent_image().save(image)
    with TestClient(create_app(bundle)) as client:
        served = client.post("/predict?top_k=5", content=image.read_bytes(),
                             headers={"content-type": "image/png"}).json()["predictions"]
    with ui_running(bundle, tmp_path) as url:
        shown = browser.classes_on_gradio_page(url, image, screenshot=tmp_path / "page.png")
    assert [name for name, _ in shown] == [p["class"] for p in served], (shown, served)
    expected = [p["probability"] for p in served]
    assert [p for _, p in shown] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_shows_a_bad_upload_with_the_services_message(bundle, tmp_path):
    if importlib.util.find_spec("gradio") is None:
        pytest.skip('Gradio is not installed (pip install -e ".[ui]")')
    import gradio as gr

    from week10_deploy.standalone import ui
    from week10_deploy.standalone.predict_onnx import OnnxClassifier

    classify = ui.make_classify(OnnxClassifier(bundle), 3)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a PNG")
    with pytest.raises(gr.Error, match="not an image Pillow can read"):
        classify(str(junk))
    buffer = io.BytesIO()
    transparent_image().save(buffer, "PNG")
    (tmp_path / "ok.png").write_bytes(buffer.getvalue())
    from_file, from_image = classify(str(tmp_path / "ok.png")), classify(transparent_image())
    assert list(from_file) == list(from_image) and len(from_file) == 3  # the same preparation


# ------------------------------------------------------------------------------------------
# The load generators' reports, as benchmarks/week10.py (serve_mnist_hey) reads them
# ------------------------------------------------------------------------------------------
WRK_REPORT = """Running 10s test @ http://127.0.0.1:8790/predict
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    48.83ms   12.78ms    1.20s    97.47%
    Req/Sec     1.04k   147.05     1.20k    94.00%
  Latency Distribution
     50%  846.66us
     75%   49.97ms
     90%   54.36ms
     99%    1.09s
  5161 requests in 5.01s, 1.89MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   1030.65
Transfer/sec:    385.49KB
"""
HEY_REPORT = """Summary:
  Requests/sec:\t752.7905
Latency distribution:
  10% in 0.0519 secs
  50% in 0.0589 secs
  99% in 0.2192 secs
Status code distribution:
  [200]\t3787 responses
  [503]\t2 responses

Error distribution:
  [7]\tPost "http://127.0.0.1:8790/predict": dial tcp 127.0.0.1:8790: connect: connection refused
"""


def test_the_load_generators_reports_are_read_with_their_errors_and_units():
    from benchmarks.week10 import parse_hey_csv, parse_hey_summary, parse_wrk

    wrk = parse_wrk(WRK_REPORT)
    assert wrk["requests"] == 5161 and wrk["rps"] == 1030.65 and wrk["errors"] == 2 + 3 + 4
    assert wrk["p50_ms"] == pytest.approx(0.84666) and wrk["p99_ms"] == pytest.approx(1090.0)
    hey = parse_hey_summary(HEY_REPORT)
    assert hey["rps"] == 752.7905 and hey["requests"] == 3787 + 2 + 7 and hey["errors"] == 2 + 7
    assert hey["p50_ms"] == pytest.approx(58.9) and hey["p99_ms"] == pytest.approx(219.2)
    header = ("response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,"
              "status-code,offset")
    on_time = "\n".join([header] + [f"0.0040,0,0,0,0.004,0,200,{k / 10 + 0.06 * (k == 7):.4f}"
                                     for k in range(1, 31)])  # the 7th sent 60 ms late: still sent
    # the same connection with the 11th to 13th requests missing (failed, or the schedule slipped)
    # and the last four ticks (the server stopped answering): the very last one is not counted
    gaps = "\n".join([header] + [f"0.0400,0,0,0,0.04,0,{500 if k == 5 else 200},{k / 10:.4f}"
                                 for k in range(1, 27) if not 11 <= k <= 13])
    read = parse_hey_csv([on_time, gaps], per_connection=10, duration=3.0)
    assert read["requests"] == 30 + 23 and read["missing"] == 3 + 3 and read["errors"] == 3 + 3 + 1
    assert read["p50_ms"] == pytest.approx(4.0) and read["max_ms"] == pytest.approx(40.0)
    assert read["rps"] == pytest.approx(53 / 3.0)
