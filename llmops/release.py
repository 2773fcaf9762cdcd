"""Record a lifecycle in MLflow, decide, register, promote.

One parent run per lifecycle and one child run per candidate, so the MLflow
UI compares candidates side by side. The decision itself is
`gates.decide_promotion`, a pure function; this module carries it out.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from llmops import registry, tasks
from llmops.candidate import HISTORY_FILE
from llmops.config import LlmopsConfig
from llmops.data import SPLITS, PreparedData
from llmops.gates import CandidateReport, ChampionState, Decision, decide_promotion
from llmops.report import model_card, summary_table


@dataclass(frozen=True)
class ReleaseOutcome:
    parent_run_id: str
    decision: Decision
    version: str | None
    """The registered version of the selected candidate (new or reused)."""
    champion: str | None
    promoted: bool
    message: str
    summary: str


def _flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config or recipe as MLflow params: dotted keys, lists as JSON, values cut to MLflow's limit."""
    if not tree:
        return {}
    flat = pd.json_normalize(tree, sep=".").iloc[0].to_dict()
    return {
        prefix + k: (json.dumps(v) if isinstance(v, list | dict) else str(v))[:6000]
        for k, v in flat.items()
        if v is not None
    }


def _log_history(candidate_dir: Path) -> None:
    """The Trainer's loss and validation curves as step metrics of the candidate's run."""
    history_file = candidate_dir.parent / HISTORY_FILE
    if not history_file.is_file():
        return
    for entry in json.loads(history_file.read_text()):
        step = int(entry.get("step", 0))
        metrics = {
            f"train/{k}": float(v)
            for k, v in entry.items()
            if k not in ("step", "epoch") and isinstance(v, int | float)
        }
        if metrics:
            mlflow.log_metrics(metrics, step=step)


def _version_tags(
    report: CandidateReport,
    decision: Decision,
    key: str,
    data: PreparedData,
    parent_run_id: str,
    config_yaml: str,
    commit: str,
) -> dict[str, Any]:
    verdict = decision.verdicts[report.kind]
    data_uri = f"runs:/{parent_run_id}/data"
    tags: dict[str, Any] = {
        "task": report.task,
        "candidate": report.kind,
        "verdict": "passed" if verdict.passed else "rejected",
        "reasons": verdict.reasons or ["passed every gate"],
        "candidate_key": key,
        "data_fingerprint": data.fingerprint,
        "labels": data.labels,
        "train_data": f"{data_uri}/train.parquet",
        "reference_data": f"{data_uri}/reference.parquet",
        "test_data": f"{data_uri}/test.parquet",
        "test_metrics": {k: round(v, 6) for k, v in report.metrics.items()},
        "parent_run_id": parent_run_id,
        "git_commit": commit,
        "config": config_yaml,
    }
    if report.notes or verdict.notes:
        tags["notes"] = report.notes + verdict.notes
    if "macro_f1" in report.metrics:  # monitoring compares live quality with it
        tags["test_macro_f1"] = f"{report.metrics['macro_f1']:.6f}"
    return tags


