"""Week 7, Part 2: a Transformer-encoder text classifier on AG News (4 news topics).

Part 1's pieces as PyTorch modules: token embeddings plus the sinusoidal positional encoding,
``nn.TransformerEncoder`` told which positions are <pad> (``src_key_padding_mask``), then one
vector per text (``--pool``): ``mean`` of the outputs over the real tokens, or ``cls``, the
output of a learned [CLS] vector put in front of every text (every layer lets it attend to all).

AdamW with the learning rate stepped after every batch (``warmup_then_cosine``), early stopping
on the validation loss deciding in the loop (Week 4's ``EarlyStopping``), the test set touched
once at the end. ``--model bag``: the ``nn.EmbeddingBag`` baseline (baseline.py).

Run: python week07_transformer/part2.py [--smoke] [--help]
     python week07_transformer/part2.py --data-dir DATA            # DATA/ag_news_csv[.tgz]
     python week07_transformer/part2.py --model bag --epochs 5     # the EmbeddingBag baseline
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from common.config import BaseConfig, Range
from common.device import autocast, pick_device, prepare_model, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader
from common.plots import plot_history
from common.progress import progress
from common.runner import launch
from common.runs import Run
from common.train import check_finite, evaluate
from week02_mlp.data import Splits
from week04_regularization.part2 import EarlyStopping
from week06_rnn.tokens import PAD
from week07_transformer.baseline import BagOfEmbeddings
from week07_transformer.data import encode, load_ag_news, loaders
from week07_transformer.report import report_test_set


@dataclass
class Config(BaseConfig):
    """Week 7, Part 2: a Transformer-encoder (or EmbeddingBag) text classifier on AG News."""

    model: Literal["transformer", "bag"] = "transformer"  # the encoder, or the EmbeddingBag one
    pool: Literal["mean", "cls"] = "mean"  # one vector per text: mean of real tokens, or [CLS]
    d_model: Annotated[int, Range(2, 1024)] = 128  # width of token vectors (attention, outputs)
    nhead: Annotated[int, Range(1, 64)] = 4  # attention heads, each on d_model / nhead features
    layers: Annotated[int, Range(1, 24)] = 2  # encoder layers (self-attention + feed-forward each)
    ff_mult: Annotated[int, Range(1, 16)] = 2  # feed-forward width = ff_mult x d_model
    norm_first: bool = True  # LayerNorm before each sublayer (pre-LN); off: the 2017 post-LN layout
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.1  # in attention, feed-forward, input
    epochs: Annotated[int, Range(1)] = 6  # passes over the training texts
    batch_size: Annotated[int, Range(1)] = 64  # texts per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 5e-4  # peak learning rate of AdamW
    weight_decay: Annotated[float, Range(0, 1)] = 0.01  # AdamW's decoupled weight decay
    warmup: Annotated[float, Range(0, 0.5)] = 0.1  # share of all steps the lr rises over, from 0
    label_smoothing: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # target mass spread out
    patience: Annotated[int, Range(1)] = 3  # stop after this many epochs without a lower val loss
    vocab_size: Annotated[int, Range(3)] = 30_000  # most frequent training tokens kept (+ specials)
    max_len: Annotated[int, Range(1, 4096)] = 64  # tokens kept per text (title + description)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.05  # training texts held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training texts, at random (0: all)
    SMOKE: ClassVar[dict] = {"d_model": 32, "nhead": 2, "layers": 1, "epochs": 8, "batch_size": 32,
                             "lr": 3e-3, "max_len": 24, "vocab_size": 400, "val_fraction": 0.1}
    # The bag of embeddings has no attention to destabilize and few, sparse updates: a larger lr.
    PRESETS: ClassVar[dict] = {"model": {"bag": {"lr": 0.05, "warmup": 0.0, "d_model": 64}}}

    def check(self) -> None:
        if self.model == "transformer" and self.d_model % self.nhead:
            raise ConfigError(f"--d-model {self.d_model} must be divisible by --nhead {self.nhead} "
                              "(each head gets d_model / nhead features)")
        if self.model == "transformer" and self.d_model % 2:
            raise ConfigError(f"--d-model {self.d_model} must be even (the positional encoding "
                              "pairs sin and cos)")


# ---- The model: Part 1's positional encoding as a buffer, then the encoder ----
class PositionalEncoding(nn.Module):
    """Adds PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)) to
    (N, L, d) inputs. A buffer: moves with ``.to(device)``, not trained, not checkpointed."""

    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * inv_freq)  # (max_len, d/2) each
        pe[:, 1::2] = torch.cos(position * inv_freq)
        self.register_buffer("pe", pe.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > len(self.pe):
            raise ValueError(f"{x.shape[1]} positions, but the encoding has {len(self.pe)}")
        return x + self.pe[:x.shape[1]].to(x.dtype)


class TransformerClassifier(nn.Module):
    """ids (N, L) -> class scores (N, K): embed * sqrt(d) + PE, encoder layers, pool, linear."""

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 128, nhead: int = 4,
                 layers: int = 2, ff_mult: int = 2, dropout: float = 0.1, pool: str = "mean",
                 norm_first: bool = True, max_len: int = 4096):
        super().__init__()
        self.pool, self.scale = pool, math.sqrt(d_model)
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # x sqrt(d): vectors of size ~1
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d_model)) if pool == "cls" else None
        self.position = PositionalEncoding(d_model, max_len + 1)  # +1: room for [CLS]
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff_mult * d_model, dropout,
                                           batch_first=True, norm_first=norm_first)
        # Pre-LN leaves the last layer's output un-normalized: one final LayerNorm, as GPT-2 does.
        # enable_nested_tensor=False: pads are computed and ignored, not packed away (same result).
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False,
                                             norm=nn.LayerNorm(d_model) if norm_first else None)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # True where a position is <pad>: nn.MultiheadAttention's convention (True = ignore), the
        # opposite of Part 1's "keep" masks. Position 0 always counts: an empty text is one <pad>,
        # and a query with every key masked would get 0/0 = NaN weights.
        pad = ids == PAD  # (N, L)
        pad[:, 0] = False
        x = self.embed(ids) * self.scale  # (N, L, d)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(ids), -1, -1).to(x.dtype), x], dim=1)  # (N, 1+L, d)
            pad = torch.cat([pad.new_zeros(len(ids), 1), pad], dim=1)
        x = self.encoder(self.dropout(self.position(x)), src_key_padding_mask=pad)  # (N, L', d)
        if self.cls is not None:
            pooled = x[:, 0]
        else:
            keep = (~pad).unsqueeze(-1).to(x.dtype)  # (N, L, 1)
            pooled = (x * keep).sum(dim=1) / keep.sum(dim=1)  # (N, d): the mean over real tokens
        return self.head(pooled)  # (N, K)


def build_model(cfg: Config, vocab_size: int, num_classes: int) -> nn.Module:
    if cfg.model == "bag":
        return BagOfEmbeddings(vocab_size, num_classes, cfg.d_model)
    return TransformerClassifier(vocab_size, num_classes, d_model=cfg.d_model, nhead=cfg.nhead,
                                 layers=cfg.layers, ff_mult=cfg.ff_mult, dropout=cfg.dropout,
                                 pool=cfg.pool, norm_first=cfg.norm_first, max_len=cfg.max_len)


# ---- The learning-rate schedule: warmup, then a half cosine, stepped after every batch ----
def warmup_then_cosine(total_steps: int, warmup_steps: int):
    """The factor LambdaLR multiplies the peak lr by after ``step`` optimizer steps:
    (step + 1) / warmup_steps while warming up, then 0.5 (1 + cos(pi t)), t going 0 -> 1.
    Why warm up: Adam's second moments first rest on a few batches, and attention can lock onto
    patterns of the random weights; small steps until both settle avoid an early blow-up."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


