"""Metric modules for the `evaluate` library, shipped in the package: the hub is not reachable."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import evaluate

_HERE = Path(__file__).parent


@cache
def load_metric(name: str) -> Any:
    """`accuracy` or `f1`, loaded from this package by path (never from the hub)."""
    return evaluate.load(str(_HERE / name))


def classification_scores(predictions: list[int], references: list[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class F1 (a list in label-id order)."""
    labels = list(range(num_labels))
    return {
        "accuracy": load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"],
        "macro_f1": load_metric("f1").compute(
            predictions=predictions, references=references, average="macro", labels=labels
        )["f1"],
        "per_class_f1": load_metric("f1").compute(
            predictions=predictions, references=references, average=None, labels=labels
        )["f1"],
    }
