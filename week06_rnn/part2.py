"""Week 6, Part 2: IMDB sentiment with an LSTM or GRU: packed sequences, clipping through time.

    tokenize -> vocabulary   week06_rnn/tokens.py, on the training split only (other words: <unk>)
    pad, then pack           a batch is a rectangle of ids padded with <pad>; packing (--packed)
                             tells the RNN each row's true length, so it never reads the padding
                             (by default: the padded run read at each row's last token)
    final hidden states      the last state of each direction summarizes the review
    clip the gradient norm   backpropagation through 256 steps can explode: train_one_epoch
                             clips it in one line and logs the norm it measured
    best checkpoint          kept on validation accuracy; the test set is read once, at the end

``--model ngram_bag``: the fastText-style baseline an RNN has to beat (baseline.py).

Run: python week06_rnn/part2.py [--smoke] [--help]
     python week06_rnn/part2.py --model gru --no-bidirectional
     python week06_rnn/part2.py --resume runs/week06/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from common.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from common.config import Range, ResumableConfig
from common.device import autocast, pick_device, seed_everything
from common.errors import ConfigError
from common.plots import confusion_matrix, plot_confusion, plot_history
from common.progress import progress
from common.runner import launch
from common.runs import Run
from common.text import TextData, load_text
from common.train import check_finite, evaluate, predict
from week06_rnn.baseline import NgramBag
from week06_rnn.tokens import PAD, LengthBatches, Vocab, encode_texts, tokenize


@dataclass
class Config(ResumableConfig):
    """Week 6, Part 2: an LSTM/GRU sentiment classifier on IMDB reviews."""

    model: Literal["lstm", "gru", "ngram_bag"] = "lstm"  # recurrent cell, or the n-gram baseline
    bidirectional: bool = True  # a second RNN reads each review backwards; both final states used
    packed: bool = False  # feed a PackedSequence (GPU: fast); off: read each row's last state
    layers: Annotated[int, Range(1, 4)] = 1  # stacked RNN layers
    embed_dim: Annotated[int, Range(1, 1024)] = 64  # size of each word vector
    hidden: Annotated[int, Range(1, 2048)] = 64  # RNN state size (per direction)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # on word vectors and summary
    vocab_size: Annotated[int, Range(3)] = 25_000  # most frequent training tokens kept (+ specials)
    max_len: Annotated[int, Range(1)] = 256  # tokens per review; longer ones are cut
    keep: Literal["first", "last"] = "last"  # which end of a long review to keep
    ngram_buckets: Annotated[int, Range(1)] = 2**18  # ngram_bag: hashed bigram vectors
    epochs: Annotated[int, Range(1)] = 10  # passes over the training data (88.3% on IMDB)
    batch_size: Annotated[int, Range(1)] = 64  # reviews per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 3e-3  # peak lr of one-cycle (AdamW)
    weight_decay: Annotated[float, Range(0, 1)] = 0.0  # AdamW decoupled weight decay
    clip: Annotated[float, Range(0)] = 1.0  # largest gradient norm (0: measure only)
    bucket: bool = True  # batch reviews of similar length together (less padding: faster)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # training reviews held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training reviews, at random (0: all)
    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32, "embed_dim": 32, "hidden": 32,
                             "vocab_size": 500, "max_len": 64, "lr": 2e-2, "dropout": 0.1,
                             "ngram_buckets": 4096, "packed": True}

    def check(self) -> None:
        if self.model == "ngram_bag" and self.layers > 1:
            raise ConfigError("--layers is for the recurrent models, not --model ngram_bag")
        if self.resume and read_checkpoint(self.resume).get("optimizer") is None:
            # best_model.pt has weights only: the optimizer and schedule would restart silently
            raise ConfigError(f"--resume {self.resume} holds the weights only (a best_model.pt?); "
                              "resume from the checkpoint.pt next to it")


# ---- The models ----
def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first ``length`` entries in reverse order, padding left where it was (at the
    end): [a, b, c, PAD] -> [c, b, a, PAD]. What the backward direction of a BiRNN reads."""
    steps = torch.arange(x.shape[1], device=x.device).expand(len(x), -1)  # (N, L)
    last = (lengths.to(x.device) - 1).unsqueeze(1)  # (N, 1)
    index = torch.where(steps <= last, last - steps, steps)
    return x.gather(1, index if x.ndim == 2 else index.unsqueeze(2).expand_as(x))


