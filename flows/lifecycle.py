"""The `lifecycle` flow: raw data to a gated, promoted champion, for classifiers and generators. Wiring only.

Each task calls one `llmops` function and passes paths, never models or data; `llmops.tasks` picks each
stage's implementation for the configured task (`sequence-classification`, `causal-lm`, `seq2seq-lm`).
Expensive stages are cached by content (`llmops.cache`): rerunning an unchanged
config reuses every folder and registers nothing new.

    python -m flows.lifecycle --config configs/quickstart.yaml --set train.epochs=1
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from llmops import quantize, release, tasks
from llmops.cache import cached_stage, stage_key
from llmops.checkpoints import ModelLoadError
from llmops.config import ConfigError, LlmopsConfig, RayStage, load_config
from llmops.gates import CandidateReport
from llmops.ports import cluster_env, node_address
from llmops.prepared_data import DataError

BAD_INPUT = (ConfigError, DataError, ModelLoadError)
RAY_CWD = "LLMOPS_RAY_CWD"
"""The flow's working directory, given to its Ray job: every node runs the stages from there."""

if (_cwd := os.environ.get(RAY_CWD)) is not None:  # this process is a Ray worker of a lifecycle on a cluster
    if not Path(_cwd).is_dir():
        raise RuntimeError(
            f"{_cwd} is not visible on {node_address()}: on a Ray cluster, the lifecycle's working directory "
            "(its work_dir, data and registry) must be on storage every node sees at the same path (docs/scale.md)"
        )
    os.chdir(_cwd)


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures; bad input fails the same way every time."""
    try:
        state.result()
    except BAD_INPUT:
        return False
    except Exception:
        return True
    return False


io_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_bad_input)
compute_task = task(cache_policy=NO_CACHE)


def _stage(cfg: LlmopsConfig, name: str, *inputs: Any) -> Path:
    return Path(cfg.work_dir) / name / stage_key(*inputs)


def _cached(folder: Path, build: Any) -> str:
    path, was_cached = cached_stage(folder, build)
    if was_cached:
        get_run_logger().info("cached: reusing %s", path)
    return str(path)


@compute_task
def preflight(cfg: LlmopsConfig) -> None:
    for line in tasks.for_config(cfg).preflight(cfg):
        get_run_logger().info(line)


@io_task
def current_champion(cfg: LlmopsConfig) -> str | None:
    return release.current_champion(cfg)


@io_task
def adapter_base(cfg: LlmopsConfig) -> LlmopsConfig:
    return release.adapter_base(cfg)


@io_task
def evaluation_context(cfg: LlmopsConfig) -> dict[str, Any]:
    return tasks.for_config(cfg).eval_context(cfg)


@io_task
def prepare_data(cfg: LlmopsConfig) -> str:
    build = tasks.for_config(cfg).prepare_data
    return _cached(_stage(cfg, "data", cfg.task, cfg.data), lambda tmp: build(cfg.data, tmp))


@compute_task
def fine_tune(cfg: LlmopsConfig, data_dir: str) -> str:
    folder = _stage(cfg, "teacher", data_dir, cfg.model, cfg.train)
    return _cached(folder, lambda tmp: tasks.for_config(cfg).fine_tune(cfg, data_dir, tmp)) + "/model"


@compute_task
def distil(cfg: LlmopsConfig, teacher_dir: str, data_dir: str) -> str:
    folder = _stage(cfg, "student", teacher_dir, cfg.distill, cfg.train.loss_per)
    return _cached(folder, lambda tmp: tasks.for_config(cfg).distil(cfg, teacher_dir, data_dir, tmp)) + "/model"


@compute_task
def quantize_student(cfg: LlmopsConfig, student_dir: str, kind: str, data_dir: str) -> str:
    folder = _stage(cfg, kind, student_dir, kind, cfg.quantize)
    build = lambda tmp: quantize.quantize_candidate(student_dir, kind, cfg.quantize, tmp / "model", data_dir)  # noqa: E731
    return _cached(folder, build) + "/model"


@compute_task
def evaluate_candidate(cfg: LlmopsConfig, candidate_dir: str, data_dir: str, context: dict[str, Any]) -> str:
    folder = _stage(cfg, "eval", candidate_dir, cfg.eval, data_dir, context)
    evaluate = tasks.for_config(cfg).evaluate
    build = lambda tmp: evaluate(cfg, candidate_dir, data_dir, context).save(tmp / "report.json")  # noqa: E731
    return _cached(folder, build) + "/report.json"


@io_task
def score_champion(
    cfg: LlmopsConfig, version: str | None, data_dir: str, known: dict[str, float | None], context: dict[str, Any]
) -> release.ChampionState:
    return release.score_champion(cfg, version, data_dir, known, Path(cfg.work_dir) / "champions", context)


@io_task
def release_candidates(
    cfg: LlmopsConfig,
    report_paths: dict[str, str],
    keys: dict[str, str],
    champion: release.ChampionState,
    data_dir: str,
    execution: release.Execution,
) -> release.ReleaseOutcome:
    reports = {kind: CandidateReport.load(path) for kind, path in report_paths.items()}
    return release.release(cfg, reports, keys, champion, data_dir, execution)


def candidate_key(candidate_dir: str) -> str:
    """The content key of a candidate: the stage folder it was built in."""
    return Path(candidate_dir).parent.name


def ray_address(cfg: LlmopsConfig) -> str | None:
    """The Ray cluster the stages run on: `ray.address`, else `RAY_ADDRESS`; None: this process."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def on_ray() -> bool:
    """Whether this flow runs with prefect-ray's task runner (its tasks go to the cluster)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is not None and type(context.task_runner).__name__ == "RayTaskRunner"


def _stage_run(cfg: LlmopsConfig, stage: str, task: Any, *args: Any) -> Callable[[], Any]:
    """Start `task(*args)`: here, or on the Ray cluster with what `ray.stages[stage]` asks of a node; returns
    how to wait for its result."""
    if not on_ray():
        result = task(*args)
        return lambda: result
    from prefect_ray.context import remote_options

    with remote_options(**ray_options(cfg, stage)):
        future = task.submit(*args)
    return future.result


def ray_options(cfg: LlmopsConfig, stage: str) -> dict[str, Any]:
    """What a stage's task asks of its node (`ray.stages[stage]`, 1 CPU by default), as Ray's remote options."""
    if stage == "fine_tune" and cfg.train.processes > 1:
        # The task only waits for its Ray Train workers, each of which asks for what ray.stages.fine_tune says.
        return {"num_cpus": 0, "num_gpus": 0}
    wanted = cfg.ray.stages.get(stage) or RayStage()  # type: ignore[call-overload]
    options: dict[str, Any] = {"num_cpus": wanted.num_cpus, "num_gpus": wanted.num_gpus}
    if wanted.memory_gb is not None:
        options["memory"] = int(wanted.memory_gb * 2**30)
    return options


def _on_cluster(address: str, config: str, overrides: list[str]) -> dict[str, Any]:
    """The lifecycle as a subflow whose stages run on the Ray cluster at `address` (prefect-ray)."""
    on_ray = lifecycle.with_options(name="lifecycle-on-ray", task_runner=ray_task_runner(address))
    return on_ray(config, overrides)


def ray_task_runner(address: str) -> Any:
    """prefect-ray's task runner on the cluster at `address` (`local`: a Ray instance of this machine's cores,
    started for the flow and stopped after it): its workers run from this working directory, with this process's
    settings (`llmops.ports.cluster_env`)."""
    from prefect_ray import RayTaskRunner

    env = cluster_env() | {RAY_CWD: os.getcwd()}
    local = {"include_dashboard": False, "log_to_driver": False} if address == "local" else {}
    return RayTaskRunner(address=address, init_kwargs={"runtime_env": {"env_vars": env}} | local)


def evaluate_all(
    cfg: LlmopsConfig, candidates: dict[str, str], data_dir: str, context: dict[str, Any]
) -> dict[str, str]:
    """Report paths by candidate kind: one after the other, or at once on Ray (`eval.parallel: ray`): on the
    cluster the lifecycle runs on, else on a Ray instance started here for the evaluation."""
    if on_ray():
        started = {kind: _stage_run(cfg, "evaluate", evaluate_candidate, cfg, path, data_dir, context)
                   for kind, path in candidates.items()}  # fmt: skip
        return {kind: wait() for kind, wait in started.items()}
    if cfg.eval.parallel == "none":
        # Sequential by default: candidates timed side by side must not share the cores.
        return {kind: evaluate_candidate(cfg, path, data_dir, context) for kind, path in candidates.items()}

    @flow(name="evaluate-candidates", task_runner=ray_task_runner("local"))
    def on_local_ray() -> dict[str, str]:
        return evaluate_all(cfg, candidates, data_dir, context)  # on_ray() now: each candidate a task

    return on_local_ray()


@flow(name="lifecycle", log_prints=True)
def lifecycle(config: str = "configs/quickstart.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Data -> teacher -> student -> quantized candidates -> evaluation -> gates -> registry (an adapter run:
    data -> adapter over its registered base -> evaluation -> gates -> registry)."""
    started_at = time.time()
    cfg = load_config(config, overrides)
    address = ray_address(cfg)
    if address is not None and not on_ray():
        return _on_cluster(address, config, overrides or [])
    champion_at_start = current_champion(cfg)
    preflight(cfg)
    cfg = adapter_base(cfg)
    context = evaluation_context(cfg)
    data_dir = _stage_run(cfg, "data", prepare_data, cfg)()
    teacher = _stage_run(cfg, "fine_tune", fine_tune, cfg, data_dir)()
    candidates, skipped = {"teacher": teacher}, {}
    # an adapter (`train.lora.adapter_of`) is released as trained: it runs over its base, not a smaller student
    adapter = cfg.train.lora is not None and cfg.train.lora.adapter_of is not None
    student = teacher if adapter else _stage_run(cfg, "distil", distil, cfg, teacher, data_dir)()
    quantized: dict[str, Callable[[], Any]] = {}  # at once on a cluster, one after the other here
    for kind in [] if adapter else cfg.quantize.candidates:
        reason = quantize.unavailable(student, kind)
        if reason is not None:
            skipped[kind] = reason
            print(f"quantize.candidates: {kind} skipped: {reason}")
            continue
        quantized[quantize.KIND_OF.get(kind, kind)] = (
            (lambda: student)
            if kind == "fp32"
            else _stage_run(cfg, "quantize", quantize_student, cfg, student, kind, data_dir)
        )
    candidates |= {kind: wait() for kind, wait in quantized.items()}
    reports = evaluate_all(cfg, candidates, data_dir, context)
    keys = {kind: candidate_key(path) for kind, path in candidates.items()}
    known = {keys[k]: CandidateReport.load(p).metrics.get(cfg.gates.metric) for k, p in reports.items()}
    champion = score_champion(cfg, champion_at_start, data_dir, known, context)
    # Candidates and their evaluations are content-keyed folders: the same key, the same execution (MLflow shows one).
    execution = release.Execution(stage_key(reports, cfg.gates, cfg.registry.model_name), started_at)
    outcome = release_candidates(cfg, reports, keys, champion, data_dir, execution)
    print(f"\n{outcome.summary}\n\n{outcome.message}")
    return {
        "task": cfg.task,
        "model": cfg.registry.model_name,
        "version": outcome.version,
        "champion": outcome.champion,
        "promoted": outcome.promoted,
        "selected": outcome.decision.selected,
        "message": outcome.message,
        "parent_run_id": outcome.parent_run_id,
        "experiment_id": outcome.experiment_id,
        "summary": outcome.summary,
        "candidates": candidates,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the lifecycle flow as a plain Prefect flow.")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    lifecycle(args.config, args.overrides)


if __name__ == "__main__":
    main()
