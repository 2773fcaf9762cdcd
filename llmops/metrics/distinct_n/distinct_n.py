"""Distinct-n (Li et al. 2016) as an `evaluate` module that ships with llmops (loads offline by path).

Unique word n-grams over all n-grams, across every generation together: 1.0 when no n-gram repeats
anywhere, near 0 when the model writes the same thing again and again.
"""

import datasets
import evaluate

_DESCRIPTION = "Corpus-level share of distinct word n-grams among all n-grams of the generations."


class DistinctN(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Li et al., A Diversity-Promoting Objective Function for Neural Conversation Models, 2016",
            inputs_description="predictions: list of generated strings; n: n-gram order (default 2)",
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, n=2):
        grams = []
        for text in predictions:
            words = str(text).split()
            grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        return {f"distinct_{n}": len(set(grams)) / len(grams) if grams else 0.0}
