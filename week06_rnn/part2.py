"""Week 6, Part 2: IMDB sentiment with an LSTM or GRU: packed sequences, clipping through time.

What this lab shows, in the order the data meets it:

    tokenize -> vocabulary       common.text: built on the training split only (validation and
                                 test words the model never saw become <unk>, as in real use)
    pad, then pack               a batch is a rectangle of ids padded with <pad>; packing tells
                                 the RNN each row's true length, so it never reads the padding
                                 (--packed; by default the same states are read off the padded
                                 run at each row's last token: TextRNN.final_state says why)
    final hidden states          the last state of each direction summarizes the review
    clip the gradient norm       backpropagation through 256 steps can explode: ClipGradients
                                 below measures the norm every step and scales it down
    best checkpoint              kept on validation accuracy; the test set is read once, at the end

``--model ngram_bag`` trains the fastText-style baseline instead (mean of word and bigram
embeddings): a recurrent network has to beat it to be worth its cost.

Run: python week06_rnn/part2.py [--smoke] [--help]
     python week06_rnn/part2.py --model gru --no-bidirectional
     python week06_rnn/part2.py --resume runs/week06/part2/<time>/checkpoint.pt   (after Ctrl-C)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from common.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from common.config import Range, ResumableConfig
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import confusion_matrix, plot_confusion, plot_history
from common.runner import launch
from common.runs import Run
from common.text import PAD, LengthBatches, TextData, Vocab, load_text, pad_batch, tokenize
from common.train import Callback, Loop, evaluate, fit, predict


@dataclass
class Config(ResumableConfig):
    """Week 6, Part 2: an LSTM/GRU sentiment classifier on IMDB reviews."""

    model: Literal["lstm", "gru", "ngram_bag"] = "lstm"  # recurrent cell, or the bag-of-n-grams baseline
    bidirectional: bool = True  # a second RNN reads each review backwards; both final states are used
    packed: bool = False  # feed the RNN a PackedSequence (GPU: fast); off: run padded, read each row's last state
    layers: Annotated[int, Range(1, 4)] = 1  # stacked RNN layers
    embed_dim: Annotated[int, Range(1, 1024)] = 64  # size of each word vector
    hidden: Annotated[int, Range(1, 2048)] = 64  # RNN state size (per direction)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # on the word vectors and on the summary
    vocab_size: Annotated[int, Range(3)] = 25_000  # most frequent training tokens kept (with <pad>, <unk>)
    max_len: Annotated[int, Range(1)] = 256  # tokens per review; longer ones are cut
    keep: Literal["first", "last"] = "last"  # which end of a long review to keep (its ending often sums it up)
    ngram_buckets: Annotated[int, Range(1)] = 2**18  # ngram_bag: hashed bigram vectors
    epochs: Annotated[int, Range(1)] = 4  # passes over the training data
    batch_size: Annotated[int, Range(1)] = 64  # reviews per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 3e-3  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: Annotated[float, Range(0, 1)] = 0.0  # AdamW decoupled weight decay
    clip: Annotated[float, Range(0)] = 1.0  # largest gradient norm; larger ones are scaled down (0: no clipping)
    bucket: bool = True  # batch reviews of similar length together (less padding: faster)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # share of training reviews held out
    train_subset: Annotated[int, Range(0)] = 0  # use only N training reviews, drawn at random (0: all)
    SMOKE: ClassVar[dict] = {"epochs": 8, "batch_size": 32, "embed_dim": 32, "hidden": 32, "vocab_size": 500,
                             "max_len": 64, "lr": 2e-2, "dropout": 0.1, "ngram_buckets": 4096, "packed": True}

    def check(self) -> None:
        if self.model == "ngram_bag" and self.layers > 1:
            raise ConfigError("--layers is for the recurrent models; --model ngram_bag has no layers to stack")
        if self.resume and read_checkpoint(self.resume).get("optimizer") is None:
            # best_model.pt has the weights only: resuming from it would restart the optimizer,
            # the one-cycle schedule and the best-so-far from scratch, silently.
            raise ConfigError(f"--resume {self.resume} holds the weights only (a best_model.pt?); resume from the "
                              "checkpoint.pt next to it")


# ---- The models ----
def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first ``length`` entries in reverse order, padding left where it was (at the
    end): [a, b, c, PAD] -> [c, b, a, PAD]. What the backward direction of a BiRNN reads."""
    steps = torch.arange(x.shape[1], device=x.device).expand(len(x), -1)
    last = (lengths.to(x.device) - 1).unsqueeze(1)
    index = torch.where(steps <= last, last - steps, steps)
    return x.gather(1, index if x.ndim == 2 else index.unsqueeze(2).expand_as(x))


