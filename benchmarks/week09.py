"""Week 9 benchmark: the DCGAN of week09_gan/part2.py on real MNIST, scored without downloads.

    python benchmarks/run.py mnist_dcgan --data-dir DATA [--set epochs=3] [--set out=DIR]
        [--set threads=1]

A fixed compute budget, not a clock: ``epochs`` (default 3) whole passes over the 50,000
training images (390 steps each at batch 128), so the result repeats exactly on a CPU however
loaded the machine is; the wall time it took is reported with it. The scoring classifier (the
Week 3 CNN, one epoch) is trained first if it is not cached yet; its time is not part of the
GAN's (``classifier_s``).

Reported: the Frechet distance between classifier features of 5,000 generated and 5,000
held-out real images (``value``), the same distance between two disjoint halves of the
held-out real images (``fd_real``, the floor a perfect generator would reach at this sample
size), and the share of 10,000 generated images the classifier gives each digit, with the goal
"every digit between 7% and 13%" checked (``coverage_goal_met``).

Options (``--set key=value``): any week09_gan.part2 Config field (``lr``, ``label_smoothing``,
``g_width`` ...); ``threads=N`` (default 1: on a CPU shared with other busy processes one
thread was several times faster per step than two); ``out=DIR`` keeps the
run folder with its sample grids and plots.
"""

from __future__ import annotations

import tempfile
import time

from benchmarks.run import Benchmark, config_options
from common.data import load
from common.device import pick_device
from week09_gan import part2
from week09_gan.quality import get_scorer


def mnist_dcgan(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, part2.Config, default_threads=1)
    settings = {"dataset": "mnist", "epochs": 3, **fields}
    t0 = time.perf_counter()
    # The scoring classifier: trained once, then cached.
    get_scorer("mnist", load("mnist", data_dir), smoke=False, device=pick_device(device))
    classifier_s = time.perf_counter() - t0
    # --set out=DIR keeps the run folder (grids, plots); else a temporary one.
    keep = settings.pop("out", "")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = part2.Config(**settings, data_dir=data_dir, device=device, out=keep or tmp)
        summary = part2.main(cfg)
    shares = summary["class_shares"]
    return {"metric": "fd", "value": summary["fd"], "fd_real": summary["fd_real"],
            "fd_ratio": summary["fd_ratio"], "fd_untrained": summary["fd_start"],
            "fd_samples": summary["fd_samples"],
            "class_shares": dict(zip(summary["classes"], shares)), "min_class_share": min(shares),
            "max_class_share": max(shares),
            "coverage_goal_met": all(0.07 <= s <= 0.13 for s in shares),
            "gan_train_s": summary["train_time_s"], "gan_wall_s": summary["wall_time_s"],
            "classifier_s": round(classifier_s, 1),
            "classifier_val_acc": summary["classifier_val_acc"],
            "steps": summary["steps"], "config": settings}


ENTRIES = {
    "mnist_dcgan": Benchmark(
        mnist_dcgan, "Week 9 DCGAN on MNIST, 3 epochs: classifier-feature Frechet distance (lower "
                     "is better) vs real-vs-real, class coverage of 10,000 samples",
        higher_is_better=False),
}
