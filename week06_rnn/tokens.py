"""Week 6: text to token ids: a tokenizer, a vocabulary, padding, and batches bucketed by length.

    vocab = Vocab.build(map(tokenize, train_texts), max_size=20_000)   # training texts only
    x, lengths = encode_texts(texts, vocab, max_len=256)               # (N, L) ids, (N,) lengths
    train = LengthBatches(x, lengths, y, batch_size=64, shuffle=True)  # similar lengths together

torchtext no longer imports with current PyTorch, and what a lab needs from it is short enough to
read: a regular expression, a frequency count, and right-padding into one int64 tensor. Index 0 is
the padding token and index 1 the unknown token in every vocabulary (``PAD``, ``UNK``), so a model
can use ``padding_idx=PAD`` and recover lengths as ``(x != PAD).sum(1)``. Week 7 imports these.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator

import torch

from common.errors import CheckpointError
from common.loader import derive_seed

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")

# ---- The tokenizer ----
# One regular expression, tried left to right at each position:
#   [^\W_]+(?=n't)   the word before a negating "n't" ("do" of "don't", "was" of "wasn't")
#   n't              the negation itself, kept as a token of its own so "not good" and
#                    "isn't good" share the signal a sentiment model needs
#   '[^\W_]+         other clitics: 's 're 've 'll 'd 'm
#   [^\W_]+          words and numbers (any alphabet: "café" stays one word)
#   [^\w\s]          every other non-space character ("!", "?", ")" carry sentiment too)
# A word letter may be followed by combining accents (U+0300-U+036F): after NFC most accents are
# part of their letter already, but some have no precomposed form ("İ".lower() is "i" + U+0307).
_W = r"[^\W_](?:[^\W_]|[\u0300-\u036f])*"
_TOKEN = re.compile(rf"{_W}(?=n't)|n't|'{_W}|{_W}|[^\w\s]")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)  # IMDB reviews contain HTML line breaks
# Invisible characters are not tokens: a zero-width space separates words (it is how Thai
# marks word breaks); joiners, the word joiner and a byte-order mark belong to no word at all.
_INVISIBLE = str.maketrans({"\u200b": " ", "\u200c": "", "\u200d": "", "\u2060": "",
                            "\ufeff": ""})


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation marks; "<br />" removed; "don't" -> ["do", "n't"].
    Unicode is NFC-normalized first, so "café" typed with a combining accent is the same token."""
    text = text.translate(_INVISIBLE).lower().replace("’", "'")
    return _TOKEN.findall(_BREAK.sub(" ", unicodedata.normalize("NFC", text)))


# ---- The vocabulary ----
class Vocab:
    """Token <-> index. ``itos[0] == "<pad>"``, ``itos[1] == "<unk>"``, then the training
    tokens, most frequent first (ties broken alphabetically, so the same corpus always gives
    the same indices whatever order it was read in)."""

    def __init__(self, itos: list[str]):
        if list(itos[:2]) != list(SPECIALS) or len(set(itos)) != len(itos):
            raise ValueError(f"a vocabulary starts with {SPECIALS} and has no duplicates")
        self.itos = list(itos)
        self.stoi = {token: i for i, token in enumerate(self.itos)}

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], max_size: int, min_freq: int = 1) -> Vocab:
        """The ``max_size - 2`` most frequent tokens seen at least ``min_freq`` times, plus the
        two specials (``max_size`` counts them). Build it from the training split only: a test
        word must be unknown to the model, as it would be in use."""
        if max_size < len(SPECIALS) or min_freq < 1:
            raise ValueError(f"max_size must be >= {len(SPECIALS)} and min_freq >= 1")
        counts = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        for special in SPECIALS:  # a literal "<unk>" in the text is just unknown
            counts.pop(special, None)
        kept = [item for item in counts.items() if item[1] >= min_freq]
        ranked = sorted(kept, key=lambda kv: (-kv[1], kv[0]))  # most frequent, then a-z
        return cls([*SPECIALS, *(token for token, _ in ranked[:max_size - len(SPECIALS)])])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        get = self.stoi.get
        return [get(token, UNK) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def state_dict(self) -> dict:
        """Plain lists and strings: saved inside checkpoints, which load with weights_only=True."""
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Vocab:
        itos = state.get("itos") if isinstance(state, dict) else None
        if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos):
            raise CheckpointError("the saved vocabulary is not a list of tokens "
                                  "(not a checkpoint of a text model?)")
        try:
            return cls(itos)
        except ValueError as e:
            raise CheckpointError(f"the saved vocabulary is damaged: {e}") from None


