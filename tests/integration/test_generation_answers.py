"""What a person reads from a generator, through every path, and the gates around it.

A registered generator that would answer every prompt with nothing (`tests.tiny_registry.build_eager_ender`) still
answers, at any temperature, through the MLflow model, `llmops predict`, OpenAI's routes (streamed and not) and
the Open Inference Protocol's `generate`; an empty answer comes only when a caller asks for one. Through the
lifecycle, such a model is never promoted, with a classifier champion to judge it and without. A gate on a
metric the run cannot measure is refused before any stage runs, with the overrides that fix it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

import flows.lifecycle as lifecycle_flow
from cli.main import app
from llmops import tasks
from llmops.config import ConfigError, LlmopsConfig, RegistryConfig, ServeConfig, load_config
from tests.conftest import REPO, STUDENT_AND_INT8
from tests.http_service import in_process, openai_client
from tests.tiny_registry import (
    TINY_BERT_DECODER,
    build_eager_ender,
    prefer_ending,
    register_generators,
    register_versions,
    set_alias,
)

LLM_TINY = REPO / "configs" / "llm-tiny.yaml"
NAME = "eager-generator"
PROMPTS = ["classify the sentiment of this tweet: lost my bag again", "write a positive tweet about coachella"]
TEMPERATURES = [0.0, 0.8, 1.5]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("eager")
    uri = register_generators(root, NAME, seeds=[0], build=build_eager_ender)
    set_alias(uri, NAME, "champion", "1")
    return uri


def test_the_mlflow_model_never_answers_empty(store: str) -> None:
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    for temperature in TEMPERATURES:
        out = model.predict(PROMPTS, params={"temperature": temperature, "seed": 1, "max_new_tokens": 5})
        assert (out["text"].str.len() > 0).all() and (out["completion_tokens"] >= 1).all()
    asked = model.predict(PROMPTS, params={"min_new_tokens": 0, "max_new_tokens": 5})
    assert asked["text"].tolist() == ["", ""]  # the caller allowed it


def test_the_cli_never_answers_empty(store: str) -> None:
    for temperature in TEMPERATURES:
        registry = ["--set", f"registry.tracking_uri={store}", "--set", f"registry.model_name={NAME}"]
        ran = CliRunner().invoke(
            app, ["predict", "--config", str(LLM_TINY), *registry, "--temperature", str(temperature), *PROMPTS]
        )
        assert ran.exit_code == 0, ran.output
        lines = ran.output.splitlines()
        answers = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("> ")]
        assert len(answers) == len(PROMPTS) and all(a.strip() and not a.startswith("  (") for a in answers)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_served_routes_never_answer_empty(store: str, tmp_path: Path) -> None:
    serve = ServeConfig(
        models=[NAME],
        poll_interval_s=0.1,
        model_cache=str(tmp_path / "served"),
        prediction_log=str(tmp_path / "predictions.db"),
    )
    async with in_process(LlmopsConfig(registry=RegistryConfig(model_name=NAME), serve=serve), store) as (http, app):
        client = openai_client(app)
        for temperature in TEMPERATURES:
            sampling: dict[str, Any] = {"model": NAME, "max_tokens": 5, "temperature": temperature, "seed": 2}
            whole = await client.completions.create(prompt=PROMPTS[0], **sampling)
            streamed = await client.completions.create(prompt=PROMPTS[0], stream=True, **sampling)
            pieces = "".join([chunk.choices[0].text async for chunk in streamed if chunk.choices])
            assert whole.choices[0].text and pieces == whole.choices[0].text
            messages = [{"role": "user", "content": PROMPTS[1]}]
            chat = await client.chat.completions.create(messages=messages, **sampling)  # type: ignore[arg-type]
            assert chat.choices[0].message.content
            generated = await http.post(
                f"/v2/models/{NAME}/generate",
                json={"text_input": PROMPTS[1], "parameters": {"temperature": temperature, "max_tokens": 5}},
            )
            assert generated.status_code == 200 and generated.json()["text_output"]
        asked = await client.completions.create(
            model=NAME, prompt=PROMPTS[0], max_tokens=5, extra_body={"min_tokens": 0}
        )
        assert asked.choices[0].text == ""


# --- through the lifecycle ------------------------------------------------------------------------------

ONLY_ENDS = [
    "model.random_init=" + json.dumps(TINY_BERT_DECODER),
    "train.learning_rate=1.0e-9",  # training leaves the bias in charge: the end token stays its first choice
    "distill.learning_rate=1.0e-9",
    "distill.student_layers=[0]",
    STUDENT_AND_INT8,
]
EMPTY_ONLY = "gates.answers={max_off_label_share: null, max_truncated_share: null, max_repetition_rate: null}"


@pytest.fixture
def only_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every base model the lifecycle builds prefers to end at once (as a badly trained checkpoint might)."""
    from llmops.generation import train as generation_train

    build = generation_train.load_base_model
    monkeypatch.setattr(
        generation_train, "load_base_model", lambda *args, **kw: prefer_ending(build(*args, **kw), args[2])
    )