class TextRNN(nn.Module):
    """Embedding -> an LSTM/GRU reading forward (and one reading backward) -> their final
    states side by side -> a linear classifier. Two RNN modules, not one bidirectional one, so
    both ways of feeding a padded batch can be written out; with one layer it is exactly
    ``nn.LSTM(bidirectional=True)`` (tested). With more, each direction is its own stack."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int, hidden: int,
                 cell: str = "lstm", bidirectional: bool = True, layers: int = 1,
                 dropout: float = 0.0, packed: bool = False):
        super().__init__()
        self.packed = packed
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)  # <pad>'s vector is 0
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        kw = dict(num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.forward_rnn = rnn(embed_dim, hidden, **kw)
        self.backward_rnn = rnn(embed_dim, hidden, **kw) if bidirectional else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def final_state(self, rnn: nn.Module, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The state (N, hidden) of the last layer after each row's own last real token.

        packed   ``pack_padded_sequence`` runs row i for exactly lengths[i] steps, so h_n is the
                 state after its last token (``enforce_sorted=False``: it sorts the rows and puts
                 h_n back in order). cuDNN's fast path on a GPU; on a CPU its backward pass is
                 quadratic in the length (20 s instead of 0.5 s for 64 x 256 tokens, measured).
        padded   run over the whole padded batch and pick, in each row, the output at step
                 lengths[i] - 1. Padding sits AFTER the real tokens, so that output has not seen
                 any of it: the same numbers as packing (tested), for a few wasted steps."""
        if self.packed:
            packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h_n = rnn(packed)
            h_n = h_n[0] if isinstance(h_n, tuple) else h_n  # the LSTM's (h_n, c_n): c is memory
            return h_n[-1]  # (layers, N, hidden) -> the last layer's (N, hidden)
        outputs, _ = rnn(e)  # (N, L, hidden): the last layer's state after every step
        return outputs[torch.arange(len(e), device=e.device), lengths.to(e.device) - 1]

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        """The sequence summary (N, directions * hidden) of a right-padded batch of ids (N, L)."""
        lengths = (x != PAD).sum(1).clamp(min=1)  # (N,): real tokens are never PAD; empty: 1
        e = self.drop(self.embed(x))  # (N, L, embed_dim)
        # Why the final hidden state summarizes the review: the RNN read it token by token, and
        # its state is the only thing it carried from one token to the next, so everything it
        # learned to keep (that "not" came before "good", that the ending was glowing) is in
        # the state after the last token. It must be the last REAL token: an RNN that goes on
        # reading <pad> drifts away from it. The forward state holds the ending best (the
        # beginning had to survive 200 updates); the backward RNN reads the review from its
        # last token to its first, so its final state holds the beginning best.
        states = [self.final_state(self.forward_rnn, e, lengths)]
        if self.backward_rnn is not None:
            backwards = reverse_within_length(e, lengths)
            states.append(self.final_state(self.backward_rnn, backwards, lengths))
        return torch.cat(states, dim=1)  # (N, directions * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.summary(x)))  # (N, classes)


def make_model(cfg: Config, vocab_size: int, num_classes: int) -> nn.Module:
    if cfg.model == "ngram_bag":
        return NgramBag(vocab_size, num_classes, cfg.embed_dim, cfg.ngram_buckets, cfg.dropout)
    return TextRNN(vocab_size, num_classes, cfg.embed_dim, cfg.hidden, cell=cfg.model,
                   bidirectional=cfg.bidirectional, layers=cfg.layers, dropout=cfg.dropout,
                   packed=cfg.packed)


# ---- Data: texts -> ids -> batches of similar length ----
class Batches(NamedTuple):
    train: LengthBatches
    val: LengthBatches
    test: LengthBatches
    vocab: Vocab


def split_reviews(cfg: Config, n_reviews: int) -> tuple[list[int], list[int]]:
    """Validation and training indices, at random, checked (cheap: call it before Run.start)."""
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_reviews, generator=g)[:cfg.train_subset or None]  # 0: all
    n_val = int(round(cfg.val_fraction * len(order)))
    if n_val < 1 or len(order) - n_val < 1:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(order)} training reviews "
                          "leaves none for validation or training; change it or use more reviews")
    if cfg.batch_size > len(order) - n_val:  # one short batch would train, but one rule for all
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(order) - n_val} "
                          "training reviews")
    return order[:n_val].tolist(), order[n_val:].tolist()


def make_batches(cfg: Config, data: TextData, device: torch.device) -> Batches:
    """Hold out validation reviews, build the vocabulary on the rest, batch each split by length."""
    val_idx, train_idx = split_reviews(cfg, len(data.train_texts))
    train_texts = [data.train_texts[i] for i in train_idx]
    vocab = Vocab.build((tokenize(t) for t in train_texts), max_size=cfg.vocab_size)

    def batches(texts, y, shuffle):
        x, lengths = encode_texts(texts, vocab, cfg.max_len, cfg.keep)
        return LengthBatches(x, lengths, y, cfg.batch_size if shuffle else 256, shuffle=shuffle,
                             bucket=cfg.bucket, device=device, seed=cfg.seed)

    return Batches(batches(train_texts, data.y_train[train_idx], True),
                   batches([data.train_texts[i] for i in val_idx], data.y_train[val_idx], False),
                   batches(data.test_texts, data.y_test, False), vocab)


