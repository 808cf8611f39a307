"""Week 3 benchmarks: the Part 2 CNN on real MNIST and on the JPEG copy of CIFAR-10.

    python benchmarks/run.py mnist_cnn --data-dir DATA
    python benchmarks/run.py cifar10_cnn --data-dir DATA [--set budget_s=600]

``--set key=value`` overrides any field of week03_cnn.part2.Config (e.g. ``--set epochs=4``),
plus ``threads=N``: torch CPU threads, 1 by default. On a CPU shared with other busy
processes, one thread is several times faster than two (measured: MNIST 32 s with 1 thread,
126 s with 2, while other jobs kept the 2 cores busy): a multi-threaded op waits at a barrier
for its slowest thread, and that thread is often descheduled. On an idle machine try
``--set threads=0`` (torch's default: one per core).
"""

from __future__ import annotations

import tempfile

import torch

from benchmarks.run import Benchmark, config_options
from week03_cnn.part2 import Config, main

# The settings found by the measurements in week03_cnn/README.md.
MNIST = dict(dataset="mnist", epochs=2, batch_size=128, lr=8e-3, width=16, blocks=3, head_pool=3, batch_norm=True,
             dropout=0.0, augment=False, val_fraction=0.0, channels_last=True, bf16=True)
# epochs is only an upper bound here: the run stops at budget_s, and the learning rate
# anneals to 0 by the clock (part2.one_cycle).
CIFAR10 = dict(dataset="cifar10", epochs=100, batch_size=128, lr=4e-3, width=32, blocks=4, batch_norm=True,
               dropout=0.1, augment=True, val_fraction=0.0, channels_last=True, bf16=True, budget_s=600.0)


def _run_lab(defaults: dict, data_dir: str, device: str, options: dict) -> dict:
    options, _ = config_options(options, Config, default_threads=1)
    with tempfile.TemporaryDirectory() as out:
        summary = main(Config(**{**defaults, **options}, data_dir=data_dir, device=device, out=out))
    return {"metric": "test_acc", "value": summary["test_acc"], "epochs_done": summary["epochs_done"],
            "train_time_s": summary["train_time_s"], "run_wall_s": summary["wall_time_s"],
            "params": summary["params"], "torch_threads": torch.get_num_threads(),
            "config": {**defaults, **options}}


ENTRIES = {
    "mnist_cnn": Benchmark(lambda d, dev, o: _run_lab(MNIST, d, dev, o),
                           "Week 3 CNN on MNIST from scratch: test accuracy (target >= 0.99 in < 60 s on 2 CPU cores)"),
    "cifar10_cnn": Benchmark(lambda d, dev, o: _run_lab(CIFAR10, d, dev, o),
                             "Week 3 CNN on CIFAR-10 (JPEG copy): test accuracy in a time budget (budget_s, 600 s)"),
}
