"""Week 8: NumPy PCA (both routes) == torch.linalg.svd / torch.pca_lowrank, k-means and k-means++
do what their rules say (== scikit-learn's Lloyd from the same start), clusters scored against
labels correctly; the autoencoders learn on the twin, beat the mean image, and resume exactly."""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits
from torch import nn

from common.checkpoint import read_checkpoint, save_checkpoint
from common.data import ImageData
from common.parity import assert_close
from common.runs import Run
from tests.conftest import run_lab
from week08_autoencoder import bottleneck_sweep, latent_kmeans, part1, part2


@pytest.fixture(autouse=True)
def one_blas_thread():
    """One BLAS/OpenMP thread in this test process, as the smoke runs get from OMP_NUM_THREADS=1:
    NumPy's OpenBLAS otherwise starts a thread per core, and with two pytest workers on 2 loaded
    cores the 784 x 784 eigh of the PCA baseline spun for ~7 CPU-s instead of 0.1 (measured)."""
    with threadpool_limits(1):
        yield


# ---------------------------------------------------------------------------------------------
# What each script's --smoke run must show (tests/test_smoke.py runs them)
# ---------------------------------------------------------------------------------------------
def check_part1(summary: dict, rows: list[dict]) -> None:
    inertia = [float(r["inertia"]) for r in rows]
    assert len(inertia) >= 2, inertia
    assert all(b <= a * (1 + 1e-12) for a, b in zip(inertia, inertia[1:])), inertia
    assert summary["kmeans_converged"] and inertia[-1] < inertia[0]
    assert summary["eig_svd_max_variance_diff"] < 1e-10
    assert summary["eig_svd_max_component_diff"] < 1e-8
    # sklearn's digits: 10 balanced classes (chance 0.1); k-means reaches about 0.8 here
    assert summary["kmeans_train_acc"] > 0.6 and summary["kmeans_test_acc"] > 0.6
    assert summary["kmeans_train_nmi"] > 0.5
    mses = [v for k, v in summary.items() if k.startswith("pca_test_mse_k")]
    assert len(mses) >= 3 and all(b < a for a, b in zip(mses, mses[1:])), \
        "more components must rebuild better"
    assert 0.5 < summary["variance_explained_top"] < 1


def losses_fall(rows: list[dict], column: str = "") -> None:
    trained = [r for r in rows if r.get("train_loss") not in (None, "")]
    for key in dict.fromkeys(r.get(column, "") for r in trained):
        losses = [float(r["train_loss"]) for r in trained if r.get(column, "") == key]
        assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0], f"no fall ({key}): {losses}"


def check_part2(summary: dict, rows: list[dict]) -> None:
    losses_fall(rows)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    # The mean image is what a code that carries nothing gives: the autoencoder must do clearly
    # better. Measured (seed 0): 0.61 x the mean image's MSE; with the code zeroed (z * 0, the
    # decoder learns the mean image) 1.00; with --lr 1e-9 3.2 (and the loss does not fall).
    assert summary["test_mse"] < 0.8 * summary["mean_image_mse"]
    assert summary["pca_test_mse"] < summary["mean_image_mse"]


def check_sweep(summary: dict, rows: list[dict]) -> None:
    losses_fall(rows, "bottleneck")
    sizes = summary["bottlenecks"]
    assert len(sizes) >= 2
    for d in sizes:  # measured: 0.62 (d=4) and 0.62 (d=16); a code that carries nothing: 1.00
        assert summary[f"test_mse_d{d}"] < 0.8 * summary["mean_image_mse"], d
    pca = [summary[f"pca_test_mse_d{d}"] for d in sizes]
    assert all(b < a for a, b in zip(pca, pca[1:])), "PCA with more components must rebuild better"


