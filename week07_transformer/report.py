"""Week 7's test report: accuracy, accuracy per class and the confusion matrix."""

from __future__ import annotations

import numpy as np
from torch import nn

from common.loader import TensorLoader
from common.plots import confusion_matrix, plot_confusion
from common.runs import Run
from common.train import predict
from week03_cnn.part2 import per_class_accuracy


def report_test_set(model: nn.Module, test: TensorLoader, classes: list[str], run: Run,
                    title: str) -> dict:
    """Predict the test set (once, with the weights training kept), print the accuracy of each
    class and save confusion.png; returns test_acc, per_class_acc and confusion for the summary."""
    logits, targets = predict(model, test)
    pred, targets = logits.argmax(1).numpy(), targets.numpy()
    matrix = confusion_matrix(targets, pred, len(classes))
    plot_confusion(matrix, classes, run.path("confusion.png"), title=title)
    per_class = dict(zip(classes, np.round(per_class_accuracy(matrix), 4).tolist()))
    print("per-class test accuracy: " + "  ".join(f"{c} {a:.3f}" for c, a in per_class.items()))
    return {"test_acc": float((pred == targets).mean()), "per_class_acc": per_class,
            "confusion": matrix.tolist()}
