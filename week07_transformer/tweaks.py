"""Week 7 self-work: three fixes for a Transformer that trains slowly or overfits, side by side.

The same Part 2 classifier, in the 2017 paper's post-LN layout by default (LayerNorm after each
residual sum: the layout that is hard to train without warmup), trained five times from the same
initial weights on the same batches, changing one thing at a time:

    plain            no warmup, no dropout, no label smoothing
    warmup           the lr rises linearly over the first 10% of the steps (fewer blow-ups)
    dropout          dropout 0.2 in attention, feed-forward and embeddings (against overfitting)
    label_smoothing  targets 0.9 / 0.1 spread over the other classes (against over-confidence)
    all              the three together

For each: the best validation accuracy and its epoch, how many epochs it took to reach 95% of
it (convergence), the gap between training and validation accuracy at the end (overfitting),
the plain cross-entropy on validation (comparable across variants: a smoothed loss is not), and
the test accuracy of the kept model, touched once. The best variant is chosen on validation.

Run: python week07_transformer/tweaks.py [--smoke] [--help]
     python week07_transformer/tweaks.py --data-dir DATA --train-subset 10000 --epochs 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from common.config import BaseConfig, Range
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from common.train import evaluate
from week07_transformer import part2
from week07_transformer.data import encode, load_ag_news, loaders

VARIANTS = {
    "plain": {"warmup": 0.0, "dropout": 0.0, "label_smoothing": 0.0},
    "warmup": {"warmup": 0.1, "dropout": 0.0, "label_smoothing": 0.0},
    "dropout": {"warmup": 0.0, "dropout": 0.2, "label_smoothing": 0.0},
    "label_smoothing": {"warmup": 0.0, "dropout": 0.0, "label_smoothing": 0.1},
    "all": {"warmup": 0.1, "dropout": 0.2, "label_smoothing": 0.1},
}


@dataclass
class Config(BaseConfig):
    """Week 7 self-work: warmup, dropout, label smoothing vs slow convergence and overfitting."""

    epochs: Annotated[int, Range(1)] = 8  # passes over the training texts, for each variant
    batch_size: Annotated[int, Range(1)] = 64  # texts per optimizer step
    d_model: Annotated[int, Range(2, 1024)] = 128  # Transformer width
    nhead: Annotated[int, Range(1, 64)] = 4  # attention heads
    layers: Annotated[int, Range(1, 24)] = 4  # encoder layers (deep post-LN needs warmup more)
    norm_first: bool = False  # post-LN (the 2017 layout); --norm-first: pre-LN, fine without warmup
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # peak LR, the same for every variant
    max_len: Annotated[int, Range(1, 4096)] = 64  # tokens kept per text
    vocab_size: Annotated[int, Range(3)] = 30_000  # vocabulary size (with <pad> and <unk>)
    val_fraction: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.1  # share of training held out
    train_subset: Annotated[int, Range(0)] = 10_000  # texts used (0: all): few let overfitting show

    SMOKE: ClassVar[dict] = {"epochs": 3, "batch_size": 32, "d_model": 32, "nhead": 2, "layers": 1,
                             "lr": 5e-3, "max_len": 24, "vocab_size": 400}

    def check(self) -> None:
        if self.d_model % self.nhead or self.d_model % 2:
            raise ConfigError(f"--d-model {self.d_model} must be even and divisible by "
                              f"--nhead {self.nhead}")


def variant_config(cfg: Config, settings: dict) -> part2.Config:
    # patience = epochs: every epoch runs, the best is kept
    return part2.Config(smoke=cfg.smoke, seed=cfg.seed, device=cfg.device, data_dir=cfg.data_dir,
                        out=cfg.out, epochs=cfg.epochs, batch_size=cfg.batch_size,
                        d_model=cfg.d_model, nhead=cfg.nhead, layers=cfg.layers,
                        norm_first=cfg.norm_first, lr=cfg.lr, max_len=cfg.max_len,
                        vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                        train_subset=cfg.train_subset, patience=cfg.epochs, **settings)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_ag_news(cfg)
    splits, vocab = encode(variant_config(cfg, VARIANTS["plain"]), data)  # checks --batch-size
    run = Run.start(cfg, __file__, device)
    summaries: dict[str, dict] = {}
    for name, settings in VARIANTS.items():
        print(f"--- {name}: {settings} ---")
        vcfg = variant_config(cfg, settings)
        seed_everything(cfg.seed)  # the same initial weights and batches for every variant
        model = part2.build_model(vcfg, len(vocab), len(splits.classes)).to(device)
        rows, _ = part2.train_model(vcfg, model, splits, device, run.sub(name, variant=name))
        _, val, test = loaders(vcfg, splits, device)
        accs = [r["val_acc"] for r in rows]
        best_acc = max(accs)
        kept = evaluate(model, val)  # plain cross-entropy, whatever loss the variant trained with
        summaries[name] = {"best_val_acc": best_acc, "kept_val_acc": kept["acc"],
                           "kept_val_ce": kept["loss"],
                           "epochs_to_95pct": next(i for i, a in enumerate(accs, 1)
                                                   if a >= 0.95 * best_acc),
                           "final_train_val_gap": rows[-1]["train_acc"] - rows[-1]["val_acc"],
                           "test_acc": evaluate(model, test)["acc"]}
    for key in ("val_acc", "train_loss"):
        curves = {v: [(r["epoch"], r[key]) for r in run.rows if r["variant"] == v]
                  for v in VARIANTS}
        plot_curves(curves, run.path(f"variants_{key}.png"), ylabel=key,
                    title=f"post-LN={not cfg.norm_first}, lr {cfg.lr:g}, {data.name}")
    run.write_comparison(summaries, list(summaries["plain"]), column="variant")
    # chosen on validation, never on test
    best = max(summaries, key=lambda v: summaries[v]["kept_val_acc"])
    return run.finish(**{f"{k}_{v}": x for v, s in summaries.items() for k, x in s.items()},
                      variants=list(VARIANTS), best_variant=best, data=data.name)


if __name__ == "__main__":
    launch(main, Config)
