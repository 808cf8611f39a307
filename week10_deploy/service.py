"""Week 10: an inference service for an exported image classifier (FastAPI).

Start it (one process, loopback only; the bundle is a folder written by week10_deploy/part2.py):

    export DL_LABS_BUNDLE=runs/week10/part2/<time>/bundle
    uvicorn week10_deploy.service:app_from_env --factory

Environment: DL_LABS_BUNDLE (required), DL_LABS_BACKEND (onnx | torch, default onnx),
DL_LABS_BATCH_WAIT_MS (micro-batching window in ms, 0 to 1000, default 0: off), DL_LABS_THREADS
(threads per inference call, default 1). uvicorn binds 127.0.0.1 unless you pass --host.

    GET  /health            {"status": "ok", ...} once the model is loaded
    GET  /metadata          model name, classes, input shape, version, backend, limits
    POST /predict           one image -> top-k classes with probabilities (?top_k=3)
    POST /predict/batch     several images -> a list of top-k lists

A POST body is an image file (``Content-Type: image/png``, ``image/jpeg``, ...), a multipart
upload (field ``file``; ``files`` for /predict/batch) or JSON ``{"pixels": [...]}`` with values
in [0, 1] shaped like the model's input (C, H, W) ((H, W) for one channel; a list of them for
/predict/batch). Every bad request gets a 4xx and ``{"error": "..."}``, never a 500.

Concurrency: the event loop only moves bytes. Decoding and the model run on a small thread pool
(ONNX Runtime and PyTorch release the GIL while they compute), so slow requests do not block
the others. With ``batch_wait_ms > 0``, single-image requests arriving within that window are
run as one batch (micro-batching): fewer, larger model calls, for a little added latency.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import LabError
from week10_deploy.export import bundle_files, describe_bundle, read_bundle
from week10_deploy.standalone.predict_onnx import (
    MAX_PIXELS,
    BadInput,
    OnnxClassifier,
    decode_image,
    pixels_from_json,
    top_k,
)

BACKENDS = ("onnx", "torch")
MAX_BYTES = 5 * 2**20  # largest request body accepted (5 MiB)
MAX_WAIT_MS = 1000  # longest micro-batching window accepted
TOP_K = "how many classes to return, most probable first"
ACCEPTED = ("image/* (the file as the body), multipart/form-data (field 'file') or "
            "application/json ({'pixels': ...})")


class TorchClassifier(OnnxClassifier):
    """The same model from the bundle's model.pt2 (``torch.export``), run eagerly by PyTorch.
    Only the model call differs from ``OnnxClassifier``: the image handling is shared."""

    backend = "torch"

    def _load(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # process-wide: this process serves, it does not train
        self._torch = torch
        self.module = torch.export.load(bundle_files(self.folder)["pt2"]).module()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            return self.module(x).numpy()


class MicroBatcher:
    """Collects single images for up to ``wait_s`` (or until ``max_batch`` are waiting), runs
    them as one batch on the thread pool, and hands each caller its own row of probabilities."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray],
                 executor: ThreadPoolExecutor, max_batch: int, wait_s: float):
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def submit(self, image: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch:
                try:
                    timeout = max(deadline - loop.time(), 0)
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            loop.create_task(self._run([item for item in items if not item[1].cancelled()]))

    async def _run(self, items: list) -> None:
        if not items:
            return
        try:
            batch = np.stack([image for image, _ in items])
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_batch, batch)
        except Exception as e:  # hand the failure to every waiting request
            for _, future in items:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), row in zip(items, probabilities):
            if not future.done():
                future.set_result(row)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes`` (a client may lie
    in Content-Length or send no length at all: the count of bytes received is what counts)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadInput(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise BadInput(413, f"the body is {int(declared):,} bytes; the limit is {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadInput(413, f"the body is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(bundle: str | Path, backend: str = "onnx", max_batch: int = 64, *,
               batch_wait_ms: float = 0.0, threads: int = 1, workers: int | None = None,
               max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> FastAPI:
    """The service for one bundle folder. The model is loaded here, once, before the first
    request (a bad bundle fails now, not at the first request).

    backend        "onnx" (ONNX Runtime on model.onnx) or "torch" (torch.export.load of model.pt2)
    max_batch      most images in one /predict/batch request, and in one micro-batch
    batch_wait_ms  micro-batching window for /predict (0: every request runs on its own)
    threads        threads per model call; workers: calls at once (default: the CPU count)
    max_bytes      largest body accepted; max_pixels: largest image (width x height) decoded
    """
    if backend not in BACKENDS:
        raise LabError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if max_batch < 1 or threads < 1 or max_bytes < 1 or max_pixels < 1 or batch_wait_ms < 0:
        raise LabError("max_batch, threads, max_bytes and max_pixels must be >= 1 "
                       "and batch_wait_ms >= 0")
    # also NaN and inf: a window that never closes hangs every request
    if not batch_wait_ms <= MAX_WAIT_MS:
        raise LabError(f"batch_wait_ms (DL_LABS_BATCH_WAIT_MS) must be a number in "
                       f"[0, {MAX_WAIT_MS}], not {batch_wait_ms}")
    metadata = read_bundle(bundle)
    classifier = TorchClassifier if backend == "torch" else OnnxClassifier
    model = classifier(bundle, metadata, threads=threads)
    # Pillow's own decompression-bomb guard: Image.open warns above MAX_IMAGE_PIXELS and refuses
    # above twice that. Process-wide, so set here to the service's limit (decode_image checks too).
    Image.MAX_IMAGE_PIXELS = max_pixels
    executor = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2,
                                  thread_name_prefix="inference")
    batcher = (MicroBatcher(model.probabilities, executor, max_batch, batch_wait_ms / 1000)
               if batch_wait_ms else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if batcher:
            batcher.start()
        yield
        if batcher:
            await batcher.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"dl-labs: {metadata['name']}", version=metadata["version"],
                  lifespan=lifespan, description=describe_bundle(metadata))
    app.state.model, app.state.metadata = model, metadata

    # ---- Every error as {"error": "..."} with its 4xx status ----
    @app.exception_handler(BadInput)
    async def bad_input(request: Request, e: BadInput):
        return _error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                             for err in e.errors())
        return _error(422, problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    async def off_loop(function, *args):
        """Run ``function(*args)`` on the inference threads; the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    shape = model.shape

    async def images_from(request: Request, batch: bool) -> np.ndarray:
        """The request's image(s) as (N, C, H, W) in [0, 1], whatever form they came in."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (kind == "application/json" or kind.startswith("image/")
                or kind == "application/octet-stream" or kind == "multipart/form-data"):
            raise BadInput(415, f"Content-Type {kind or '(none)'} is not accepted; "
                                f"send {ACCEPTED}")
        body = await read_body(request, max_bytes)
        if kind == "application/json":
            return await off_loop(_pixels_from_body, body, shape, batch)
        if kind == "multipart/form-data":
            return await _images_from_form(request, body, batch)
        if batch:
            raise BadInput(415, "/predict/batch takes several images: a multipart upload "
                                "(fields 'files') or JSON {'pixels': [...]}")
        return (await off_loop(decode_image, body, shape, max_pixels))[None]

    async def _images_from_form(request: Request, body: bytes, batch: bool) -> np.ndarray:
        async def replay():  # the body was already read (and counted): give it to the form parser
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=max_batch, max_fields=16,
                                                             max_part_size=max_bytes)
        except StarletteHTTPException as e:  # Starlette's 400s; too many files is a size limit: 413
            too_many = "Too many files" in str(e.detail)
            raise BadInput(413 if too_many else e.status_code,
                           f"more than {max_batch} images in one request; the limit is {max_batch}"
                           if too_many else str(e.detail)) from None
        field = "files" if batch else "file"
        uploads = [item for item in form.getlist(field) if hasattr(item, "read")]
        if not uploads:
            raise BadInput(422, f"missing field '{field}': upload the image{'s' if batch else ''} "
                                f"as multipart field '{field}' (curl -F {field}=@image.png)")
        if not batch and len(uploads) > 1:
            raise BadInput(422, "/predict takes one image; use /predict/batch for several")
        files = [await upload.read() for upload in uploads]
        return await off_loop(_decode_all, files, shape, max_pixels)

    def check_batch(images: np.ndarray) -> None:
        if len(images) > max_batch:
            raise BadInput(413, f"{len(images)} images in one request; the limit is {max_batch}")

    def answer(predictions) -> dict:
        return {"model": metadata["name"], "version": metadata["version"], "backend": model.backend,
                "predictions": predictions}

    # ---- Endpoints ----
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": metadata["name"], "version": metadata["version"],
                "backend": model.backend}

    @app.get("/metadata")
    async def get_metadata() -> dict:
        keys = ("name", "classes", "input_shape", "input_range", "mean", "std", "version",
                "created", "torch")
        return {**{k: metadata.get(k) for k in keys}, "backend": model.backend,
                "max_batch": max_batch, "max_bytes": max_bytes, "max_pixels": max_pixels,
                "micro_batching_ms": batch_wait_ms}

    @app.post("/predict")
    async def predict(request: Request,
                      k: int = Query(3, ge=1, alias="top_k", description=TOP_K)) -> dict:
        images = await images_from(request, batch=False)
        if batcher:
            probabilities = (await batcher.submit(images[0]))[None]
        else:
            probabilities = await off_loop(model.probabilities, images)
        return answer(top_k(probabilities, model.classes, k)[0])

    @app.post("/predict/batch")
    async def predict_batch(request: Request,
                            k: int = Query(3, ge=1, alias="top_k", description=TOP_K)) -> dict:
        images = await images_from(request, batch=True)
        check_batch(images)
        probabilities = await off_loop(model.probabilities, images)
        return answer(top_k(probabilities, model.classes, k))

    return app