def check_latent_kmeans(summary: dict, rows: list[dict]) -> None:
    losses_fall([r for r in rows if r.get("epoch")])
    # The twin's 102 test images cannot judge clustering quality: a random labelling of them
    # already scores about 0.25 accuracy after matching and 0.21 NMI (measured, 200 draws), as
    # much as k-means does on the twin. Part 1's k-means is judged by its unit tests and its
    # smoke run on real digits (accuracy > 0.6), this script's pipeline on clearly separated
    # classes (test_latent_kmeans_recovers_...); here: every view was clustered and scored.
    assert summary["clustered"] == 102
    for view in ("pixels", "pca", "latent"):
        assert 0 < summary[f"acc_{view}"] <= 1 and 0 <= summary[f"nmi_{view}"] <= 1, view
        assert 1 <= summary[f"iterations_{view}"] < 300, view  # k-means converged (max_iter 300)
    views = {r["representation"] for r in rows if r.get("representation")}
    assert views == {"pixels", "PCA", "latent"}


SMOKE_OUTCOMES = {"part1.py": check_part1, "part2.py": check_part2,
                  "bottleneck_sweep.py": check_sweep, "latent_kmeans.py": check_latent_kmeans}


# ---------------------------------------------------------------------------------------------
# PCA: both NumPy routes == torch.linalg.svd and torch.pca_lowrank
# ---------------------------------------------------------------------------------------------
def pca_data(seed: int = 0) -> np.ndarray:
    """40 x 8 rows with a clear spectrum (variances about 16, 9, 4, 2.3, 1, 0.4, 0.1 and one of 0:
    an exactly constant column), a duplicated row and exact zeros among the entries."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    x = rng.normal(size=(40, 7)) * np.array([4.0, 3.0, 2.0, 1.5, 1.0, 0.6, 0.3]) @ q
    x = np.column_stack([x[:, :3], np.full(40, 2.5), x[:, 3:]])  # column 3: constant, zero variance
    x[5] = x[4]  # a tie: two identical rows
    x[7, [0, 1]] = 0.0
    return x


def same_up_to_sign(mine: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Each row of ``mine`` equals the matching row of ``expected`` or its negative."""
    signs = np.sign((mine * expected).sum(axis=1))
    assert np.all(signs != 0), f"{what}: a component is orthogonal to PyTorch's"
    assert_close(mine * signs[:, None], expected, what)


def torch_pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xt = torch.from_numpy(x)
    _, s, vh = torch.linalg.svd(xt - xt.mean(dim=0), full_matrices=False)
    return (s**2 / (len(x) - 1)).numpy(), vh.numpy()


@pytest.mark.parametrize("route", [part1.pca_svd, part1.pca_eig], ids=["svd", "eigh"])
def test_pca_matches_torch_linalg_svd(route):
    x = pca_data()
    variance, components = torch_pca(x)
    pca = route(x)
    assert_close(pca.mean, x.mean(axis=0), "mean")
    assert_close(pca.explained_variance, variance, "explained variance")
    assert pca.explained_variance[-1] == pytest.approx(0, abs=1e-12), \
        "the constant column adds no variance"
    assert_close(pca.explained_variance_ratio, variance / variance.sum(),
                 "explained variance ratio")
    same_up_to_sign(pca.components[:7], components[:7], "components with nonzero variance")
    # The zero-variance direction is exactly the constant column's axis.
    assert_close(np.abs(pca.components[7]), np.eye(8)[3], "zero-variance component")


def test_pca_matches_torch_pca_lowrank():
    x = pca_data(1)
    torch.manual_seed(0)
    u, s, v = torch.pca_lowrank(torch.from_numpy(x), q=8, center=True, niter=6)
    pca = part1.pca_svd(x)
    # pca_lowrank is randomized: with q = all 8 columns its subspace is exact, but the result goes
    # through a QR of a random projection and a second SVD, so 1e-9 is rounding on numbers up to
    # ~20.
    variance = (s**2 / (len(x) - 1)).numpy()
    assert_close(pca.explained_variance[:7], variance[:7], "explained variance", rtol=1e-9)
    same_up_to_sign(pca.components[:7], v.T.numpy()[:7], "components")


