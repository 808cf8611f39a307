"""Fast in-memory batching: ``TensorLoader``, plus ``normalizer`` and ``split``.

    train = TensorLoader(x_train, y_train, 128, shuffle=True, augment=crop_flip(4),
                         transform=normalizer(data.mean, data.std), device=device, seed=cfg.seed)
    for epoch in range(start, epochs + 1):
        train.set_epoch(epoch)       # a resumed run sees exactly the batches it would have seen
        for x, y in train: ...

Data sets that fit in memory are held as tensors (on the GPU when training there) and batched
by indexing: no per-sample Python work, no worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from common.augment import Augment

Transform = Callable[[torch.Tensor], torch.Tensor]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One step of SplitMix64: a fixed bijection on 64-bit integers that scrambles every bit."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*values: int) -> int:
    """A seed for ``torch.Generator.manual_seed`` that is a pure function of ``values``.

    Folds SplitMix64 over the integers, starting from how many there are (so ``(s, e)`` and
    ``(s, e, 0)`` differ). Plain integer arithmetic, not ``hash``: the same seed on every
    machine, OS and Python version, so a run resumed elsewhere still sees the same batches.
    Nearby inputs (epoch 3 and 4) give unrelated seeds, unlike ``seed + epoch``, where run
    seed 1 epoch 2 would repeat run seed 2 epoch 1.
    """
    h = _splitmix64(len(values))
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & 0x7FFF_FFFF_FFFF_FFFF


class TensorLoader:
    """Mini-batches by indexing tensors held in memory (on the GPU when training there).

    Replaces ``DataLoader`` for data that fits in memory: no per-sample Python calls, no worker
    processes, one gather per batch. Each batch goes through two optional steps, in order:

    ``augment(x_batch, generator)``  the random part (crops, flips), on the whole batch. It is
                                      handed a CPU ``torch.Generator`` and must draw all its
                                      randomness from it, never from the global RNG, so that
                                      the augmentation can be replayed.
    ``transform(x_batch)``           the deterministic part (uint8 -> normalized float). It
                                      runs after ``augment`` so that crops pad with real
                                      pixel values and work on the compact uint8 tensor.

    Determinism: the shuffle order of epoch ``e`` comes from a CPU generator seeded with
    ``derive_seed(seed, e)``; batch ``i`` of that epoch is augmented with a generator seeded
    with ``derive_seed(seed, e, i)``. So the batches of an epoch are a pure function of
    (seed, epoch) and do not depend on what ran before. That is what lets an interrupted run
    resume exactly: call ``set_epoch(e)`` and epoch ``e`` repeats the batches it had. A loader
    whose ``set_epoch`` is never called starts at epoch 1 and moves to the next epoch after
    each complete pass, so ``for epoch ...: for x, y in loader`` still reshuffles every pass,
    and the whole sequence repeats from a fresh loader with the same seed. (A pass abandoned
    midway, e.g. by ``break``, does not advance the epoch.) The generators are on the CPU, so
    the batches are the same whether the tensors live on a CPU or a GPU.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 augment: Augment | None = None, transform: Transform | None = None,
                 drop_last: bool = False, device: torch.device | str | None = None, seed: int = 0):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.transform = augment, transform
        self.seed = seed
        self.epoch = 1  # the epoch the next pass will produce; fit() counts epochs from 1

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass produce epoch ``epoch``'s batches (order and augmentation)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, n, b = self.epoch, len(self.x), self.batch_size
        order = None
        if self.shuffle:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g).to(self.x.device)
        for i in range(len(self)):
            if order is None:
                xb, yb = self.x[i * b:(i + 1) * b], self.y[i * b:(i + 1) * b]
            else:
                idx = order[i * b:(i + 1) * b]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None:
                g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, epoch, i))
                xb = self.augment(xb, g)
            if self.transform is not None:
                xb = self.transform(xb)
            yield xb, yb
        self.epoch = epoch + 1


def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    """uint8 images (N, C, H, W) -> float32, scaled to [0, 1], then standardized per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - m.to(x.device)) / s.to(x.device)

    return normalize


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int = 0):
    """Hold out a random ``val_fraction`` of (x, y) for validation: (x_tr, y_tr, x_val, y_val)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(x)))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
