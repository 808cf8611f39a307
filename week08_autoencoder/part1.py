"""Week 8, Part 1: PCA (two ways) and k-means (k-means++ starts) from scratch in NumPy, on digits.

Run: python week08_autoencoder/part1.py [--smoke] [--help]
     python week08_autoencoder/part1.py --dataset digits        # scikit-learn's 8x8 digits, offline
     python week08_autoencoder/part1.py --data-dir DATA --samples 0   # all 60,000 MNIST images

Notation: X is (n, d), one image per row (pixels in [0, 1]); mu is the mean image and
Xc = X - mu the centred data.

PCA looks for the orthonormal directions v_1, v_2, ... along which the data varies most.
    Covariance route:  C = Xc^T Xc / (n - 1)  (d x d, symmetric);  C v_i = lambda_i v_i.
                       The variance of the data along v_i is lambda_i ("variance explained").
    SVD route:         Xc = U S V^T;  then C = V (S^2 / (n - 1)) V^T, so the rows of V^T are the
                       same directions and lambda_i = s_i^2 / (n - 1), without forming C (whose
                       condition number is the square of Xc's: small lambdas lose digits).
    Share explained:   r_i = lambda_i / sum_j lambda_j  (a scree plot shows r_i against i).
    k components:      z = (x - mu) V_k  (the "latent representation", k numbers per image),
                       x_hat = mu + z V_k^T. The mean squared error over the data set is the
                       variance left out: sum_{i > k} lambda_i (n - 1) / (n d) per pixel.

k-means splits the rows of X into k clusters to minimize the inertia
    J = sum_i ||x_i - c_{a(i)}||^2      (a(i): the cluster of x_i, c_j: cluster j's centre)
by alternating two steps, each of which can only lower J (so J never increases, and as there
are finitely many assignments it stops):
    assign:  a(i) = argmin_j ||x_i - c_j||^2     (best centre for fixed centres)
    update:  c_j = mean of the x_i with a(i) = j  (best centres for a fixed assignment)
k-means++ picks the starting centres: the first uniformly at random, each next one x_i with
probability D(x_i)^2 / sum_l D(x_l)^2, D = distance to the nearest centre chosen so far:
far-away points are likely picks, so the starting centres are spread over the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import linear_sum_assignment

from common.config import BaseConfig, Range
from common.data import load
from common.device import pick_device, seed_everything
from common.errors import ConfigError
from common.plots import plot_confusion, save
from common.runner import launch
from common.runs import Run


@dataclass
class Config(BaseConfig):
    """Week 8, Part 1: PCA by eigendecomposition and by SVD, k-means++ and k-means, in NumPy."""

    dataset: Literal["mnist", "digits"] = "mnist"  # mnist: 28x28, downloaded; digits: sklearn's 8x8
    samples: Annotated[int, Range(0)] = 10000  # training images used (at random; 0: all of them)
    components: Annotated[int, Range(1)] = 50  # principal components in the figures and summary
    clusters: Annotated[int, Range(2, 100)] = 10  # k of k-means (10: one per digit, if data agrees)
    restarts: Annotated[int, Range(1, 100)] = 3  # k-means++ starts; the lowest inertia is kept
    max_iter: Annotated[int, Range(1, 10000)] = 100  # most assign/update rounds per k-means run

    SMOKE: ClassVar[dict] = {"dataset": "digits", "restarts": 2, "components": 20}
    UNUSED: ClassVar[tuple] = ("device",)  # NumPy on the CPU: no --device


# ----------------------------------------------------------------------------------------
# PCA
# ----------------------------------------------------------------------------------------
@dataclass
class PCA:
    """A fitted PCA: the mean, the components (rows, orthonormal, by decreasing variance) and
    the variance along each (``explained_variance``, lambda_i) and its share (r_i)."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (m, d), m = min(n, d)
    explained_variance: np.ndarray  # (m,)
    explained_variance_ratio: np.ndarray  # (m,)

    def transform(self, x: np.ndarray, k: int) -> np.ndarray:
        """z = (x - mu) V_k: the coordinates of each row along the first k components."""
        return (x - self.mean) @ self.components[:k].T

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """x_hat = mu + z V_k^T, for z of k columns."""
        return self.mean + z @ self.components[:z.shape[1]]

    def reconstruct(self, x: np.ndarray, k: int) -> np.ndarray:
        """x projected onto the mean plus the span of the first k components."""
        return self.inverse_transform(self.transform(x, k))