def test_eigh_and_svd_routes_agree_on_real_digits():
    """sklearn's digits: real images whose corner pixels are always 0 (exact zeros, three tied
    zero variances). Past the zeros the directions are arbitrary, so compare those with variance."""
    x = load_digits().data / 16
    by_eig, by_svd = part1.pca_eig(x), part1.pca_svd(x)
    # eigh works on C = Xc^T Xc / (n-1): its eigenvalues carry absolute errors of about
    # eps * lambda_max (~1e-16 * 0.2 * 64), not the relative ones of the SVD route.
    assert_close(by_eig.explained_variance, by_svd.explained_variance, "variances", atol=1e-13)
    # Components move by eps * lambda_max / gap: compare the first 10, whose gaps are >= 5e-3.
    gaps = -np.diff(by_svd.explained_variance[:11])
    assert gaps.min() > 5e-3
    assert_close(by_eig.components[:10], by_svd.components[:10], "components (signs fixed alike)")


def test_reconstruction_from_all_components_is_exact_and_the_error_is_the_variance_left_out():
    x = pca_data(2)
    n, d = x.shape
    pca = part1.pca_svd(x)
    assert_close(pca.components @ pca.components.T, np.eye(d), "orthonormal components")
    assert_close(pca.reconstruct(x, d), x, "all components")
    for k in (1, 3, 5):
        mse = np.mean((x - pca.reconstruct(x, k)) ** 2)
        left_out = pca.explained_variance[k:].sum() * (n - 1) / (n * d)
        assert_close(mse, left_out, f"MSE from {k} components")
    z = pca.transform(x, 3)
    assert_close(z.var(axis=0, ddof=1), pca.explained_variance[:3], "variance of each coordinate")
    assert part1.components_for(pca.explained_variance_ratio, 1.0) <= 7
    assert part1.components_for(np.array([0.5, 0.3, 0.2]), 0.8) == 2


# ---------------------------------------------------------------------------------------------
# k-means and k-means++
# ---------------------------------------------------------------------------------------------
def blobs(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, size=(4, 5))
    labels = np.arange(n) % 4
    return centres[labels] + rng.normal(size=(n, 5)), labels


