"""Week 12, Part 2: the capstone pipeline in one command, from a config to a served model.

    config -> data -> model (a small Vision Transformer, or Week 4's residual CNN) -> training
    (Week 4's schedules and early stopping, checkpoints, resume, AMP on GPU, DDP under torchrun)
    -> evaluation report (accuracy with a Wilson interval, confusion matrix, worst errors, curves)
    -> ONNX export checked against the eager model -> model card -> served by the Week 10 service,
    whose answer to a request is compared with the eager model's

Everything lands in one run folder: checkpoint.pt, report.md (+ PNGs), bundle/ (model.onnx,
model.pt2, metadata.json), model_card.md, summary.json.

Run: python week12_capstone/part2.py [--smoke] [--help]
     python week12_capstone/part2.py --model vit --data-dir ../shared/data
     torchrun --nproc_per_node 2 week12_capstone/part2.py --smoke      # data parallel (gloo on the CPU)
     python week12_capstone/part2.py --resume runs/week12/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import math
import warnings
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import read_checkpoint
from common.config import Range, ResumableConfig
from common.data import ImageData, load
from common.device import prepare_model, seed_everything
from common.distributed import DistInfo, all_reduce_mean, setup, shard, teardown, wrap
from common.errors import CheckpointError, ConfigError, LabError
from common.loader import TensorLoader, derive_seed, normalizer, split
from common.plots import confusion_matrix, plot_confusion, plot_history, plot_images
from common.runner import launch
from common.runs import Run
from common.train import Callback, Loop, fit, predict
from week03_cnn.part2 import training_augment
from week04_regularization.best_cnn import SpeedNet, whitening_filters
from week04_regularization.part2 import EarlyStopping, EpochScheduler, make_optimizer, make_scheduler, subset
from week12_capstone.part1 import wilson_interval


@dataclass
class Config(ResumableConfig):
    """Week 12, Part 2: train, evaluate, export and serve a CIFAR-10 classifier in one command."""

    model: Literal["resnet", "vit"] = "resnet"  # resnet: Week 4's residual SpeedNet; vit: the Vision Transformer here
    epochs: Annotated[int, Range(1)] = 12  # most passes over the training data (early stopping may end sooner)
    patience: Annotated[int, Range(0)] = 3  # stop after this many epochs without a lower val loss (0: never stop)
    batch_size: Annotated[int, Range(1)] = 256  # images per optimizer step (per process under torchrun)
    schedule: Literal["onecycle", "cosine", "step", "plateau"] = "onecycle"  # Week 4's LR schedules (onecycle warms up)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # Week 4's factory: no weight decay on norms and biases
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 2e-3  # peak learning rate (--model vit: 1e-3)
    weight_decay: Annotated[float, Range(0, 1)] = 0.05  # AdamW: decoupled decay per unit lr; SGD: L2
    label_smoothing: Annotated[float, Range(0, 1, hi_open=True)] = 0.1  # share of the target spread over all classes
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # training images held out for validation
    train_subset: Annotated[int, Range(0)] = 0  # use only N training images, drawn at random (0: all): quicker
    # --- resnet ---------------------------------------------------------------------------------
    width: Annotated[int, Range(1, 1024)] = 32  # resnet: channels of the first conv group (then 2x, 4x)
    # --- vit ------------------------------------------------------------------------------------
    patch: Annotated[int, Range(1, 32)] = 4  # vit: side of the square patches (4 on 32x32 images: 64 tokens)
    dim: Annotated[int, Range(1, 2048)] = 128  # vit: width of every token
    depth: Annotated[int, Range(1, 48)] = 4  # vit: transformer blocks
    heads: Annotated[int, Range(1, 64)] = 4  # vit: attention heads; each looks at dim/heads channels
    mlp_ratio: Annotated[int, Range(1, 16)] = 2  # vit: hidden width of each block's MLP, in multiples of dim
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # vit: dropout on attention outputs and MLPs
    # --- evaluation and deployment -------------------------------------------------------------------
    worst: Annotated[int, Range(0, 64)] = 16  # most confident test errors shown as images in the report
    deploy: bool = True  # export to ONNX, check it against eager, serve one request with the Week 10 service

    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "width": 12, "dim": 48, "depth": 2, "heads": 2,
                             "lr": 5e-3, "patience": 2, "worst": 8}
    PRESETS: ClassVar[dict] = {"model": {"vit": {"lr": 1e-3}}}  # transformers want a gentler peak than the CNN

    def check(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"--heads {self.heads} must divide --dim {self.dim} (each head gets dim/heads channels)")


# =========================================================================================
#                         The Vision Transformer (Dosovitskiy et al. 2021)
# =========================================================================================
# An image becomes a sequence: cut it into patch x patch squares, flatten each, project it to a
# `dim`-wide token. A learned [class] token is put in front, a learned position vector is added
# to every token (attention itself does not know where a token came from), and pre-norm
# transformer blocks mix the tokens. The class token's final state is classified.


class PatchEmbedding(nn.Module):
    """(N, C, H, W) images -> (N, L, dim) tokens, one per patch, row by row.

    "Flatten each patch and multiply by a matrix" is exactly a convolution whose kernel and stride
    are the patch size. An image whose side is not a multiple of the patch is zero-padded on the
    right and bottom (zero = the mean colour after normalization): L = ceil(H/p) * ceil(W/p).
    """

    def __init__(self, in_channels: int, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[2] % self.patch, -x.shape[3] % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x).flatten(2).transpose(1, 2)


def num_patches(size: int, patch: int) -> int:
    """Tokens from a size x size image: ceil(size / patch) per side (the last patch padded)."""
    return math.ceil(size / patch) ** 2


class Attention(nn.Module):
    """Multi-head self-attention, written out: softmax(Q K^T / sqrt(d)) V per head.

    (F.scaled_dot_product_attention would fuse it; with 65 tokens the explicit form is as fast on
    the CPU, exports to ONNX as plain MatMul/Softmax, and FlopCounterMode can count it: part1.)"""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, h, T, d/h)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (N, h, T, T): who looks at whom
        mixed = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return self.dropout(self.proj(mixed))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)). Normalizing the
    branch inputs (not the sum) keeps a clean residual path, so deep stacks train without warm
    restarts or careful init."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """patches -> [class] token + positions -> blocks -> LayerNorm -> linear head on the class token.

    ``positional=False`` leaves the position vectors out: the model then sees a bag of patches
    (shuffling them changes nothing, as the tests check), which is what the position vectors fix.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, patch: int = 4,
                 dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0,
                 positional: bool = True):
        super().__init__()
        self.patches = PatchEmbedding(in_channels, patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        tokens = 1 + num_patches(image_size, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim)) if positional else None
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for parameter in (self.cls_token, self.pos_embed):
            if parameter is not None:
                nn.init.trunc_normal_(parameter, std=0.02)  # small: positions start as a gentle hint
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # shape[0]: a dynamic batch
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _init_linear(module: nn.Module) -> None:
    """Linear weights ~ truncated normal(0.02), zero biases: the usual ViT start."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


# =========================================================================================
#                                   Data and model
# =========================================================================================
def make_model(cfg: Config, data: ImageData) -> nn.Module:
    """The ViT above, or Week 4's SpeedNet (a residual CNN) with its patch-whitening first layer
    computed from 1000 training images drawn at random (the JPEG copy is stored class by class)."""
    channels, size = data.x_train.shape[1], data.x_train.shape[2]
    if cfg.model == "vit":
        return ViT(channels, size, data.num_classes, cfg.patch, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio,
                   cfg.dropout)
    net = SpeedNet((cfg.width, 2 * cfg.width, 4 * cfg.width), num_classes=data.num_classes, in_channels=channels)
    sample = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(cfg.seed))[:1000]
    net.stem.weight.data.copy_(whitening_filters(normalizer(data.mean, data.std)(data.x_train[sample])))
    return net


def make_loaders(cfg: Config, data: ImageData, info: DistInfo) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """Training batches (this process's shard under torchrun, Week 3's crop + flip), validation
    held out of the training set, and the test set, all normalized with the training statistics."""
    x, y, x_val, y_val = split(data.x_train, data.y_train, cfg.val_fraction, cfg.seed)
    if len(x_val) == 0:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(data.x_train)} training images holds out none "
                          "for validation; use more images or a larger --val-fraction")
    x, y = shard(x, y, info)  # rank r trains on examples r, r+W, ...; validation and test stay whole
    if len(x) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(x)} training images "
                          f"{'of each process' if info.distributed else 'left after validation'}")
    normalize = normalizer(data.mean, data.std)
    train = TensorLoader(x, y, cfg.batch_size, shuffle=True, drop_last=True, device=info.device,
                         seed=derive_seed(cfg.seed, info.rank), augment=training_augment("cifar10"),
                         transform=normalize)
    val = TensorLoader(x_val, y_val, 1024, transform=normalize, device=info.device)
    return train, val, TensorLoader(data.x_test, data.y_test, 1024, transform=normalize, device=info.device)


class AgreeOnValidation(Callback):
    """Under torchrun every process must take the same decisions (stop early, lower the LR):
    a rank that stops while the others train on would hang them. BatchNorm's running statistics
    differ a little between ranks (each saw its own last batch), so the validation figures are
    averaged over the ranks before any callback reads them. A no-op in a single process."""

    def __init__(self, info: DistInfo):
        self.info = info

    def on_epoch_end(self, loop: Loop) -> None:
        for key in ("val_loss", "val_acc"):
            value = torch.tensor(loop.row[key], dtype=torch.float64)
            loop.row[key] = all_reduce_mean(value, self.info).item()


# =========================================================================================
#                                  Evaluation report
# =========================================================================================
def evaluate_test(model: nn.Module, test: TensorLoader, data: ImageData, run: Run, worst: int) -> dict:
    """The test set, once: accuracy with its 95% Wilson interval (Part 1), per-class accuracy with
    intervals, the confusion matrix, and the most confident mistakes as images."""
    logits, targets = predict(model, test)
    probs = logits.softmax(dim=1)
    predicted = probs.argmax(dim=1)
    correct = predicted == targets
    n, k = len(targets), int(correct.sum())
    low, high = wilson_interval(np.array(k), np.array(n))
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), data.num_classes)
    plot_confusion(matrix, data.classes, run.path("confusion.png"), title=f"test accuracy {k / n:.2%}")
    class_low, class_high = wilson_interval(matrix.diagonal(), matrix.sum(axis=1))
    per_class = [{"class": c, "n": int(matrix[i].sum()), "acc": float(matrix[i, i] / max(matrix[i].sum(), 1)),
                  "low": float(class_low[i]), "high": float(class_high[i])} for i, c in enumerate(data.classes)]
    # Worst errors: wrong answers given with the highest confidence, the ones to look at first.
    confidence = probs.gather(1, predicted.unsqueeze(1)).squeeze(1)
    wrong = torch.nonzero(~correct).squeeze(1)
    shown = wrong[confidence[wrong].argsort(descending=True)][:worst]
    if len(shown):
        titles = [f"{data.classes[int(targets[i])]}->{data.classes[int(predicted[i])]} {confidence[i]:.0%}"
                  for i in shown.tolist()]
        plot_images(data.x_test[shown].numpy(), run.path("worst_errors.png"), titles=titles, ncols=8,
                    title="most confident mistakes (true->predicted, confidence)")
    return {"test_acc": k / n, "test_acc_low": float(low), "test_acc_high": float(high), "test_n": n,
            "per_class": per_class, "worst_shown": len(shown)}


def write_report(path, cfg: Config, data: ImageData, loop: Loop, early: EarlyStopping | None, test: dict,
                 params: int) -> None:
    """report.md: the figures a reviewer asks for first, with the plots beside them."""
    kept = early.best_epoch if early else loop.epoch
    kept_val_acc = next(r["val_acc"] for r in loop.rows if r["epoch"] == kept)
    lines = [f"# Evaluation report: {cfg.model} on {data.name}", "",
             f"Test accuracy **{test['test_acc']:.2%}** (95% Wilson interval {test['test_acc_low']:.2%} to "
             f"{test['test_acc_high']:.2%}, n = {test['test_n']}); the test set was evaluated once, after "
             "training, on the weights that validation chose.", "",
             "| | |", "|---|---|",
             f"| model | {cfg.model}, {params:,} parameters |",
             f"| epochs trained | {loop.epoch} of {cfg.epochs}{' (stopped early)' if loop.stop else ''} |",
             f"| kept epoch (lowest validation loss) | {kept} |",
             f"| validation accuracy of the kept epoch | {kept_val_acc:.2%} |",
             f"| training time | {sum(r['epoch_time_s'] for r in loop.rows):.1f} s |", "",
             "## Per class", "", "| class | n | accuracy | 95% interval |", "|---|---:|---:|---|"]
    lines += [f"| {c['class']} | {c['n']} | {c['acc']:.1%} | {c['low']:.1%} to {c['high']:.1%} |"
              for c in test["per_class"]]
    lines += ["", "## Learning curves", "", "![learning curves](curves.png)", "",
              "## Confusion matrix (rows: true class)", "", "![confusion matrix](confusion.png)", ""]
    if test["worst_shown"]:
        lines += ["## Most confident mistakes", "", "![worst errors](worst_errors.png)", ""]
    path.write_text("\n".join(lines))


# =========================================================================================
#                        Export, check, model card, serve (Week 10)
# =========================================================================================
DEPLOY_MODULES = ("onnx", "onnxruntime", "onnxscript", "fastapi", "httpx")


def check_deploy_dependencies() -> None:
    """Before any work: the export and the service need the optional 'deploy' extra."""
    missing = [m for m in DEPLOY_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise LabError(f"--deploy needs {', '.join(missing)}: pip install -e '.[deploy]' (or run with --no-deploy)")


def export_and_serve(model: nn.Module, data: ImageData, run: Run, cfg: Config, test: dict) -> dict:
    """Write the bundle (ONNX + torch.export program + metadata, normalization baked in), check the
    ONNX graph against the eager model on test images, then start the Week 10 service in-process and
    compare its answer to a request with the eager model's."""
    import onnxruntime

    with warnings.catch_warnings():  # newer Starlette asks for httpx2 instead of the deploy extra's httpx: same client
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient

    from common.export import write_bundle
    from week10_deploy.service import create_app

    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    normalize = normalizer(data.mean, data.std)
    images = data.x_test[:64]
    pixels = images.float() / 255  # what every client sends: pixels in [0, 1]; the bundle normalizes
    bundle = write_bundle(run.path("bundle"), model, pixels[:2], name=f"cifar10-{cfg.model}", classes=data.classes,
                          mean=data.mean, std=data.std,
                          extra={"test_acc": test["test_acc"], "data": data.name, "config": cfg.to_dict()})
    with torch.inference_mode():
        eager_probs = model(normalize(images)).softmax(dim=1)

    session = onnxruntime.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0])
    onnx_probs = onnx_logits.softmax(dim=1)
    onnx_diff = (onnx_probs - eager_probs).abs().max().item()

    with TestClient(create_app(bundle, backend="onnx")) as client:  # the app in-process, no port opened
        served = serve_request(client, images[:4], data.num_classes)
    served_probs = torch.tensor(served["probabilities"])
    served_diff = (served_probs - eager_probs[:4]).abs().max().item()
    same_answer = served["classes"] == [data.classes[int(i)] for i in eager_probs[:4].argmax(1)]
    return {"onnx_max_prob_diff": onnx_diff, "onnx_same_argmax": bool((onnx_probs.argmax(1) ==
                                                                         eager_probs.argmax(1)).all()),
            "served_max_prob_diff": served_diff, "served_same_answer": same_answer,
            "served_classes": served["classes"], "bundle": str(bundle)}