def _fix_signs(components: np.ndarray) -> np.ndarray:
    """A component and its negative are the same direction; make each one's largest-magnitude
    entry positive so both routes (and every run) return the same vectors."""
    rows = np.arange(len(components))
    signs = np.sign(components[rows, np.abs(components).argmax(axis=1)])
    signs[signs == 0] = 1
    return components * signs[:, None]


def _ratio(variance: np.ndarray) -> np.ndarray:
    total = variance.sum()
    return variance / total if total > 0 else np.zeros_like(variance)


def pca_eig(x: np.ndarray) -> PCA:
    """PCA by the eigendecomposition of the covariance C = Xc^T Xc / (n - 1).

    ``np.linalg.eigh`` (for symmetric matrices) returns eigenvalues in increasing order: flip
    them. Rounding can make zero eigenvalues slightly negative: a variance is >= 0, so clip.
    """
    n, d = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1][:min(n, d)]
    variance = np.clip(eigenvalues[order], 0, None)
    return PCA(mean, _fix_signs(eigenvectors[:, order].T), variance, _ratio(variance))


def pca_svd(x: np.ndarray) -> PCA:
    """PCA by the SVD of the centred data, Xc = U S V^T: components = rows of V^T,
    lambda_i = s_i^2 / (n - 1). ``full_matrices=False`` skips the n x n U we do not need."""
    n, _ = x.shape
    mean = x.mean(axis=0)
    _, singular_values, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = singular_values**2 / (n - 1)
    return PCA(mean, _fix_signs(vt), variance, _ratio(variance))


def components_for(ratio: np.ndarray, share: float) -> int:
    """The fewest components whose cumulative explained share reaches ``share``."""
    return int(np.searchsorted(np.cumsum(ratio), share - 1e-12) + 1)


