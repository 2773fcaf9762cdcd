"""Repetition within a generation (seq-rep-n of Welleck et al. 2019) as an `evaluate` module that ships with
llmops (loads offline by path).

Per generation, the share of its word n-grams that repeat an earlier n-gram of the same generation; the mean
over generations. 0 for text that never repeats itself, near 1 for a loop.
"""

import datasets
import evaluate

from llmops.metrics.text import seq_rep

_DESCRIPTION = "Mean share of repeated word n-grams within each generation (seq-rep-n)."


class Repetition(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Welleck et al., Neural Text Generation with Unlikelihood Training, 2019",
            inputs_description="predictions: list of generated strings; n: n-gram order (default 3)",
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, n=3):
        shares = [seq_rep(str(text), n) for text in predictions]
        return {"repetition_rate": sum(shares) / len(shares) if shares else 0.0}
