"""Monitoring a served generator: generations logged by the real serving app (in-process) against a real
registry, the packaged tweet instructions as traffic. Prompts from the reference's own topics hold; prompts
about a topic held out of the reference (coachella) drift, and the pass decides to retrain the generator
with the window's corrected answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from asgi_lifespan import LifespanManager
from evidently.ui.workspace import Workspace

from llmops.config import LlmopsConfig, load_config
from llmops.generation.data import prepare_data
from monitoring.generation import requested_labels, run_generation_monitor, training_rows
from monitoring.monitor import verdict_lines
from monitoring.window import Side
from serving.app import create_app
from tests.conftest import REPO, Recorder
from tests.tiny_registry import register_generators, register_versions, set_alias

LLM_TINY = REPO / "configs" / "llm-tiny.yaml"
NAME = "monitored-generator"


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    cfg = load_config(LLM_TINY, ["data.sample=1500", "data.holdout_topics=[coachella]"])
    prepared = prepare_data(cfg.data, tmp_path_factory.mktemp("instructions"))
    return {s: pd.read_parquet(prepared.split_path(s)) for s in ("train", "test", "holdout")}


@pytest.fixture
def cfg(workdir: Path, instructions: dict[str, pd.DataFrame]) -> LlmopsConfig:
    uri = register_generators(workdir, NAME, [1], reference=instructions["test"])
    register_versions(workdir, "tweet-sentiment", [1])  # the control classifier
    set_alias(uri, NAME, "champion", "1")
    set_alias(uri, "tweet-sentiment", "champion", "1")
    return load_config(
        LLM_TINY,
        [
            f"registry.tracking_uri={uri}",
            f"registry.model_name={NAME}",
            f"registry.artifact_location={workdir / 'mlartifacts'}",
            f"serve.models=[{NAME}]",
            "serve.poll_interval_s=0.2",
            "monitor.window_size=300",
            "monitor.retrain.min_window=200",
            "monitor.retrain.drift_windows=1",
            "monitor.retrain.of_last=1",
            "monitor.retrain.max_quality_drop=null",
            "monitor.generation.reference_rows=300",
            "monitor.generation.max_new_tokens=8",
        ],
    )


def serve(cfg: LlmopsConfig, rows: pd.DataFrame, corrections: int = 0) -> None:
    """Ask the served generator each row's chat (as clients do) and correct the first `corrections` answers."""

    async def traffic() -> None:
        app = create_app(cfg, tracking_uri=cfg.registry.tracking_uri)
        async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s", timeout=60) as client:
                for i, messages in enumerate(rows["messages"]):
                    body = {"model": NAME, "messages": json.loads(messages), "max_tokens": 8, "temperature": 0}
                    answered = await client.post("/v1/chat/completions", json=body)
                    assert answered.status_code == 200, answered.text
                    if i < corrections:
                        correction = {
                            "request_id": answered.headers["x-request-id"],
                            "completion": rows["completion"].iloc[i],
                        }
                        assert (await client.post("/v1/feedback", json=correction)).status_code == 202

    asyncio.run(traffic())


def test_prompts_like_the_reference_hold(cfg: LlmopsConfig, instructions: dict[str, pd.DataFrame]) -> None:
    serve(cfg, instructions["train"].sample(300, random_state=1))
    recorder = Recorder()
    outcome = run_generation_monitor(cfg, NAME, launcher=recorder)
    summary = json.loads((outcome.report_dir / "summary.json").read_text())  # what a user reads
    assert summary["window"]["rows"] == 300 and summary["reference"]["rows"] == 300
    assert not summary["drift"]["detected"], summary["drift"]["reasons"]
    assert outcome.decision.verdict == "hold" and recorder.requests == []
    generations = summary["generations"]
    assert generations["control"] == "control judged by tweet-sentiment version 1"
    assert generations["window"]["judged"] > 100 and 0 <= generations["window"]["control_accuracy"] <= 1
    assert (outcome.report_dir / "report.html").is_file()
    run = mlflow.get_run(outcome.run_id)
    assert run.data.tags["llmops.model"] == NAME and run.data.tags["llmops.drift"] == "false"
    assert {"drift_prompt", "window_control_accuracy", "drift_g_length"} <= set(run.data.metrics)
    workspace = Workspace(cfg.monitor.workspace)
    project = workspace.search_project(NAME)[0]
    assert len(workspace.list_runs(project.id)) == 2  # drift, decision
    titles = [panel.title for panel in workspace.get_dashboard(project.id).panels]  # a generator's dashboard
    assert "Prompt drift" in titles and "Control, feedback and bias" in titles


