"""Week 10, Part 2: serve the Week 3 CNN over HTTP, and call it the way a client would.

The path from a trained model to an answer over the network, in four steps:

    1. a model: trained here (Week 3's CNN and loaders, imported; the loop written below) or loaded
       from a run's checkpoint
    2. a bundle: model.onnx + model.pt2 + metadata.json, the normalization baked in, both
       exports checked against eager PyTorch (week10_deploy/export.py: the export calls)
    3. the service (week10_deploy/service.py) on 127.0.0.1, started in this process with the
       same uvicorn server the README's command starts
    4. a client: test images sent as PNG files, answers compared with the model's own; a few
       bad requests (each must get its 4xx); a short closed-loop load test

The bundle stays in the run folder; serve it again with the README's uvicorn command.

Run: python week10_deploy/part2.py [--smoke] [--help]
     python week10_deploy/part2.py --dataset mnist --epochs 2
     python week10_deploy/part2.py --checkpoint runs/week03/part2/<time>/checkpoint.pt
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import httpx
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.checkpoint import load_checkpoint, read_checkpoint
from common.config import BaseConfig, Range
from common.data import ImageData, load
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import CheckpointError, ConfigError
from common.loader import TensorLoader, normalizer
from common.progress import progress
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate, predict
from week03_cnn import part2 as week3
from week10_deploy.export import write_bundle
from week10_deploy.load_test import closed_loop, report
from week10_deploy.service import create_app, serving

NO_CHECKPOINT = "leave out --checkpoint to train a CNN here"  # instead of an unservable file


@dataclass
class Config(BaseConfig):
    """Week 10, Part 2: train (or load) a CNN, bundle it, serve it, and call the service."""

    dataset: Literal["mnist", "cifar10"] = "mnist"  # image data set (and Week 3 CNN) to serve
    checkpoint: str = ""  # checkpoint.pt of a Week 3/4/10 CNN run to serve instead of training
    epochs: Annotated[int, Range(1)] = 2  # passes over the training data (when training here)
    batch_size: Annotated[int, Range(1)] = 128  # images per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-3  # peak lr of Week 3's one-cycle AdamW
    width: Annotated[int, Range(1, 512)] = 32  # channels of the first conv block (then doubling)
    blocks: Annotated[int, Range(1, 5)] = 3  # conv blocks, each halves the image
    backend: Literal["onnx", "torch"] = "onnx"  # service engine: ONNX Runtime or torch.export
    n_check: Annotated[int, Range(1)] = 500  # test images sent to the service one by one (PNG)
    load_seconds: Annotated[float, Range(0, 60)] = 3.0  # closed-loop load test length (0: skip)
    concurrency: Annotated[int, Range(1, 1000)] = 16  # clients of the load test

    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "width": 8, "lr": 5e-3, "n_check": 40,
                             "load_seconds": 0.3, "concurrency": 4}

    def check(self) -> None:
        size = week3.IMAGE_SIZE[self.dataset]
        if size >> self.blocks < 1:
            raise ConfigError(f"--blocks {self.blocks}: each block halves the {size}-pixel "
                              f"{self.dataset} images, so use at most {size.bit_length() - 1}")


# ---- 1. A model: trained here, or a trained one from a checkpoint ----
WEEK3_KEYS = ("dataset", "epochs", "batch_size", "lr", "width", "blocks", "smoke", "seed",
              "device", "data_dir")


def train_one_epoch(model: nn.Module, train: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> dict:
    """Week 3's loop: one pass over the batches; the mean loss and accuracy over the epoch."""
    model.train()
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in progress(train, "train"):
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(train) * train.batch_size  # drop_last: every batch is full
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item()}


def train_model(w3: week3.Config, data: ImageData, train, val, device: torch.device,
                run: Run) -> nn.Module:
    """Week 3's recipe: its CNN, AdamW, one-cycle stepped per batch, and the loop above."""
    model = prepare_model(week3.make_model(w3, data), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=w3.lr, weight_decay=w3.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, w3.lr, epochs=w3.epochs,
                                                    steps_per_epoch=len(train), pct_start=0.25)
    # No checkpoint per epoch (no --resume here): main saves the model once, at the end.
    for epoch in range(1, w3.epochs + 1):
        train.set_epoch(epoch)
        row = train_one_epoch(model, train, optimizer, scheduler, device)
        check_finite(row["train_loss"], epoch)
        if val is not None:
            row.update({f"val_{k}": v for k, v in evaluate(model, val).items()})
        run.log(show=True, epoch=epoch, **row)
    return model


def checkpoint_model(path: str, data: ImageData) -> nn.Module:
    """The CNN a Week 3 / Week 4 / Week 10 run saved: its settings (in the checkpoint) rebuild
    the architecture, then the weights are loaded (weights_only, as always)."""
    payload = read_checkpoint(path, instead=NO_CHECKPOINT)
    saved = payload["config"]
    if payload["model_class"] != "CNN" or not {"width", "blocks", "dataset"} <= set(saved):
        raise CheckpointError(f"{path} holds a {payload['model_class']} without the CNN settings "
                              "of Weeks 3/4/10; pass the checkpoint.pt of a week03/part2, "
                              f"week04/part2 or week10/part2 run, or {NO_CHECKPOINT}")
    if saved["dataset"] != data.name.split()[0]:
        raise CheckpointError(f"{path} is a {saved['dataset']} model; pass --dataset "
                              f"{saved['dataset']}")
    widths = tuple(saved["width"] * 2**i for i in range(saved["blocks"]))
    model = week3.CNN(data.x_train.shape[1], data.num_classes, widths,
                      saved.get("batch_norm", True), saved.get("dropout", 0.0),
                      saved.get("head_pool", 1))
    load_checkpoint(path, model, restore_rng=False)
    return model


