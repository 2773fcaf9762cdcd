"""One monitoring pass: window vs reference, report, decision, records, and the retraining if decided.

Every pass is recorded, the "no" decisions included: an MLflow run (kind
`monitor`, tagged with the champion's version, the verdict and the window's
drift) with the report as artifacts, and the Evidently workspace. Past passes
are read back from those MLflow runs: they are the history the retraining
policy's hysteresis, cooldown and daily cap look at.

Each task brings its parts (`TaskMonitor`: `monitoring.classification`, `monitoring.generation`); the pass,
the decision and the records are one. How a retraining starts is the caller's: `flows/monitor.py` passes a
launcher that goes through Prefect or runs the lifecycle in-process.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import mlflow
import pandas as pd
from mlflow import MlflowClient

from llmops import registry
from llmops.config import LlmopsConfig
from llmops.ports import node_address
from monitoring import workspace
from monitoring.decision import PastDecision, RetrainDecision, WindowResult, decide_retraining
from monitoring.report import MonitoringReport
from monitoring.summary import FeedbackQuality, Flagged, Generations, LabelQuality, PassSummary, WindowFacts
from monitoring.window import Champion, Side, WindowSpec, find_champion

KIND = "monitor"


@dataclass(frozen=True)
class RetrainRequest:
    config: str | None
    overrides: list[str]
    extra_rows: str | None
    """Parquet of the window's feedback-labelled rows (None: the window had none)."""
    reason: str
    deployment: str | None = None
    """The Prefect deployment that retrains (default: `monitor.retrain_deployment`)."""


Launcher = Callable[[RetrainRequest], dict[str, Any]]


@dataclass(frozen=True)
class MonitorOutcome:
    report_dir: Path
    summary: PassSummary
    decision: RetrainDecision
    run_id: str


FLAGGED_METRIC = "guard_flagged_share"


def flagged_facts(frame: pd.DataFrame) -> Flagged | None:
    """What the guards found in the window's texts, from the log's `flagged` (None: no text was checked)."""
    if "flagged" not in frame:
        return None
    checked = frame["flagged"].dropna().astype(str)
    if checked.empty:
        return None
    kinds = Counter(kind for found in checked for kind in found.split(",") if kind)
    flagged = int((checked != "").sum())
    return Flagged(len(checked), flagged, round(flagged / len(checked), 6), dict(sorted(kinds.items())))


def monitoring_experiment(cfg: LlmopsConfig) -> str:
    return f"{cfg.registry.experiment}-monitoring"


def past_decisions(client: MlflowClient, experiment: str, model: str) -> list[PastDecision]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`llmops.kind` = '{KIND}' and tags.`llmops.model` = '{model}'",
        max_results=1000,
    )
    drift = {"true": True, "false": False}
    return [
        PastDecision(
            float(run.data.tags["llmops.window_end"]),
            drift.get(run.data.tags.get("llmops.drift", "")),
            run.data.tags.get("llmops.verdict") == "retrain",
            run.data.metrics.get(FLAGGED_METRIC),
        )
        for run in runs
        if "llmops.window_end" in run.data.tags
    ]


def report_dir(root: str, at: float) -> Path:
    stamp = datetime.fromtimestamp(at).strftime("%Y%m%d-%H%M%S")
    folder, n = Path(root) / stamp, 1
    while folder.exists():  # two passes in one second
        n += 1
        folder = Path(root) / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder.resolve()


def record_mlflow(
    cfg: LlmopsConfig,
    champion: Champion,
    summary: PassSummary,
    decision: RetrainDecision,
    folder: Path,
    at: float,
    metrics: dict[str, float],
) -> str:
    drift = summary.drift
    tags = {
        "llmops.kind": KIND,
        "llmops.model": champion.name,
        "llmops.champion_version": champion.version,
        "llmops.verdict": decision.verdict,
        "llmops.reason": decision.reason[:5000],
        "llmops.drift": "none" if decision.verdict == "no-verdict" or drift is None else str(drift.detected).lower(),
        "llmops.window_end": repr(at),
        "llmops.window": summary.window.spec,
        "llmops.host": node_address(),  # the Ray node that ran the pass, on a cluster
    }
    experiment_id = registry.ensure_experiment(cfg.registry, monitoring_experiment(cfg))
    name = f"monitor-v{champion.version}-{folder.name}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder), artifact_path="report")
    return run.info.run_id