class TextRNN(nn.Module):
    """Embedding -> LSTM/GRU reading forward (and a second one reading backward) -> the final
    states side by side -> linear classifier.

    A bidirectional RNN is two RNNs: one reads the review left to right, the other right to left.
    We keep them as two modules (``forward_rnn``, ``backward_rnn``) so that both ways of feeding a
    padded batch can be written out (``packed`` below); with one layer this is exactly
    ``nn.LSTM(bidirectional=True)`` (tests/test_week06_rnn.py copies the weights across and
    compares). With several layers each direction is its own stack, whereas in nn.LSTM's
    bidirectional stack the second layer reads both directions' outputs.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int, hidden: int, cell: str = "lstm",
                 bidirectional: bool = True, layers: int = 1, dropout: float = 0.0, packed: bool = False):
        super().__init__()
        self.packed = packed
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)  # <pad>'s vector stays 0
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]

        def make():
            return rnn(embed_dim, hidden, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

        self.forward_rnn = make()
        self.backward_rnn = make() if bidirectional else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def final_state(self, rnn: nn.Module, e: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The state (N, hidden) of the last layer after each row's own last real token.

        packed   ``pack_padded_sequence`` tells the RNN each row's length, so it runs row i for
                 exactly lengths[i] steps and its h_n is the state after that row's last token
                 (``enforce_sorted=False``: it sorts the rows by length and puts h_n back in
                 order). The standard way, and cuDNN's fast path on a GPU. On a CPU, PyTorch's
                 backward pass for packed input is quadratic in the length (measured: ~20 s
                 instead of 0.5 s for a batch of 64 x 256 tokens).
        padded   the RNN runs over the whole padded batch and we pick, in each row, the output
                 at step lengths[i] - 1. Padding sits AFTER the real tokens, so that output
                 has not seen any of it: the same numbers as packing (tested), for a few
                 wasted steps on padding (bucketing keeps those few)."""
        if self.packed:
            # pack_padded_sequence wants the lengths on the CPU.
            _, h_n = rnn(pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False))
            h_n = h_n[0] if isinstance(h_n, tuple) else h_n  # the LSTM returns (h_n, c_n); c_n is its memory
            return h_n[-1]  # (layers, N, hidden): the last layer
        outputs, _ = rnn(e)  # (N, L, hidden): the last layer's state after every step
        return outputs[torch.arange(len(e), device=e.device), lengths.to(e.device) - 1]

    def summary(self, x: torch.Tensor) -> torch.Tensor:
        """The sequence summary (N, directions * hidden) of a right-padded batch of ids (N, L)."""
        # Rows are right-padded with PAD and real tokens are never PAD, so the true lengths are
        # the non-PAD counts (an empty review is one PAD: length 1).
        lengths = (x != PAD).sum(1).clamp(min=1)
        e = self.drop(self.embed(x))
        # Why the final hidden state summarizes the review: the RNN read it token by token, and
        # its state is the only thing it carried from one token to the next, so everything it
        # learned to keep (that "not" came before "good", that the ending was glowing) is in
        # the state after the last token. It must be the last REAL token: an RNN that goes on
        # reading <pad> drifts away from it. The forward state holds the ending best (the
        # beginning had to survive 200 updates); the backward RNN reads the review from its last
        # token to its first, so its final state holds the beginning best: together they see
        # both ends.
        states = [self.final_state(self.forward_rnn, e, lengths)]
        if self.backward_rnn is not None:
            states.append(self.final_state(self.backward_rnn, reverse_within_length(e, lengths), lengths))
        return torch.cat(states, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.summary(x)))