# ---- 4. The client side ----
def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as a PNG file: what a user would upload."""
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()


async def ask_one_by_one(url: str, files: list[bytes]) -> list[int]:
    """POST each image to /predict (8 at a time) and read the top class of each answer."""
    limit = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
        async def ask(data: bytes) -> int:
            async with limit:
                r = await client.post("/predict?top_k=1", content=data,
                                      headers={"content-type": "image/png"})
                r.raise_for_status()
                return r.json()["predictions"][0]["index"]

        return await asyncio.gather(*(ask(f) for f in files))


def bad_requests(url: str, good_png: bytes) -> dict[str, int]:
    """Requests a service meets in the wild; each should get a 4xx with a JSON message, never a
    500."""
    png = {"content-type": "image/png"}
    cases = {
        "not an image": {"content": b"hello", "headers": png},
        "truncated PNG": {"content": good_png[: len(good_png) // 2], "headers": png},
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
    if cfg.checkpoint:  # a missing or damaged file is refused before the data loads
        read_checkpoint(cfg.checkpoint, instead=NO_CHECKPOINT)
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    w3 = week3.Config(**{k: getattr(cfg, k) for k in WEEK3_KEYS})  # as a Week 3 run would
    if cfg.checkpoint:
        model = checkpoint_model(cfg.checkpoint, data)
    else:
        # Week 3's batches, built before the run folder: a batch larger than the training set
        # is a ConfigError (exit 2) raised here, so nothing is written.
        train, val, _ = week3.make_loaders(w3, data, device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no folder
    if not cfg.checkpoint:
        model = train_model(w3, data, train, val, device, run)
    model = model.cpu().eval()

    # The model's own answers on the test set (touched once, here); the first n_check images
    # are sent to the service, which must give the same answers.
    test = TensorLoader(data.x_test, data.y_test, 1024, transform=normalizer(data.mean, data.std))
    test_logits, _ = predict(model, test)  # (N, classes)
    test_acc = (test_logits.argmax(1) == data.y_test).float().mean().item()
    n = min(cfg.n_check, len(data.x_test))
    x_test, y_test, eager_pred = data.x_test[:n], data.y_test[:n], test_logits[:n].argmax(1)

    # 2. The bundle: the model takes pixels in [0, 1]; (x - mean) / std is inside the graphs.
    example = x_test[:1].float() / 255  # (1, C, H, W): only its shape matters
    extra = {"test_acc": round(test_acc, 4), "trained_by": cfg.checkpoint or run.name,
             "synthetic_data": data.synthetic}
    bundle = write_bundle(run.path("bundle"), model, example, name=f"{cfg.dataset}_cnn",
                          classes=data.classes, mean=data.mean, std=data.std, extra=extra)
    print(f"bundle written to {bundle}")

    # 3. + 4. Serve it on loopback and call it over HTTP.
    files = [png_bytes(image) for image in x_test]
    with serving(create_app(bundle, backend=cfg.backend)) as url:
        health = httpx.get(url + "/health", trust_env=False).json()
        print(f"serving {url} (backend {cfg.backend}); health: {health}")
        served_pred = torch.tensor(asyncio.run(ask_one_by_one(url, files)))
        print("bad requests:")
        statuses = bad_requests(url, files[0])
        under_load = {}
        if cfg.load_seconds:
            under_load = asyncio.run(closed_loop(url, files[0], {"content-type": "image/png"},
                                           cfg.concurrency, cfg.load_seconds, warmup=0.2))
            print(report(under_load))

    agree = (served_pred == eager_pred).float().mean().item()
    service_acc = (served_pred == y_test).float().mean().item()
    print(f"test accuracy {test_acc:.2%}; {n} test images over HTTP: the service agrees with "
          f"the model on {agree:.2%} of them (accuracy {service_acc:.2%})")
    if not cfg.checkpoint:  # serve it again: --checkpoint <run folder>/checkpoint.pt
        run.save_checkpoint(model, epoch=cfg.epochs)
    load_figures = {f"load_{k}": under_load.get(f"closed_{k}", 0)
                    for k in ("requests", "errors", "rps", "p50_ms", "p99_ms")}
    return run.finish(test_acc=test_acc, service_acc=service_acc, service_agrees_with_eager=agree,
                      eager_acc_checked=(eager_pred == y_test).float().mean().item(), n_checked=n,
                      bad_requests=len(statuses),
                      bad_requests_4xx=sum(400 <= s < 500 for s in statuses.values()),
                      bundle=str(bundle), **load_figures)


if __name__ == "__main__":
    launch(main, Config)
