"""Week 8 benchmarks on real MNIST: PCA and k-means on pixels, autoencoders against PCA at
equal dimension, and k-means on an autoencoder's codes.

    python benchmarks/run.py mnist_pca_kmeans --data-dir DATA
    python benchmarks/run.py mnist_ae_vs_pca --data-dir DATA [--set epochs=10 --set arch=conv]
    python benchmarks/run.py mnist_latent_kmeans --data-dir DATA [--set bottleneck=10]

``mnist_pca_kmeans`` runs Part 1's NumPy code on all 60,000 training images: the variance the
first 50 components explain, and k-means (k = 10, k-means++, best of 3 starts) scored against
the labels (accuracy after Hungarian matching, NMI); the literature puts k-means on raw MNIST
pixels at about 53% accuracy. ``mnist_ae_vs_pca`` is ``bottleneck_sweep.py`` for codes of 8, 32
and 64 numbers: the autoencoder's test MSE per pixel (pixels in [0, 1], the 10,000 test images)
must be below PCA's with as many components, at every size. ``mnist_latent_kmeans`` is
``latent_kmeans.py``: k-means on the 10,000 test images' pixels, PCA codes and autoencoder
codes. ``--set key=value`` overrides a Config field of the script behind the entry;
``threads=N`` sets torch's CPU threads.
"""

from __future__ import annotations

from benchmarks.run import Benchmark, config_options
from week08_autoencoder import bottleneck_sweep, latent_kmeans, part1

# The settings measured in week08_autoencoder/README.md.
AE_SWEEP = dict(arch="fc", loss="mse", hidden=(512, 256), epochs=8, batch_size=128, lr=2e-3,
                bottlenecks=(8, 32, 64))
LATENT = dict(arch="fc", loss="mse", hidden=(512, 256), epochs=8, batch_size=128, lr=2e-3,
              bottleneck=10)


def pca_kmeans(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, part1.Config)
    cfg = part1.Config(**{"samples": 0, **fields}, data_dir=data_dir)
    x_train, y_train, x_test, y_test, _, name = part1.load_pixels(cfg)
    pca = part1.pca_svd(x_train)
    explained = float(pca.explained_variance_ratio[:50].sum())
    result = part1.best_of_restarts(x_train, cfg.clusters, cfg.restarts, cfg.max_iter, cfg.seed)
    mapping = part1.match_clusters(y_train, result.labels)
    test_labels = part1.squared_distances(x_test, result.centres).argmin(axis=1)
    return {"metric": "variance_explained_50", "value": explained,
            "kmeans_train_acc": part1.matched_accuracy(y_train, result.labels, mapping),
            "kmeans_train_nmi": part1.nmi(y_train, result.labels),
            "kmeans_test_acc": part1.matched_accuracy(y_test, test_labels, mapping),
            "kmeans_test_nmi": part1.nmi(y_test, test_labels),
            "kmeans_iterations": result.iterations,
            "components_for_90pct": part1.components_for(pca.explained_variance_ratio, 0.9),
            "images": len(x_train), "dataset": name,
            "config": {"samples": cfg.samples, "clusters": cfg.clusters,
                       "restarts": cfg.restarts, "seed": cfg.seed}}


def _run_script(module, settings: dict, data_dir: str, device: str) -> dict:
    """The script's main() with these settings; its run folder (figures) goes to runs/ as usual."""
    cfg = module.Config(**settings, data_dir=data_dir, device=device)
    return module.main(cfg)


def ae_vs_pca(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, bottleneck_sweep.Config)
    settings = {**AE_SWEEP, **fields}
    summary = _run_script(bottleneck_sweep, settings, data_dir, device)
    sizes = summary["bottlenecks"]
    ratios = {d: summary[f"test_mse_d{d}"] / summary[f"pca_test_mse_d{d}"] for d in sizes}
    return {"metric": "worst_ae_over_pca_mse", "value": max(ratios.values()),
            "ae_below_pca_at_every_size": all(r < 1 for r in ratios.values()),
            **{f"ae_test_mse_d{d}": summary[f"test_mse_d{d}"] for d in sizes},
            **{f"pca_test_mse_d{d}": summary[f"pca_test_mse_d{d}"] for d in sizes},
            **{f"ae_over_pca_d{d}": ratios[d] for d in sizes},
            "mean_image_mse": summary["mean_image_mse"], "script_wall_s": summary["wall_time_s"],
            "run_dir": summary["run_dir"],
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}


def latent_clusters(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, latent_kmeans.Config)
    settings = {**LATENT, **fields}
    summary = _run_script(latent_kmeans, settings, data_dir, device)
    keys = [f"{m}_{v}" for v in ("pixels", "pca", "latent") for m in ("acc", "nmi")]
    return {"metric": "acc_latent", "value": summary["acc_latent"], **{k: summary[k] for k in keys},
            "clustered": summary["clustered"], "script_wall_s": summary["wall_time_s"],
            "run_dir": summary["run_dir"],
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}


ENTRIES = {
    "mnist_pca_kmeans": Benchmark(
        pca_kmeans, "Week 8 Part 1 on all 60k MNIST training images: variance explained by 50 PCA "
                    "components; k-means on pixels, accuracy after matching, NMI"),
    "mnist_ae_vs_pca": Benchmark(
        ae_vs_pca, "Week 8 autoencoder vs PCA at 8, 32, 64 dims: worst test-MSE ratio AE/PCA "
                   "(goal: < 1 at every size)", higher_is_better=False),
    "mnist_latent_kmeans": Benchmark(
        latent_clusters, "Week 8 k-means on autoencoder codes vs PCA codes vs pixels (10k MNIST "
                         "test images): accuracy after matching on the codes"),
}
