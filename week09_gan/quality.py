"""Week 9: how good are generated images? A score that needs no download.

The usual score, FID, is the Frechet distance between Inception-v3 features of real and of
generated images. Inception weights are a 100 MB download and were trained on photos, not
digits; so here the features come from this project's own classifier: the Week 3 CNN
(``week03_cnn.part2.CNN``, imported), trained once on the GAN's training images and cached.

    Frechet distance between N(mu1, S1) and N(mu2, S2):
        d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Fit a Gaussian to each set of features (mean and covariance) and measure how far apart the
two Gaussians are: 0 for identical sets, larger when the means move apart or the spreads
differ. A GAN that draws only one kind of digit has a small covariance: the trace term
catches that even when every single image looks fine.

A number alone means little, so every report also gives the **real-vs-real baseline**: the
distance between two disjoint halves of the real validation images, at the same sample size
(the estimate is biased upwards for small samples, so sizes must match). And **class
coverage**: the share of generated images the classifier puts in each class (a GAN that
forgot a digit shows it at once).

The real images used here are held out from the GAN's training images (``gan_split``); the
test set is never touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.data import ImageData, cache_root
from common.device import seed_everything
from common.errors import CheckpointError
from common.loader import normalizer, split
from common.train import fit, predict
from week03_cnn import part2 as week3

VAL_FRACTION = 1 / 6  # MNIST: 50,000 images to train on, 10,000 held out for scoring
SPLIT_SEED = 0  # fixed: the cached classifier and every GAN run see the same split


# ----------------------------------------------------------------------------------------
# The Frechet distance
# ----------------------------------------------------------------------------------------
def gaussian_frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                              cov2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix
    M = S1^(1/2) S2 S1^(1/2) (same eigenvalues), so Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)).
    Two symmetric eigendecompositions, no general matrix square root (and no SciPy).
    Tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    cov1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    cov2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # S1^(1/2)
    middle = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # >= 0 in exact arithmetic; rounding can give -1e-13


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two sets of feature rows (N, D)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return gaussian_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                     np.cov(b, rowvar=False))


# ----------------------------------------------------------------------------------------
# The classifier whose features we compare
# ----------------------------------------------------------------------------------------
def gan_split(data: ImageData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images for the GAN and the classifier, and held-out real images for scoring."""
    return split(data.x_train, data.y_train, VAL_FRACTION, SPLIT_SEED)


def classifier_config(dataset: str, smoke: bool) -> week3.Config:
    """The Week 3 CNN's settings: for real data the mnist_cnn benchmark's one-epoch recipe
    (99% on MNIST) with global average pooling (64 features); under --smoke the same net for 4
    short epochs on the twin (about 0.78 on its held-out images, where chance is 0.1)."""
    if smoke:
        return week3.Config(dataset=dataset, epochs=4, batch_size=32, width=16, blocks=3, lr=5e-3,
                            dropout=0.0, augment=False, val_fraction=0.0, device="cpu")
    return week3.Config(dataset=dataset, epochs=1 if dataset == "mnist" else 4, batch_size=128,
                        lr=8e-3, width=16, blocks=3, dropout=0.0, augment=False, val_fraction=0.0,
                        device="cpu")


@dataclasses.dataclass
class Scorer:
    """A trained classifier, and what it says about a set of images."""

    model: week3.CNN
    normalize: object
    val_acc: float
    device: torch.device

    @torch.inference_mode()
    def features_and_classes(self, images: torch.Tensor,
                             batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (the pooled conv features the linear head reads) and predicted
        classes of images in [-1, 1] (the generator's tanh range), float64 NumPy."""
        self.model.eval()
        features, classes = [], []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(self.device).float()
            x = (x + 1) / 2  # [-1, 1] -> [0, 1]
            x = self.normalize(x * 255)  # the classifier's own input scaling (uint8 units)
            pooled = self.model.pool(self.model.features(x)).flatten(1)
            features.append(pooled.double().cpu())
            classes.append(self.model.head(pooled).argmax(1).cpu())
        return torch.cat(features).numpy(), torch.cat(classes).numpy()


def _train_classifier(data: ImageData, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
                      y_val: torch.Tensor,
                      cfg: week3.Config, device: torch.device) -> tuple[week3.CNN, float]:
    seed_everything(SPLIT_SEED)
    train_data = dataclasses.replace(data, x_train=x, y_train=y, x_test=x_val, y_test=y_val)
    train, _, val = week3.make_loaders(cfg, train_data, device)
    model = week3.make_model(cfg, data).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=len(train),
                                                    pct_start=0.25)
    fit(model, optimizer, train, None, cfg.epochs, scheduler=scheduler)
    logits, targets = predict(model, val)
    return model, (logits.argmax(1) == targets).float().mean().item()


def get_scorer(dataset: str, data: ImageData, smoke: bool, device: torch.device,
               cache: Path | None = None) -> Scorer:
    """The classifier for ``data``: trained here under --smoke (seconds, on the twin), else
    loaded from the cache (``$DL_LABS_CACHE/week09``), training it once (MNIST: about a minute
    on a CPU) if it is not there or the cached file is damaged."""
    cfg = classifier_config(dataset, smoke)
    x, y, x_val, y_val = gan_split(data)
    model = week3.make_model(cfg, data).to(device)
    path = (cache or cache_root() / "week09") / f"classifier_{dataset}.pt"
    val_acc = None
    if not smoke and path.exists():
        try:
            payload = load_checkpoint(path, model, script="week09/classifier", restore_rng=False)
            val_acc = float(payload["extra"]["val_acc"])
            print(f"classifier for scoring: {path} (validation accuracy {val_acc:.2%})")
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            print(f"warning: cached classifier unusable ({e}); training it again")
    if val_acc is None:
        print(f"training the scoring classifier (Week 3 CNN, {cfg.epochs} epoch(s) on {len(x)} "
              "images) ...")
        model, val_acc = _train_classifier(data, x, y, x_val, y_val, cfg, device)
        print(f"scoring classifier: validation accuracy {val_acc:.2%}")
        if not smoke:
            save_checkpoint(path, model, epoch=cfg.epochs, config=cfg.to_dict(),
                            script="week09/classifier",
                            val_acc=val_acc)
    return Scorer(model.eval(), normalizer(data.mean, data.std), val_acc, device)


def score(scorer: Scorer, generated: torch.Tensor, real: torch.Tensor, num_classes: int) -> dict:
    """Frechet distance of generated vs real, the real-vs-real baseline, and class coverage.

    ``real`` (held-out images in [-1, 1]) is cut into two disjoint halves A and B; the three
    feature sets compared all have n = min(len(real) // 2, len(generated)) rows:
    fd = FD(generated, A), fd_real = FD(B, A). Coverage uses every generated image."""
    n = min(len(real) // 2, len(generated))
    real_features, _ = scorer.features_and_classes(real[:2 * n])
    gen_features, gen_classes = scorer.features_and_classes(generated)
    half_a, half_b = real_features[:n], real_features[n:2 * n]
    shares = np.bincount(gen_classes, minlength=num_classes) / len(gen_classes)
    fd, fd_real = frechet_distance(gen_features[:n], half_a), frechet_distance(half_b, half_a)
    return {"fd": fd, "fd_real": fd_real, "fd_ratio": fd / max(fd_real, 1e-12), "fd_samples": n,
            "class_shares": [round(float(s), 4) for s in shares],
            "min_class_share": float(shares.min()),
            "max_class_share": float(shares.max())}