def release(
    cfg: LlmopsConfig,
    reports: dict[str, CandidateReport],
    keys: dict[str, str],
    champion: ChampionState,
    data_dir: str | Path,
) -> ReleaseOutcome:
    """Log the lifecycle, decide with the policy, register the selected candidate and promote it if it passed."""
    task = tasks.for_config(cfg)
    client = registry.setup_tracking(cfg.registry)
    name = cfg.registry.model_name
    state = dataclasses.replace(champion, version_now=registry.alias_version(client, name, registry.CHAMPION))
    decision = decide_promotion(list(reports.values()), state, cfg.gates, cfg.eval.min_slice_size, task.scoring, keys)
    data = PreparedData.load(data_dir)
    selected = reports.get(decision.selected or "")
    existing = registry.find_version_by_key(client, name, keys[selected.kind]) if selected else None
    table = summary_table(list(reports.values()), decision)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    commit = registry.git_commit()
    model_uri = None
    with mlflow.start_run(run_name=f"lifecycle-{data.fingerprint[:8]}") as parent:
        mlflow.log_params(_flat_params(cfg.model_dump(mode="json")))
        mlflow.set_tags(
            {
                "llmops.kind": "lifecycle",
                "llmops.task": cfg.task,
                "llmops.data_fingerprint": data.fingerprint,
                "llmops.git_commit": commit,
                "llmops.decision": decision.reason,
            }
        )
        splits = {s: data.split_path(s) for s in (*SPLITS, "holdout", "reference")}
        registry.log_data_inputs(splits, data.fingerprint, task.target_column)
        if (data.directory / "data_card.md").is_file():
            mlflow.log_artifact(str(data.directory / "data_card.md"))
        for kind, report in reports.items():
            verdict = decision.verdicts[kind]
            with mlflow.start_run(run_name=kind, nested=True):
                mlflow.log_metrics(report.flat_metrics())
                mlflow.log_params({"candidate": kind, **_flat_params(report.recipe, "recipe.")})
                notes = report.notes + verdict.notes
                mlflow.set_tags(
                    {
                        "llmops.candidate": kind,
                        "llmops.candidate_key": keys[kind],
                        "llmops.verdict": "passed" if verdict.passed else "rejected",
                        "llmops.reasons": "; ".join(verdict.reasons) or "passed every gate",
                        **({"llmops.notes": "; ".join(notes)} if notes else {}),
                    }
                )
                _log_history(Path(report.path))
                if kind == decision.selected and existing is None:
                    model_uri = task.log_model(Path(report.path), data)
        version = existing
        if selected is not None:
            tags = _version_tags(selected, decision, keys[selected.kind], data, parent.info.run_id, config_yaml, commit)
            if version is None:
                version = registry.register(name, model_uri or "", tags)
            else:  # a rerun: keep the version's lineage, refresh its verdict
                verdict_tags = registry.encode_tags({k: tags[k] for k in ("verdict", "reasons")})
                for key, value in verdict_tags.items():
                    client.set_model_version_tag(name, version, key, value)
        promoted, message, champion_now = False, decision.reason, state.version_now
        if selected is not None and decision.verdicts[selected.kind].passed and version is not None:
            client.set_registered_model_alias(name, registry.CHALLENGER, version)
        if decision.promote and version is not None:
            result = registry.promote(client, name, version, champion.version_at_start)
            promoted, message, champion_now = result.promoted, result.message, result.champion
        mlflow.set_tag("llmops.outcome", message)
        mlflow.log_text(table, "summary.md")
        mlflow.log_text(config_yaml, "config.yaml")
        mlflow.log_dict(dataclasses.asdict(decision), "decision.json")
        mlflow.log_text(
            model_card(
                name,
                version,
                list(reports.values()),
                decision,
                data.fingerprint,
                json.loads((data.directory / "data.json").read_text())["rows"],
                config_yaml,
            ),
            "model_card.md",
        )
    return ReleaseOutcome(parent.info.run_id, decision, version, champion_now, promoted, message, table)


def current_champion(cfg: LlmopsConfig) -> str | None:
    """The champion's version when the flow starts: promotion later is compare-and-set against it."""
    client = registry.setup_tracking(cfg.registry)
    return registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)


def score_champion(
    cfg: LlmopsConfig,
    version: str | None,
    data_dir: str | Path,
    known: dict[str, float | None],
    scratch_dir: str | Path,
    context: dict[str, Any],
) -> ChampionState:
    """The start-time champion's `gates.metric` on this flow's test set.

    `known` maps candidate keys to that metric already measured in this flow: a
    champion built from the same inputs is not downloaded and scored again.
    """
    if version is None:
        return ChampionState(None, None)
    client = registry.setup_tracking(cfg.registry)
    name = cfg.registry.model_name
    key = registry.version_tags(client, name, version).get(registry.TAG + "candidate_key")
    if key in known:
        return ChampionState(version, version, known[key], key)
    candidate_dir = registry.download_candidate(name, version, Path(scratch_dir) / f"champion-v{version}")
    quality = tasks.for_config(cfg).measure_quality(cfg, str(candidate_dir), str(data_dir), context)
    return ChampionState(version, version, quality.get(cfg.gates.metric), key)
