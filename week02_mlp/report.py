"""Pictures of Week 2's test results: the confusion matrix and the most confident mistakes."""

from __future__ import annotations

import torch

from common.data import ImageData
from common.plots import confusion_matrix, plot_confusion, plot_images
from common.runs import Run


def worst_mistakes(probs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` wrong predictions the model was most confident about."""
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != targets).nonzero().flatten()
    return wrong[confidence[wrong].argsort(descending=True)[:k]]


def report_mistakes(logits: torch.Tensor, targets: torch.Tensor, data, classes: list[str],
                    run: Run, acc: float) -> None:
    """confusion.png, and for images worst_mistakes.png: the most confident wrong answers.
    ``logits`` (N, classes) and ``targets`` (N,) are the test set's, in ``data.x_test`` order."""
    logits, targets = logits.cpu(), targets.cpu()
    predicted, probs = logits.argmax(dim=1), logits.softmax(dim=1)
    matrix = confusion_matrix(targets.numpy(), predicted.numpy(), len(classes))
    plot_confusion(matrix, classes, run.path("confusion.png"),
                   title=f"test accuracy {acc:.2%} ({len(targets)})")
    worst = worst_mistakes(probs, targets, k=24)
    if isinstance(data, ImageData) and len(worst):
        titles = [f"{classes[targets[i]]}->{classes[predicted[i]]} {probs[i].max():.2f}"
                  for i in worst]
        plot_images(data.x_test[worst].numpy(), run.path("worst_mistakes.png"), titles=titles,
                    ncols=8, title="most confident mistakes (true->predicted, confidence)")
