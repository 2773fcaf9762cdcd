"""Metric modules for the `evaluate` library, shipped in the package: the hub is not reachable."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_HERE = Path(__file__).parent


@cache
def load_metric(name: str) -> Any:
    """`accuracy`, `f1`, `exact_match`, `distinct_n` or `repetition`, loaded from this package by path (never from
    the hub). `evaluate` is imported here, not with this package: serving reads `llmops.metrics.text` alone."""
    import evaluate

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


def slice_scores(test: pd.DataFrame, predicted: np.ndarray, num_labels: int) -> tuple[dict[str, float], dict[str, int]]:
    """Macro-F1 and row count per value of the `topic` column."""
    scores, rows = {}, {}
    for topic, index in test.groupby("topic").groups.items():
        positions = test.index.get_indexer(index)
        scores[str(topic)] = classification_scores(
            predicted[positions].tolist(), test["label_id"].to_numpy()[positions].tolist(), num_labels
        )["macro_f1"]
        rows[str(topic)] = len(positions)
    return scores, rows


def generation_scores(generations: list[str]) -> dict[str, float]:
    """Diversity across generations (distinct-2) and repetition within each (seq-rep-3)."""
    return {
        "distinct_2": load_metric("distinct_n").compute(predictions=generations, n=2)["distinct_2"],
        "repetition_rate": load_metric("repetition").compute(predictions=generations, n=3)["repetition_rate"],
    }


def exact_match(predictions: list[str], references: list[str]) -> float:
    return float(load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"])