def _pixels_from_body(body: bytes, shape: tuple[int, int, int], batch: bool) -> np.ndarray:
    import json

    try:
        # parse_int=float: a JSON integer becomes a float, so 5000 digits are inf (refused below as
        # out of range) instead of Python's error about its int-conversion digit limit.
        payload = json.loads(body, parse_int=float)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInput(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:  # e.g. [[[[...]]]] nested thousands deep: the parser's stack runs out
        raise BadInput(400, "the JSON is nested too deeply "
                            "(pixels nest 3 levels, 4 for a batch)") from None
    if not isinstance(payload, dict) or "pixels" not in payload:
        raise BadInput(422, "missing field 'pixels': send {\"pixels\": [[...], ...]} "
                            "with values in [0, 1]")
    return pixels_from_json(payload["pixels"], shape, batch)


def _decode_all(files: list[bytes], shape: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    images = []
    for i, data in enumerate(files):
        try:
            images.append(decode_image(data, shape, max_pixels))
        except BadInput as e:
            message = f"image {i}: {e.message}" if len(files) > 1 else e.message
            raise BadInput(e.status, message) from None
    return np.stack(images)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: FastAPI, port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 in a background thread (the same server as the
    README's command, in this process): yields the base URL once it accepts connections, stops
    it on exit."""
    import threading

    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port or free_port(), log_level=log_level)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LabError(f"the service did not start on 127.0.0.1:{server.config.port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def app_from_env() -> FastAPI:
    """The uvicorn factory (``--factory``): settings from DL_LABS_* environment variables; a bad
    bundle or setting is one line on stderr and exit status 1, not a traceback."""
    try:
        bundle = os.environ.get("DL_LABS_BUNDLE", "")
        if not bundle:
            raise LabError("set DL_LABS_BUNDLE to a bundle folder (written by "
                           "week10_deploy/part2.py), e.g. "
                           "DL_LABS_BUNDLE=runs/week10/part2/<time>/bundle "
                           "uvicorn week10_deploy.service:app_from_env --factory")
        try:
            wait_ms = float(os.environ.get("DL_LABS_BATCH_WAIT_MS", "0"))
            threads = int(os.environ.get("DL_LABS_THREADS", "1"))
        except ValueError as e:
            raise LabError(f"DL_LABS_BATCH_WAIT_MS / DL_LABS_THREADS must be numbers "
                           f"({e})") from None
        return create_app(bundle, os.environ.get("DL_LABS_BACKEND", "onnx"), batch_wait_ms=wait_ms,
                          threads=threads)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
