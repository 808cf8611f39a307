"""Week 12, Part 2: the capstone pipeline in one command, from a config to a served model.

    data -> model (the Vision Transformer of vit.py, or Week 4's residual CNN; both built in
    build.py) -> training (the loop below: Week 4's schedules and early stopping, checkpoints,
    exact resume, DDP under torchrun) -> evaluation (report.py: accuracy with a Wilson interval,
    confusion matrix, worst errors, curves) -> ONNX export checked against eager, served by the
    Week 10 service (deploy.py) -> model card

Everything lands in one run folder: checkpoint.pt, report.md (+ PNGs), bundle/ (model.onnx,
model.pt2, metadata.json), model_card.md, summary.json.

Run: python week12_capstone/part2.py [--smoke] [--help]
     python week12_capstone/part2.py --model vit --data-dir ../shared/data
     torchrun --nproc_per_node 2 week12_capstone/part2.py --smoke   # data parallel (gloo on CPU)
     python week12_capstone/part2.py --resume runs/week12/part2/<time>/checkpoint.pt  (after Ctrl-C)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from common.checkpoint import resume_state
from common.config import Range, ResumableConfig
from common.data import load, subset
from common.device import prepare_model, seed_everything
from common.distributed import DistInfo, all_reduce_mean, setup, teardown, wrap
from common.errors import ConfigError
from common.loader import TensorLoader
from common.plots import plot_history
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate
from week04_regularization.best_cnn import mixed_precision
from week04_regularization.part2 import (
    EarlyStopping,
    make_decay_optimizer,
    make_scheduler,
    step_per_epoch,
)
from week12_capstone.build import check_resume_matches_launch, make_loaders, make_model
from week12_capstone.deploy import check_deploy_dependencies, export_and_serve
from week12_capstone.report import evaluate_test, write_model_card, write_report


@dataclass
class Config(ResumableConfig):
    """Week 12, Part 2: train, evaluate, export and serve a CIFAR-10 classifier in one command."""

    model: Literal["resnet", "vit"] = "resnet"  # resnet: Week 4's residual SpeedNet; vit: vit.py
    epochs: Annotated[int, Range(1)] = 12  # most passes over the training data (may stop sooner)
    # Early stopping is off by default: one-cycle plans its LR to the last epoch, and its
    # high-LR middle epochs are noisy (patience 3 stopped the CNN at epoch 9 of 24, at peak LR).
    patience: Annotated[int, Range(0)] = 0  # stop after N epochs without a lower val loss (0: off)
    batch_size: Annotated[int, Range(1)] = 256  # images per step (per process under torchrun)
    schedule: Literal["onecycle", "cosine", "step", "plateau"] = "onecycle"  # Week 4's LR schedules
    # The resnet defaults are Week 4's CPU recipe (best_cnn.py); the vit preset is AdamW's.
    optimizer: Literal["adamw", "sgd"] = "sgd"  # Week 4's factory: no decay on norms and biases
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 0.8  # peak learning rate (vit: 1e-3)
    weight_decay: Annotated[float, Range(0, 1)] = 5e-4  # SGD: L2 on weights (vit, AdamW: 0.05)
    bias_lr_scale: Annotated[float, Range(0, lo_open=True)] = 16.0  # norms, biases learn at lr x N
    label_smoothing: Annotated[float, Range(0, 1, hi_open=True)] = 0.2  # target share spread out
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # training images held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training images, at random (0: all)
    translate: Annotated[int, Range(0, 8)] = 2  # training: random shifts of up to N pixels (0: off)
    flip: bool = True  # training: random left-right flips (a mirrored horse is still a horse)
    bf16: bool = True  # bf16 autocast in training: on CUDA, and on CPUs with native bf16
    tta: bool = True  # also report test accuracy with flip TTA (the served model sees one view)
    # --- resnet ---
    width: Annotated[int, Range(1, 1024)] = 32  # channels of the first conv group (then 2x, 4x)
    # --- vit ---
    # The shape benchmarks/week12.py's cifar10_vit_sweep chose on validation for a CPU budget.
    patch: Annotated[int, Range(1, 32)] = 8  # side of the square patches (8 on 32x32: 16 tokens)
    dim: Annotated[int, Range(1, 2048)] = 192  # width of every token
    depth: Annotated[int, Range(1, 48)] = 6  # transformer blocks
    heads: Annotated[int, Range(1, 64)] = 6  # attention heads; each looks at dim/heads channels
    mlp_ratio: Annotated[int, Range(1, 16)] = 2  # hidden width of each block's MLP, in units of dim
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # on attention outputs and MLPs
    # --- evaluation and deployment ---
    worst: Annotated[int, Range(0, 64)] = 16  # most confident test errors shown in the report
    deploy: bool = True  # export to ONNX, check it against eager, serve one request (Week 10)

    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "width": 12, "dim": 48, "depth": 2,
                             "heads": 2, "patience": 2, "worst": 8}
    PRESETS: ClassVar[dict] = {"model": {"vit": {  # a ViT wants AdamW and a gentler peak
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "bias_lr_scale": 1.0,
        "label_smoothing": 0.1}}}
    SMOKE_PRESETS: ClassVar[dict] = {  # 56 steps: AdamW must learn fast; on the tiny twin, 8x8
        "optimizer": {"adamw": {"lr": 5e-3}}, "model": {"vit": {"patch": 4}}}  # patches are coarse

    def check(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"--heads {self.heads} must divide --dim {self.dim} "
                              "(each head gets dim/heads channels)")


def train_one_epoch(model: nn.Module, train: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler, per_batch: bool, loss_fn: nn.Module, bf16: bool) -> dict:
    model.train()
    device = train.x.device
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in train:  # x: (B, C, H, W) normalized, y: (B,)
        with mixed_precision(x.device, bf16):  # bf16 convs and matmuls where the chip has them
            logits = model(x)  # (B, classes)
        loss = loss_fn(logits.float(), y)  # label smoothing: a target of 0.8 + 0.2/10, not 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun DDP averages the gradients over the ranks here
        optimizer.step()
        if per_batch:
            scheduler.step()  # one-cycle: after EVERY BATCH
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(train) * train.batch_size  # drop_last: every batch is full
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item()}


def validate(model: nn.Module, val: TensorLoader, loss_fn: nn.Module, info: DistInfo) -> dict:
    """Validation loss and accuracy, averaged over the ranks under torchrun: every rank must take
    the same decisions (stop early, lower the LR), and a rank that stopped while the others
    trained on would hang them. BatchNorm's running statistics differ a little per rank (each
    saw its own last batch), so the raw figures differ too. In one process: unchanged."""
    figures = evaluate(model, val, loss_fn)
    return {f"val_{k}": all_reduce_mean(torch.tensor(v, dtype=torch.float64), info).item()
            for k, v in figures.items()}


def main(cfg: Config) -> dict:
    if cfg.deploy:
        check_deploy_dependencies()
    seed_everything(cfg.seed)
    info = setup(cfg.device)  # under torchrun: joins the process group; else a world of one
    check_resume_matches_launch(cfg.resume, info)

    # ---- data ----
    data = load("cifar10", cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    data = subset(data, cfg.train_subset, cfg.seed)
    train, val, test = make_loaders(cfg, data, info)

    # ---- model, optimizer, schedule ----
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    net = prepare_model(make_model(cfg, data), info.device, channels_last=cfg.model == "resnet")
    params = sum(p.numel() for p in net.parameters())
    model = wrap(net, info)  # DistributedDataParallel under torchrun: gradients averaged
    # SGD: Nesterov momentum, which one-cycle moves between 0.95 and 0.85 opposite to the LR
    optimizer = make_decay_optimizer(net, cfg.optimizer, cfg.lr, cfg.weight_decay,
                                     no_decay_lr_scale=cfg.bias_lr_scale)
    scheduler, per_batch = make_scheduler(cfg.schedule, optimizer, cfg.epochs, len(train))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    early = EarlyStopping(model, cfg.patience or math.inf)  # patience 0: never stop early
    run = Run.start(cfg, __file__, info.device) if info.is_main else None  # rank 0 alone writes
    if run:
        print(f"{cfg.model}: {params:,} parameters; train {len(train.x)} x {info.world_size} "
              f"process(es), validation {len(val.x)}, test {len(test.x)} images ({data.name})")

    # ---- train: the loop, with validation deciding (schedule, early stopping) ----
    state = (run.restore(model, optimizer, scheduler) if run  # {"epoch": 0} for a new run
             else resume_state(cfg.resume, model, optimizer, scheduler, script="week12/part2"))
    if "early" in state:
        early.load_state_dict(state["early"])
    stopped, epoch = state.get("stopped", False), state["epoch"]
    while not stopped and epoch < cfg.epochs:
        epoch += 1
        t0 = time.perf_counter()
        train.set_epoch(epoch)  # this epoch's shuffle and crops, the same after a resume
        row = {"epoch": epoch, **train_one_epoch(model, train, optimizer, scheduler, per_batch,
                                                 loss_fn, cfg.bf16)}
        check_finite(row["train_loss"], epoch)  # NaN/inf: stop, keeping the last checkpoint
        row.update(validate(model, val, loss_fn, info))  # the same figures on every rank
        row.update(lr=optimizer.param_groups[0]["lr"],
                   epoch_time_s=round(time.perf_counter() - t0, 3))
        if not per_batch:
            step_per_epoch(scheduler, row["val_loss"])  # step, cosine, plateau: after every EPOCH
        stopped = early.update(row["val_loss"], epoch)  # early stopping decides here
        if run:  # rank 0 alone prints, logs and saves
            run.log(show=True, **row)
            run.save_checkpoint(model, optimizer, scheduler, epoch=epoch, stopped=stopped,
                                early=early.state_dict())
    kept = early.restore_best() if cfg.patience else epoch  # the epoch validation liked best
    if run is None:  # the other ranks are done once training is
        del model
        teardown(info)
        return {"rank": info.rank}

    # ---- evaluate once on the test set, report, export and serve ----
    rows = run.rows
    kept_row = next(r for r in rows if r["epoch"] == kept)
    training = {"params": params, "epochs_done": epoch, "stopped_early": stopped,
                "kept_epoch": kept, "val_acc": kept_row["val_acc"],
                "train_time_s": round(sum(r["epoch_time_s"] for r in rows), 2)}
    plot_history(rows, run.path("curves.png"), title=f"{cfg.model} on {data.name}")
    test_figures = evaluate_test(net, test, data, run.path, cfg.worst, cfg.tta)
    write_report(run.path("report.md"), cfg, data, training, test_figures)
    deployed = None
    if cfg.deploy:
        extra = {"test_acc": test_figures["test_acc"], "data": data.name, "config": cfg.to_dict()}
        deployed = export_and_serve(net, data, run.path("bundle"), f"cifar10-{cfg.model}", extra)
    write_model_card(run.path("model_card.md"), cfg, data, test_figures, params, deployed)
    del model
    teardown(info)
    figures = {k: v for k, v in test_figures.items() if k.startswith("test_acc")}
    deployed = {k: v for k, v in (deployed or {}).items() if k != "served_classes"}
    return run.finish(model=cfg.model, **training, **figures, world_size=info.world_size,
                      data=data.name, **deployed)


if __name__ == "__main__":
    launch(main, Config)