def test_kmeans_matches_sklearn_lloyd_from_the_same_start():
    x, _ = blobs()
    x = np.round(x, 1)  # ties: many equal coordinates
    # rows 0..2 hit three blobs, row 7 the fourth's: sklearn's rule on ties is ours
    start = x[[0, 1, 2, 7]]
    mine = part1.kmeans(x, start, max_iter=100)
    ref = KMeans(4, init=start, n_init=1, max_iter=100, tol=0, algorithm="lloyd").fit(x)
    assert mine.converged
    np.testing.assert_array_equal(mine.labels, ref.labels_)
    assert_close(mine.centres, ref.cluster_centers_, "centres")
    # sklearn sums the squared distances in another order: rounding on a sum of 300 terms
    assert_close(mine.inertia[-1], ref.inertia_, "inertia", rtol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_inertia_never_increases_and_ends_at_a_fixed_point(seed):
    x = load_digits().data[:400] / 16
    rng = np.random.default_rng(seed)
    result = part1.kmeans(x, x[rng.choice(len(x), 8, replace=False)], max_iter=300)
    steps = np.diff(result.inertia)
    assert result.converged and np.all(steps <= 1e-9 * result.inertia[0]), steps.max()
    assert result.inertia[-1] < result.inertia[0]
    d2 = part1.squared_distances(x, result.centres)
    np.testing.assert_array_equal(d2.argmin(axis=1), result.labels)  # each at its nearest centre
    for j in range(8):  # each centre at the mean of its points
        assert_close(result.centres[j], x[result.labels == j].mean(axis=0), f"centre {j}",
                     atol=1e-12)
    assert_close(result.inertia[-1], d2.min(axis=1).sum(), "final inertia")


def test_an_empty_cluster_keeps_its_centre_and_breaks_nothing():
    x, _ = blobs(1, 60)
    start = np.vstack([x[:3], np.full((1, 5), 1e3)])  # nothing is nearest to the far centre
    result = part1.kmeans(x, start)
    assert np.all(np.isfinite(result.centres))
    assert np.array_equal(result.centres[3], np.full(5, 1e3))
    assert all(b <= a for a, b in zip(result.inertia, result.inertia[1:]))


def test_squared_distances_match_torch_cdist():
    x, _ = blobs(2, 30)
    x[0] = 0.0
    centres = np.vstack([x[:3], np.zeros((1, 5))])  # distance 0 for rows 0, 1, 2: no negatives
    expected = torch.cdist(torch.from_numpy(x), torch.from_numpy(centres)).numpy() ** 2
    # ||x||^2 - 2 x.c + ||c||^2 cancels: absolute error ~ eps * ||x||^2 (~1e-16 * 100), not relative
    assert_close(part1.squared_distances(x, centres), expected, "squared distances", atol=1e-11)
    assert part1.squared_distances(x, centres).min() == 0.0


def test_kmeans_plus_plus_draws_by_squared_distance():
    """Points 0, 1, 3 on a line. First pick uniform; then P(next = i) = D_i^2 / sum D^2:
    after 0: 1/10 and 9/10; after 1: 1/5, 4/5; after 3: 9/13, 4/13."""
    x = np.array([[0.0], [1.0], [3.0]])
    rng = np.random.default_rng(0)
    draws = 6000
    pairs = Counter(tuple(part1.kmeans_plus_plus(x, 2, rng)) for _ in range(draws))
    expected = {(0, 1): 1 / 10, (0, 2): 9 / 10, (1, 0): 1 / 5, (1, 2): 4 / 5, (2, 0): 9 / 13,
                (2, 1): 4 / 13}
    assert set(pairs) == set(expected), "a centre was picked twice"
    for pair, p in expected.items():
        share = p / 3
        sigma = math.sqrt(share * (1 - share) / draws)
        assert abs(pairs[pair] / draws - share) < 5 * sigma, (pair, pairs[pair] / draws, share)


def pick_triples(x: np.ndarray, third_power: int = 2) -> dict[tuple[int, int, int], float]:
    """P(the first three k-means++ picks are i, j, m), by hand: i uniform; j with probability
    D^2 / sum D^2, D the distance to i; m with probability D^p / sum D^p, D the distance to the
    nearer of i and j (p = 2: the rule; p = 1: the bug of drawing by distance)."""
    out = {}
    for i, j, m in itertools.permutations(range(len(x)), 3):
        d_i = np.linalg.norm(x - x[i], axis=1)
        d_ij = np.minimum(d_i, np.linalg.norm(x - x[j], axis=1)) ** third_power
        out[(i, j, m)] = (d_i[j] ** 2 / np.sum(d_i**2)) * (d_ij[m] / d_ij.sum()) / len(x)
    return out


def test_kmeans_plus_plus_draws_the_third_centre_by_squared_distance_too():
    """Points 0, 1, 3, 7 on a line, k = 3: every ordered triple's share of 6000 draws against the
    D^2 rule computed by hand. E.g. after 0 and 7 the third is 1 or 3 with probabilities 1/10 and
    9/10 (D^2 = 1 and 9), where drawing it by distance would give 1/4 and 3/4."""
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    expected, draws = pick_triples(x), 6000
    sigma = {t: math.sqrt(p * (1 - p) / draws) for t, p in expected.items()}
    by_distance = pick_triples(x, third_power=1)  # the test can tell: a share moves > 10 sigma
    assert max(abs(by_distance[t] - p) / sigma[t] for t, p in expected.items()) > 10
    rng = np.random.default_rng(0)
    triples = Counter(tuple(part1.kmeans_plus_plus(x, 3, rng).tolist()) for _ in range(draws))
    assert set(triples) <= set(expected), "a centre was picked twice"
    for triple, p in expected.items():
        share = triples[triple] / draws
        assert abs(share - p) < 5 * sigma[triple], (triple, share, p)


def test_kmeans_plus_plus_never_picks_a_copy_of_a_chosen_point():
    x = np.array([[0.0, 0.0]] * 6 + [[5.0, 5.0], [5.0, 5.0], [9.0, 0.0]])
    rng = np.random.default_rng(1)
    for _ in range(200):
        chosen = x[part1.kmeans_plus_plus(x, 3, rng)]
        assert len({tuple(c) for c in chosen}) == 3
    picks = part1.kmeans_plus_plus(np.zeros((4, 2)), 3, rng)  # all the same: any distinct rows
    assert len(set(picks.tolist())) == 3
    with pytest.raises(ValueError, match="at least k=5"):
        part1.kmeans_plus_plus(x[:3], 5, rng)


def test_best_of_restarts_finds_well_separated_blobs():
    x, labels = blobs(3)
    result = part1.best_of_restarts(x, 4, restarts=3, max_iter=100, seed=0)
    assert part1.matched_accuracy(labels, result.labels) > 0.95


# ---------------------------------------------------------------------------------------------
# Scoring clusters against labels
# ---------------------------------------------------------------------------------------------
def test_matching_accuracy_on_a_known_labelling():
    true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    # cluster 1 = label 0, cluster 0 = 1, cluster 2 = 2: one wrong
    pred = np.array([1, 1, 2, 0, 0, 0, 2, 2, 2])
    assert part1.match_clusters(true, pred) == {0: 1, 1: 0, 2: 2}
    assert part1.matched_accuracy(true, pred) == pytest.approx(8 / 9)
    renamed = np.array([7, 3, 5])[true]  # the same partition under other cluster names
    assert part1.matched_accuracy(true, renamed) == 1.0
    assert part1.nmi(true, renamed) == pytest.approx(1.0)
    # More clusters than labels: one-to-one matching leaves the extra cluster wrong.
    extra_cluster = np.array([0, 0, 3, 1, 1, 1, 2, 2, 2])
    assert part1.matched_accuracy(true, extra_cluster) == pytest.approx(8 / 9)
    assert part1.nmi(true, np.zeros(9, dtype=int)) == 0.0  # one cluster tells nothing


@pytest.mark.parametrize("seed", range(3))
def test_nmi_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.6, true, rng.integers(0, 7, 500))  # partly informative
    assert_close(part1.nmi(true, pred), normalized_mutual_info_score(true, pred), "NMI")
    assert_close(part1.nmi(true, true), 1.0, "NMI of a labelling with itself")


