"""Record a lifecycle in MLflow, decide, register, promote.

One parent run per lifecycle execution, spanning it (from the flow's start to its decision), and one child run
per candidate, spanning that candidate's build, with the settings a user compares as params: the MLflow UI
compares candidates side by side. A rerun that built nothing and changes nothing in the registry adds no runs:
it counts itself on the run that recorded the execution (`llmops.cached_reruns`). The registered model and each
version carry a description from the model card. The decision itself is `gates.decide_promotion`, a pure
function; this module carries it out.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from llmops import registry, tasks
from llmops.cache import Built
from llmops.candidate_folder import HISTORY_FILE
from llmops.config import LlmopsConfig
from llmops.gates import CandidateReport, ChampionState, Decision, decide_promotion
from llmops.prepared_data import SPLITS, PreparedData
from llmops.report import model_card, model_description, summary_table, version_description

DESCRIPTION_LIMIT = 5000
"""Characters MLflow's SQL stores keep of a description."""


@dataclass(frozen=True)
class Execution:
    """One run of the lifecycle flow: when it started, and a key of what it decided from (the candidate and
    evaluation stages, the gates, the registered name). Runs with one key are one execution in MLflow."""

    key: str
    started_at: float


@dataclass(frozen=True)
class ReleaseOutcome:
    parent_run_id: str
    experiment_id: str
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


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _compared(cfg: LlmopsConfig, report: CandidateReport) -> dict[str, Any]:
    """The settings a user compares candidates by, under the same names on every candidate's run."""
    trained_by = cfg.train if report.kind == "teacher" else cfg.distill
    params: dict[str, Any] = {
        "candidate": report.kind,
        "training": "fine-tuning" if report.kind == "teacher" else "distillation",
        "learning_rate": trained_by.learning_rate,
        "epochs": trained_by.epochs,
        "batch_size": trained_by.batch_size,
        "quantization": report.recipe.get("quantization", {}).get("method", "none"),
    }
    model_config = Path(report.path) / "config.json"
    if model_config.is_file():
        architecture = json.loads(model_config.read_text())
        layers = architecture.get("num_hidden_layers", architecture.get("num_layers"))
        if layers is not None:
            params["layers"] = layers
    if report.kind != "teacher":
        ffn_keep = report.recipe.get("ffn_keep", cfg.distill.ffn_keep)  # unset in the config: what was applied
        params |= {"student_layers": cfg.distill.student_layers, "ffn_keep": ffn_keep}
        params |= {"temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    if report.kind not in ("teacher", "student"):
        params["quantization_kind"] = report.kind
    return params


def _without_search(recipe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The recipe without the int8 search's log (a run's params stay short), and that log."""
    quantization = dict(recipe.get("quantization", {}))
    search = quantization.pop("search", None)
    return ({**recipe, "quantization": quantization} if "quantization" in recipe else recipe), search


def _log_search(search: dict[str, Any]) -> None:
    """The accuracy-aware int8 search on its candidate's run: each pass as a step, the result as params."""
    for step, trial in enumerate(search["trials"]):
        metrics = {"search/macro_f1": trial["macro_f1"], "search/layers_kept_fp32": len(trial["kept_fp32"])}
        mlflow.log_metrics(metrics, step=step)
    mlflow.log_params(
        {
            "int8_search.max_loss": search["max_loss"],
            "int8_search.reference_macro_f1": round(search["reference_macro_f1"], 6),
            "int8_search.layers_kept_fp32": len(search["kept_fp32"]),
            "int8_search.met": search["met"],
        }
    )
    mlflow.log_dict(search, "quantization_search.json")


def _recorded(client: MlflowClient, experiment_id: str, execution: Execution) -> Run | None:
    """The run that recorded this execution already, if any."""
    runs = client.search_runs(
        [experiment_id], f"tags.`llmops.execution_key` = '{execution.key}'", order_by=["start_time ASC"], max_results=1
    )
    return runs[0] if runs else None


def _count_rerun(client: MlflowClient, run: Run) -> str:
    reruns = int(run.data.tags.get("llmops.cached_reruns", "0")) + 1
    now = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_tag(run.info.run_id, "llmops.cached_reruns", str(reruns))
    client.set_tag(run.info.run_id, "llmops.last_cached_rerun", now)
    return (
        f"nothing new: every stage was reused and the registry already holds this outcome; recorded in MLflow run "
        f"'{run.info.run_name}' ({run.info.run_id}), which counts {reruns} such rerun(s)"
    )


def release(
    cfg: LlmopsConfig,
    reports: dict[str, CandidateReport],
    keys: dict[str, str],
    champion: ChampionState,
    data_dir: str | Path,
    execution: Execution,
) -> ReleaseOutcome:
    """Log the lifecycle, decide with the policy, register the selected candidate and promote it if it passed."""
    task = tasks.for_config(cfg)
    client = registry.setup_tracking(cfg.registry)
    experiment_id = registry.ensure_experiment(cfg.registry, cfg.registry.experiment)
    name = cfg.registry.model_name
    state = dataclasses.replace(champion, version_now=registry.alias_version(client, name, registry.CHAMPION))
    decision = decide_promotion(list(reports.values()), state, cfg.gates, cfg.eval.min_slice_size, task.scoring, keys)
    data = PreparedData.load(data_dir)
    selected = reports.get(decision.registered or "")  # what passed, else the best rejected one (for inspection)
    existing = registry.find_version_by_key(client, name, keys[selected.kind]) if selected else None
    table = summary_table(list(reports.values()), decision)

    earlier = _recorded(client, experiment_id, execution)
    challenger = registry.alias_version(client, name, registry.CHALLENGER)
    passed = selected is not None and decision.verdicts[selected.kind].passed
    if earlier is not None and existing is not None and not decision.promote and (not passed or challenger == existing):
        message = _count_rerun(client, earlier)
        return ReleaseOutcome(
            earlier.info.run_id, experiment_id, decision, existing, state.version_now, False, message, table
        )

    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    commit = registry.git_commit()
    model_uri = None
    parent_id = client.create_run(
        experiment_id, start_time=_ms(execution.started_at), run_name=f"lifecycle-{data.fingerprint[:8]}"
    ).info.run_id
    with mlflow.start_run(run_id=parent_id) as parent:
        mlflow.log_params(_flat_params(cfg.model_dump(mode="json")))
        mlflow.set_tags(
            {
                "llmops.kind": "lifecycle",
                "llmops.task": cfg.task,
                "llmops.data_fingerprint": data.fingerprint,
                "llmops.git_commit": commit,
                "llmops.decision": decision.reason,
                "llmops.execution_key": execution.key,
            }
        )
        splits = {s: data.split_path(s) for s in (*SPLITS, "holdout", "reference")}
        registry.log_data_inputs(splits, data.fingerprint, task.target_column)
        if (data.directory / "data_card.md").is_file():
            mlflow.log_artifact(str(data.directory / "data_card.md"))
        for kind, report in reports.items():
            verdict = decision.verdicts[kind]
            built = Built.of(Path(report.path).parent)
            fresh = built is not None and built.started >= execution.started_at
            child_id = client.create_run(
                experiment_id,
                start_time=_ms(built.started) if built and fresh else None,
                run_name=kind,
                tags={MLFLOW_PARENT_RUN_ID: parent_id},
            ).info.run_id
            with mlflow.start_run(run_id=child_id, nested=True):
                mlflow.log_metrics(report.flat_metrics())
                recipe, search = _without_search(report.recipe)
                mlflow.log_params(_flat_params(_compared(cfg, report)) | _flat_params(recipe, "recipe."))
                if search is not None:
                    _log_search(search)
                notes = report.notes + verdict.notes
                mlflow.set_tags(
                    {
                        "llmops.candidate": kind,
                        "llmops.candidate_key": keys[kind],
                        "llmops.verdict": "passed" if verdict.passed else "rejected",
                        "llmops.reasons": "; ".join(verdict.reasons) or "passed every gate",
                        **({"llmops.notes": "; ".join(notes)} if notes else {}),
                        **({} if fresh else {"llmops.reused": "built by an earlier run of the lifecycle"}),
                    }
                )
                _log_history(Path(report.path))
                if kind == decision.registered and existing is None:
                    model_uri = task.log_model(Path(report.path), data)
            if built and fresh:  # the run spans the candidate's build
                client.set_terminated(child_id, end_time=_ms(built.finished))
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
        if passed and version is not None:
            client.set_registered_model_alias(name, registry.CHALLENGER, version)
        if decision.promote and version is not None:
            result = registry.promote(client, name, version, champion.version_at_start)
            promoted, message, champion_now = result.promoted, result.message, result.champion
        mlflow.set_tag("llmops.outcome", message)
        mlflow.log_text(table, "summary.md")
        mlflow.log_text(config_yaml, "config.yaml")
        mlflow.log_dict(dataclasses.asdict(decision), "decision.json")
        rows = json.loads((data.directory / "data.json").read_text())["rows"]
        card = model_card(name, version, list(reports.values()), decision, data.fingerprint, rows, config_yaml)
        mlflow.log_text(card, "model_card.md")
        if version is not None:
            described = version_description(card, parent.info.run_id)
            client.update_model_version(name, version, description=described[:DESCRIPTION_LIMIT])
            about = model_description(name, cfg.task, data.labels, cfg.model.name_or_path)
            client.update_registered_model(name, description=about[:DESCRIPTION_LIMIT])
    return ReleaseOutcome(parent.info.run_id, experiment_id, decision, version, champion_now, promoted, message, table)


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