@pytest.mark.usefixtures("prefect_server", "only_ends")
@pytest.mark.parametrize("judge", [False, True], ids=["without a classifier champion", "with one"])
def test_a_model_that_only_ends_is_never_promoted(workdir: Path, judge: bool) -> None:
    if judge:
        register_versions(workdir, "tweet-sentiment", seeds=[1])
        set_alias(f"sqlite:///{workdir / 'mlflow.db'}", "tweet-sentiment", "champion", "1")
    result = lifecycle_flow.lifecycle(str(LLM_TINY), [*ONLY_ENDS, EMPTY_ONLY])
    assert not result["promoted"] and result["selected"] is None
    table, note = result["summary"].split("\n\n")
    assert " * " not in table and note.startswith("No candidate is marked *: none passed every gate")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert "tweet-generator" not in {m.name for m in client.search_registered_models() if m.aliases}
    children = client.search_runs(
        [client.get_run(result["parent_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{result['parent_run_id']}'",
    )
    for run in children:
        assert run.data.metrics["empty_share"] == 1.0
        assert "empty share 1.0000 > ceiling 0.0200" in run.data.tags["llmops.reasons"]
        assert ("control_accuracy" in run.data.metrics) is judge
    # without the ceiling, the same candidates (reused, not retrained) pass every other gate: it is what refuses them
    unguarded = lifecycle_flow.lifecycle(str(LLM_TINY), [*ONLY_ENDS, "gates.answers=null"])
    assert unguarded["promoted"]


# --- before any stage runs ------------------------------------------------------------------------------


def chat_file(path: Path, rows: int = 40) -> Path:
    """A user's own chat data: two kinds of request, in the messages format, no instruction column."""
    lines = []
    for i in range(rows):
        ask, answer = (f"classify: order {i} arrived late", "negative") if i % 2 else (f"say hi to {i}", f"hi {i}!")
        lines.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_gate_the_data_cannot_measure_is_refused_before_anything_runs(workdir: Path) -> None:
    source = chat_file(workdir / "chats.jsonl")
    overrides = [f"data.source={source}", "gates.metric=macro_f1", "gates.min_macro_f1=0.5"]
    with pytest.raises(ConfigError) as refused:
        lifecycle_flow.lifecycle(str(LLM_TINY), overrides)
    message = str(refused.value)
    assert "gates.metric gates macro-F1, which this run cannot measure" in message
    assert "data.source has none (its rows carry no instruction kind: data.instruction_column)" in message
    assert "--set 'gates.metric=perplexity' --set 'gates.min_macro_f1=null'" in message
    assert not (workdir / "artifacts").exists()  # no stage ran: no data prepared, nothing trained
    ran = CliRunner().invoke(app, ["run", "--config", str(LLM_TINY), *[a for o in overrides for a in ("--set", o)]])
    assert ran.exit_code == 2 and "error: gates this run cannot apply (nothing was trained)" in ran.output


def test_control_accuracy_is_gated_where_a_judge_exists_or_only_when_measured(workdir: Path) -> None:
    gated = ["gates.min={control_accuracy: 0.5}"]
    with pytest.raises(ConfigError, match="there is no 'tweet-sentiment' champion in the registry") as refused:
        cfg = load_config(LLM_TINY, gated)
        tasks.for_config(cfg).preflight(cfg)
    assert "--set 'gates.min={}'" in str(refused.value) and "gates.when_measured" in str(refused.value)
    cfg = load_config(LLM_TINY, [*gated, "gates.when_measured=[control_accuracy]"])
    plan = tasks.for_config(cfg).preflight(cfg)
    assert any(line.startswith("gates not applied, this run cannot measure: control_accuracy") for line in plan)
    register_versions(workdir, "tweet-sentiment", seeds=[1])
    set_alias(f"sqlite:///{workdir / 'mlflow.db'}", "tweet-sentiment", "champion", "1")
    assert not any("control" in line for line in tasks.for_config(cfg).preflight(cfg))  # a judge: it applies


def test_chat_data_without_instructions_is_gated_on_what_it_can_measure_by_default(workdir: Path) -> None:
    cfg = load_config(None, ["task=causal-lm", f"data.source={chat_file(workdir / 'chats.jsonl')}"])
    plan = tasks.for_config(cfg).preflight(cfg)
    assert plan[0] == "gates: quality compared on perplexity (gates.metric)"
    assert "empty share <= 0.02" in plan[1] and "off-label share" not in plan[1]  # no closed rows to be off-label
    assert "off-label share" in plan[2]  # said: not applied, and why