# ----------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------
def squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """||x_i - c_j||^2 = ||x_i||^2 - 2 x_i . c_j + ||c_j||^2 for all pairs, as one matrix product
    (an (n, k, d) array of differences would not fit in memory for MNIST). Rounding can leave a
    tiny negative where x_i = c_j: clip at 0."""
    d2 = ((x * x).sum(axis=1)[:, None] - 2 * x @ centres.T
          + (centres * centres).sum(axis=1)[None, :])
    return np.maximum(d2, 0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k starting centres by the k-means++ rule (module docstring).

    Each pick draws u ~ U[0, 1) and takes the first i with cumsum(D^2)_i > u * sum(D^2): the
    inverse of the cumulative distribution, so x_i is picked with probability D_i^2 / sum D^2,
    and a point already picked (D = 0) never again."""
    n = len(x)
    if k > n:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    chosen = [int(rng.integers(n))]
    d2 = squared_distances(x, x[chosen])[:, 0]
    for _ in range(1, k):
        cumulative = np.cumsum(d2)
        # Every point sits on a chosen centre (duplicates): any other point will do.
        if cumulative[-1] <= 0:
            chosen.append(int(rng.choice(np.setdiff1d(np.arange(n), chosen))))
        else:
            u = rng.random() * cumulative[-1]
            chosen.append(int(np.searchsorted(cumulative, u, side="right")))
        d2 = np.minimum(d2, squared_distances(x, x[chosen[-1:]])[:, 0])
    return np.array(chosen)


@dataclass
class KMeansResult:
    centres: np.ndarray  # (k, d)
    labels: np.ndarray  # (n,) cluster of each row
    inertia: list[float]  # J after each assignment step (the last one: the final J)
    iterations: int
    converged: bool  # the assignment stopped changing before max_iter


def kmeans(x: np.ndarray, centres: np.ndarray, max_iter: int = 100) -> KMeansResult:
    """Lloyd's algorithm from the given starting centres: assign, update, until the assignment
    stops changing. A cluster left empty keeps its old centre (J cannot rise that way)."""
    centres = np.array(centres, dtype=np.float64)
    labels, inertia = None, []
    for iteration in range(1, max_iter + 1):
        d2 = squared_distances(x, centres)
        new_labels = d2.argmin(axis=1)  # ties go to the lowest cluster index, as in scikit-learn
        inertia.append(float(d2[np.arange(len(x)), new_labels].sum()))
        if labels is not None and np.array_equal(new_labels, labels):
            return KMeansResult(centres, labels, inertia, iteration, True)
        labels = new_labels
        # Sum the points of each cluster as one matrix product, one_hot (k, n) @ x (n, d): BLAS
        # speed, where np.add.at (one element at a time) took seconds per round on MNIST.
        one_hot = np.zeros((len(centres), len(x)))
        one_hot[labels, np.arange(len(x))] = 1.0
        sums, counts = one_hot @ x, one_hot.sum(axis=1)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return KMeansResult(centres, labels, inertia, max_iter, False)


def best_of_restarts(x: np.ndarray, k: int, restarts: int, max_iter: int,
                     seed: int) -> KMeansResult:
    """k-means from ``restarts`` k-means++ starts; the run with the lowest final inertia (J
    has local minima: the start matters)."""
    rng = np.random.default_rng(seed)
    runs = [kmeans(x, x[kmeans_plus_plus(x, k, rng)], max_iter) for _ in range(restarts)]
    return min(runs, key=lambda r: r.inertia[-1])


# ----------------------------------------------------------------------------------------
# Scoring clusters against labels
# ----------------------------------------------------------------------------------------
def contingency(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """counts[j, c]: how many rows of cluster j have label c."""
    true, pred = np.asarray(true), np.asarray(pred)
    shape = (pred.max() + 1, true.max() + 1)
    return np.bincount(pred * shape[1] + true, minlength=shape[0] * shape[1]).reshape(shape)


def match_clusters(true: np.ndarray, pred: np.ndarray) -> dict[int, int]:
    """The one-to-one cluster -> label map with the most rows right (the Hungarian algorithm on
    the contingency table): cluster ids are arbitrary names, so "cluster 3" must first be told
    which digit it stands for. With more clusters than labels, the extra ones match nothing."""
    counts = contingency(true, pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return dict(zip(rows.tolist(), cols.tolist()))


def matched_accuracy(true: np.ndarray, pred: np.ndarray,
                     mapping: dict[int, int] | None = None) -> float:
    """Share of rows whose cluster maps to their label (the map: ``match_clusters``, unless
    given)."""
    mapping = match_clusters(true, pred) if mapping is None else mapping
    label_of = np.array([mapping.get(int(c), -1) for c in range(int(np.max(pred)) + 1)])
    mapped = label_of[np.asarray(pred)]
    return float(np.mean(mapped == np.asarray(true)))


def entropy(counts: np.ndarray) -> float:
    """H = -sum p log p (natural log) of a distribution given by counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(true: np.ndarray, pred: np.ndarray) -> float:
    """Normalized mutual information, NMI = I(T; P) / ((H(T) + H(P)) / 2), where
    I(T; P) = sum_{j,c} p(j, c) log(p(j, c) / (p(j) p(c))). 1: the clusters are the labels up to
    renaming; 0: they say nothing about them. No matching needed. (Both constant: 1 by
    convention.)"""
    counts = contingency(true, pred).astype(np.float64)
    h_pred, h_true = entropy(counts.sum(axis=1)), entropy(counts.sum(axis=0))
    if h_pred == 0 and h_true == 0:
        return 1.0
    p = counts / counts.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / outer[nz])).sum())
    return max(mutual, 0.0) / ((h_true + h_pred) / 2)