class NgramBag(nn.Module):
    """fastText-style baseline: the mean of the vectors of every word and every bigram (hashed
    into ``buckets`` slots), then a linear classifier. No order beyond neighbouring pairs."""

    PRIME = 1_000_003  # bigram (a, b) -> (a * PRIME + b) mod buckets, shifted past the vocabulary

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int, buckets: int, dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.buckets = vocab_size, buckets
        self.bag = nn.EmbeddingBag(vocab_size + buckets, embed_dim, mode="mean", padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def ngrams(self, x: torch.Tensor) -> torch.Tensor:
        """Word ids and bigram ids side by side (N, 2L - 1); PAD where a bigram touches padding."""
        a, b = x[:, :-1], x[:, 1:]
        bigrams = self.vocab_size + (a * self.PRIME + b) % self.buckets
        return torch.cat([x, bigrams.masked_fill((a == PAD) | (b == PAD), PAD)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bag(self.ngrams(x))))  # PAD entries are left out of the mean


def make_model(cfg: Config, vocab_size: int, num_classes: int) -> nn.Module:
    if cfg.model == "ngram_bag":
        return NgramBag(vocab_size, num_classes, cfg.embed_dim, cfg.ngram_buckets, cfg.dropout)
    return TextRNN(vocab_size, num_classes, cfg.embed_dim, cfg.hidden, cfg.model, cfg.bidirectional, cfg.layers,
                   cfg.dropout, cfg.packed)


# ---- Gradient clipping through time ----
class ClipGradients(Callback):
    """Backpropagation through time multiplies by the recurrent Jacobian once per step (Part 1
    writes it out). When those factors are above 1 the gradient grows geometrically with the
    length, and one long review can produce a step that wrecks the weights. After every
    backward pass, before the optimizer steps, we measure the global gradient norm and, if it
    is above ``max_norm``, scale all gradients down to that norm: the direction is kept, only
    the step is bounded. The epoch's mean norm and the share of steps clipped are logged, so
    you can see whether clipping did anything (``--clip 0`` only measures)."""

    def __init__(self, model: nn.Module, max_norm: float):
        self.model, self.max_norm = model, max_norm
        self.norms: list[float] = []

    def on_after_backward(self, loop: Loop) -> None:
        limit = self.max_norm if self.max_norm > 0 else math.inf
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), limit)  # returns the norm BEFORE clipping
        self.norms.append(float(norm))

    def on_epoch_end(self, loop: Loop) -> None:
        if self.norms:
            loop.row["grad_norm"] = sum(self.norms) / len(self.norms)
            loop.row["grad_norm_max"] = max(self.norms)
            loop.row["clipped"] = sum(n > self.max_norm for n in self.norms) / len(self.norms) if self.max_norm else 0.0
        self.norms = []


# ---- The best model on validation ----
class BestCheckpoint(Callback):
    """After each epoch: the highest validation accuracy so far? Save the weights (with the
    vocabulary, which the model is useless without) to ``path``. Its progress is in
    ``state_dict``, so a resumed run keeps comparing against the same best."""

    def __init__(self, path, model: nn.Module, vocab: Vocab, config: dict, script: str):
        self.path, self.model, self.vocab, self.config, self.script = path, model, vocab, config, script
        self.best_acc, self.best_epoch = -1.0, 0

    def on_epoch_end(self, loop: Loop) -> None:
        if loop.row["val_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = loop.row["val_acc"], loop.epoch
            save_checkpoint(self.path, self.model, epoch=loop.epoch, config=self.config, script=self.script,
                            vocab=self.vocab.state_dict(), val_acc=self.best_acc)
        loop.row["best_epoch"] = self.best_epoch

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]


