"""Week 10, Part 2: serve the Week 3 CNN over HTTP, and call it the way a client would.

The path from a trained model to an answer over the network, in four steps:

    1. a model: trained here (Week 3's CNN and loaders, imported) or loaded from a run's checkpoint
    2. a bundle: model.onnx + model.pt2 + metadata.json (common.export.write_bundle), the
       normalization baked in, both exports checked against eager PyTorch
    3. the service (week10_deploy/service.py) on 127.0.0.1, started in this process with the same
       uvicorn server the README's command starts
    4. a client: test images sent as PNG files, answers compared with the model's own; a few bad
       requests (each must get its 4xx); a short closed-loop load test

The bundle stays in the run folder; serve it again with the README's uvicorn command.

Run: python week10_deploy/part2.py [--smoke] [--help]
     python week10_deploy/part2.py --dataset mnist --epochs 2
     python week10_deploy/part2.py --checkpoint runs/week03/part2/<time>/checkpoint.pt   (serve a trained CNN)
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import httpx
import torch
from PIL import Image

from common.checkpoint import load_checkpoint, read_checkpoint
from common.config import BaseConfig, Range
from common.data import ImageData, load
from common.device import pick_device, prepare_model, seed_everything
from common.errors import CheckpointError, ConfigError
from common.export import write_bundle
from common.loader import TensorLoader, normalizer
from common.runner import launch
from common.runs import Run
from common.train import fit, predict
from week03_cnn import part2 as week3
from week10_deploy.load_test import closed_loop, report
from week10_deploy.service import create_app, serving


@dataclass
class Config(BaseConfig):
    """Week 10, Part 2: train (or load) a CNN, bundle it, serve it, and call the service."""

    dataset: Literal["mnist", "cifar10"] = "mnist"  # which image data set (and Week 3 CNN) to serve
    checkpoint: str = ""  # checkpoint.pt of a Week 3/4 CNN run (or of this script) to serve instead of training
    epochs: Annotated[int, Range(1)] = 2  # passes over the training data (when training here)
    batch_size: Annotated[int, Range(1)] = 128  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-3  # peak learning rate of Week 3's one-cycle AdamW
    width: Annotated[int, Range(1, 512)] = 32  # channels of the first conv block; each next block doubles them
    blocks: Annotated[int, Range(1, 5)] = 3  # conv blocks, each halves the image
    backend: Literal["onnx", "torch"] = "onnx"  # the service's engine: ONNX Runtime, or the torch.export program
    n_check: Annotated[int, Range(1)] = 500  # test images sent to the service one by one (as PNG files)
    load_seconds: Annotated[float, Range(0, 60)] = 3.0  # length of the closed-loop load test (0: skip it)
    concurrency: Annotated[int, Range(1, 1000)] = 16  # clients of the load test

    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "width": 8, "lr": 5e-3, "n_check": 40,
                             "load_seconds": 0.3, "concurrency": 4}

    def check(self) -> None:
        size = week3.IMAGE_SIZE[self.dataset]
        if size >> self.blocks < 1:
            raise ConfigError(f"--blocks {self.blocks}: each block halves the {size}-pixel {self.dataset} images, "
                              f"so use at most {size.bit_length() - 1}")


# ---- 1. A model: trained here, or a trained one from a checkpoint ----
def week3_config(cfg: Config, **settings) -> week3.Config:
    """Week 3's settings for this run (its model and loaders are reused as they are)."""
    keys = ("dataset", "epochs", "batch_size", "lr", "width", "blocks", "smoke", "seed", "device", "data_dir")
    return week3.Config(**{**{k: getattr(cfg, k) for k in keys}, **settings})


def train_model(cfg: Config, data: ImageData, device: torch.device, run: Run) -> torch.nn.Module:
    w3 = week3_config(cfg)
    train, val, _ = week3.make_loaders(w3, data, device)
    model = prepare_model(week3.make_model(w3, data), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=w3.lr, weight_decay=w3.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, w3.lr, epochs=w3.epochs, steps_per_epoch=len(train),
                                                    pct_start=0.25)
    # No checkpoints between epochs (this script does not resume; Week 3's part2.py does): main saves
    # the trained model once, at the end, so that --checkpoint can serve it again later.
    loop = fit(model, optimizer, train, val, w3.epochs, scheduler=scheduler)
    for row in loop.rows:
        run.log(**row)
    return model


def checkpoint_model(path: str, data: ImageData) -> torch.nn.Module:
    """The CNN a Week 3 / Week 4 / Week 10 run saved: its settings (in the checkpoint) rebuild the
    architecture, then the weights are loaded (weights_only, as always)."""
    payload = read_checkpoint(path)
    saved = payload["config"]
    if payload["model_class"] != "CNN" or not {"width", "blocks", "dataset"} <= set(saved):
        raise CheckpointError(f"{path} holds a {payload['model_class']} without the CNN settings of Weeks 3/4/10; "
                              "pass the checkpoint.pt of a week03/part2, week04/part2 or week10/part2 run")
    if saved["dataset"] != data.name.split()[0]:
        raise CheckpointError(f"{path} is a {saved['dataset']} model; pass --dataset {saved['dataset']}")
    widths = tuple(saved["width"] * 2**i for i in range(saved["blocks"]))
    model = week3.CNN(data.x_train.shape[1], data.num_classes, widths, saved.get("batch_norm", True),
                      saved.get("dropout", 0.0), saved.get("head_pool", 1))
    load_checkpoint(path, model, restore_rng=False)
    return model