def test_a_shifted_topic_decides_to_retrain_with_the_corrected_answers(
    cfg: LlmopsConfig, instructions: dict[str, pd.DataFrame]
) -> None:
    shifted = instructions["holdout"].sample(300, random_state=1)
    assert set(shifted["topic"]) == {"coachella"}
    serve(cfg, shifted, corrections=40)
    recorder = Recorder()
    outcome = run_generation_monitor(cfg, NAME, launcher=recorder)
    assert outcome.summary.drift.detected, outcome.summary.drift
    assert any(reason.startswith("prompt") for reason in outcome.summary.drift.reasons)
    assert outcome.decision.verdict == "retrain"
    (request,) = recorder.requests
    assert request.deployment == "lifecycle/llm" and request.config == "configs/llm-quickstart.yaml"
    extra = pd.read_parquet(request.extra_rows)
    assert len(extra) == 40 and set(extra["completion"]) <= set(shifted["completion"])
    assert f"data.extra_rows={request.extra_rows}" in request.overrides
    assert outcome.summary.retraining["training_rows"] == 40
    lines = verdict_lines(outcome)
    assert f"{NAME} v1" in lines and "300 generations" in lines and "decision: RETRAIN" in lines
    assert "generations: control accuracy" in lines and "40 corrections" in lines


@pytest.mark.usefixtures("prefect_server")
def test_the_monitor_flow_of_the_classifier_covers_the_served_generators(
    cfg: LlmopsConfig, instructions: dict[str, pd.DataFrame], workdir: Path
) -> None:
    from flows.monitor import monitor

    tweets = pd.DataFrame({"text": ["great crew", "lost my bag"], "label": ["positive", "negative"],
                           "topic": ["airline", "airline"]})  # fmt: skip
    register_versions(workdir, "flow-sentiment", [2], reference=tweets)  # the config's own model: a classifier
    register_generators(workdir, "unmonitorable", [3])  # a champion without lineage: its pass fails alone
    set_alias(cfg.registry.tracking_uri, "flow-sentiment", "champion", "1")
    set_alias(cfg.registry.tracking_uri, "unmonitorable", "champion", "1")
    serve(cfg, instructions["test"].sample(300, random_state=2))
    overrides = [
        f"registry.tracking_uri={cfg.registry.tracking_uri}",
        f"registry.artifact_location={cfg.registry.artifact_location}",
        "registry.model_name=flow-sentiment",
        f"serve.models=[flow-sentiment,{NAME},unmonitorable]",
        f"serve.prediction_log={cfg.serve.prediction_log}",
        f"work_dir={cfg.work_dir}",
        f"monitor.reports_dir={cfg.monitor.reports_dir}",
        f"monitor.workspace={cfg.monitor.workspace}",
        "monitor.window_size=300",
        "monitor.generation.reference_rows=300",
        "monitor.generation.max_new_tokens=8",
    ]
    result = monitor(str(REPO / "configs" / "tiny.yaml"), overrides)

    assert result["model"] == "flow-sentiment" and result["decision"]["verdict"] == "no-verdict"  # no traffic
    generated = result["generators"][NAME]
    assert generated["window"]["rows"] == 300 and generated["decision"]["verdict"] == "hold"
    assert generated["generations"]["window"]["judged"] > 100  # judged by tweet-sentiment, as configured
    assert (Path(generated["report_dir"]) / "report.html").is_file()
    assert mlflow.get_run(generated["run_id"]).data.tags["llmops.model"] == NAME
    assert "has no llmops.reference_data tag" in result["generators"]["unmonitorable"]["error"]


def test_the_requested_label_comes_from_the_prompt() -> None:
    prompts = pd.Series(
        ["write a Positive tweet about apple", "classify the sentiment of this tweet: x", "write an odd tweet"]
    )
    assert requested_labels(prompts, r"\bwrite an? (\w+) tweet\b").tolist() == ["positive", None, "odd"]


def test_feedback_becomes_training_rows() -> None:
    frame = pd.DataFrame(
        {
            "prompt": ["a", "b", "c", "d"],
            "messages": ["", "", "", ""],
            "completion": ["x", "y", "z", "w"],
            "rating": [None, 1.0, -1.0, 1.0],
            "correction": ["better", None, None, "best"],
        }
    )
    rows = training_rows(Side(frame, None), good_rating=1.0)
    assert sorted(zip(rows["prompt"], rows["completion"], strict=True)) == [("a", "better"), ("b", "y"), ("d", "best")]
