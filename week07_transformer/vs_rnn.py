"""Week 7 self-work: the Transformer classifier against Week 6's LSTM, on the same AG News texts.

Both models see the same training, validation and test texts, the same vocabulary and padding,
and train with the same loop, optimizer (AdamW), warmup-then-cosine schedule and early stopping
(``part2.train_model``); only the model differs (and its learning rate). Measured for each, in
one run: test accuracy, seconds per epoch (training + validation), parameters, and the memory
of one training step's activations: every tensor autograd keeps for the backward pass, counted
with ``torch.autograd.graph.saved_tensors_hooks`` (on CUDA, also the peak the allocator saw).

Why they differ: self-attention looks at all pairs of tokens at once (L^2 work and memory per
layer, but no step waits for another: parallel), an RNN walks the L tokens one after another
(L steps, each small: sequential). On short texts like AG News's (~40 tokens) the L^2 is cheap.

Run: python week07_transformer/vs_rnn.py [--smoke] [--help]
     python week07_transformer/vs_rnn.py --data-dir DATA --train-subset 20000
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves, save
from common.runner import launch
from common.runs import Run
from common.train import evaluate
from week06_rnn.part2 import TextRNN
from week07_transformer import part2
from week07_transformer.data import encode, load_ag_news, loaders

MODELS = ("transformer", "rnn")


@dataclass
class Config(BaseConfig):
    """Week 7 self-work: Transformer vs Week 6's LSTM on AG News: accuracy, time, memory, size."""

    epochs: Annotated[int, Range(1)] = 5  # passes over the training texts, for each model
    batch_size: Annotated[int, Range(1)] = 64  # texts per optimizer step
    d_model: Annotated[int, Range(2, 1024)] = 128  # Transformer width (= the LSTM's embedding size)
    nhead: Annotated[int, Range(1, 64)] = 4  # Transformer attention heads
    layers: Annotated[int, Range(1, 12)] = 2  # Transformer layers (the LSTM has one, bidirectional)
    hidden: Annotated[int, Range(1, 2048)] = 128  # LSTM state size per direction
    lr_transformer: Annotated[float, Range(0, 1e6, lo_open=True)] = 5e-4  # Transformer peak LR
    lr_rnn: Annotated[float, Range(0, 1e6, lo_open=True)] = 3e-3  # LSTM peak LR (Week 6's default)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.1  # dropout in both models
    max_len: Annotated[int, Range(1, 4096)] = 64  # tokens kept per text
    vocab_size: Annotated[int, Range(3)] = 30_000  # vocabulary size (with <pad> and <unk>)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.05  # share of training held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training texts (0: all)

    SMOKE: ClassVar[dict] = {"epochs": 4, "batch_size": 32, "d_model": 32, "nhead": 2, "layers": 1,
                             "hidden": 32, "lr_transformer": 3e-3, "lr_rnn": 1e-2, "max_len": 24,
                             "vocab_size": 400, "val_fraction": 0.1}

    def check(self) -> None:
        if self.d_model % self.nhead or self.d_model % 2:
            raise ConfigError(f"--d-model {self.d_model} must be even and divisible by "
                              f"--nhead {self.nhead}")


def lab_config(cfg: Config, model: str) -> part2.Config:
    """Part 2's settings for one of the two models (the shared loop reads lr, warmup, epochs...)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(part2.Config)
              if hasattr(cfg, f.name)}
    lr = cfg.lr_transformer if model == "transformer" else cfg.lr_rnn
    return part2.Config(**shared, lr=lr, patience=cfg.epochs)  # no early stop: both run every epoch


def make_model(cfg: Config, model: str, vocab_size: int, num_classes: int) -> nn.Module:
    if model == "transformer":
        return part2.TransformerClassifier(vocab_size, num_classes, cfg.d_model, cfg.nhead,
                                           cfg.layers, dropout=cfg.dropout, max_len=cfg.max_len)
    return TextRNN(vocab_size, num_classes, cfg.d_model, cfg.hidden, "lstm", bidirectional=True,
                   layers=1, dropout=cfg.dropout)


def activation_mib(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """MiB of the tensors autograd saves for backward in one training step on batch ``x``:
    attention keeps (N, heads, L, L) weights, an LSTM its gates at every step. Parameters
    (also saved, by every linear layer) are left out; each storage is counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def plot_comparison(results: dict[str, dict], path) -> None:
    import matplotlib.pyplot as plt

    metrics = [("test_acc", "test accuracy"), ("epoch_time_s", "seconds per epoch"),
               ("activation_mib", "activation memory per step (MiB)"), ("params", "parameters")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4))
    for ax, (key, label) in zip(axes, metrics):
        values = [results[m][key] for m in MODELS]
        ax.bar(MODELS, values, color=["tab:blue", "tab:orange"])
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("Transformer encoder vs bidirectional LSTM, same data and loop")
    fig.tight_layout()
    save(fig, path)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_ag_news(cfg)
    # One split and vocabulary for both; encode refuses a --batch-size over the training texts.
    splits, vocab = encode(lab_config(cfg, "transformer"), data)
    run = Run.start(cfg, __file__, device)
    results: dict[str, dict] = {}
    for name in MODELS:
        print(f"--- {name} ---")
        seed_everything(cfg.seed)
        model = make_model(cfg, name, len(vocab), len(splits.classes)).to(device)
        batch_x = splits.x_train[:cfg.batch_size].to(device)
        batch_y = splits.y_train[:cfg.batch_size].to(device)
        memory = activation_mib(model, batch_x, batch_y)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows, _ = part2.train_model(lab_config(cfg, name), model, splits, device,
                                    run.sub(name, model=name))
        _, val, test = loaders(lab_config(cfg, name), splits, device)
        results[name] = {"test_acc": evaluate(model, test)["acc"],
                         "val_acc": evaluate(model, val)["acc"],
                         "epoch_time_s": float(np.median([r["epoch_time_s"] for r in rows])),
                         "activation_mib": memory,
                         "params": sum(p.numel() for p in model.parameters())}
        if device.type == "cuda":
            results[name]["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    header = (f"{'model':12s} {'test acc':>9s} {'val acc':>8s} {'s/epoch':>8s} {'act. MiB':>9s} "
              f"{'params':>10s}")
    lines = [header] + [f"{m:12s} {r['test_acc']:9.4f} {r['val_acc']:8.4f} "
                        f"{r['epoch_time_s']:8.2f} {r['activation_mib']:9.2f} {r['params']:10,d}"
                        for m, r in results.items()]
    print("\n".join(lines))
    run.path("comparison.txt").write_text("\n".join(lines) + "\n")
    plot_comparison(results, run.path("comparison.png"))
    curves = {m: [(r["epoch"], r["val_acc"]) for r in run.rows if r["model"] == m] for m in MODELS}
    plot_curves(curves, run.path("val_acc.png"), ylabel="validation accuracy", title=data.name)
    return run.finish(**{f"{k}_{m}": v for m, r in results.items() for k, v in r.items()},
                      data=data.name)


if __name__ == "__main__":
    launch(main, Config)
