"""Week 12: the trained model exported (Week 10's bundle: ONNX + torch.export, normalization
baked in), the ONNX graph checked against the eager model, and the Week 10 service asked, as a
client would, whether it answers like the eager model."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from common.data import ImageData
from common.errors import LabError
from common.loader import normalizer

DEPLOY_MODULES = ("onnx", "onnxruntime", "onnxscript", "fastapi", "httpx")


def check_deploy_dependencies() -> None:
    """Before any work: the export and the service need the optional 'deploy' extra."""
    missing = [m for m in DEPLOY_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LabError(f"--deploy needs {', '.join(missing)}: pip install -e '.[deploy]' "
                       "(or run with --no-deploy)")


def export_and_serve(model: nn.Module, data: ImageData, bundle_dir: Path, name: str,
                     extra: dict) -> dict:
    """Write the bundle, check the ONNX graph against the eager model on 64 test images, then
    start the Week 10 service in-process and compare its answer to a request with eager's."""
    import onnxruntime

    with warnings.catch_warnings():  # newer Starlette asks for httpx2, not the extra's httpx
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from fastapi.testclient import TestClient

    from week10_deploy.export import write_bundle
    from week10_deploy.service import create_app

    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    images = data.x_test[:64]  # (64, C, H, W) uint8
    pixels = images.float() / 255  # what a client sends: pixels in [0, 1]; the bundle normalizes
    bundle = write_bundle(bundle_dir, model, pixels[:2], name=name, classes=data.classes,
                          mean=data.mean, std=data.std, extra=extra)
    with torch.inference_mode():
        eager_probs = model(normalizer(data.mean, data.std)(images)).softmax(dim=1)  # (64, classes)

    session = onnxruntime.InferenceSession(str(bundle / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: pixels.numpy()}
    onnx_probs = torch.from_numpy(session.run(None, feed)[0]).softmax(dim=1)

    with TestClient(create_app(bundle, backend="onnx")) as client:  # in-process, no port opened
        served = serve_request(client, images[:4], data.num_classes)
    served_probs = torch.tensor(served["probabilities"])
    eager_classes = [data.classes[int(i)] for i in eager_probs[:4].argmax(1)]
    return {"onnx_max_prob_diff": (onnx_probs - eager_probs).abs().max().item(),
            "onnx_same_argmax": bool((onnx_probs.argmax(1) == eager_probs.argmax(1)).all()),
            "served_max_prob_diff": (served_probs - eager_probs[:4]).abs().max().item(),
            "served_same_answer": served["classes"] == eager_classes,
            "served_classes": served["classes"], "bundle": str(bundle)}


def serve_request(client, images: torch.Tensor, num_classes: int) -> dict:
    """POST a batch of images to the service as a client would (JSON pixels in [0, 1], shaped
    (C, H, W) each) and read back, per image, the predicted class and the probabilities of every
    class (top_k = all classes, put back in class order)."""
    pixels = (images.float() / 255).tolist()
    response = client.post("/predict/batch", params={"top_k": num_classes}, json={"pixels": pixels})
    if response.status_code != 200:
        raise LabError(f"the Week 10 service answered {response.status_code}: "
                       f"{response.text[:200]}")
    rows = response.json()["predictions"]
    probabilities = [[0.0] * num_classes for _ in rows]
    for row, answer in zip(probabilities, rows):
        for entry in answer:
            row[entry["index"]] = entry["probability"]
    return {"classes": [answer[0]["class"] for answer in rows], "probabilities": probabilities}
