"""The monitoring report: Evidently drift (and quality) reports over the window and the reference, plus bias.

One Evidently report holds every drift signal, so the HTML page is one page:
- text: Evidently's text content drift on the cleaned text (a domain classifier);
- descriptors: length, words, URL and mention share, unknown-token share;
- embedding: the champion's embeddings on a few principal components fit on the reference;
- prediction: the predicted-label distribution; confidence: the top-class probability.
Quality (a second report) needs feedback labels in the window. Evidently's
default method and threshold per column type decide each signal's drift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, MulticlassClassification, Report
from evidently.core.report import Snapshot
from evidently.metrics import DriftedColumnsCount, ValueDrift
from evidently.presets import ClassificationQuality, ClassificationQualityByLabel
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, f1_score
from statsmodels.stats.power import NormalIndPower

from llmops.config import DataConfig, MonitorConfig
from monitoring.bias import BiasResult, slice_bias, slice_masks
from monitoring.summary import Drift, LabelQuality, PassSummary, ReferenceFacts, SampleFacts, WindowFacts, plain
from monitoring.window import DESCRIPTORS, NUMERIC_DESCRIPTORS, Champion, Side, window_labelled

EMBEDDING_SHARE = 0.5
"""The embedding has drifted when at least this share of its principal components has."""


@dataclass
class MonitoringReport:
    drift: Snapshot
    quality: Snapshot | None
    summary: PassSummary
    """Window, reference, every signal, quality, bias (the decision is added by the pass)."""

    @property
    def drift_detected(self) -> bool:
        return self.summary.drift is not None and self.summary.drift.detected


def principal_components(reference: Side, current: Side, k: int) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Both sides' embeddings on the reference's first `k` principal components (None: a side has none)."""
    if reference.embeddings is None or current.embeddings is None:
        return None
    if reference.embeddings.shape[1] != current.embeddings.shape[1]:
        return None
    k = min(k, reference.embeddings.shape[1], len(reference.embeddings))
    pca = PCA(n_components=k, random_state=0).fit(reference.embeddings)
    names = [f"embedding_pc{i}" for i in range(k)]
    return (
        pd.DataFrame(pca.transform(reference.embeddings), columns=names),
        pd.DataFrame(pca.transform(current.embeddings), columns=names),
    )


def column_signal(results: dict[str, dict[str, Any]], column: str) -> dict[str, Any]:
    """One column's drift as the summary reports it (from `drift_results`)."""
    test = results[column]
    return {
        "score": test["score"],
        "method": test["method"],
        "threshold": test["threshold"],
        "drifted": test["drifted"],
    }