# ---- Training: the loop, with the per-batch schedule and early stopping in view ----
def train_one_epoch(model: nn.Module, train: TensorLoader, optimizer: torch.optim.Optimizer,
                    scheduler, loss_fn: nn.Module) -> dict:
    model.train()
    device = train.x.device
    total_loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in progress(train, "train"):  # x: (B, L) token ids, y: (B,)
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)  # (B, classes)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # warmup then cosine is planned in batches: step after every batch
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    seen = len(train.x)
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item()}


def train_model(cfg: Config, model: nn.Module, splits: Splits, device: torch.device,
                run: Run) -> tuple[list[dict], int]:
    """Train with early stopping; returns the rows logged and the epoch whose weights are kept."""
    train, val, _ = loaders(cfg, splits, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_cosine(total, round(cfg.warmup * total)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    early, rows = EarlyStopping(model, cfg.patience), []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train.set_epoch(epoch)
        row = {"epoch": epoch, **train_one_epoch(model, train, optimizer, scheduler, loss_fn)}
        check_finite(row["train_loss"], epoch)
        row.update({f"val_{k}": v for k, v in evaluate(model, val, loss_fn).items()})
        row.update(lr=scheduler.get_last_lr()[0], epoch_time_s=round(time.perf_counter() - t0, 3))
        run.log(show=True, **row)
        rows.append(row)
        if early.update(row["val_loss"], epoch):  # early stopping decides here
            print(f"early stopping after epoch {epoch}: no lower validation loss for "
                  f"{cfg.patience} epochs")
            break
    kept = early.restore_best()  # the epoch validation liked best
    if kept != epoch:
        print(f"end of training: restored the weights of epoch {kept} (lowest validation loss)")
    return rows, kept


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_ag_news(cfg)
    splits, vocab = encode(cfg, data)  # refuses a --batch-size larger than the training texts
    print(f"{data.name}: train {len(splits.x_train)}, validation {len(splits.x_val)}, test "
          f"{len(splits.x_test)} texts; vocabulary {len(vocab)} tokens; padded to "
          f"{splits.x_train.shape[1]} tokens")
    seed_everything(cfg.seed)
    model = prepare_model(build_model(cfg, len(vocab), len(splits.classes)), device)
    params = sum(p.numel() for p in model.parameters())
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    print(f"{type(model).__name__}: {params:,} parameters")
    rows, kept = train_model(cfg, model, splits, device, run)
    plot_history(rows, run.path("curves.png"), title=f"{cfg.model} on {data.name}")
    _, val, test = loaders(cfg, splits, device)
    kept_val = evaluate(model, val)
    test_result = report_test_set(model, test, splits.classes, run, f"{cfg.model}, test")  # once
    run.save_checkpoint(model, epoch=rows[-1]["epoch"], vocab=vocab.state_dict(), kept_epoch=kept)
    epoch_times = [r["epoch_time_s"] for r in rows]
    return run.finish(**test_result, val_acc=kept_val["acc"], val_loss=kept_val["loss"],
                      kept_epoch=kept, epochs_done=rows[-1]["epoch"], params=params,
                      train_time_s=round(sum(epoch_times), 2),
                      epoch_time_s=round(float(np.median(epoch_times)), 3), data=data.name)


if __name__ == "__main__":
    launch(main, Config)
