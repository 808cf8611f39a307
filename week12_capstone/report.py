"""Week 12: the evaluation report and the model card: accuracy with its uncertainty, per class,
the confusion matrix, the most confident mistakes, and what the model is (not) for.

``wilson_interval`` is the success metric's interval (Part 1 plans with it, Part 2 reports it);
the tests check it against scipy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.data import ImageData
from common.plots import confusion_matrix, plot_confusion, plot_images
from common.train import predict
from week04_regularization.best_cnn import tta_logits

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = Z_95) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval for a proportion: k successes in n trials (elementwise).

        p = k / n,   centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half-width  = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    It inverts the normal test of p rather than putting a normal around p (the "Wald" interval
    p +- z sqrt(p(1-p)/n)), so it stays inside [0, 1] and does not shrink to a point at p = 0
    or 1. 10,000 test images at 80% accuracy: +-0.8 points. n = 0 gives the whole [0, 1].
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe_n = np.maximum(n, 1)
    p = k / safe_n
    denominator = 1 + z**2 / safe_n
    centre = (p + z**2 / (2 * safe_n)) / denominator
    half = z / denominator * np.sqrt(p * (1 - p) / safe_n + z**2 / (4 * safe_n**2))
    return np.where(n > 0, centre - half, 0.0), np.where(n > 0, centre + half, 1.0)


class FlipAverage(nn.Module):
    """Week 4's flip test-time augmentation as a model: the mean of the logits of each image and
    of its mirror image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, x)


def evaluate_test(model: nn.Module, test, data: ImageData, path: Callable[[str], Path],
                  worst: int, tta: bool = False) -> dict:
    """The test set, once: accuracy with its 95% Wilson interval, per-class accuracy with
    intervals, the confusion matrix, and the most confident mistakes as images (``path(name)``
    says where each plot goes). All of it is for the model as served, one view per image;
    ``tta`` adds the accuracy with flip TTA (``test_acc_tta``), for comparison with Week 4."""
    logits, targets = predict(model, test)  # (N, classes), (N,)
    probs = logits.softmax(dim=1)
    predicted = probs.argmax(dim=1)
    correct = predicted == targets
    n, k = len(targets), int(correct.sum())
    low, high = wilson_interval(np.array(k), np.array(n))
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), data.num_classes)
    plot_confusion(matrix, data.classes, path("confusion.png"), title=f"test accuracy {k / n:.2%}")
    class_n = matrix.sum(axis=1)
    class_low, class_high = wilson_interval(matrix.diagonal(), class_n)
    per_class = [{"class": c, "n": int(class_n[i]), "acc": float(matrix[i, i] / max(class_n[i], 1)),
                  "low": float(class_low[i]), "high": float(class_high[i])}
                 for i, c in enumerate(data.classes)]
    # Worst errors: wrong answers given with the highest confidence, the ones to look at first.
    confidence = probs.gather(1, predicted.unsqueeze(1)).squeeze(1)  # (N,)
    wrong = torch.nonzero(~correct).squeeze(1)
    shown = wrong[confidence[wrong].argsort(descending=True)][:worst]
    if len(shown):
        titles = [f"{data.classes[int(targets[i])]}->{data.classes[int(predicted[i])]} "
                  f"{confidence[i]:.0%}" for i in shown.tolist()]
        plot_images(data.x_test[shown].numpy(), path("worst_errors.png"), titles=titles, ncols=8,
                    title="most confident mistakes (true->predicted, confidence)")
    figures = {"test_acc": k / n, "test_acc_low": float(low), "test_acc_high": float(high),
               "test_n": n, "per_class": per_class, "worst_shown": len(shown)}
    if tta:
        mirrored, _ = predict(FlipAverage(model), test)
        k_tta = int((mirrored.argmax(dim=1) == targets).sum())
        low, high = wilson_interval(np.array(k_tta), np.array(n))
        figures.update(test_acc_tta=k_tta / n, test_acc_tta_low=float(low),
                       test_acc_tta_high=float(high))
    return figures


