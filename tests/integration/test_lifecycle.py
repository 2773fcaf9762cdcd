"""The lifecycle flow on a tiny random-init BERT, against a real MLflow store and a real Prefect server.

The tests in this module share one registry and run in order: first run,
unchanged rerun, a rejected candidate, the same candidate passing, rollback,
and a champion that moves while a flow evaluates.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

import flows.lifecycle as lifecycle_flow
from cli.main import app
from llmops import registry
from llmops.cache import Built
from tests.conftest import STUDENT_AND_INT8, TINY_CONFIG

NAME = "tweet-sentiment"
pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def run(*overrides: str) -> dict:
    return lifecycle_flow.lifecycle(str(TINY_CONFIG), list(overrides))


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


def tags(client: MlflowClient, version: str) -> dict[str, str]:
    return dict(client.get_model_version(NAME, version).tags)


@pytest.fixture(scope="module")
def first(home: Path, prefect_server: None) -> dict:
    return run()


def test_first_run_promotes_a_gated_champion(first: dict, client: MlflowClient) -> None:
    assert first["promoted"] and first["version"] == "1"
    assert aliases(client) == {"champion": "1", "challenger": "1"}
    version_tags = tags(client, "1")
    assert version_tags["llmops.candidate"] == first["selected"]
    assert first["selected"] in {"teacher", "student", "int8", "bnb-int8", "nf4", "onnx-fp32", "onnx-int8"}
    assert version_tags["llmops.verdict"] == "passed"
    assert version_tags["llmops.parent_run_id"] == first["parent_run_id"]
    for key in ("data_fingerprint", "candidate_key", "train_data", "reference_data", "config", "git_commit"):
        assert version_tags[f"llmops.{key}"], key


def test_parent_run_holds_one_child_per_candidate(first: dict, client: MlflowClient) -> None:
    parent = client.get_run(first["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["llmops.candidate"] for r in children) == [
        "bnb-int8",
        "int8",
        "nf4",
        "onnx-fp32",
        "onnx-int8",
        "student",
        "teacher",
    ]
    for child in children:
        assert {"macro_f1", "accuracy", "latency_p50_ms", "throughput_per_s", "size_mb"} <= set(child.data.metrics)
        # What the Compare view compares, under one name on every candidate.
        assert {"candidate", "learning_rate", "epochs", "batch_size", "layers", "quantization"} <= set(
            child.data.params
        )
        if child.data.tags["llmops.candidate"] != "teacher":
            assert {"student_layers", "temperature", "alpha"} <= set(child.data.params)
        # Real durations: each candidate's run spans its build, inside the lifecycle's run.
        assert parent.info.start_time <= child.info.start_time <= child.info.end_time <= parent.info.end_time
    int8 = next(c for c in children if c.data.tags["llmops.candidate"] == "int8")  # its accuracy-aware search
    assert int8.data.params["int8_search.max_loss"] == "0.005" and "search/macro_f1" in int8.data.metrics
    assert "quantization_search.json" in {a.path for a in client.list_artifacts(int8.info.run_id)}
    teacher = next(c for c in children if c.data.tags["llmops.candidate"] == "teacher")
    assert teacher.info.end_time - teacher.info.start_time > 100  # ms: fine-tuning, not the moment it was logged
    assert parent.info.end_time - parent.info.start_time > sum(c.info.end_time - c.info.start_time for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"model_card.md", "summary.md", "decision.json", "config.yaml", "data"} <= artifacts
    assert {i.dataset.name.split("-")[0] for i in parent.inputs.dataset_inputs} == {
        "train",
        "validation",
        "test",
        "holdout",
        "reference",
    }


def test_the_registry_and_experiment_read_as_a_user_expects(first: dict, client: MlflowClient) -> None:
    model = client.get_registered_model(NAME)
    assert "`champion` is the version `llmops serve` serves" in model.description
    version = client.get_model_version(NAME, "1")
    assert version.description.startswith(f"# {NAME} version 1") and "## Decision" in version.description
    assert first["parent_run_id"] in version.description  # where the whole configuration is
    experiment = client.get_experiment(client.get_run(first["parent_run_id"]).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the training runs


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


TRAINER_STATE = ("checkpoint-", "optimizer", "scheduler", "rng_state", "trainer_state")


def test_a_run_leaves_only_what_a_rerun_needs(first: dict, home: Path) -> None:
    """The stage folders keep each candidate's model and little else (a Trainer's checkpoints and optimizer state
    once made the teacher's folder 7x its model); the tiny config's whole `artifacts/` stays under 80 MB."""
    artifacts = home / "artifacts"
    assert [p for p in artifacts.rglob("*") if p.name.startswith(TRAINER_STATE)] == []
    for stage in ("teacher", "student", "int8", "bnb-int8", "nf4", "onnx-fp32", "onnx-int8"):
        (folder,) = [p for p in (artifacts / stage).iterdir() if p.is_dir()]
        assert _size(folder) - _size(folder / "model") < 1_000_000, stage  # besides the model: logs and records
    assert _size(artifacts) < 80_000_000


def test_champion_honours_the_model_contract(first: dict, home: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(["the flight was great", "lost my bag again", "ok"])
    assert list(out.columns) == ["label", "score", "prob_negative", "prob_neutral", "prob_positive"]
    assert len(out) == 3 and set(out["label"]) <= {"negative", "neutral", "positive"}
    probs = out[["prob_negative", "prob_neutral", "prob_positive"]].sum(axis=1)
    assert probs.round(5).eq(1.0).all()


def test_unchanged_rerun_registers_nothing(first: dict, client: MlflowClient) -> None:
    again = run()
    assert not again["promoted"] and "nothing new" in again["message"]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert aliases(client)["champion"] == "1"
    # One execution, one run: the rerun counts itself on the run that recorded it instead of adding eight more.
    experiment_id = client.get_run(first["parent_run_id"]).info.experiment_id
    assert len(client.search_runs([experiment_id])) == 8  # the lifecycle and its seven candidates
    assert again["parent_run_id"] == first["parent_run_id"]
    assert client.get_run(first["parent_run_id"]).data.tags["llmops.cached_reruns"] == "1"


def test_cli_and_module_entry_points(first: dict, client: MlflowClient) -> None:
    lifecycle_flow.main(["--config", str(TINY_CONFIG)])  # python -m flows.lifecycle
    result = CliRunner().invoke(app, ["run", "--config", str(TINY_CONFIG)])
    assert result.exit_code == 0, result.output
    assert "champion: version 1" in result.output and "mlflow ui --backend-store-uri" in result.output
    assert "#/experiments/1?workflowType=machine_learning" in result.output  # the training runs, not GenAI's view
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    predicted = CliRunner().invoke(app, ["predict", "--config", str(TINY_CONFIG), "the flight was great"])
    assert predicted.exit_code == 0, predicted.output
    assert "prob_positive" in predicted.output and "the flight was great" in predicted.output


def test_predict_with_an_unknown_alias_is_a_clear_error(first: dict) -> None:
    result = CliRunner().invoke(app, ["predict", "--config", str(TINY_CONFIG), "--alias", "nope", "hi"])
    assert result.exit_code == 2 and "cannot load models:/tweet-sentiment@nope" in result.output


def test_failing_candidate_is_registered_with_reasons_and_champion_kept(first: dict, client: MlflowClient) -> None:
    result = run("train.learning_rate=0.003", "gates.min_macro_f1=0.99", STUDENT_AND_INT8)
    assert not result["promoted"] and result["version"] == "2"
    version_tags = tags(client, "2")
    assert version_tags["llmops.verdict"] == "rejected"
    assert "< floor 0.9900" in version_tags["llmops.reasons"]
    assert aliases(client) == {"champion": "1", "challenger": "1"}


def _registered_keys(client: MlflowClient) -> list[str]:
    return [v.tags["llmops.candidate_key"] for v in client.search_model_versions(f"name = '{NAME}'")]


def test_passing_change_is_promoted_then_rolled_back(first: dict, client: MlflowClient) -> None:
    # the previous test's candidates, under the default gates
    result = run("train.learning_rate=0.003", STUDENT_AND_INT8)
    version = result["version"]
    assert result["promoted"] and version in {"2", "3"}  # v2 reused if the same candidate is selected
    selected_key = Path(result["candidates"][result["selected"]]).parent.name
    assert tags(client, version)["llmops.candidate_key"] == selected_key
    assert tags(client, version)["llmops.verdict"] == "passed"
    assert len(set(_registered_keys(client))) == len(_registered_keys(client))  # never registered twice
    assert aliases(client) == {"champion": version, "challenger": version, "previous-champion": "1"}
    outcome = registry.rollback(client, NAME)
    assert outcome.champion == "1"
    assert aliases(client) == {"champion": "1", "challenger": version, "previous-champion": version}
    assert tags(client, version)["llmops.rolled_back"] == "true"


def test_champion_moved_during_evaluation_is_not_overwritten(
    first: dict, client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = aliases(client)["previous-champion"]
    real_score_champion = lifecycle_flow.release.score_champion

    def someone_promotes_meanwhile(*args, **kwargs):
        # Between the flow's snapshot of the champion and its promotion, a user moves the alias.
        client.set_registered_model_alias(NAME, "champion", other)
        return real_score_champion(*args, **kwargs)

    monkeypatch.setattr(lifecycle_flow.release, "score_champion", someone_promotes_meanwhile)
    result = run("train.learning_rate=0.004", STUDENT_AND_INT8)
    assert not result["promoted"] and f"moved from version 1 to {other}" in result["message"]
    assert result["version"] not in {"1", other}
    assert aliases(client)["champion"] == other
    assert aliases(client)["challenger"] == result["version"]  # it passed its gates; only promotion was refused


def test_candidates_evaluate_at_once_on_a_ray_instance_of_this_machine(workdir: Path) -> None:
    result = lifecycle_flow.lifecycle(str(TINY_CONFIG), ["eval.parallel=ray", STUDENT_AND_INT8])
    assert result["promoted"] and set(result["candidates"]) == {"teacher", "student", "int8"}
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["llmops.candidate"] for r in children) == ["int8", "student", "teacher"]
    assert all("macro_f1" in r.data.metrics for r in children)
    # at once: on this machine's two cores, two evaluations ran side by side
    spans = sorted((b.started, b.finished) for b in map(Built.of, (workdir / "artifacts" / "eval").glob("*")) if b)
    assert len(spans) == 3 and any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans
    import ray

    assert not ray.is_initialized()  # the instance started for the evaluation is stopped after it