# ----------------------------------------------------------------------------------------
# Data and figures
# ----------------------------------------------------------------------------------------
def load_pixels(cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str]:
    """Training and test images as float64 rows in [0, 1], their labels, the image side, a name.
    ``samples`` training images are drawn at random (the test set stays whole)."""
    data = load(cfg.dataset, cfg.data_dir, smoke=cfg.smoke, seed=cfg.seed)
    if cfg.dataset == "digits":  # sklearn's digits: 64 features, each a pixel from 0 to 16
        scale, side = 16.0, 8
    else:
        scale, side = 255.0, data.x_train.shape[-1]
    x_train = data.x_train.reshape(len(data.x_train), -1).numpy().astype(np.float64) / scale
    x_test = data.x_test.reshape(len(data.x_test), -1).numpy().astype(np.float64) / scale
    y_train, y_test = data.y_train.numpy(), data.y_test.numpy()
    if cfg.samples and cfg.samples < len(x_train):
        keep = np.random.default_rng(cfg.seed).permutation(len(x_train))[:cfg.samples]
        x_train, y_train = x_train[keep], y_train[keep]
    if cfg.clusters > len(x_train):
        raise ConfigError(f"--clusters {cfg.clusters} is more than the {len(x_train)} "
                          "training images")
    return x_train, y_train, x_test, y_test, side, data.name


def plot_scree(ratio: np.ndarray, shown: int, path, title: str):
    """The share of variance per component (bars) and the running total (line)."""
    shown = min(shown, len(ratio))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(np.arange(1, shown + 1), ratio[:shown], color="tab:blue", label="per component")
    ax.set(xlabel="component", ylabel="share of variance", title=title)
    twin = ax.twinx()
    twin.plot(np.arange(1, shown + 1), np.cumsum(ratio)[:shown], color="tab:red", marker=".",
              label="cumulative")
    twin.set(ylim=(0, 1.02), ylabel="cumulative share")
    for share in (0.8, 0.9):
        twin.axhline(share, color="gray", lw=0.6, ls="--")
    handles = [h for a in (ax, twin) for h in a.get_legend_handles_labels()[0]]
    twin.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    return save(fig, path)


def plot_vectors(vectors: np.ndarray, side: int, path, titles: list[str], title: str,
                 signed: bool = True):
    """Rows of length side^2 as images: components on a red/blue scale (sign matters, 0 is
    white), centres and reconstructions in grey."""
    n = len(vectors)
    cols = min(n, 10)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, vector, label in zip(axes.flat, vectors, titles):
        image = vector.reshape(side, side)
        if signed:
            limit = np.abs(image).max() + 1e-12
            ax.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=7)
    fig.suptitle(title, y=1.02)
    return save(fig, path)


def reconstruction_grid(pca: PCA, images: np.ndarray, ks: list[int], side: int, path):
    """Row 1: test images; each next row: the same images from k components."""
    rows = [images] + [np.clip(pca.reconstruct(images, k), 0, 1) for k in ks]
    titles = [f"original {i}" for i in range(len(images))] + [f"k={k}" for k in ks for _ in images]
    return plot_vectors(np.concatenate(rows), side, path, titles,
                        "PCA reconstructions from k components", signed=False)


