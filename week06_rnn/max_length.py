"""Week 6, self-work: how long must a review be? Accuracy and training time against the
length reviews are cut (or padded) to.

An RNN's cost grows linearly with the number of steps, and so does how far a gradient must
travel back (Part 1). Cutting reviews short is faster but throws words away: the half of IMDB
reviews longer than ~230 tokens lose their ending at 128, where the verdict often is. The same
BiLSTM (part2.py's) is trained once per length, same seed and same reviews; each is chosen on
validation and tested once. ``--keep last`` cuts from the start instead.

Run: python week06_rnn/max_length.py [--smoke] [--help]
     python week06_rnn/max_length.py --lengths 64 128 256 512 --train-subset 10000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import torch

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import save
from common.runner import interrupted, launch
from common.runs import Run
from common.text import load_text
from week06_rnn import part2
from week06_rnn.tokens import tokenize


@dataclass
class Config(BaseConfig):
    """Week 6 self-work: accuracy and time of a BiLSTM on IMDB against the maximum length."""

    lengths: tuple[int, ...] = (32, 64, 128, 256, 512)  # max_len values (tokens per review)
    keep: Literal["first", "last"] = "first"  # which end of a long review to keep
    model: Literal["lstm", "gru"] = "lstm"  # recurrent cell
    train_subset: Annotated[int, Range(0)] = 10_000  # train on N random reviews (0: all 25,000)
    embed_dim: Annotated[int, Range(1, 1024)] = 64  # word vector size
    hidden: Annotated[int, Range(1, 2048)] = 64  # state size per direction
    vocab_size: Annotated[int, Range(3)] = 25_000  # most frequent training tokens kept
    epochs: Annotated[int, Range(1)] = 4  # passes over the training reviews, per length
    batch_size: Annotated[int, Range(1)] = 64  # reviews per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 3e-3  # peak learning rate (one-cycle AdamW)
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.3  # on the embeddings and the summary
    SMOKE: ClassVar[dict] = {"lengths": (4, 48), "model": "lstm", "train_subset": 0,
                             "embed_dim": 32, "hidden": 32, "vocab_size": 500, "epochs": 8,
                             "batch_size": 32, "lr": 2e-2, "dropout": 0.1}

    def check(self) -> None:
        if (not self.lengths or min(self.lengths) < 1
                or len(set(self.lengths)) != len(self.lengths)):
            raise ConfigError(f"--lengths {' '.join(map(str, self.lengths))}: "
                              "give distinct lengths >= 1")


def lab_config(cfg: Config, max_len: int) -> part2.Config:
    """Part 2's settings for one length: all else (reviews, seed, model) the same for every one."""
    return part2.Config(model=cfg.model, embed_dim=cfg.embed_dim, hidden=cfg.hidden,
                        max_len=max_len, keep=cfg.keep, vocab_size=cfg.vocab_size,
                        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        dropout=cfg.dropout, train_subset=cfg.train_subset, seed=cfg.seed)


def plot_study(rows: list[dict], path, title: str):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    lengths = [r["max_len"] for r in rows]
    left.plot(lengths, [r["test_acc"] for r in rows], "o-", label="test")
    left.plot(lengths, [r["val_acc"] for r in rows], "s--", label="validation")
    left.set(xscale="log", xlabel="max length (tokens)", ylabel="accuracy", title=title)
    left.legend()
    right.plot(lengths, [r["train_time_s"] for r in rows], "o-")
    right.set(xscale="log", xlabel="max length (tokens)", ylabel="training time (s)",
              title=f"{rows[0]['epochs']} epochs")
    for ax in (left, right):
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()  # the log axis would add its own labels between ours
        ax.grid(alpha=0.3)
    return save(fig, path)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    torch.set_flush_denormal(True)  # see part2.main
    device = pick_device(cfg.device)
    data = load_text("imdb", cfg.data_dir, smoke=cfg.smoke, n_synthetic=1024, seed=cfg.seed)
    lengths = sorted(cfg.lengths)
    # The split does not depend on the length: a --batch-size larger than the training reviews
    # (or a --train-subset too small to split) is refused here, before the run folder exists.
    part2.split_reviews(lab_config(cfg, lengths[0]), len(data.train_texts))
    run = Run.start(cfg, __file__, device)
    rows = []
    # Reviews longer than max_len lose words. (Not the padded lengths >= max_len: those are cut
    # at max_len, so a review of exactly max_len tokens, which lost nothing, would count too.)
    token_counts = torch.tensor([len(tokenize(t)) for t in data.train_texts])
    for max_len in lengths:
        lab = lab_config(cfg, max_len)
        b = part2.make_batches(lab, data, device)
        cut = (token_counts > max_len).float().mean().item()  # share of reviews that lost words
        print(f"--- max_len {max_len}: {cut:.0%} of training reviews cut ---")
        seed_everything(cfg.seed)
        model = part2.make_model(lab, len(b.vocab), data.num_classes).to(device)
        try:
            _, result = part2.train_and_test(lab, b, model,
                                             run.sub(f"len{max_len}", max_len=max_len))
        except KeyboardInterrupt as e:  # this script has no --resume: say what was kept instead
            kept = (f"what it finished ({len(run.rows)} epochs in all) is in "
                    f"{run.dir / 'metrics.csv'}" if run.rows else "no epoch had finished")
            raise interrupted(e, f"while training with max_len {max_len}; {kept}. This study "
                                 "has no --resume: run it again to finish it") from None
        keys = ("test_acc", "val_acc", "best_epoch", "train_time_s")
        rows.append({"max_len": max_len, "cut_share": cut, "epochs": cfg.epochs,
                     **{k: result[k] for k in keys}})
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
    plot_study(rows, run.path("max_length.png"), f"{cfg.model} on {data.name}")
    lines = [",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]
    run.path("study.csv").write_text("\n".join(lines) + "\n")
    best = max(rows, key=lambda r: r["val_acc"])["max_len"]
    return run.finish(lengths=lengths, test_acc=[r["test_acc"] for r in rows],
                      train_time_s=[r["train_time_s"] for r in rows],
                      test_acc_shortest=rows[0]["test_acc"], test_acc_longest=rows[-1]["test_acc"],
                      best_length_on_validation=best)


if __name__ == "__main__":
    launch(main, Config)
