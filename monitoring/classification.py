"""Monitoring a served classifier: its parts of the one monitoring pass (`monitoring.monitor.run_pass`).

The window is the champion's logged predictions with their latest feedback labels; the reference, its reference
data scored by the champion itself (cached per version). The report: Evidently drift on the text, its
descriptors, the embedding, the predicted labels and the confidence; quality on feedback labels; bias by slice
(`monitoring.report`). A retraining adds the window's feedback-labelled rows to the lifecycle's data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from llmops.config import LlmopsConfig
from llmops.predlog import open_store
from monitoring.decision import RetrainDecision, WindowResult
from monitoring.monitor import Launcher, MonitorOutcome, RetrainRequest, run_pass
from monitoring.report import MonitoringReport, build_report
from monitoring.summary import LabelQuality, PassSummary
from monitoring.window import Champion, ReferenceCache, Side, WindowSpec, labelled_rows, load_window


def run_monitor(
    cfg: LlmopsConfig,
    config_path: str | None = None,
    overrides: list[str] | None = None,
    *,
    launcher: Launcher | None = None,
    now: float | None = None,
) -> MonitorOutcome:
    """One pass over the config's classifier (`registry.model_name`); a retraining reruns `config_path` with
    `overrides` (or `monitor.retrain_config`)."""

    def parts(client: MlflowClient, tracking_uri: str) -> ClassifierMonitor:
        cache = ReferenceCache(Path(cfg.work_dir) / "monitor", tracking_uri)
        return ClassifierMonitor(cfg, cache, config_path, list(overrides or []))

    return run_pass(cfg, cfg.registry.model_name, parts, launcher=launcher, now=now)


@dataclass
class ClassifierMonitor:
    cfg: LlmopsConfig
    cache: ReferenceCache
    config_path: str | None
    overrides: list[str] = field(default_factory=list)
    task: str | None = None

    def load_window(self, spec: WindowSpec, champion: Champion) -> Side:
        store = open_store(self.cfg.serve.prediction_log)
        tokenizer = self.cache.tokenizer(champion)
        return load_window(store, spec, champion, tokenizer, self.cfg.data, self.cfg.monitor.sample_rows)

    def report(
        self, window: Side, champion: Champion, spec: WindowSpec, summary: PassSummary, folder: Path, at: float
    ) -> tuple[MonitoringReport, WindowResult]:
        cfg = self.cfg
        reference = self.cache.reference(champion, cfg.monitor.reference_rows, cfg.data)
        report = build_report(reference, window, champion, cfg.monitor, cfg.data, spec.describe())
        report.drift.save_html(str(folder / "report.html"))
        if report.quality is not None:
            report.quality.save_html(str(folder / "quality.html"))
        return report, _window_result(report, window.size, at)

    def retraining(
        self, window: Side, decision: RetrainDecision, folder: Path
    ) -> tuple[RetrainRequest, dict[str, Any]]:
        extra = _extra_rows(window, folder)
        overrides = [*self.overrides, *([f"data.extra_rows={extra}"] if extra else [])]
        config = self.cfg.monitor.retrain_config or self.config_path
        labelled = len(labelled_rows(window))
        request = RetrainRequest(config, overrides, extra, decision.reason)
        return request, {"config": request.config, "extra_rows": extra, "labelled_rows": labelled}

    def metrics(self, summary: PassSummary) -> dict[str, float]:
        return _metrics(summary)


def _window_result(report: MonitoringReport, rows: int, at: float) -> WindowResult:
    quality, bias = report.summary.quality, report.summary.bias
    return WindowResult(
        at,
        rows,
        drift=report.drift_detected,
        quality_drop=None if quality is None else quality.drop,
        bias_gap=None if bias is None or bias.f1_gap is None else bias.f1_gap.value,
    )


def _metrics(summary: PassSummary) -> dict[str, float]:
    values: dict[str, float] = {"window_rows": summary.window.rows}
    drift = summary.drift
    if drift is not None:
        values |= {f"drift_{name}": drift.signals[name]["score"] for name in ("text", "prediction", "confidence")}
        if drift.embedding_share is not None:
            values["drift_embedding_share"] = drift.embedding_share
        values |= {f"drift_{name}": score for name, score in drift.scores("descriptors").items()}
    if isinstance(summary.quality, LabelQuality):
        values |= {"window_macro_f1": summary.quality.macro_f1, "window_accuracy": summary.quality.accuracy}
    if summary.bias is not None:
        gaps = summary.bias.gaps()
        values |= {f"bias_{name}": gaps[name].value for name in ("rate_gap", "f1_gap") if name in gaps}
    return values


def _extra_rows(window: Side, folder: Path) -> str | None:
    rows = labelled_rows(window)
    if rows.empty:
        return None
    digest = hashlib.sha256(rows.to_json().encode()).hexdigest()[:12]
    path = folder / f"feedback-{digest}.parquet"  # named by content: the lifecycle's data cache keys on the path
    rows.to_parquet(path, index=False)
    return str(path)
