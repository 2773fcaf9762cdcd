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
    base = report.recipe.get("adapter_of")
    if base:  # the MLflow UI shows what the adapter runs over; serving reads it from candidate.json
        tags["adapter_of"] = f"{base['model']}/{base['version']}"
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


@dataclass(frozen=True)
class _Release:
    """What every step of one release reads: the decision, the candidates, the data, and the lifecycle run."""

    cfg: LlmopsConfig
    task: tasks.Task
    client: MlflowClient
    experiment_id: str
    reports: dict[str, CandidateReport]
    keys: dict[str, str]
    decision: Decision
    data: PreparedData
    execution: Execution
    config_yaml: str
    commit: str

    @property
    def name(self) -> str:
        return self.cfg.registry.model_name

    @property
    def selected(self) -> CandidateReport | None:
        """What passed, else the best rejected candidate (registered for inspection), else none."""
        return self.reports.get(self.decision.registered or "")

    @property
    def passed(self) -> bool:
        return self.selected is not None and self.decision.verdicts[self.selected.kind].passed


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
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    run = _Release(
        cfg, task, client, experiment_id, reports, keys, decision, PreparedData.load(data_dir), execution, config_yaml,
        registry.git_commit(),
    )  # fmt: skip
    existing = registry.find_version_by_key(client, name, keys[run.selected.kind]) if run.selected else None
    table = summary_table(list(reports.values()), decision)
    earlier = _unchanged_rerun(run, existing)
    if earlier is not None:
        message = _count_rerun(client, earlier)
        return ReleaseOutcome(
            earlier.info.run_id, experiment_id, decision, existing, state.version_now, False, message, table
        )
    parent_id = client.create_run(
        experiment_id, start_time=_ms(execution.started_at), run_name=f"lifecycle-{run.data.fingerprint[:8]}"
    ).info.run_id
    with mlflow.start_run(run_id=parent_id):
        _record_execution(run)
        model_uri = _record_candidates(run, parent_id, log_model=existing is None)
        version = _register(run, parent_id, existing, model_uri)
        promoted, message, champion_now = _promote(run, version, state)
        _describe(run, version, parent_id, message, table)
    return ReleaseOutcome(parent_id, experiment_id, decision, version, champion_now, promoted, message, table)


def _unchanged_rerun(run: _Release, existing: str | None) -> Run | None:
    """The run that recorded this execution, when its candidate is registered already and the registry would not
    change (nothing to promote, no new challenger); else None."""
    if existing is None or run.decision.promote:
        return None
    earlier = _recorded(run.client, run.experiment_id, run.execution)
    unchanged = not run.passed or registry.alias_version(run.client, run.name, registry.CHALLENGER) == existing
    return earlier if unchanged else None


def _record_execution(run: _Release) -> None:
    """The lifecycle run: the config as params, lineage tags, the data splits as MLflow dataset inputs."""
    data = run.data
    mlflow.log_params(_flat_params(run.cfg.model_dump(mode="json")))
    mlflow.set_tags(
        {
            "llmops.kind": "lifecycle",
            "llmops.task": run.cfg.task,
            "llmops.data_fingerprint": data.fingerprint,
            "llmops.git_commit": run.commit,
            "llmops.decision": run.decision.reason,
            "llmops.execution_key": run.execution.key,
        }
    )
    splits = {s: data.split_path(s) for s in (*SPLITS, "holdout", "reference")}
    registry.log_data_inputs(splits, data.fingerprint, run.task.target_column)
    if (data.directory / "data_card.md").is_file():
        mlflow.log_artifact(str(data.directory / "data_card.md"))


def _record_candidates(run: _Release, parent_id: str, log_model: bool) -> str | None:
    """One child run per candidate, spanning its build: metrics, compared settings, verdict, training log. The
    selected candidate's MLflow model is logged in its run (`log_model`: it has no version yet); returns its URI."""
    model_uri = None
    for kind, report in run.reports.items():
        verdict = run.decision.verdicts[kind]
        built = Built.of(Path(report.path).parent)
        fresh = built is not None and built.started >= run.execution.started_at
        child_id = run.client.create_run(
            run.experiment_id,
            start_time=_ms(built.started) if built and fresh else None,
            run_name=kind,
            tags={MLFLOW_PARENT_RUN_ID: parent_id},
        ).info.run_id
        with mlflow.start_run(run_id=child_id, nested=True):
            mlflow.log_metrics(report.flat_metrics())
            recipe, search = _without_search(report.recipe)
            mlflow.log_params(_flat_params(_compared(run.cfg, report)) | _flat_params(recipe, "recipe."))
            if search is not None:
                _log_search(search)
            notes = report.notes + verdict.notes
            mlflow.set_tags(
                {
                    "llmops.candidate": kind,
                    "llmops.candidate_key": run.keys[kind],
                    "llmops.verdict": "passed" if verdict.passed else "rejected",
                    "llmops.reasons": "; ".join(verdict.reasons) or "passed every gate",
                    **({"llmops.notes": "; ".join(notes)} if notes else {}),
                    **({} if fresh else {"llmops.reused": "built by an earlier run of the lifecycle"}),
                }
            )
            _log_history(Path(report.path))
            if kind == run.decision.registered and log_model:
                model_uri = run.task.log_model(Path(report.path), run.data)
        if built and fresh:  # the run spans the candidate's build
            run.client.set_terminated(child_id, end_time=_ms(built.finished))
    return model_uri


