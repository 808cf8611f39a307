"""Week 7: an ``nn.Transformer`` encoder-decoder that learns to reverse (or sort) digit sequences.

A "translation" task small enough to learn in seconds, but one that needs attention: to write
the i-th output digit of a reversal, the decoder must find the (n+1-i)-th input digit, so it has
to look up a position in the source. Each sentence pair:

    source   7 3 9 1            (digits, right-padded with <pad>)
    target   <bos> 1 9 3 7 <eos>

Training uses *teacher forcing*: the decoder reads the true target shifted right
(<bos> 1 9 3 7) and predicts every next token (1 9 3 7 <eos>) at once, in one forward pass. A
*causal mask* keeps position i from reading positions after i, so predicting token i+1 cannot
peek at it. At test time there is no true target: *greedy decoding* feeds the model its own
output, one token at a time, until <eos>. A test sequence counts as right only if every digit
and the <eos> are (exact match).

Run: python week07_transformer/seq2seq.py [--smoke] [--help]
     python week07_transformer/seq2seq.py --task sort --max-digits 12
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.config import BaseConfig, Range
from common.device import autocast, pick_device, seed_everything
from common.errors import ConfigError
from common.loader import TensorLoader
from common.plots import plot_curves
from common.runner import launch
from common.runs import Run
from common.train import check_finite
from week07_transformer.part2 import PositionalEncoding, warmup_then_cosine

PAD, BOS, EOS = 0, 1, 2  # special tokens; digit d is token d + 3
VOCAB = 13


@dataclass
class Config(BaseConfig):
    """Week 7: nn.Transformer reverses (or sorts) digits; teacher forcing, greedy decoding."""

    task: Literal["reverse", "sort"] = "reverse"  # the target: the digits backwards, or in order
    min_digits: Annotated[int, Range(1, 64)] = 3  # shortest source sequence
    max_digits: Annotated[int, Range(1, 64)] = 10  # longest source sequence
    train_size: Annotated[int, Range(1)] = 20_000  # training pairs (drawn once, fixed)
    d_model: Annotated[int, Range(2, 1024)] = 64  # token vector width
    nhead: Annotated[int, Range(1, 64)] = 4  # attention heads
    layers: Annotated[int, Range(1, 12)] = 2  # encoder layers, and as many decoder layers
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # seldom needed (endless variety)
    epochs: Annotated[int, Range(1)] = 8  # passes over the training pairs
    batch_size: Annotated[int, Range(1)] = 64  # pairs per optimizer step
    lr: Annotated[float, Range(0, 1e6, lo_open=True)] = 1e-3  # peak learning rate (warmup + cosine)
    warmup: Annotated[float, Range(0, 0.5)] = 0.05  # share of steps warming the learning rate up

    SMOKE: ClassVar[dict] = {"min_digits": 3, "max_digits": 5, "train_size": 2000, "d_model": 32,
                             "layers": 1, "epochs": 3, "batch_size": 32, "lr": 3e-3}
    UNUSED: ClassVar[tuple] = ("data_dir",)  # synthetic data made in memory

    def check(self) -> None:
        if self.min_digits > self.max_digits:
            raise ConfigError(f"--min-digits {self.min_digits} is more than "
                              f"--max-digits {self.max_digits}")
        if self.d_model % self.nhead or self.d_model % 2:
            raise ConfigError(f"--d-model {self.d_model} must be even and divisible by "
                              f"--nhead {self.nhead}")
        if self.batch_size > self.train_size:
            raise ConfigError(f"--batch-size {self.batch_size} is more than "
                              f"--train-size {self.train_size}")


# ---- The task ----
def make_pairs(n: int, min_digits: int, max_digits: int, task: str,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs: sources (n, max_digits) and targets (n, max_digits + 2) = <bos> answer <eos>,
    both right-padded with <pad>. Lengths are uniform in [min_digits, max_digits]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_digits, max_digits + 1, (n,), generator=g)
    digits = torch.randint(0, 10, (n, max_digits), generator=g) + 3
    src = torch.where(torch.arange(max_digits) < lengths[:, None], digits, PAD)
    tgt = torch.full((n, max_digits + 2), PAD)
    tgt[:, 0] = BOS
    for i, length in enumerate(lengths.tolist()):
        seq = src[i, :length]
        answer = seq.flip(0) if task == "reverse" else seq.sort().values
        tgt[i, 1:length + 1] = answer
        tgt[i, length + 1] = EOS
    return src, tgt


# ---- The model ----
def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L), True above the diagonal = "may not attend" (nn.Transformer's convention, the
    opposite of Part 1's): position i sees positions 0..i only."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)


class Seq2SeqTransformer(nn.Module):
    """Shared token embedding (+ sinusoidal positions) -> nn.Transformer -> next-token scores."""

    def __init__(self, d_model: int = 64, nhead: int = 4, layers: int = 2, dropout: float = 0.0,
                 max_len: int = 128):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.embed = nn.Embedding(VOCAB, d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.position = PositionalEncoding(d_model, max_len)
        # "enable_nested_tensor is True, but ...": nn.Transformer's own default
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(d_model, nhead, layers, layers, 4 * d_model, dropout,
                                              batch_first=True, norm_first=True)
        self.out = nn.Linear(d_model, VOCAB)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs ("memory") and the source padding mask (True = <pad>)."""
        src_pad = src == PAD
        x = self.position(self.embed(src) * self.scale)
        return self.transformer.encoder(x, src_key_padding_mask=src_pad), src_pad

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor,
               src_pad: torch.Tensor) -> torch.Tensor:
        """Next-token scores (N, T, VOCAB) for every prefix of ``tgt_in``. The causal mask is all
        the target needs: its pads come after its real tokens, so no real position sees them
        (the pads' own outputs are ignored by the loss)."""
        mask = causal_mask(tgt_in.shape[1], tgt_in.device)
        x = self.position(self.embed(tgt_in) * self.scale)
        h = self.transformer.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True,
                                     memory_key_padding_mask=src_pad)
        return self.out(h)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)


