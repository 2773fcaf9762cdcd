"""Bad input stops the flow before training, with a message naming the problem; nothing is registered."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import TINY_CONFIG
from tests.tiny_registry import build_tiny_candidate

pytestmark = pytest.mark.usefixtures("prefect_server")


def _csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def _undecodable(path: Path) -> str:
    path.write_bytes("text,sentiment\ncaf\xe9,positive\nbad,negative\n".encode("latin-1"))
    return str(path)


CASES = {
    "unknown-key": (lambda d: ["train.epochz=1"], "train.epochz: unknown key"),
    "wrong-type": (lambda d: ["train.epochs=many"], "train.epochs"),
    "missing-column": (
        lambda d: [f"data.source={_csv(d / 'x.csv', pd.DataFrame({'body': ['a'], 'sentiment': ['x']}))}"],
        "column 'text' not found",
    ),
    "empty-dataset": (
        lambda d: [f"data.source={_csv(d / 'x.csv', pd.DataFrame({'text': [' '], 'sentiment': ['x']}))}"],
        "empty after cleaning",
    ),
    "single-class": (
        lambda d: [f"data.source={_csv(d / 'x.csv', pd.DataFrame({'text': ['a', 'b'], 'sentiment': ['x', 'x']}))}"],
        "single class",
    ),
    "undecodable-file": (lambda d: [f"data.source={_undecodable(d / 'x.csv')}"], "not valid utf-8"),
    "missing-model-path": (lambda d: [f"model.name_or_path={d / 'no-model'}"], "not a model folder"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_with_a_named_error(case: str, workdir: Path) -> None:
    overrides, message = CASES[case]
    args = ["run", "--config", str(TINY_CONFIG)]
    for item in overrides(workdir):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (workdir / "artifacts" / "teacher").exists()  # stopped before training
    if (workdir / "mlflow.db").exists():
        assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_registered_models() == []


def test_rollback_without_previous_champion_is_a_clear_error(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["rollback", "--config", str(TINY_CONFIG)])
    assert result.exit_code == 2
    assert "no 'previous-champion' alias" in result.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "has no 'champion' alias: nothing to monitor"),
        (["monitor.window_size=0"], "monitor.window_size"),
        (["monitor.bias.slices=[{name: x, regex: '('}]"], "invalid regex"),
    ],
    ids=["no-champion", "bad-window", "bad-slice"],
)
def test_monitor_without_a_champion_or_with_a_bad_config_is_named(
    overrides: list[str], message: str, workdir: Path
) -> None:
    args = ["monitor", "--config", str(TINY_CONFIG)]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (workdir / "reports").exists()


# --- generative tasks: the same promise ------------------------------------------------------------------------

LLM_TINY = TINY_CONFIG.with_name("llm-tiny.yaml")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _classifier_folder(directory: Path) -> str:
    return str(build_tiny_candidate(directory / "classifier", seed=0))


LLM_CASES = {
    "neither-format": (
        lambda d: [f"data.source={_jsonl(d / 'x.jsonl', [{'text': 'a', 'label': 'b'}] * 10)}"],
        "neither 'prompt'/'completion' columns nor a 'messages' column",
    ),
    "empty-completions": (
        lambda d: [
            "data.source="
            + _jsonl(d / "x.jsonl", [{"prompt": f"q{i}", "completion": "" if i % 5 == 0 else "a"} for i in range(20)])
        ],
        "4 of 20 rows have an empty completion (rows 0, 5, 10, 15)",
    ),
    "classifier-checkpoint": (
        lambda d: [f"model.name_or_path={_classifier_folder(d)}", "model.random_init=null"],
        "is a BertForSequenceClassification checkpoint (a classifier); task causal-lm needs",
    ),
    "unknown-task": (lambda d: ["task=summarisation"], "task: Input should be"),
    "transfer-rows": (lambda d: ["distill.transfer_rows=100"], "distill.transfer_rows is for classification"),
    "unknown-gate-metric": (lambda d: ["gates.min={bleu: 0.3}"], "gates name metrics a causal-lm evaluation"),
}


@pytest.mark.parametrize("case", LLM_CASES)
def test_bad_generative_input_stops_with_a_named_error(case: str, workdir: Path) -> None:
    overrides, message = LLM_CASES[case]
    args = ["run", "--config", str(LLM_TINY)]
    for item in overrides(workdir):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (workdir / "artifacts" / "teacher").exists()  # stopped before training
    if (workdir / "mlflow.db").exists():
        assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_registered_models() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--ray needs a Ray cluster: --ray-address HOST:PORT or RAY_ADDRESS"),
        (["--set", "serve.min_replicas=3", "--set", "serve.max_replicas=2"], "serve.max_replicas (2) below"),
    ],
)
def test_serving_on_ray_without_a_cluster_or_with_replicas_upside_down_is_named(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--ray", "--config", str(TINY_CONFIG), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # nothing was started