# ---------------------------------------------------------------------------------------------
# Autoencoders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_autoencoder_shapes(arch):
    cfg = part2.Settings(arch=arch, bottleneck=5, hidden=(32, 16), channels=(4, 8))
    model = part2.make_model(cfg)
    x = torch.rand(3, 1, 28, 28)
    assert model.encode(x).shape == (3, 5)
    assert model(x).shape == (3, 1, 28, 28)
    assert model.reconstruct(x).min() >= 0 and model.reconstruct(x).max() <= 1


def test_reconstruction_losses_compare_with_the_pixels_in_0_1():
    logits = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    target = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    target[0] = 0
    target[1] = 255
    unit = target.double() / 255
    mse = part2.ReconstructionLoss("mse")(logits, target)
    bce = part2.ReconstructionLoss("bce")(logits, target)
    assert_close(mse.item(), F.mse_loss(torch.sigmoid(logits.float()), unit.float()).item(), "MSE")
    # float32 inside the loss (it runs under autocast on GPUs): compare at float32 precision
    expected = F.binary_cross_entropy(torch.sigmoid(logits), unit).item()
    assert_close(bce.item(), expected, "BCE", rtol=1e-6)


def test_conv_autoencoder_with_bce_learns_the_twin(offline, tmp_path):
    cfg = part2.Settings(smoke=True, arch="conv", loss="bce", bottleneck=8, channels=(4, 8),
                         epochs=3, batch_size=32, lr=1e-2, out=str(tmp_path))
    data = part2.load_images(cfg)
    train, val, test = part2.make_loaders(cfg, data, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    untrained = part2.make_model(cfg)  # the weights train_autoencoder starts from (same seed)
    run = Run.start(cfg, part2.__file__, torch.device("cpu"), quiet=True)
    model = part2.train_autoencoder(cfg, train, val, torch.device("cpu"), run, checkpoints=False)
    rows = run.rows
    assert [r["epoch"] for r in rows] == [1, 2, 3] and not list(run.dir.glob("*.pt"))
    assert rows[-1]["val_loss"] < 0.9 * rows[0]["val_loss"], [r["val_loss"] for r in rows]
    assert part2.reconstruction_mse(model, test) < 0.5 * part2.reconstruction_mse(untrained, test)


def test_the_pca_baseline_uses_the_same_pixels_and_test_images():
    g = torch.Generator().manual_seed(0)
    x_train = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=g)
    x_test = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8, generator=g)
    mse, rebuilt, mean_mse = part2.pca_at(x_train, x_test, 49)
    test = x_test.reshape(7, -1).double().numpy() / 255
    assert rebuilt.shape == (7, 784) and mse == pytest.approx(np.mean((test - rebuilt) ** 2))
    mean_image = x_train.reshape(50, -1).double().numpy().mean(0) / 255
    assert mean_mse == pytest.approx(np.mean((test - mean_image) ** 2))
    assert mse < mean_mse


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of 4 clearly separated classes: class k lights up quadrant k (at a random
    brightness), over noise. Any sound clustering of them matches the labels exactly."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 4)[torch.randperm(n, generator=g)]
    x = torch.rand(n, 1, 28, 28, generator=g) * 40
    lit = torch.zeros(4, 28, 28)
    for k, (r, c) in enumerate([(0, 0), (0, 14), (14, 0), (14, 14)]):
        lit[k, r:r + 14, c:c + 14] = 1
    x += lit[y].unsqueeze(1) * (150 + 60 * torch.rand(n, 1, 1, 1, generator=g))
    return x.round().to(torch.uint8), y