def serve_request(client, images: torch.Tensor, num_classes: int) -> dict:
    """POST a batch of images to the service as a client would (JSON pixels in [0, 1], shaped
    (C, H, W) each) and read back, per image, the predicted class and the probabilities of every
    class (top_k = all classes, put back in class order)."""
    pixels = (images.float() / 255).tolist()
    response = client.post("/predict/batch", params={"top_k": num_classes}, json={"pixels": pixels})
    if response.status_code != 200:
        raise LabError(f"the Week 10 service answered {response.status_code}: {response.text[:200]}")
    rows = response.json()["predictions"]
    probabilities = [[0.0] * num_classes for _ in rows]
    for row, answer in zip(probabilities, rows):
        for entry in answer:
            row[entry["index"]] = entry["probability"]
    return {"classes": [answer[0]["class"] for answer in rows], "probabilities": probabilities}


def write_model_card(path, cfg: Config, data: ImageData, test: dict, params: int, deployed: dict | None) -> None:
    """model_card.md (after Mitchell et al. 2019): what the model is, what it was trained and
    tested on, how well it does with what uncertainty, and where it should not be used."""
    weakest = min(test["per_class"], key=lambda c: c["acc"])
    source = "synthetic shapes and textures (a smoke run, not a real model)" if data.synthetic else "photographs"
    lines = [f"# Model card: cifar10-{cfg.model}", "",
             "## Model", f"- {'Vision Transformer' if cfg.model == 'vit' else 'residual CNN (Week 4 SpeedNet)'}, "
             f"{params:,} parameters, trained by `week12_capstone/part2.py` (settings in config.yaml).",
             "- Input: RGB images 32x32, pixels scaled to [0, 1] (the exported graphs normalize by themselves).",
             f"- Output: probabilities over the 10 classes: {', '.join(data.classes)}.", "",
             "## Intended use",
             "- Teaching: an end-to-end example of training, evaluating, exporting and serving a classifier.",
             "- Not for decisions about people or property; not for images unlike CIFAR-10 (other sizes, domains).", "",
             "## Data",
             f"- Trained on {data.name}: {source}; "
             f"{cfg.val_fraction:.0%} of the training images held out for validation (model selection).",
             f"- Tested once on {test['test_n']} held-out images.", "",
             "## Performance",
             f"- Test accuracy {test['test_acc']:.2%}, 95% Wilson interval {test['test_acc_low']:.2%} to "
             f"{test['test_acc_high']:.2%}.",
             f"- Weakest class: {weakest['class']} ({weakest['acc']:.1%}); per-class figures in report.md.", "",
             "## Limitations",
             *(["- The CIFAR-10 copy used here is JPEG-compressed (quality 75): compare only with runs on the "
                "same copy."] if "jpg" in data.source else []),
             "- 32x32 images: small objects and fine texture are lost; expect a drop on other photos.",
             "- Confident mistakes exist (worst_errors.png): the probabilities are not calibrated.", ""]
    if deployed:
        lines += ["## Deployment",
                  "- Bundle: `bundle/` (model.onnx, model.pt2, metadata.json), served by `week10_deploy/service.py`.",
                  "- ONNX vs eager on 64 test images: largest probability difference "
                  f"{deployed['onnx_max_prob_diff']:.1e}.",
                  f"- Served answer vs eager: largest probability difference {deployed['served_max_prob_diff']:.1e}, "
                  f"same classes: {deployed['served_same_answer']}.", ""]
    path.write_text("\n".join(lines))


