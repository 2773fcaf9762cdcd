"""Exact match as an `evaluate` module that ships with llmops (loads offline by path).

Both sides are compared after trimming, lower-casing and dropping trailing punctuation, so
`Positive.` matches `positive`.
"""

import datasets
import evaluate

_DESCRIPTION = "Share of generated answers equal to the reference answer, after light normalisation."


def _normalise(text):
    return str(text).strip().lower().rstrip(".!?;:,").strip()


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        hits = [_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(hits) / len(hits) if hits else 0.0}