def test_latent_kmeans_recovers_clearly_separated_classes_in_every_view(tmp_path, monkeypatch):
    # The twin cannot judge the clustering (a random labelling of its 102 test images scores
    # like k-means): here the classes are plain, so each view must match the labels, and a
    # script that scored against other images' labels or encoded other images would not.
    x_train, y_train = quadrant_images(320, 0)
    x_test, y_test = quadrant_images(100, 1)
    data = ImageData(x_train, y_train, x_test, y_test, ["a", "b", "c", "d"], (0.3,), (0.3,),
                     "quadrants")
    monkeypatch.setattr(part2, "load_images", lambda cfg: data)
    summary = lab(tmp_path, "--smoke", "--clusters", "4", "--bottleneck", "4", "--epochs", "4",
                  "--cluster-points", "60", module=latent_kmeans)
    assert summary["clustered"] == 60, summary
    for view in ("pixels", "pca", "latent"):  # measured: 1.0 and 1.0 for all three
        assert summary[f"acc_{view}"] > 0.95 and summary[f"nmi_{view}"] > 0.9, (view, summary)


# ---------------------------------------------------------------------------------------------
# The lab: settings, bad input, resume
# ---------------------------------------------------------------------------------------------
def lab(tmp_path: Path, *argv: str, module=part2) -> dict:
    argv = ["--out", str(tmp_path / "runs"), "--device", "cpu", *argv]
    return run_lab(module.main, module.Config, argv)


