"""Evaluate a candidate on the held-out test set: quality, slices, speed, size.

Every candidate is measured by the same function on the same rows with the
same thread count, so the numbers compare side by side.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmops.candidate_folder import weights_size_mb
from llmops.classification.candidate import Classifier
from llmops.config import EvalConfig
from llmops.gates import CandidateReport, Scoring
from llmops.metrics import classification_scores, slice_scores

SCORING = Scoring(speed="throughput_per_s", latency_p50="latency_p50_ms", latency_p95="latency_p95_ms")
"""Classifiers: the fastest is the highest throughput at the evaluation batch size (64)."""


def measure_latency(classifier: Classifier, texts: list[str], samples: int) -> tuple[float, float]:
    """p50 and p95 milliseconds for single-text requests (one warm-up call first)."""
    classifier.predict_proba(texts[:1], batch_size=1)
    timings = []
    for text in (texts * (samples // max(len(texts), 1) + 1))[:samples]:
        start = time.perf_counter()
        classifier.predict_proba([text], batch_size=1)
        timings.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 95))


def measure_throughput(classifier: Classifier, texts: list[str], batch_size: int, repeats: int = 1) -> float:
    """Texts per second at `batch_size`: the median of `repeats` passes, after one warm-up batch."""
    classifier.predict_proba(texts[:batch_size], batch_size=batch_size)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        classifier.predict_proba(texts, batch_size=batch_size)
        rates.append(len(texts) / (time.perf_counter() - start))
    return float(np.median(rates))


def _check_labels(classifier: Classifier, test: pd.DataFrame) -> None:
    unknown = sorted(set(test["label"]) - set(classifier.labels))
    if unknown:
        raise ValueError(f"the test set has labels {unknown} that the model at {classifier.directory} does not know")


def _predict_test(classifier: Classifier, test: pd.DataFrame, batch_size: int) -> np.ndarray:
    """Predicted label ids in the test set's own label-id order (the model may order labels differently)."""
    _check_labels(classifier, test)
    ids = dict(zip(test["label"], test["label_id"], strict=True))
    predicted = classifier.predict_proba(test["text"].tolist(), batch_size=batch_size).argmax(axis=1)
    return np.array([ids.get(classifier.labels[i], -1) for i in predicted])


def macro_f1_on(classifier: Classifier, rows: pd.DataFrame, batch_size: int = 64) -> float:
    """Macro-F1 of `classifier` on labelled rows (`text`, `label`, `label_id`)."""
    predicted = _predict_test(classifier, rows, batch_size)
    return float(
        classification_scores(predicted.tolist(), rows["label_id"].tolist(), len(classifier.labels))["macro_f1"]
    )


def evaluate_quality(candidate_dir: str | Path, test_path: str | Path, cfg: EvalConfig) -> dict[str, float]:
    """Macro-F1 and accuracy alone (the champion's scores on this flow's test set, for non-inferiority)."""
    classifier = Classifier(candidate_dir)
    test = pd.read_parquet(test_path)
    predicted = _predict_test(classifier, test, cfg.throughput_batch_size)
    scores = classification_scores(predicted.tolist(), test["label_id"].tolist(), len(classifier.labels))
    return {"macro_f1": float(scores["macro_f1"]), "accuracy": float(scores["accuracy"])}


def evaluate_candidate(candidate_dir: str | Path, test_path: str | Path, cfg: EvalConfig) -> CandidateReport:
    """Load the candidate and measure it on the Parquet test split."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    classifier = Classifier(candidate_dir)
    test = pd.read_parquet(test_path)
    texts = test["text"].tolist()
    predicted = _predict_test(classifier, test, cfg.throughput_batch_size)
    num_labels = len(classifier.labels)
    scores = classification_scores(predicted.tolist(), test["label_id"].tolist(), num_labels)
    slices, slice_rows = slice_scores(test, predicted, num_labels)
    p50, p95 = measure_latency(classifier, texts, cfg.latency_samples)
    throughput = measure_throughput(
        classifier, texts[: cfg.throughput_max_rows], cfg.throughput_batch_size, cfg.throughput_repeats
    )
    return CandidateReport(
        kind=classifier.meta.kind,
        path=str(candidate_dir),
        metrics={
            "macro_f1": float(scores["macro_f1"]),
            "accuracy": float(scores["accuracy"]),
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "throughput_per_s": throughput,
            "size_mb": weights_size_mb(candidate_dir),
        },
        per_class_f1=dict(zip(classifier.labels, scores["per_class_f1"], strict=True)),
        slice_macro_f1=slices,
        slice_rows=slice_rows,
        params=classifier.meta.params,
        recipe=classifier.meta.recipe,
    )