# ---- Data: texts -> ids ----
def encode(texts: list[str], vocab: Vocab, max_len: int, keep: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids, cut to ``max_len`` from the start (``keep="first"``) or the end, right-padded."""
    ids = [vocab.encode(tokenize(t)) for t in texts]
    if keep == "last":
        ids = [seq[-max_len:] for seq in ids]
    return pad_batch(ids, max_len)


@dataclass
class Batches:
    train: LengthBatches
    val: LengthBatches
    test: LengthBatches
    vocab: Vocab


def make_batches(cfg: Config, data: TextData, device: torch.device) -> Batches:
    """Hold out validation reviews from the training set, build the vocabulary on the rest,
    and batch all three splits by length."""
    n = len(data.train_texts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.train_subset and cfg.train_subset < n:
        order = order[:cfg.train_subset]
    n_val = int(round(cfg.val_fraction * len(order)))
    if n_val < 1 or len(order) - n_val < 1:
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(order)} training reviews leaves no "
                          "validation or no training reviews; use more reviews or another --val-fraction")
    val_idx, train_idx = order[:n_val].tolist(), order[n_val:].tolist()
    train_texts = [data.train_texts[i] for i in train_idx]
    vocab = Vocab.build((tokenize(t) for t in train_texts), max_size=cfg.vocab_size)

    def batches(texts, y, shuffle):
        x, lengths = encode(texts, vocab, cfg.max_len, cfg.keep)
        return LengthBatches(x, lengths, y, cfg.batch_size if shuffle else 256, shuffle=shuffle, bucket=cfg.bucket,
                             device=device, seed=cfg.seed)

    return Batches(batches(train_texts, data.y_train[train_idx], True),
                   batches([data.train_texts[i] for i in val_idx], data.y_train[val_idx], False),
                   batches(data.test_texts, data.y_test, False), vocab)


def train_and_test(cfg: Config, b: Batches, model: nn.Module, run: Run, resume: str = "") -> tuple[Loop, dict]:
    """Train ``model`` with AdamW and a one-cycle schedule, clipping gradients and keeping the
    best epoch on validation; then that model meets the test set, once."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * len(b.train),
                                                    pct_start=0.2)
    clip = ClipGradients(model, cfg.clip)  # on_after_backward: between loss.backward() and optimizer.step()
    best = BestCheckpoint(run.path("best_model.pt"), model, b.vocab, run.config, run.name)
    loop = fit(model, optimizer, b.train, b.val, cfg.epochs, scheduler=scheduler, callbacks=[clip, best], run=run,
               resume=resume)
    load_checkpoint(best.path, model, restore_rng=False)
    val = evaluate(model, b.val)
    logits, targets = predict(model, b.test)
    predicted = logits.argmax(1)
    num_classes = logits.shape[1]
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), num_classes)
    majority = torch.bincount(targets, minlength=num_classes).max().item() / len(targets)
    return loop, {"test_acc": (predicted == targets).float().mean().item(), "val_acc": val["acc"],
                  "best_epoch": best.best_epoch, "epochs_done": loop.epoch, "majority_baseline": majority,
                  "confusion": matrix.tolist(), "params": sum(p.numel() for p in model.parameters()),
                  "vocab": len(b.vocab), "first_train_loss": loop.rows[0]["train_loss"],
                  "last_train_loss": loop.rows[-1]["train_loss"],
                  "train_time_s": round(sum(r["epoch_time_s"] for r in loop.rows), 2)}


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    # Gradients that vanish through time (Part 1) pass through "denormal" floats (below 1e-38),
    # which x86 CPUs process up to 100x slower; flushing them to zero changes nothing we can
    # measure and made the LSTM's backward pass 6x faster here.
    torch.set_flush_denormal(True)
    device = pick_device(cfg.device)
    data = load_text("imdb", cfg.data_dir, smoke=cfg.smoke, n_synthetic=1024, seed=cfg.seed)
    b = make_batches(cfg, data, device)
    print(f"train {len(b.train.x)}, validation {len(b.val.x)}, test {len(b.test.x)} reviews ({data.name}); "
          f"vocabulary {len(b.vocab)}; mean length {b.train.lengths.float().mean():.0f} tokens (cut at {cfg.max_len})")
    model = make_model(cfg, len(b.vocab), data.num_classes).to(device)
    run = Run.start(cfg, __file__, device)  # after every check: a bad setting leaves no run folder
    loop, summary = train_and_test(cfg, b, model, run, cfg.resume)
    plot_history(loop.rows, run.path("curves.png"), title=f"{cfg.model} on {data.name}")
    plot_confusion(summary["confusion"], data.classes, run.path("confusion.png"), title=f"test set ({data.name})")
    return run.finish(**summary)


if __name__ == "__main__":
    launch(main, Config)