@pytest.mark.parametrize("module, argv, message", [
    (part2, ["--bottleneck", "0"], "--bottleneck: must be in [1, 784]"),
    (part2, ["--arch", "conv", "--channels", "8"], "--channels takes two numbers"),
    (part2, ["--lr", "0"], "--lr: must be in (0, 1000000]"),
    (part2, ["--loss", "l1"], "invalid choice: 'l1'"),
    (bottleneck_sweep, ["--bottlenecks"], "--bottlenecks needs at least one size"),
    (latent_kmeans, ["--clusters", "50", "--cluster-points", "20"],
     "--clusters 50 is more than --cluster-points 20"),
])
def test_impossible_settings_fail_in_parsing_with_one_line(tmp_path, module, argv, message, capsys):
    assert lab(tmp_path, *argv, module=module) == {"exit": 2}
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module", [part2, bottleneck_sweep, latent_kmeans],
                         ids=["part2", "bottleneck_sweep", "latent_kmeans"])
def test_a_batch_larger_than_the_training_set_is_a_setting_error_before_the_run_folder(
        tmp_path, offline, capsys, module):
    # 461 = the twin's 512 training images less the 10% held out for validation
    assert lab(tmp_path, "--smoke", "--batch-size", "462", module=module) == {"exit": 2}
    err = capsys.readouterr().err
    assert "--batch-size 462 is more than the 461 training images" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_batch_of_all_the_training_images_is_one_step_per_epoch():
    cfg = part2.Config(smoke=True, batch_size=461, device="cpu")
    train, _, _ = part2.make_loaders(cfg, part2.load_images(cfg), torch.device("cpu"))
    assert len(train) == 1 and len(train.x) == 461


def test_missing_mnist_offline_is_one_line_and_leaves_nothing(tmp_path, offline, capsys):
    assert lab(tmp_path, "--data-dir", str(tmp_path / "nowhere")) == {"exit": 1}
    err = capsys.readouterr().err
    assert "mnist: --data-dir" in err and "--smoke" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
    cfg = ["--out", str(tmp_path / "runs"), "--samples", "5", "--clusters", "10",
           "--dataset", "digits"]
    assert run_lab(part1.main, part1.Config, cfg) == {"exit": 2}
    assert "--clusters 10 is more than the 5 training images" in capsys.readouterr().err


def test_ctrl_c_then_resume_ends_with_the_uninterrupted_weights(tmp_path, offline, monkeypatch,
                                                                capsys, ctrl_c):
    # 14 steps per epoch, the one-cycle schedule stepped per batch
    args = ["--smoke", "--epochs", "2", "--latent-points", "30"]
    straight = lab(tmp_path / "straight", *args)
    ctrl_c(20)  # in epoch 2
    assert lab(tmp_path / "cut", *args) == {"exit": 130}
    (checkpoint,) = (tmp_path / "cut" / "runs").glob("week08/part2/*/checkpoint.pt")
    assert "the checkpoint of epoch 1" in capsys.readouterr().err
    steps = ctrl_c(0)
    # PCA must be fitted on the training split only, and scored on the test images
    seen, pca_at = [], part2.pca_at
    monkeypatch.setattr(part2, "pca_at", lambda *args: seen.append(args) or pca_at(*args))
    resumed = lab(tmp_path / "cut", "--resume", str(checkpoint))
    assert steps.steps == 14, "the resumed run trains epoch 2 only"
    rows = list(csv.DictReader((checkpoint.parent / "metrics.csv").open()))  # the run itself
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["val_loss"]) < float(rows[0]["val_loss"])
    cfg = part2.Config(smoke=True)
    data = part2.load_images(cfg)
    train, val, _ = part2.make_loaders(cfg, data, torch.device("cpu"))
    (x_train, x_test, k), = seen
    assert torch.equal(x_train, train.x) and torch.equal(x_test, data.x_test) and k == 8
    assert len(x_train) + len(val.x) == len(data.x_train)
    monkeypatch.undo()
    weights = read_checkpoint(checkpoint)["model"]
    uninterrupted = read_checkpoint(Path(straight["run_dir"]) / "checkpoint.pt")["model"]
    for name, value in uninterrupted.items():
        assert torch.equal(value, weights[name]), name
    assert resumed["test_mse"] == straight["test_mse"]
    assert resumed["run_dir"] == str(checkpoint.parent)
    capsys.readouterr()
    again = lab(tmp_path / "cut", "--resume", str(checkpoint))
    assert again["test_mse"] == straight["test_mse"] and "nothing to do" in capsys.readouterr().out


