"""What differs by task, in one table: each lifecycle stage's implementation for classifiers and generators.

The flow (`flows/lifecycle.py`), the stage cache, the gates, the registry and the release are shared and call
the stages through here. Classification lives in `llmops/classification/`, generation in `llmops/generation/`,
each with the same module names (`data`, `modeling`, `train`, `distill`, `candidate`, `evaluate`,
`mlflow_model`); what both use sits beside this module (`training`, `launcher`, `students`, `candidate_folder`,
`prepared_data`, `corpus`, `checkpoints`). Quantization is shared: it reads the task from the candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from llmops.config import DataConfig, LlmopsConfig
from llmops.gates import CandidateReport, Scoring
from llmops.prepared_data import PreparedData


@dataclass(frozen=True)
class Task:
    name: str
    scoring: Scoring
    preflight: Callable[[LlmopsConfig], list[str]]
    """Fail before any stage runs if the model cannot serve this task or the gates name what this run cannot
    measure; returns what the user should read before training starts."""
    prepare_data: Callable[[DataConfig, Path], PreparedData]
    fine_tune: Callable[[LlmopsConfig, str, Path], Path]
    """(cfg, data_dir, stage folder) -> the teacher candidate folder."""
    distil: Callable[[LlmopsConfig, str, str, Path], Path]
    """(cfg, teacher_dir, data_dir, stage folder) -> the student candidate folder."""
    eval_context: Callable[[LlmopsConfig], dict[str, Any]]
    """What evaluation depends on beyond the candidate and the data (resolved once per run; part of its key)."""
    evaluate: Callable[[LlmopsConfig, str, str, dict[str, Any]], CandidateReport]
    """(cfg, candidate_dir, data_dir, context) -> every metric of the candidate."""
    measure_quality: Callable[[LlmopsConfig, str, str, dict[str, Any]], dict[str, float]]
    """The quality metrics alone (the champion's, on this run's test rows, for non-inferiority)."""
    log_model: Callable[[Path, PreparedData], str]
    """Log the candidate as an MLflow model in the active run; returns its model URI."""
    target_column: str
    """The column MLflow's dataset inputs name as the target."""


def _test(data_dir: str) -> Path:
    return PreparedData.load(data_dir).split_path("test")


# --- classification --------------------------------------------------------------------------------------


def _classifier_preflight(cfg: LlmopsConfig) -> list[str]:
    from llmops.checkpoints import preflight

    preflight(cfg.model)
    return []


def _classifier_fine_tune(cfg: LlmopsConfig, data_dir: str, out: Path) -> Path:
    from llmops.classification.train import fine_tune
    from llmops.launcher import run_fine_tune

    return run_fine_tune(fine_tune, cfg.model, cfg.train, cfg.task, data_dir, out, cfg.ray.stages.get("fine_tune"))


def _classifier_distil(cfg: LlmopsConfig, teacher_dir: str, data_dir: str, out: Path) -> Path:
    from llmops.classification import distill

    return distill.distil(cfg.distill, teacher_dir, PreparedData.load(data_dir), out)


def _classifier_evaluate(cfg: LlmopsConfig, candidate_dir: str, data_dir: str, context: dict) -> CandidateReport:
    from llmops.classification import evaluate

    return evaluate.evaluate_candidate(candidate_dir, _test(data_dir), cfg.eval)


def _classifier_quality(cfg: LlmopsConfig, candidate_dir: str, data_dir: str, context: dict) -> dict[str, float]:
    from llmops.classification import evaluate

    return evaluate.evaluate_quality(candidate_dir, _test(data_dir), cfg.eval)


def _classifier_log_model(candidate_dir: Path, data: PreparedData) -> str:
    from llmops import registry

    examples = pd.read_parquet(data.split_path("test"))["text"].head(3).tolist()
    return registry.log_candidate_model(candidate_dir, data.labels, examples)


def _classification() -> Task:
    from llmops.classification import data, evaluate

    return Task(
        name="sequence-classification",
        scoring=evaluate.SCORING,
        preflight=_classifier_preflight,
        prepare_data=data.prepare_data,
        fine_tune=_classifier_fine_tune,
        distil=_classifier_distil,
        eval_context=lambda cfg: {},
        evaluate=_classifier_evaluate,
        measure_quality=_classifier_quality,
        log_model=_classifier_log_model,
        target_column="label",
    )


# --- generation ------------------------------------------------------------------------------------------


def _generator_preflight(cfg: LlmopsConfig) -> list[str]:
    from llmops.generation.modeling import check_checkpoint, qlora_config

    check_checkpoint(cfg.model, cfg.task)
    if cfg.train.lora is not None and cfg.train.lora.qlora:
        qlora_config()  # no GPU: a clear error now, not after the data stage
    return _check_gates(cfg)


