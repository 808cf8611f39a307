"""Week 6's baseline, ``part2.py --model ngram_bag``: what an RNN has to beat on IMDB."""

from __future__ import annotations

import torch
from torch import nn

from week06_rnn.tokens import PAD


class NgramBag(nn.Module):
    """fastText-style baseline: the mean of the vectors of every word and every bigram (hashed
    into ``buckets`` slots), then a linear classifier. No order beyond neighbouring pairs."""

    PRIME = 1_000_003  # bigram (a, b) -> (a * PRIME + b) mod buckets, shifted past the vocabulary

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int, buckets: int,
                 dropout: float = 0.0):
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
        return self.head(self.drop(self.bag(self.ngrams(x))))  # PADs are left out of the mean