class TaskMonitor(Protocol):
    """A task's parts of the one monitoring pass (`run_pass`): how its window is read, compared with the
    champion's reference, turned into a retraining, and measured in MLflow."""

    task: str | None
    """Written as the summary's `task` (None: the classifier's summary, which has none)."""

    def load_window(self, spec: WindowSpec, champion: Champion) -> Side:
        """The champion's logged traffic in the window."""
        ...

    def report(
        self, window: Side, champion: Champion, spec: WindowSpec, summary: PassSummary, folder: Path, at: float
    ) -> tuple[MonitoringReport, WindowResult]:
        """Window vs the champion's reference: the report (its pages written to `folder`, its summary the pass's
        `summary` with every signal) and what the retraining policy reads of it."""
        ...

    def retraining(
        self, window: Side, decision: RetrainDecision, folder: Path
    ) -> tuple[RetrainRequest, dict[str, Any]]:
        """The retraining a `retrain` decision starts, and what the summary says of it."""
        ...

    def metrics(self, summary: PassSummary) -> dict[str, float]:
        """The pass's MLflow metrics."""
        ...


def run_pass(
    cfg: LlmopsConfig,
    model_name: str,
    task_monitor: Callable[[MlflowClient, str], TaskMonitor],
    *,
    launcher: Launcher | None = None,
    now: float | None = None,
) -> MonitorOutcome:
    """One monitoring pass over `model_name`'s champion: compare the window with the reference, write and record
    the report, decide, and retrain if decided. `task_monitor(client, tracking_uri)`: the task's parts."""
    at = time.time() if now is None else now
    client = registry.setup_tracking(cfg.registry)
    part = task_monitor(client, registry.resolve_tracking_uri(cfg.registry))
    champion = find_champion(client, model_name)
    spec = WindowSpec.from_config(cfg.monitor, at)
    window = part.load_window(spec, champion)
    rows = window.size
    folder = report_dir(cfg.monitor.reports_dir, at)
    summary = PassSummary(champion.name, champion.version, WindowFacts(spec.describe(), rows), task=part.task)
    report, result = None, WindowResult(at, rows, drift=False)
    if rows >= cfg.monitor.retrain.min_window:
        report, result = part.report(window, champion, spec, summary, folder, at)
        summary = report.summary
    flagged = flagged_facts(window.frame)
    if flagged is not None:
        summary, result = replace(summary, guards=flagged), replace(result, flagged_share=flagged.share)
    history = past_decisions(client, monitoring_experiment(cfg), champion.name)
    decision = decide_retraining(result, history, cfg.monitor.retrain)
    summary = summary.decided(datetime.fromtimestamp(at).isoformat(timespec="seconds"), decision)
    request = None
    if decision.retrain:
        request, retraining = part.retraining(window, decision, folder)
        summary = replace(summary, retraining=retraining)
    metrics = part.metrics(summary) | ({FLAGGED_METRIC: flagged.share} if flagged is not None else {})
    return conclude(cfg, client, champion, report, summary, decision, request, metrics, launcher, folder, at)