def _register(run: _Release, parent_id: str, existing: str | None, model_uri: str | None) -> str | None:
    """The selected candidate's version: a new one with its lineage tags, or (a rerun) the existing one with its
    verdict refreshed. None when no candidate was selected."""
    selected = run.selected
    if selected is None:
        return existing
    tags = _version_tags(
        selected, run.decision, run.keys[selected.kind], run.data, parent_id, run.config_yaml, run.commit
    )
    if existing is None:
        return registry.register(run.name, model_uri or "", tags)
    verdict_tags = registry.encode_tags({k: tags[k] for k in ("verdict", "reasons")})
    for key, value in verdict_tags.items():
        run.client.set_model_version_tag(run.name, existing, key, value)
    return existing


def _promote(run: _Release, version: str | None, state: ChampionState) -> tuple[bool, str, str | None]:
    """A passing version becomes the challenger; the champion, when the policy says so and nobody promoted
    another version meanwhile. Returns (promoted, what happened, the champion now)."""
    if run.passed and version is not None:
        run.client.set_registered_model_alias(run.name, registry.CHALLENGER, version)
    if not (run.decision.promote and version is not None):
        return False, run.decision.reason, state.version_now
    result = registry.promote(run.client, run.name, version, state.version_at_start)
    return result.promoted, result.message, result.champion


def _describe(run: _Release, version: str | None, parent_id: str, outcome: str, table: str) -> None:
    """The outcome, the closing table, the config, the decision and the model card on the lifecycle run; the card
    as the version's description, and what the model is as the registered model's."""
    mlflow.set_tag("llmops.outcome", outcome)
    mlflow.log_text(table, "summary.md")
    mlflow.log_text(run.config_yaml, "config.yaml")
    mlflow.log_dict(dataclasses.asdict(run.decision), "decision.json")
    rows = json.loads((run.data.directory / "data.json").read_text())["rows"]
    reports = list(run.reports.values())
    card = model_card(run.name, version, reports, run.decision, run.data.fingerprint, rows, run.config_yaml)
    mlflow.log_text(card, "model_card.md")
    if version is None:
        return
    described = version_description(card, parent_id)
    run.client.update_model_version(run.name, version, description=described[:DESCRIPTION_LIMIT])
    about = model_description(run.name, run.cfg.task, run.data.labels, run.cfg.model.name_or_path)
    run.client.update_registered_model(run.name, description=about[:DESCRIPTION_LIMIT])


def current_champion(cfg: LlmopsConfig) -> str | None:
    """The champion's version when the flow starts: promotion later is compare-and-set against it."""
    client = registry.setup_tracking(cfg.registry)
    return registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)


def adapter_base(cfg: LlmopsConfig) -> LlmopsConfig:
    """An adapter run (`train.lora.adapter_of`) with its base resolved: `adapter_of` names the exact version and
    `model.name_or_path` that version's candidate folder (downloaded once under `work_dir/bases`). Other runs are
    returned as they are."""
    lora = cfg.train.lora
    if lora is None or lora.adapter_of is None:
        return cfg
    from llmops.generation.adapters import resolve_base

    registry.setup_tracking(cfg.registry)
    uri = registry.resolve_tracking_uri(cfg.registry)
    ref, folder = resolve_base(lora.adapter_of, uri, Path(cfg.work_dir).resolve() / "bases")
    train = cfg.train.model_copy(update={"lora": lora.model_copy(update={"adapter_of": f"{ref.model}/{ref.version}"})})
    model = cfg.model.model_copy(update={"name_or_path": str(folder), "random_init": None})
    return cfg.model_copy(update={"model": model, "train": train})


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