def _no_judge(cfg: LlmopsConfig) -> str | None:
    """Why no classifier can judge control accuracy (None: one can)."""
    name = cfg.eval.generation.control_model
    if name is None:
        return "eval.generation.control_model is null"
    if _control_context(cfg)["control_version"] is None:
        return f"there is no '{name}' champion in the registry to judge it (its lifecycle registers one: make run)"
    return None


def _check_gates(cfg: LlmopsConfig) -> list[str]:
    """Refuse gates on metrics this run cannot measure (a ConfigError naming the fix); say what will be gated."""
    from llmops import gates
    from llmops.config import ConfigError
    from llmops.generation.data import row_kinds
    from llmops.generation.evaluate import unmeasurable

    why_not = unmeasurable(cfg.eval.generation, row_kinds(cfg.data), _no_judge(cfg))
    refused = gates.refusal(cfg.gates, why_not, fallback_metric="perplexity")
    if refused is not None:
        raise ConfigError(refused)
    return gates.gate_plan(cfg.gates, why_not)


def _generator_fine_tune(cfg: LlmopsConfig, data_dir: str, out: Path) -> Path:
    from llmops.generation.train import fine_tune
    from llmops.launcher import run_fine_tune

    return run_fine_tune(fine_tune, cfg.model, cfg.train, cfg.task, data_dir, out, cfg.ray.stages.get("fine_tune"))


def _generator_distil(cfg: LlmopsConfig, teacher_dir: str, data_dir: str, out: Path) -> Path:
    from llmops.generation import distill

    return distill.distil(cfg.distill, teacher_dir, PreparedData.load(data_dir), out, cfg.train.loss_per)


def _control_context(cfg: LlmopsConfig) -> dict[str, Any]:
    """The classifier champion that judges generations: its name and version (None: there is none)."""
    from llmops import registry

    name = cfg.eval.generation.control_model
    if name is None:
        return {"control_model": None, "control_version": None}
    client = registry.setup_tracking(cfg.registry)
    return {"control_model": name, "control_version": registry.alias_version(client, name, registry.CHAMPION)}


def control_judge(cfg: LlmopsConfig, context: dict[str, Any]) -> Any:
    """The classifier champion of `context` that judges control accuracy, loaded (None: there is none)."""
    from llmops import registry
    from llmops.classification.candidate import Classifier
    from llmops.generation.evaluate import Control

    name, version = context.get("control_model"), context.get("control_version")
    if name is None or version is None:
        return None
    registry.setup_tracking(cfg.registry)
    folder = Path(cfg.work_dir) / "champions" / f"{name}-v{version}"
    if not (folder / "done").is_file():
        registry.download_candidate(name, version, folder)
        (folder / "done").touch()
    candidate = next(folder.rglob("candidate.json")).parent
    return Control(name, version, Classifier(candidate))


def _generator_evaluate(cfg: LlmopsConfig, candidate_dir: str, data_dir: str, context: dict) -> CandidateReport:
    from llmops.generation import evaluate

    return evaluate.evaluate_candidate(candidate_dir, _test(data_dir), cfg.eval, control_judge(cfg, context))


def _generator_quality(cfg: LlmopsConfig, candidate_dir: str, data_dir: str, context: dict) -> dict[str, float]:
    from llmops.generation import evaluate
    from llmops.generation.loading import load_generator

    test = pd.read_parquet(_test(data_dir))
    judge = control_judge(cfg, context)
    return evaluate.evaluate_quality(load_generator(candidate_dir), test, cfg.eval.generation, judge)[0]


def _generator_log_model(candidate_dir: Path, data: PreparedData) -> str:
    from llmops import registry
    from llmops.generation.evaluate import prompts_of

    examples = prompts_of(pd.read_parquet(data.split_path("test")).head(2))
    return registry.log_generator_model(candidate_dir, [p if isinstance(p, str) else {"messages": p} for p in examples])


def _generation(name: str) -> Task:
    from llmops.generation import data
    from llmops.generation.evaluate import SCORING

    return Task(
        name=name,
        scoring=SCORING,
        preflight=_generator_preflight,
        prepare_data=data.prepare_data,
        fine_tune=_generator_fine_tune,
        distil=_generator_distil,
        eval_context=_control_context,
        evaluate=_generator_evaluate,
        measure_quality=_generator_quality,
        log_model=_generator_log_model,
        target_column="completion",
    )


def for_config(cfg: LlmopsConfig) -> Task:
    """The stage implementations of `cfg.task`."""
    return _generation(cfg.task) if cfg.generative else _classification()