def test_ctrl_c_in_a_sweep_says_what_was_kept_and_offers_no_resume(tmp_path, offline, capsys,
                                                                   ctrl_c):
    """Outside review: the sweep said "continue with --resume X" but has no --resume."""
    ctrl_c(20)  # 14 steps per model: in the first epoch of the second size
    argv = ["--smoke", "--epochs", "1", "--bottlenecks", "2", "4", "8"]
    assert lab(tmp_path, *argv, module=bottleneck_sweep) == {"exit": 130}
    err = capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").glob("week08/bottleneck_sweep/*")
    assert err == ("error: interrupted while training bottleneck 4; a sweep keeps no checkpoints "
                   "and has no --resume: the metrics of bottlenecks 2 (finished) are in "
                   f"{run_dir / 'metrics.csv'}. To finish, run the sizes left: "
                   "--bottlenecks 4 8\n"), err
    assert [r["bottleneck"] for r in csv.DictReader((run_dir / "metrics.csv").open())] == ["2"]
    assert not list(run_dir.glob("*.pt"))
    # SIGTERM: exit 143, and the epochs of the unfinished size count as kept
    from common.runner import Terminated

    view = type("R", (), {"dir": run_dir, "rows": [{"bottleneck": 4, "epoch": 1}]})()
    stopped = bottleneck_sweep.sweep_interrupted(Terminated(), 4, [4, 8], view)
    assert stopped.exit_code == 143
    assert str(stopped).startswith("terminated while training bottleneck 4")
    assert "the metrics of 1 epoch(s) of bottleneck 4 are in" in str(stopped)
    # latent_kmeans has no --resume either: it keeps no checkpoint and offers none
    ctrl_c(20)  # in epoch 2: a checkpoint of epoch 1 would exist if it kept one
    assert lab(tmp_path / "k", "--smoke", "--epochs", "2", module=latent_kmeans) == {"exit": 130}
    err = capsys.readouterr().err
    assert err.startswith("interrupted: stopped") and "continue with --resume" not in err, err
    assert not list((tmp_path / "k" / "runs").glob("week08/latent_kmeans/*/*.pt"))


def test_resume_refuses_a_foreign_or_damaged_checkpoint(tmp_path, offline, capsys):
    foreign = save_checkpoint(tmp_path / "foreign" / "checkpoint.pt", nn.Linear(2, 2),
                              script="week03/part2")
    assert lab(tmp_path, "--smoke", "--resume", str(foreign)) == {"exit": 2}
    assert "written by week03/part2, not week08/part2" in capsys.readouterr().err
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    assert lab(tmp_path, "--smoke", "--resume", str(damaged)) == {"exit": 2}
    err = capsys.readouterr().err
    assert "corrupt or not a PyTorch file" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("dims", [1, 3])
def test_latent_maps_draw_any_code_size(tmp_path, dims):
    """--bottleneck 1 once crashed in t-SNE's PCA start (it needs 2 directions)."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    codes = labels[:, None] * 3.0 + rng.normal(size=(40, dims))
    maps = part2.latent_maps(codes, labels, 0, tmp_path / "latent.png", "codes")
    assert (tmp_path / "latent.png").exists()
    assert all(points.shape == (40, 2) and np.all(np.isfinite(points)) for points in maps.values())
