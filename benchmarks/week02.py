"""Week 2 benchmark: the Part 2 MLP on real MNIST, test accuracy and wall time.

    python benchmarks/run.py mnist_mlp --data-dir DATA [--repeat 3]
    python benchmarks/run.py mnist_mlp --data-dir DIR --set epochs=15 --set bf16=off

Target: >= 98.5% test accuracy in under 60 s of wall time on a 2-core CPU (a classic Keras
MLP reaches 98.40% in 20 epochs). ``--set key=value`` overrides any field of
week02_mlp.part2.Config; ``threads=N`` sets torch's CPU threads (0: torch's default).
"""

from __future__ import annotations

import tempfile

import torch

from benchmarks.run import Benchmark, config_options
from week02_mlp.part2 import Config, main

# The configuration measured in week02_mlp/README.md: two hidden layers of 1024, dropout 0.2,
# Adam with a OneCycle schedule, batches of 512, random shifts of up to 1 pixel, matmuls in
# bfloat16 on the CPU, and all 60k training images (no validation hold-out: the benchmark
# reports the test set once, and nothing is tuned on it by this entry).
MNIST_MLP = dict(dataset="mnist", hidden="1024,1024", dropout=0.2, optimizer="adam", lr=1e-3, schedule="onecycle",
                 epochs=12, batch_size=512, shift=1, label_smoothing=0.0, val_fraction=0.0, bf16="on")


def mnist_mlp(data_dir: str, device: str, options: dict) -> dict:
    options, _ = config_options(options, Config)
    settings = {**MNIST_MLP, **options}
    with tempfile.TemporaryDirectory() as out:
        summary = main(Config(**settings, data_dir=data_dir, device=device, out=out))
    return {"metric": "test_acc", "value": summary["test_acc"], "epochs": summary["epochs"],
            "train_time_s": summary["train_time_s"], "run_wall_s": summary["wall_time_s"],
            # On a shared machine the slowest epochs are other jobs' time: the fastest epoch times
            # the number of epochs is the best estimate of the training time on a quiet machine.
            "fastest_epoch_s": summary["fastest_epoch_s"],
            "quiet_train_estimate_s": round(summary["fastest_epoch_s"] * summary["epochs"], 1),
            "params": summary["params"], "torch_threads": torch.get_num_threads(), "config": settings}


ENTRIES = {
    "mnist_mlp": Benchmark(mnist_mlp, "Week 2 MLP on MNIST: test accuracy (target >= 0.985 in < 60 s on 2 CPU cores)"),
}