# ---- Padding: ragged lists of ids -> one rectangle ----
def pad_batch(ids: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (and truncate to ``max_len``) into an (N, L) int64 tensor, L = min(max_len,
    longest); plus the lengths (N,). An empty sequence becomes one PAD of length 1, so every
    length is >= 1 (``pack_padded_sequence`` refuses 0). Padding goes AFTER the real tokens:
    an RNN's state after a row's last real token has then seen no padding at all."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lengths = torch.tensor([max(1, min(len(seq), max_len)) for seq in ids], dtype=torch.long)
    width = int(lengths.max()) if len(ids) else 1
    out = torch.full((len(ids), width), PAD, dtype=torch.long)
    for row, seq in enumerate(ids):
        if seq:
            out[row, :min(len(seq), max_len)] = torch.tensor(seq[:max_len], dtype=torch.long)
    return out, lengths


def encode_texts(texts: list[str], vocab: Vocab, max_len: int,
                 keep: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """tokenize -> encode -> pad_batch for raw texts; a text longer than ``max_len`` keeps its
    first tokens (``keep="first"``) or its last ones (a review's ending often sums it up)."""
    ids = [vocab.encode(tokenize(t)) for t in texts]
    if keep == "last":
        ids = [seq[-max_len:] for seq in ids]
    return pad_batch(ids, max_len)


# ---- Bucketing: batches of similar length ----
class LengthBatches:
    """Mini-batches of padded token ids by indexing, grouped by length (``TensorLoader`` for text).

    Each batch is cut to its own longest sequence, so a batch of short reviews does not pay for
    256 steps of padding. With ``bucket``, a shuffled epoch is split into pools of 50 batches,
    each pool sorted by length before it is cut into batches, and the batches are shuffled:
    batches hold similar lengths (little padding, the RNN runs few steps) yet differ from epoch
    to epoch. Sorting the whole set instead would give the same batches every epoch. Like
    ``TensorLoader``, epoch ``e``'s batches are a pure function of (seed, e), so ``set_epoch``
    makes a resumed run see the batches it would have seen.
    """

    POOL = 50  # batches per sorted pool

    def __init__(self, x: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor, batch_size: int,
                 shuffle: bool = False, bucket: bool = True,
                 device: torch.device | str | None = None, seed: int = 0):
        if not len(x) == len(lengths) == len(y):
            raise ValueError(f"x, lengths and y have {len(x)}, {len(lengths)} and {len(y)} rows")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else x.device
        self.x, self.y, self.lengths = x.to(device), y.to(device), lengths.cpu()
        self.batch_size, self.shuffle, self.bucket, self.seed = batch_size, shuffle, bucket, seed
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """The row indices of each batch of epoch ``epoch``."""
        n, b = len(self.x), self.batch_size
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if not self.bucket:
            return list(order.split(b))
        batches = []
        for pool in order.split(b * self.POOL):  # stable sort: ties keep the shuffled order
            ranked = pool[torch.sort(self.lengths[pool], descending=True, stable=True).indices]
            batches += list(ranked.split(b))
        if self.shuffle:  # or every epoch would start with the longest batch of the first pool
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
        return batches

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        if not self.bucket:
            return math.ceil(n / b)
        pool = b * self.POOL
        return (n // pool) * self.POOL + math.ceil((n % pool) / b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        for idx in self.batches(epoch):
            width = int(self.lengths[idx].max())  # this batch's longest: no column of pads only
            idx = idx.to(self.x.device)
            yield self.x[idx, :width], self.y[idx]
        self.epoch = epoch + 1
