"""F1 as an `evaluate` module that ships with llmops (loads offline by path).

`average` is passed to scikit-learn: "macro" gives one number, None gives one
score per label in `labels` order.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "Harmonic mean of precision and recall, per class or averaged."


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: lists of integer class ids; average; labels",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", labels=None):
        score = f1_score(references, predictions, average=average, labels=labels, zero_division=0)
        return {"f1": score.tolist() if average is None else float(score)}