def check_resume_matches_launch(resume: str, info: DistInfo) -> None:
    """A checkpoint saved under torchrun holds the DistributedDataParallel wrapper ("module."
    names); one saved by a single process does not. Say so before touching the run's folder."""
    if not resume:
        return
    under_torchrun = read_checkpoint(resume)["model_class"] == "DistributedDataParallel"
    if under_torchrun != info.distributed:
        how = "under torchrun (several processes)" if under_torchrun else "by a single process"
        raise CheckpointError(f"{resume} was saved {how}; resume it the same way "
                              f"({'torchrun --nproc_per_node N ' if under_torchrun else 'python '}"
                              f"week12_capstone/part2.py --resume {resume})")


def rank_zero_prints(info: DistInfo) -> contextlib.AbstractContextManager:
    """fit() prints every epoch's row; under torchrun only rank 0's should reach the terminal (the
    other ranks' rows would interleave with it, each with its own shard's training loss)."""
    return contextlib.nullcontext() if info.is_main else contextlib.redirect_stdout(io.StringIO())


# =========================================================================================
#                                        main
# =========================================================================================
def main(cfg: Config) -> dict:
    if cfg.deploy:
        check_deploy_dependencies()
    seed_everything(cfg.seed)
    info = setup(cfg.device)  # under torchrun: joins the process group; else a world of one
    check_resume_matches_launch(cfg.resume, info)
    data = subset(load("cifar10", cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed), cfg.train_subset, cfg.seed)
    train, val, test = make_loaders(cfg, data, info)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = prepare_model(make_model(cfg, data), info.device, channels_last=cfg.model == "resnet")  # NHWC on CUDA
    params = sum(p.numel() for p in net.parameters())
    model = wrap(net, info)  # DistributedDataParallel under torchrun: gradients averaged over the ranks
    optimizer = make_optimizer(net, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler, per_batch = make_scheduler(cfg.schedule, optimizer, cfg.epochs, len(train))
    early = EarlyStopping(model, cfg.patience) if cfg.patience else None
    callbacks: list[Callback] = [AgreeOnValidation(info), *([] if per_batch else [EpochScheduler(scheduler)]),
                                 *([early] if early else [])]
    run = Run.start(cfg, __file__, info.device) if info.is_main else None  # rank 0 alone writes
    if run:
        print(f"{cfg.model}: {params:,} parameters; train {len(train.x)} x {info.world_size} process(es), "
              f"validation {len(val.x)}, test {len(test.x)} images ({data.name})")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    with rank_zero_prints(info):
        loop = fit(model, optimizer, train, val, cfg.epochs, loss_fn=loss_fn,
                   scheduler=scheduler if per_batch else None, callbacks=callbacks, run=run, resume=cfg.resume)
    if run is None:  # other ranks: done once training is
        del model
        teardown(info)
        return {"rank": info.rank}

    plot_history(loop.rows, run.path("curves.png"), title=f"{cfg.model} on {data.name}")
    test_figures = evaluate_test(net, test, data, run, cfg.worst)
    write_report(run.path("report.md"), cfg, data, loop, early, test_figures, params)
    deployed = export_and_serve(net, data, run, cfg, test_figures) if cfg.deploy else None
    write_model_card(run.path("model_card.md"), cfg, data, test_figures, params, deployed)
    del model
    teardown(info)
    kept = early.best_epoch if early else loop.epoch
    summary = {"model": cfg.model, "params": params, "test_acc": test_figures["test_acc"],
               "test_acc_low": test_figures["test_acc_low"], "test_acc_high": test_figures["test_acc_high"],
               "val_acc": next(r["val_acc"] for r in loop.rows if r["epoch"] == kept), "kept_epoch": kept,
               "epochs_done": loop.epoch, "stopped_early": loop.stop, "world_size": info.world_size,
               "train_time_s": round(sum(r["epoch_time_s"] for r in loop.rows), 2), "data": data.name}
    if deployed:
        summary.update({k: v for k, v in deployed.items() if k != "served_classes"})
    return run.finish(**summary)


if __name__ == "__main__":
    launch(main, Config)
