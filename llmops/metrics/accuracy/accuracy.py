"""Accuracy as an `evaluate` module that ships with llmops (loads offline by path)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Share of predictions equal to the reference label."


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: lists of integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