# ---- Training: the loop, with gradient clipping in view ----
def train_one_epoch(model: nn.Module, train: LengthBatches, optimizer: torch.optim.Optimizer,
                    scheduler, clip: float) -> dict:
    model.train()
    device = train.x.device
    total_loss, correct, norms = torch.zeros((), device=device), torch.zeros((), device=device), []
    for x, y in progress(train, "train"):  # x: (B, L) ids, L = the batch's longest review
        with autocast(device):  # bf16 on CUDA; a no-op on the CPU
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Backpropagation through time multiplies by the recurrent Jacobian once per step (Part
        # 1): one long review can bring a huge gradient, a step that wrecks the weights. Above
        # `clip` all gradients are scaled to that global norm (direction kept, step bounded).
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)  # pre-clip
        optimizer.step()
        scheduler.step()  # one-cycle is planned in batches: step it after every batch
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        norms.append(grad_norm)  # a tensor: no GPU sync per step
    seen, norms = len(train.x), torch.stack(norms)
    return {"train_loss": (total_loss / seen).item(), "train_acc": (correct / seen).item(),
            "grad_norm": norms.mean().item(), "grad_norm_max": norms.max().item(),
            "clipped": (norms > clip).float().mean().item() if clip else 0.0}


def train_and_test(cfg: Config, b: Batches, model: nn.Module, run: Run) -> tuple[list, dict]:
    """Train ``model`` with AdamW and a one-cycle schedule, clipping gradients and keeping the
    best epoch on validation; then that model meets the test set, once."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, pct_start=0.2,
                                                    total_steps=cfg.epochs * len(b.train))
    best_path = run.path("best_model.pt")
    state = run.restore(model, optimizer, scheduler)  # {"epoch": 0}, or the checkpoint's
    best_acc, best_epoch = state.get("best_acc", -1.0), state.get("best_epoch", 0)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        b.train.set_epoch(epoch)  # this epoch's shuffle, the same after a resume
        row = train_one_epoch(model, b.train, optimizer, scheduler, cfg.clip)
        check_finite(row["train_loss"], epoch)
        row.update({f"val_{k}": v for k, v in evaluate(model, b.val).items()})
        if row["val_acc"] > best_acc:  # the best model on validation, with its vocabulary
            best_acc, best_epoch = row["val_acc"], epoch
            save_checkpoint(best_path, model, epoch=epoch, config=run.config, script=run.name,
                            vocab=b.vocab.state_dict(), val_acc=best_acc)
        run.log(show=True, epoch=epoch, **row, best_epoch=best_epoch,
                lr=scheduler.get_last_lr()[0], epoch_time_s=round(time.perf_counter() - t0, 3))
        run.save_checkpoint(model, optimizer, scheduler, epoch=epoch, best_acc=best_acc,
                            best_epoch=best_epoch)  # Ctrl-C resumes from here
    rows = [r for r in run.rows if all(r.get(k) == v for k, v in run.extra_columns.items())]
    load_checkpoint(best_path, model, restore_rng=False)
    logits, targets = predict(model, b.test)  # the test set, once, with the kept weights
    predicted = logits.argmax(1)
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), logits.shape[1])
    first, last = rows[0], rows[-1]
    return rows, {"test_acc": (predicted == targets).float().mean().item(), "val_acc": best_acc,
                  "best_epoch": best_epoch, "epochs_done": last["epoch"],
                  "majority_baseline": torch.bincount(targets).max().item() / len(targets),
                  "confusion": matrix.tolist(), "vocab": len(b.vocab),
                  "params": sum(p.numel() for p in model.parameters()),
                  "first_train_loss": first["train_loss"], "last_train_loss": last["train_loss"],
                  "train_time_s": round(sum(r["epoch_time_s"] for r in rows), 2)}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    # Gradients that vanish through time (Part 1) pass through "denormal" floats (< 1e-38), up to
    # 100x slower on x86 CPUs; flushed to zero (no measurable change) the LSTM trains 6x faster.
    torch.set_flush_denormal(True)
    device = pick_device(cfg.device)
    data = load_text("imdb", cfg.data_dir, smoke=cfg.smoke, n_synthetic=1024, seed=cfg.seed)
    b = make_batches(cfg, data, device)
    print(f"{data.name}: train {len(b.train.x)}, validation {len(b.val.x)}, test {len(b.test.x)}; "
          f"vocabulary {len(b.vocab)}; {b.train.lengths.float().mean():.0f} tokens a review")
    model = make_model(cfg, len(b.vocab), data.num_classes).to(device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    rows, summary = train_and_test(cfg, b, model, run)
    plot_history(rows, run.path("curves.png"), title=f"{cfg.model} on {data.name}")
    plot_confusion(summary["confusion"], data.classes, run.path("confusion.png"),
                   title=f"test set ({data.name})")
    return run.finish(**summary)


if __name__ == "__main__":
    launch(main, Config)