def main(cfg: Config) -> dict:
    seed_everything(cfg.seed)
    device = pick_device("cpu")  # NumPy only
    x_train, y_train, x_test, y_test, side, name = load_pixels(cfg)
    run = Run.start(cfg, __file__, device)
    n, d = x_train.shape
    print(f"{name}: {n} training images of {side}x{side} = {d} pixels, {len(x_test)} test images")

    # ---- PCA, both ways: the same directions and variances ----
    by_eig, by_svd = pca_eig(x_train), pca_svd(x_train)
    variance_gap = float(np.abs(by_eig.explained_variance - by_svd.explained_variance).max())
    top = min(cfg.components, len(by_svd.components))
    # Below a millionth of the top variance eigh's digits run out: compare the components above.
    reliable = by_svd.explained_variance[:top] > 1e-6 * by_svd.explained_variance[0]
    component_gap = float(np.abs(by_eig.components[:top][reliable]
                                 - by_svd.components[:top][reliable]).max())
    print(f"eigh vs SVD: max |variance difference| {variance_gap:.2e}, max |component difference| "
          f"{component_gap:.2e} (first {top} components, signs fixed)")
    pca = by_svd
    ratio = pca.explained_variance_ratio
    kept = float(ratio[:top].sum())
    needed = {share: components_for(ratio, share) for share in (0.5, 0.8, 0.9, 0.95)}
    print(f"{top} components explain {kept:.1%} of the variance; 50% needs {needed[0.5]}, "
          f"80% {needed[0.8]}, 90% {needed[0.9]}, 95% {needed[0.95]} (of {d})")
    plot_scree(ratio, max(top, needed[0.9]), run.path("scree.png"), f"PCA of {name}: scree plot")
    shown = min(20, top)
    plot_vectors(pca.components[:shown], side, run.path("components.png"),
                 [f"#{i + 1} {ratio[i]:.1%}" for i in range(shown)],
                 "first principal components (red +, blue -)")
    ks = sorted({k for k in (1, 2, 5, 10, 20, top) if k <= top})
    test_mse = {k: float(np.mean((x_test - pca.reconstruct(x_test, k)) ** 2)) for k in ks}
    for k in ks:
        print(f"  k={k:3d}: test reconstruction MSE per pixel {test_mse[k]:.5f}")
    reconstruction_grid(pca, x_test[:8], ks, side, run.path("reconstructions.png"))

    # ---- k-means++ and k-means; clusters scored against the labels they never saw ----
    result = best_of_restarts(x_train, cfg.clusters, cfg.restarts, cfg.max_iter, cfg.seed)
    for i, value in enumerate(result.inertia, start=1):
        run.log(iteration=i, inertia=value)
    mapping = match_clusters(y_train, result.labels)
    train_acc = matched_accuracy(y_train, result.labels, mapping)
    train_nmi = nmi(y_train, result.labels)
    # Test images: each to its nearest centre, scored with the matching found on training ones.
    test_labels = squared_distances(x_test, result.centres).argmin(axis=1)
    test_acc, test_nmi = matched_accuracy(y_test, test_labels, mapping), nmi(y_test, test_labels)
    ending = "converged" if result.converged else "cut"
    print(f"k-means, k={cfg.clusters}: {result.iterations} iterations ({ending}), "
          f"inertia {result.inertia[0]:.1f} -> {result.inertia[-1]:.1f}")
    print(f"  training images: accuracy after matching {train_acc:.3f}, NMI {train_nmi:.3f}; "
          f"test images (nearest centre, same matching): accuracy {test_acc:.3f}, "
          f"NMI {test_nmi:.3f}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(result.inertia) + 1), result.inertia, marker=".")
    ax.set(xlabel="iteration", ylabel="inertia J", title="k-means: J never rises")
    save(fig, run.path("inertia.png"))
    order = sorted(range(cfg.clusters), key=lambda j: mapping.get(j, cfg.clusters + j))
    plot_vectors(result.centres[order], side, run.path("centres.png"),
                 [f"-> {mapping[j]}" if j in mapping else "unmatched" for j in order],
                 "k-means centres, with the label each is matched to", signed=False)
    counts = contingency(y_train, result.labels)
    n_labels = counts.shape[1]
    matched = np.zeros((n_labels, n_labels), dtype=int)  # rows: true label, columns: matched label
    for cluster, label in mapping.items():
        if label < n_labels:
            matched[:, label] += counts[cluster]
    plot_confusion(matched, [str(c) for c in range(n_labels)], run.path("clusters_vs_labels.png"),
                   title="true label vs the label its cluster matched")

    return run.finish(dataset=name, samples=n, pixels=d, variance_explained_top=kept,
                      components_shown=top, components_for_90pct=needed[0.9],
                      components_for_95pct=needed[0.95], eig_svd_max_variance_diff=variance_gap,
                      eig_svd_max_component_diff=component_gap,
                      **{f"pca_test_mse_k{k}": v for k, v in test_mse.items()},
                      kmeans_iterations=result.iterations, kmeans_converged=result.converged,
                      inertia_first=result.inertia[0], inertia_final=result.inertia[-1],
                      kmeans_train_acc=train_acc, kmeans_train_nmi=train_nmi,
                      kmeans_test_acc=test_acc, kmeans_test_nmi=test_nmi)


if __name__ == "__main__":
    launch(main, Config)