# ---- Training with teacher forcing ----
def teacher_forcing_loss(model: nn.Module, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The decoder reads tgt[:, :-1] (<bos> a b c) and must say tgt[:, 1:] (a b c <eos>): every
    position is one next-token prediction, all in one pass. Pad targets are ignored."""
    logits = model(src, tgt[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), tgt[:, 1:].reshape(-1),
                           ignore_index=PAD)


@torch.inference_mode()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Feed the model its own most likely token until every sequence has said <eos>; after its
    <eos> a sequence gets <pad>. The source is encoded once; the decoder reruns on the prefix."""
    model.eval()
    memory, src_pad = model.encode(src)
    out = torch.full((len(src), 1), BOS, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for _ in range(max_steps):
        next_token = model.decode(out, memory, src_pad)[:, -1].argmax(-1)
        next_token = torch.where(done, PAD, next_token)
        out = torch.cat([out, next_token[:, None]], dim=1)
        done |= next_token == EOS
        if done.all():
            break
    return out[:, 1:]


def exact_match(model: Seq2SeqTransformer, src: torch.Tensor, tgt: torch.Tensor,
                batch_size: int = 500) -> float:
    """Share of sequences whose greedy output equals the target exactly (all digits and <eos>)."""
    right = 0
    for i in range(0, len(src), batch_size):
        s, t = src[i:i + batch_size], tgt[i:i + batch_size, 1:]
        decoded = greedy_decode(model, s, t.shape[1])
        decoded = F.pad(decoded, (0, t.shape[1] - decoded.shape[1]), value=PAD)
        right += int((decoded == t).all(dim=1).sum())
    return right / len(src)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    n_eval = max(200, cfg.train_size // 20)
    src, tgt = make_pairs(cfg.train_size + 2 * n_eval, cfg.min_digits, cfg.max_digits, cfg.task,
                          cfg.seed)
    train = TensorLoader(src[:cfg.train_size], tgt[:cfg.train_size], cfg.batch_size, shuffle=True,
                         device=device, seed=cfg.seed)
    val_src = src[cfg.train_size:-n_eval].to(device)
    val_tgt = tgt[cfg.train_size:-n_eval].to(device)
    test_src, test_tgt = src[-n_eval:].to(device), tgt[-n_eval:].to(device)
    model = Seq2SeqTransformer(cfg.d_model, cfg.nhead, cfg.layers, cfg.dropout,
                               cfg.max_digits + 2).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    total = cfg.epochs * len(train)
    # Part 2's schedule: a linear warmup, then a half cosine to 0, stepped after every batch.
    warm = round(cfg.warmup * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine(total, warm))
    run = Run.start(cfg, __file__, device)
    print(f"{cfg.task} {cfg.min_digits}-{cfg.max_digits} digits: {cfg.train_size} training pairs, "
          f"{n_eval} validation, {n_eval} test; {params:,} parameters")
    best = (-1.0, 0, None)  # (validation exact match, epoch, weights): the model kept
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total_loss = torch.zeros((), device=device)
        for s, t in train:  # s: (B, S) source digits, t: (B, T) <bos> answer <eos>
            with autocast(device):
                loss = teacher_forcing_loss(model, s, t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()  # per batch
            total_loss += loss.detach()
        train_loss = (total_loss / len(train)).item()
        check_finite(train_loss, epoch)
        val_exact = exact_match(model, val_src, val_tgt)
        run.log(show=True, epoch=epoch, train_loss=train_loss, val_exact=val_exact,
                lr=optimizer.param_groups[0]["lr"])
        if val_exact > best[0]:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (val_exact, epoch, weights)
    model.load_state_dict(best[2])  # chosen on validation; the test set is used once, below
    test_exact = exact_match(model, test_src, test_tgt)
    shown = lambda ids: " ".join(str(i - 3) if i >= 3 else ["<pad>", "<bos>", "<eos>"][i]
                                 for i in ids.tolist() if i != PAD)
    outputs = greedy_decode(model, test_src[:3], test_tgt.shape[1] - 1)
    for source, output in zip(test_src[:3], outputs):
        print(f"test example: {shown(source)}  ->  {shown(output)}")
    plot_curves({"train loss": run.history("train_loss")}, run.path("loss.png"),
                ylabel="cross-entropy", title=f"{cfg.task}: teacher-forced loss", logy=True)
    plot_curves({"validation": run.history("val_exact")}, run.path("exact_match.png"),
                ylabel="exact match", title=f"{cfg.task}: greedy decoding")
    run.save_checkpoint(model, epoch=best[1])
    return run.finish(test_exact=test_exact, val_exact=best[0], kept_epoch=best[1], params=params,
                      final_train_loss=run.history("train_loss")[-1],
                      first_train_loss=run.history("train_loss")[0])


if __name__ == "__main__":
    launch(main, Config)
