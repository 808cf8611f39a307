"""Week 7's baseline, ``part2.py --model bag``: what a Transformer has to beat on AG News."""

from __future__ import annotations

import torch
from torch import nn

from week06_rnn.tokens import PAD


class BagOfEmbeddings(nn.Module):
    """The fastText-style baseline: the mean of the word vectors (``nn.EmbeddingBag`` with
    ``padding_idx`` leaves pads out of the mean), then a linear layer. Word order is ignored."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 64):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=PAD)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids))  # (N, dim) -> (N, K)