# ---- 4. The client side ----
def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as a PNG file: what a user would upload."""
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()


async def ask_one_by_one(url: str, files: list[bytes]) -> list[int]:
    """POST each image to /predict (8 at a time) and read the top class of each answer."""
    limit = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
        async def ask(data: bytes) -> int:
            async with limit:
                r = await client.post("/predict?top_k=1", content=data, headers={"content-type": "image/png"})
                r.raise_for_status()
                return r.json()["predictions"][0]["index"]

        return await asyncio.gather(*(ask(f) for f in files))


def bad_requests(url: str, good_png: bytes) -> dict[str, int]:
    """Requests a service meets in the wild; each should get a 4xx with a JSON message, never a 500."""
    cases = {
        "not an image": {"content": b"hello", "headers": {"content-type": "image/png"}},
        "truncated PNG": {"content": good_png[: len(good_png) // 2], "headers": {"content-type": "image/png"}},
        "wrong content type": {"content": b"x", "headers": {"content-type": "text/plain"}},
        "missing field": {"json": {"image": []}},
        "wrong shape": {"json": {"pixels": [[0.5, 0.5]]}},
        "wrong dtype": {"json": {"pixels": "0.5"}},
        "values 0..255": {"json": {"pixels": [[200] * 28] * 28}},
        "top_k=0": {"json": {"pixels": [[0.5]]}, "params": {"top_k": 0}},
    }
    statuses = {}
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        for name, request in cases.items():
            r = client.post("/predict", **request)
            statuses[name] = r.status_code
            print(f"  {name:>20s} -> {r.status_code} {r.json().get('error', '')[:90]}")
    return statuses


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if cfg.checkpoint:
        read_checkpoint(cfg.checkpoint)  # a missing or damaged file is refused before the data loads
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    if cfg.checkpoint:
        model = checkpoint_model(cfg.checkpoint, data)  # checked before the run folder is made
    run = Run.start(cfg, __file__, device)
    if not cfg.checkpoint:
        model = train_model(cfg, data, device, run)
    model = model.cpu().eval()

    # The model's own answers on the test set (touched once, here); the first n_check images are sent
    # to the service, which must give the same answers.
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalizer(data.mean, data.std))
    test_logits, _ = predict(model, test)
    test_acc = (test_logits.argmax(1) == data.y_test).float().mean().item()
    n = min(cfg.n_check, len(data.x_test))
    x_test, y_test, eager_pred = data.x_test[:n], data.y_test[:n], test_logits[:n].argmax(1)

    # 2. The bundle: the model takes pixels in [0, 1]; (x - mean) / std is inside the exported graphs.
    example = x_test[:1].float() / 255
    bundle = write_bundle(run.path("bundle"), model, example, name=f"{cfg.dataset}_cnn", classes=data.classes,
                          mean=data.mean, std=data.std,
                          extra={"test_acc": round(test_acc, 4), "trained_by": cfg.checkpoint or run.name,
                                 "synthetic_data": data.synthetic})
    print(f"bundle written to {bundle}")

    # 3. + 4. Serve it on loopback and call it over HTTP.
    files = [png_bytes(image) for image in x_test]
    with serving(create_app(bundle, backend=cfg.backend)) as url:
        print(f"serving {url} (backend {cfg.backend}); health: {httpx.get(url + '/health', trust_env=False).json()}")
        served_pred = torch.tensor(asyncio.run(ask_one_by_one(url, files)))
        print("bad requests:")
        statuses = bad_requests(url, files[0])
        load_results = {}
        if cfg.load_seconds:
            load_results = asyncio.run(closed_loop(url, files[0], {"content-type": "image/png"}, cfg.concurrency,
                                                   cfg.load_seconds, warmup=0.2))
            print(report(load_results))

    agree = (served_pred == eager_pred).float().mean().item()
    service_acc = (served_pred == y_test).float().mean().item()
    print(f"test accuracy {test_acc:.2%}; {n} test images over HTTP: the service agrees with the model on {agree:.2%} "
          f"of them (accuracy {service_acc:.2%})")
    n_4xx = sum(400 <= s < 500 for s in statuses.values())
    if not cfg.checkpoint:
        run.save_checkpoint(model, epoch=cfg.epochs)  # serve it again: --checkpoint <run folder>/checkpoint.pt
    return run.finish(test_acc=test_acc, eager_acc_checked=(eager_pred == y_test).float().mean().item(),
                       service_acc=service_acc, service_agrees_with_eager=agree, n_checked=n,
                       bad_requests=len(statuses), bad_requests_4xx=n_4xx, bundle=str(bundle),
                       load_requests=load_results.get("closed_requests", 0),
                       load_errors=load_results.get("closed_errors", 0), load_rps=load_results.get("closed_rps", 0.0),
                       load_p50_ms=load_results.get("closed_p50_ms", 0.0),
                       load_p99_ms=load_results.get("closed_p99_ms", 0.0))


if __name__ == "__main__":
    launch(main, Config)