def drift_results(snapshot: Snapshot) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Per column: score, method, threshold and drifted (from Evidently's own test); the embedding share."""
    data = snapshot.dict()
    failed = {t["metric_config"]["metric_id"]: t["status"] != "SUCCESS" for t in data["tests"]}
    per_column, embedding = {}, None
    for metric in data["metrics"]:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            per_column[config["column"]] = {
                "score": round(float(metric["value"]), 6),
                "method": config.get("method"),
                "threshold": config.get("threshold"),
                "drifted": failed.get(metric["id"], False),
            }
        elif config["type"].endswith("DriftedColumnsCount"):
            embedding = {
                "drifted_components": int(metric["value"]["count"]),
                "share": round(float(metric["value"]["share"]), 6),
                "threshold": EMBEDDING_SHARE,
                "drifted": failed.get(metric["id"], False),
            }
    return per_column, embedding


def _text_sample(frame: pd.DataFrame, rows: int | None) -> int:
    """Keep the text of a seeded sample of `rows` rows (the others' text becomes missing, which text drift skips);
    returns the rows kept."""
    if rows is None or len(frame) <= rows:
        return len(frame)
    kept = frame.sample(rows, random_state=0).index
    frame["text"] = frame["text"].where(frame.index.isin(kept), None)
    return rows


def detectable_auc(n_reference: int, n_current: int) -> float:
    """The smallest domain-classifier ROC AUC a one-sided 5% test tells from chance at these sample sizes (the
    AUC's standard error under no drift, Hanley & McNeil 1982: sqrt((n1 + n2 + 1) / (12 n1 n2)))."""
    if not n_reference or not n_current:
        return 1.0
    return 0.5 + 1.645 * float(np.sqrt((n_reference + n_current + 1) / (12 * n_reference * n_current)))


def detectable_share_change(n_reference: int, n_current: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest change in a share (a label's, a category's; around one half, where it is hardest to see) that
    a two-sided test at `alpha` finds with `power` between samples of these sizes (Cohen's h for two proportions,
    statsmodels' power solver)."""
    h = NormalIndPower().solve_power(nobs1=n_current, ratio=n_reference / n_current, alpha=alpha, power=power)
    return float(np.sin(np.arcsin(np.sqrt(0.5)) + h / 2) ** 2 - 0.5)


def sample_facts(window: Side, reference_rows: int) -> SampleFacts | None:
    """What a sampled window's report can and cannot see (None: the window was read whole)."""
    if not window.sampled or not len(window.frame):
        return None
    n, total = len(window.frame), window.size
    margin = 1.96 * np.sqrt(0.25 / n * (total - n) / max(total - 1, 1))  # worst case, finite population
    return SampleFacts(
        rows=n,
        of=total,
        share_margin=round(float(margin), 6),
        detectable_share_change=round(detectable_share_change(reference_rows, n), 6),
        reference_rows=reference_rows,
    )


def drift_report(
    reference: Side, current: Side, cfg: MonitorConfig, metadata: dict[str, Any]
) -> tuple[Snapshot, Drift]:
    components = principal_components(reference, current, cfg.embedding_components)
    columns = ["text", "prediction", "confidence", *DESCRIPTORS]
    ref, cur = reference.frame[columns].reset_index(drop=True), current.frame[columns].reset_index(drop=True)
    # The domain classifier is the report's costliest step and grows with the rows; a sample keeps its power stated.
    text_rows = {"reference": _text_sample(ref, cfg.text_drift_rows), "current": _text_sample(cur, cfg.text_drift_rows)}
    embedding_columns: list[str] = []
    if components is not None:
        ref, cur = ref.join(components[0]), cur.join(components[1])
        embedding_columns = list(components[0].columns)
    definition = DataDefinition(
        text_columns=["text"],
        categorical_columns=["prediction", "has_unknown"],
        numerical_columns=["confidence", *NUMERIC_DESCRIPTORS, *embedding_columns],
    )
    metrics: list[Any] = [ValueDrift(column=c) for c in ("text", "prediction", "confidence", *DESCRIPTORS)]
    if embedding_columns:
        # One metric over the components: a ValueDrift (and a plot) per component would double the report's time.
        metrics.append(DriftedColumnsCount(columns=embedding_columns, drift_share=EMBEDDING_SHARE))
    report = Report(metrics, metadata=metadata, tags=["drift"], include_tests=True)
    snapshot = report.run(Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, definition))
    per_column, embedding = drift_results(snapshot)
    signals: dict[str, Any] = {
        "text": column_signal(per_column, "text")
        | {"rows": text_rows, "detectable_auc": round(detectable_auc(*text_rows.values()), 4)},
        "descriptors": {d: column_signal(per_column, d) for d in DESCRIPTORS},
        "embedding": embedding
        or {"drifted": False, "unavailable": "the window was logged without embedding vectors (serve.log_embeddings)"},
        "prediction": column_signal(per_column, "prediction"),
        "confidence": column_signal(per_column, "confidence"),
    }
    signals["descriptors"]["drifted"] = any(d["drifted"] for d in signals["descriptors"].values())
    signals["descriptors"]["unk_share_mean"] = {
        "reference": round(float(reference.frame["unk_share"].mean()), 6),
        "current": round(float(current.frame["unk_share"].mean()), 6),
    }
    reasons = [_reason(name, signals[name]) for name in cfg.drift_on if signals[name]["drifted"]]
    return snapshot, Drift(bool(reasons), reasons, plain(signals))


def _reason(name: str, signal: dict[str, Any]) -> str:
    if name == "descriptors":
        drifted = [d for d, s in signal.items() if isinstance(s, dict) and s.get("drifted")]
        return f"descriptors drifted: {', '.join(drifted)}"
    if name == "embedding":
        return f"embedding: {signal['drifted_components']} principal components drifted (share {signal['share']:.2f})"
    return f"{name}: {signal['method']} {signal['score']:.3f} (threshold {signal['threshold']})"


def quality(
    current: Side, reference: Side, champion: Champion, cfg: MonitorConfig, metadata: dict[str, Any]
) -> tuple[Snapshot | None, LabelQuality | None]:
    """Accuracy, macro-F1 and per-class F1 on the window's feedback labels, against the champion's test macro-F1."""
    labelled = window_labelled(current)
    if len(labelled) < cfg.min_labelled:
        return None, None
    y, p = labelled["feedback_label"].astype(str), labelled["prediction"].astype(str)
    macro = float(f1_score(y, p, labels=champion.labels, average="macro", zero_division=0))
    per_class = f1_score(y, p, labels=champion.labels, average=None, zero_division=0)
    summary = LabelQuality(
        labelled=len(labelled),
        accuracy=round(float(accuracy_score(y, p)), 6),
        macro_f1=round(macro, 6),
        f1_per_class={label: round(float(f), 6) for label, f in zip(champion.labels, per_class, strict=True)},
        champion_test_macro_f1=champion.test_macro_f1,
        drop=None if champion.test_macro_f1 is None else round(champion.test_macro_f1 - macro, 6),
    )
    present = set(y) | set(p)
    if len(present) < len(champion.labels) or len(set(reference.frame["label"])) < len(champion.labels):
        # Evidently (0.7) takes a window where only two labels occur for a binary task and fails on it.
        page = f"no quality page: labels {sorted(present)} occur in the window, Evidently needs all"
        return None, replace(summary, page=page)
    definition = DataDefinition(
        categorical_columns=["target", "prediction"],
        classification=[
            MulticlassClassification(
                target="target", prediction_labels="prediction", labels={label: label for label in champion.labels}
            )
        ],
    )
    cur = pd.DataFrame({"target": y.to_numpy(), "prediction": p.to_numpy()})
    ref = pd.DataFrame({"target": reference.frame["label"], "prediction": reference.frame["prediction"]})
    report = Report([ClassificationQuality(), ClassificationQualityByLabel()], metadata=metadata, tags=["quality"])
    snapshot = report.run(Dataset.from_pandas(cur, definition), Dataset.from_pandas(ref, definition))
    return snapshot, summary


def bias(current: Side, champion: Champion, cfg: MonitorConfig, data_cfg: DataConfig) -> BiasResult:
    masks = slice_masks(current.frame, cfg.bias, data_cfg.topics)
    return slice_bias(
        current.frame,
        masks,
        champion.labels,
        cfg.bias.min_slice_rows,
        cfg.min_labelled,
        cfg.bias.max_rate_gap,
        cfg.retrain.max_bias_gap,
    )


def build_report(
    reference: Side, current: Side, champion: Champion, cfg: MonitorConfig, data_cfg: DataConfig, window: str
) -> MonitoringReport:
    metadata = {"model": champion.name, "champion_version": champion.version, "window": window}
    drift_snapshot, drift = drift_report(reference, current, cfg, metadata)
    quality_snapshot, quality_summary = quality(current, reference, champion, cfg, metadata)
    bias_result = bias(current, champion, cfg, data_cfg)
    ts = current.frame["ts"]
    summary = PassSummary(
        model=champion.name,
        champion_version=champion.version,
        window=WindowFacts(
            spec=window,
            rows=current.size,
            labelled=len(window_labelled(current)),
            first_ts=float(ts.min()) if len(ts) else None,
            last_ts=float(ts.max()) if len(ts) else None,
            sample=sample_facts(current, len(reference.frame)),
        ),
        reference=ReferenceFacts(champion.reference_uri, len(reference.frame)),
        drift=drift,
        quality=quality_summary,
        bias=bias_result.facts(),
    )
    return MonitoringReport(drift_snapshot, quality_snapshot, summary)