def write_report(path: Path, cfg, data: ImageData, training: dict, test: dict) -> None:
    """report.md: the figures a reviewer asks for first, with the plots beside them.
    ``training``: params, epochs_done, stopped_early, kept_epoch, val_acc, train_time_s."""
    t = training
    lines = [f"# Evaluation report: {cfg.model} on {data.name}", "",
             f"Test accuracy **{test['test_acc']:.2%}** (95% Wilson interval "
             f"{test['test_acc_low']:.2%} to {test['test_acc_high']:.2%}, n = {test['test_n']}); "
             "the test set was evaluated once, after training, on the weights that validation "
             "chose." + (f" With flip test-time augmentation (each image and its mirror, as Week 4 "
                         f"does): {test['test_acc_tta']:.2%} ({test['test_acc_tta_low']:.2%} to "
                         f"{test['test_acc_tta_high']:.2%}); the served model answers one view."
                         if "test_acc_tta" in test else ""), "",
             "| | |", "|---|---|",
             f"| model | {cfg.model}, {t['params']:,} parameters |",
             f"| epochs trained | {t['epochs_done']} of {cfg.epochs}"
             f"{' (stopped early)' if t['stopped_early'] else ''} |",
             f"| kept epoch (lowest validation loss) | {t['kept_epoch']} |",
             f"| validation accuracy of the kept epoch | {t['val_acc']:.2%} |",
             f"| training time | {t['train_time_s']:.1f} s |", "",
             "## Per class", "", "| class | n | accuracy | 95% interval |", "|---|---:|---:|---|"]
    lines += [f"| {c['class']} | {c['n']} | {c['acc']:.1%} | {c['low']:.1%} to {c['high']:.1%} |"
              for c in test["per_class"]]
    lines += ["", "## Learning curves", "", "![learning curves](curves.png)", "",
              "## Confusion matrix (rows: true class)", "", "![confusion matrix](confusion.png)",
              ""]
    if test["worst_shown"]:
        lines += ["## Most confident mistakes", "", "![worst errors](worst_errors.png)", ""]
    path.write_text("\n".join(lines))


def write_model_card(path: Path, cfg, data: ImageData, test: dict, params: int,
                     deployed: dict | None) -> None:
    """model_card.md (after Mitchell et al. 2019): what the model is, what it was trained and
    tested on, how well it does with what uncertainty, and where it should not be used."""
    weakest = min(test["per_class"], key=lambda c: c["acc"])
    source = ("synthetic shapes and textures (a smoke run, not a real model)" if data.synthetic
              else "photographs")
    kind = "Vision Transformer" if cfg.model == "vit" else "residual CNN (Week 4 SpeedNet)"
    lines = [f"# Model card: cifar10-{cfg.model}", "",
             "## Model",
             f"- {kind}, {params:,} parameters, trained by `week12_capstone/part2.py` "
             "(settings in config.yaml).",
             "- Input: RGB images 32x32, pixels scaled to [0, 1] (the exported graphs normalize "
             "by themselves).",
             f"- Output: probabilities over the 10 classes: {', '.join(data.classes)}.", "",
             "## Intended use",
             "- Teaching: an end-to-end example of training, evaluating, exporting and serving a "
             "classifier.",
             "- Not for decisions about people or property; not for images unlike CIFAR-10 (other "
             "sizes, domains).", "",
             "## Data",
             f"- Trained on {data.name}: {source}; {cfg.val_fraction:.0%} of the training images "
             "held out for validation (model selection).",
             f"- Tested once on {test['test_n']} held-out images.", "",
             "## Performance",
             f"- Test accuracy {test['test_acc']:.2%}, 95% Wilson interval "
             f"{test['test_acc_low']:.2%} to {test['test_acc_high']:.2%}.",
             f"- Weakest class: {weakest['class']} ({weakest['acc']:.1%}); per-class figures in "
             "report.md.", "",
             "## Limitations",
             *(["- The CIFAR-10 copy used here is JPEG-compressed (quality 75): compare only with "
                "runs on the same copy."] if "jpg" in data.source else []),
             "- 32x32 images: small objects and fine texture are lost; expect a drop on other "
             "photos.",
             "- Confident mistakes exist (worst_errors.png): the probabilities are not calibrated.",
             ""]
    if deployed:
        lines += ["## Deployment",
                  "- Bundle: `bundle/` (model.onnx, model.pt2, metadata.json), served by "
                  "`week10_deploy/service.py`.",
                  "- ONNX vs eager on 64 test images: largest probability difference "
                  f"{deployed['onnx_max_prob_diff']:.1e}.",
                  "- Served answer vs eager: largest probability difference "
                  f"{deployed['served_max_prob_diff']:.1e}, same classes: "
                  f"{deployed['served_same_answer']}.", ""]
    path.write_text("\n".join(lines))
