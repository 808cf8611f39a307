"""Week 7: AG News as padded token ids, with Week 6's tokenizer and vocabulary.

    data = load_ag_news(cfg)                  # the real set, or its twin with --smoke
    splits, vocab = encode(cfg, data)         # week02's Splits of (N, L) ids; the vocabulary
    train, val, test = loaders(cfg, splits, device)

``cfg`` is ``part2.Config`` or any config with its data fields (seed, train_subset, val_fraction,
vocab_size, max_len, batch_size, data_dir, smoke): ``tweaks.py`` and ``vs_rnn.py`` pass theirs.
"""

from __future__ import annotations

import torch

from common.data import data_root
from common.errors import ConfigError, DataUnavailable
from common.loader import TensorLoader
from common.text import TextData, load_text
from week02_mlp.data import Splits
from week06_rnn.tokens import Vocab, encode_texts, tokenize


def load_ag_news(cfg) -> TextData:
    """AG News (or its twin). A data root that holds only the test file ``ag_news_test.csv`` (as
    some mirrors ship it) is named as such, with the one command that splits it into a small
    training and test set, instead of a plain "not found"."""
    try:
        return load_text("ag_news", cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    except DataUnavailable:
        root = data_root(cfg.data_dir)
        if not (root / "ag_news_test.csv").is_file():
            raise
    source, split = root / "ag_news_test.csv", root / "ag_news_split"
    raise DataUnavailable(
        f"ag_news: {root} holds only the test file ag_news_test.csv, not the training set "
        "(ag_news_csv.tgz or ag_news_csv/train.csv). To learn from a fixed split of that test "
        "file instead (6,000 texts to learn from, the rest to test; not comparable with published "
        "results), run from the repository root: python -c \"from pathlib import Path; "
        "from benchmarks.week07 import split_test_file; "
        f"split_test_file(Path('{source}'), Path('{split}'))\" and pass --data-dir {split}; "
        "or run with --smoke") from None


def encode(cfg, data: TextData) -> tuple[Splits, Vocab]:
    """Hold out validation texts at random, build the vocabulary from the remaining training
    texts only (a validation or test word is unknown to the model, as it would be in use), then
    tokenize, encode and pad every split to at most ``max_len`` tokens. A ``batch_size`` larger
    than the training texts is refused here, before a script starts its run folder."""
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data.train_texts), generator=g)[:cfg.train_subset or None]
    n_val = int(round(cfg.val_fraction * len(order)))
    if n_val == 0 or n_val == len(order):
        raise ConfigError(f"--val-fraction {cfg.val_fraction} of {len(order)} training texts "
                          "leaves none for validation or training; change it or use more texts")
    val_idx, train_idx = order[:n_val].tolist(), order[n_val:].tolist()
    if cfg.batch_size > len(train_idx):  # one short batch would train, but the rule is one for all
        raise ConfigError(f"--batch-size {cfg.batch_size} is more than the {len(train_idx)} "
                          "training texts")
    train_texts = [data.train_texts[i] for i in train_idx]
    vocab = Vocab.build(map(tokenize, train_texts), max_size=cfg.vocab_size)  # training texts only
    x_train, _ = encode_texts(train_texts, vocab, cfg.max_len)  # (N, L) ids, right-padded
    x_val, _ = encode_texts([data.train_texts[i] for i in val_idx], vocab, cfg.max_len)
    x_test, _ = encode_texts(data.test_texts, vocab, cfg.max_len)
    splits = Splits(x_train, data.y_train[train_idx], x_val, data.y_train[val_idx], x_test,
                    data.y_test, data.classes, is_image=False)
    return splits, vocab


def loaders(cfg, s: Splits, device) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """Training batches in a new order every epoch (a function of seed and epoch, so the same
    after a rerun), validation and test batches in order."""
    train = TensorLoader(s.x_train, s.y_train, cfg.batch_size, shuffle=True, device=device,
                         seed=cfg.seed)
    return (train, TensorLoader(s.x_val, s.y_val, 256, device=device),
            TensorLoader(s.x_test, s.y_test, 256, device=device))