def conclude(
    cfg: LlmopsConfig,
    client: MlflowClient,
    champion: Champion,
    report: MonitoringReport | None,
    summary: PassSummary,
    decision: RetrainDecision,
    request: RetrainRequest | None,
    metrics: dict[str, float],
    launcher: Launcher | None,
    folder: Path,
    at: float,
) -> MonitorOutcome:
    """The end of every pass: the summary written, the pass recorded in MLflow and the Evidently workspace, then
    the retraining started if one was decided (and its start recorded)."""
    (folder / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    run_id = record_mlflow(cfg, champion, summary, decision, folder, at, metrics)
    record_workspace(cfg, champion, report, summary, decision, at)
    if request is not None:
        started = launcher(request) if launcher is not None else {"mode": "none", "note": "no launcher given"}
        summary = replace(summary, retraining={**(summary.retraining or {}), **started})
        (folder / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
        client.set_tag(run_id, "llmops.retraining", json.dumps(started)[:5000])
    return MonitorOutcome(folder, summary, decision, run_id)


def record_workspace(
    cfg: LlmopsConfig,
    champion: Champion,
    report: MonitoringReport | None,
    summary: PassSummary,
    decision: RetrainDecision,
    at: float,
) -> None:
    gaps = summary.bias.gaps() if summary.bias is not None else {}
    quality = summary.quality
    values = {
        "rows": summary.window.rows,
        "drift": None if report is None else float(report.drift_detected),
        "retrain": float(decision.retrain),
        "macro_f1": quality.macro_f1 if isinstance(quality, LabelQuality) else None,
        "rate_gap": gaps["rate_gap"].value if "rate_gap" in gaps else None,
        "f1_gap": gaps["f1_gap"].value if "f1_gap" in gaps else None,
        "flagged_share": summary.guards.share if summary.guards is not None else None,
    }
    if summary.generative:
        window = summary.generations.window if summary.generations is not None else None
        values |= {key: getattr(window, key, None) for key in ("control_accuracy", "truncated_share", "empty_share")}
        values["mean_rating"] = quality.mean_rating if isinstance(quality, FeedbackQuality) else None
        values["control_gap"] = gaps["control_gap"].value if "control_gap" in gaps else None
    snapshots = [workspace.decision_snapshot(values, decision.verdict, decision.reason, datetime.fromtimestamp(at))]
    if report is not None:
        snapshots = [report.drift, *([report.quality] if report.quality else []), *snapshots]
    workspace.add(cfg.monitor.workspace, champion.name, snapshots, summary.generative)


_GAP_NAMES = {"rate_gap": "rate", "f1_gap": "macro-F1", "control_gap": "control accuracy"}


def verdict_lines(outcome: MonitorOutcome) -> str:
    """The terminal summary: drift and why, bias gaps, quality, the decision, where the report is."""
    s = outcome.summary
    rows = f"{s.window.rows} {'generations' if s.generative else 'predictions'}"
    lines = [f"{s.model} v{s.champion_version}: window {s.window.spec}, {rows}"]
    sample = s.window.sample
    if sample is not None:
        lines.append(
            f"compared through a uniform sample of {sample.rows:,} of its {sample.of:,} rows: a share in it is within"
            f" ±{sample.share_margin:.2%} of the window's (95%); against {sample.reference_rows:,} reference rows a"
            f" change of {sample.detectable_share_change:.2%} in a share is found with power 0.8 (two-sided, 0.05)"
        )
    if s.drift is None:
        lines.append("drift: not computed (window below monitor.retrain.min_window)")
    else:
        reasons = f" ({'; '.join(s.drift.reasons)})" if s.drift.reasons else ""
        lines.append(f"drift: {'YES' if s.drift.detected else 'no'}{reasons}")
    if s.generations is not None:
        lines.append(_generation_line(s.generations))
    quality = s.quality
    if isinstance(quality, FeedbackQuality) and (quality.ratings or quality.corrections):
        mean = _share(quality.mean_rating)
        lines.append(f"feedback: {quality.ratings} ratings (mean {mean}), {quality.corrections} corrections")
    if isinstance(quality, LabelQuality):
        lines.append(
            f"quality: macro-F1 {quality.macro_f1:.3f} on {quality.labelled} feedback labels"
            f" (champion test {quality.champion_test_macro_f1})"
        )
    if s.guards is not None:
        kinds = ", ".join(f"{kind} {n}" for kind, n in s.guards.kinds.items()) or "nothing found"
        lines.append(
            f"guards: personal data or credentials in {s.guards.flagged} of {s.guards.checked} checked texts"
            f" ({s.guards.share:.1%}; {kinds})"
        )
    for name, gap in (s.bias.gaps() if s.bias is not None else {}).items():
        over = " OVER ceiling" if gap.over else ""
        what = f"'{gap.label}' rate" if gap.label else _GAP_NAMES[name]
        lines.append(f"bias: {what} gap {gap.value:.3f} ({gap.between[0]} vs {gap.between[1]}){over}")
    if s.decision is not None:
        lines.append(f"decision: {s.decision.verdict.upper()}: {s.decision.reason}")
    if s.retraining is not None:
        lines.append(f"retraining: {json.dumps({k: v for k, v in s.retraining.items() if k != 'config'})}")
    lines.append(f"report: {outcome.report_dir}")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _generation_line(generations: Generations) -> str:
    now, ref = generations.window, generations.reference
    return (
        f"generations: control accuracy {_share(now.control_accuracy)}"
        f" (reference {_share(ref.control_accuracy)}), empty {_share(now.empty_share)},"
        f" truncated {_share(now.truncated_share)}, repetition {_share(now.repetition)};"
        f" {generations.control}"
    )
