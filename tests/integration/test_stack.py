"""The local stack for real: `llmops up` on free loopback ports, deployments run through a Prefect worker,
the serving API following the champion, a monitoring report the Evidently UI shows, and `llmops down`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from llmops.classification.data import prepare_data
from llmops.config import load_config
from llmops.ports import free_port
from llmops.predlog import open_store
from tests.conftest import REPO, STUDENT_ONLY, TINY_CONFIG

BIN = Path(sys.executable).parent


def llmops(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "llmops"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


class LocalStack:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.ports = {name: free_port() for name in ("mlflow", "prefect", "serving", "evidently")}
        self.overrides = [
            f"serve.prediction_log={home / 'predictions.db'}",
            f"serve.model_cache={home / 'served'}",
            "serve.poll_interval_s=1",
            f"monitor.workspace={home / 'workspace'}",
            f"monitor.reports_dir={home / 'reports'}",
            f"work_dir={home / 'work'}",
            STUDENT_ONLY,  # the stack's subject, not the candidates (test_lifecycle has them all)
        ]
        self.env = os.environ | {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
            "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api",
        }

    def logged(self) -> tuple[int, int]:
        """Rows in the serving API's prediction log: predictions, feedback labels."""
        store = open_store(self.home / "predictions.db")
        return len(store.read_predictions()), len(store.read_feedback())

    def wait_for_log(self, predictions: int, feedback: int = 0, timeout: float = 60) -> None:
        """Until the log holds this many rows (it is flushed every second, later on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while (logged := self.logged())[0] < predictions or logged[1] < feedback:
            assert time.monotonic() < deadline, f"log has {logged}, not ({predictions}, {feedback}), after {timeout} s"
            time.sleep(0.2)

    def up(self) -> subprocess.CompletedProcess[str]:
        """`make up`, as a user runs it, on this stack's ports and folder."""
        args = [f"--home={self.home}", *(f"--{name}-port={port}" for name, port in self.ports.items())]
        args += [f"--set={o}" for o in self.overrides]
        return make("up", f"CONFIG={TINY_CONFIG}", "ARGS=" + " ".join(args))

    def down(self) -> subprocess.CompletedProcess[str]:
        return make("down", f"ARGS=--home={self.home}")

    def run_deployment(
        self, name: str, *overrides: str, config: Path = TINY_CONFIG, **more: object
    ) -> subprocess.CompletedProcess[str]:
        params = json.dumps({"config": str(config), "overrides": [*self.overrides, *overrides], **more})
        return subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", name, "--params", params, "--watch"],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def mlflow(self) -> MlflowClient:
        uri = self.env["MLFLOW_TRACKING_URI"]
        return MlflowClient(uri, registry_uri=uri)  # not the process-wide registry an earlier test set

    def wait_for_flow_run(self, flow_run_id: str, timeout: float = 420) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = httpx.get(self.url("prefect", f"/api/flow_runs/{flow_run_id}")).json()
            if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} still {run['state']['type']} after {timeout:.0f} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    local = LocalStack(tmp_path_factory.mktemp("stack"))
    started = local.up()
    assert started.returncode == 0, started.stdout + started.stderr
    yield local
    local.down()


def test_up_starts_every_service_and_prints_its_url(stack: LocalStack) -> None:
    assert httpx.get(stack.url("mlflow", "/health")).status_code == 200
    assert httpx.get(stack.url("prefect", "/api/health")).status_code == 200
    assert httpx.get(stack.url("serving", "/healthz")).status_code == 200
    assert httpx.get(stack.url("evidently", "/api/projects")).status_code == 200
    for ui in ("mlflow", "prefect", "evidently"):  # the pages a user opens, not only the APIs
        page = httpx.get(stack.url(ui, "/"), follow_redirects=True)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], ui
    workers = httpx.post(stack.url("prefect", "/api/work_pools/llmops/workers/filter"), json={}).json()
    assert workers, "no worker on the llmops pool"
    deployments = httpx.post(stack.url("prefect", "/api/deployments/filter"), json={}).json()
    assert {d["name"] for d in deployments} == {"quickstart", "full", "retrain", "llm", "scheduled", "score"}
    scheduled = next(d for d in deployments if d["name"] == "scheduled")
    assert scheduled["schedules"][0]["schedule"]["cron"] == "0 * * * *"
    assert {p.stem for p in (stack.home / "pids").glob("*.pid")} == {
        "mlflow", "prefect-server", "prefect-worker", "serving", "evidently"
    }  # fmt: skip


def test_deployment_run_trains_promotes_and_serving_follows(stack: LocalStack) -> None:
    run = stack.run_deployment("lifecycle/quickstart")
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    client = stack.mlflow()
    assert client.get_model_version_by_alias("tweet-sentiment", "champion").version == "1"
    deadline, ready = time.time() + 60, {}
    while time.time() < deadline and not ready.get("ready"):
        ready = httpx.get(stack.url("serving", "/readyz")).json()
        time.sleep(0.5)
    assert ready["model"]["version"] == "1"


def test_the_batch_deployment_scores_a_file_with_the_champion(stack: LocalStack) -> None:
    texts = pd.DataFrame({"text": ["great flight @united", "lost my bag again", " "] * 100})
    texts.to_parquet(stack.home / "to-score.parquet")
    run = stack.run_deployment(
        "batch/score",
        model="models:/tweet-sentiment@champion",
        input=str(stack.home / "to-score.parquet"),
        output=str(stack.home / "scored"),
        block_rows=64,
    )
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    predictions = pd.read_parquet(stack.home / "scored" / "predictions")
    rejects = pd.read_parquet(stack.home / "scored" / "rejects")
    assert len(predictions) == 200 and set(predictions.model_version) == {"1"}  # the champion the registry named
    assert sorted(rejects.row_id) == list(range(2, 300, 3)) and set(rejects.reason) == {"empty text"}
    assert predictions.groupby(predictions.row_id % 3).label.nunique().max() == 1  # a text gets one label


def test_the_prefect_cli_a_user_types_works_unpatched(stack: LocalStack) -> None:
    def prefect(*args: str) -> subprocess.CompletedProcess[str]:
        env = stack.env | {"COLUMNS": "250"}  # wide enough that rich tables do not cut names
        return subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip

    names = ["lifecycle/quickstart", "lifecycle/full", "lifecycle/retrain", "lifecycle/llm", "monitor/scheduled",
             "batch/score"]  # fmt: skip
    deployed = prefect("--no-prompt", "deploy", "--all")  # again: stock Prefect, no patch (make up ran it first)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    assert all(f"'{name}'" in deployed.stdout for name in names), deployed.stdout[-3000:]
    listed = prefect("deployment", "ls")
    assert listed.returncode == 0 and all(name in listed.stdout for name in names), listed.stdout + listed.stderr
    runs = prefect("flow-run", "ls")  # 422 with fastapi >= 0.151 (Prefect sends `limit: null`)
    assert runs.returncode == 0 and "lifecycle" in runs.stdout, runs.stdout + runs.stderr


def test_the_llm_deployment_registers_a_generator_champion(stack: LocalStack) -> None:
    run = stack.run_deployment("lifecycle/llm", config=REPO / "configs" / "llm-tiny.yaml")
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    champion = stack.mlflow().get_model_version_by_alias("tweet-generator", "champion")
    assert champion.version == "1" and champion.tags["llmops.task"] == "causal-lm"
    # the stack's service follows the generator too, beside the classifier
    body = {"model": "tweet-generator", "prompt": "write a positive tweet about coachella", "max_tokens": 5}
    deadline, answered = time.time() + 120, None
    while time.time() < deadline:
        answered = httpx.post(stack.url("serving", "/v1/completions"), json=body, timeout=30)
        if answered.status_code == 200:
            break
        time.sleep(1)
    assert answered is not None and answered.status_code == 200, answered.text if answered else None
    assert answered.json()["system_fingerprint"] == "llmops-tweet-generator-v1"


def test_monitor_deployment_writes_a_report_the_evidently_ui_shows(stack: LocalStack) -> None:
    texts = ["great flight @united", "lost my bag again", "the new iphone is out", "coachella was fun"]
    logged, _ = stack.logged()
    for _ in range(60):
        httpx.post(stack.url("serving", "/v1/predict"), json={"texts": texts}).raise_for_status()
    stack.wait_for_log(predictions=logged + 240)
    run = stack.run_deployment("monitor/scheduled")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert list((stack.home / "reports").glob("*/summary.json"))
    projects = {p["name"]: p["id"] for p in httpx.get(stack.url("evidently", "/api/projects")).json()}
    monitored = set(projects) == {"tweet-sentiment", "tweet-generator"}  # the served generator is monitored too
    assert monitored, f"{sorted(projects)}\n{run.stdout[-4000:]}"
    for project in projects.values():
        snapshots = httpx.get(stack.url("evidently", f"/api/projects/{project}/snapshots")).json()
        assert any("decision" in s["tags"] for s in snapshots)


def test_a_retraining_decision_runs_lifecycle_retrain_on_the_worker(stack: LocalStack) -> None:
    # A topic's tweets with their true labels sent as feedback, as a labelling team would.
    cfg = load_config(TINY_CONFIG, ["data.sample=1500", "data.holdout_topics=[coachella]"])
    shifted = pd.read_parquet(prepare_data(cfg.data, stack.home / "shifted").split_path("holdout")).head(300)
    logged, labelled = stack.logged()
    for start in range(0, len(shifted), 30):
        part = shifted.iloc[start : start + 30]
        answer = httpx.post(stack.url("serving", "/v1/predict"), json={"texts": part["text"].tolist()})
        request_id = answer.raise_for_status().json()["request_id"]
        for index, label in enumerate(part["label"]):
            feedback = {"request_id": request_id, "index": index, "label": label}
            httpx.post(stack.url("serving", "/v1/feedback"), json=feedback).raise_for_status()
    stack.wait_for_log(predictions=logged + 300, feedback=labelled + 300)

    policy = ["monitor.window_size=300", "monitor.retrain.drift_windows=1", "monitor.retrain.of_last=1"]
    monitor = stack.run_deployment("monitor/scheduled", *policy)
    assert monitor.returncode == 0 and "Completed" in monitor.stdout, monitor.stdout[-3000:] + monitor.stderr[-3000:]

    client = stack.mlflow()
    (experiment,) = [e for e in client.search_experiments() if e.name == "llmops-monitoring"]
    classifier = "tags.`llmops.model` = 'tweet-sentiment'"  # the generator's pass is recorded beside it
    (last, *_) = client.search_runs([experiment.experiment_id], classifier, order_by=["attributes.start_time DESC"])
    assert last.data.tags["llmops.verdict"] == "retrain"
    retraining = json.loads(last.data.tags["llmops.retraining"])
    assert retraining["mode"] == "prefect" and retraining["deployment"] == "lifecycle/retrain"

    retrain = stack.wait_for_flow_run(retraining["flow_run_id"])
    assert retrain["state"]["type"] == "COMPLETED", retrain["state"]
    deployment = httpx.get(stack.url("prefect", f"/api/deployments/{retrain['deployment_id']}")).json()
    assert deployment["name"] == "retrain"
    key, _, extra_rows = retrain["parameters"]["overrides"][-1].partition("=")
    assert key == "data.extra_rows" and len(pd.read_parquet(extra_rows)) == 300  # the labelled window
    # A new version, registered and gated by the lifecycle the worker ran, trained on the feedback rows.
    version = client.get_model_version("tweet-sentiment", "2")
    assert version.tags["llmops.verdict"] in ("passed", "rejected")
    uri = stack.env["MLFLOW_TRACKING_URI"]
    train = mlflow.artifacts.download_artifacts(version.tags["llmops.train_data"], tracking_uri=uri)
    assert len(set(shifted["text"]) & set(pd.read_parquet(train)["text"])) > 150  # of 300, split like the rest


def test_a_taken_port_stops_up_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = llmops("up", "--home", str(tmp_path), f"--prefect-port={port}", f"--mlflow-port={free_port()}")
    assert result.returncode == 2
    assert f"port {port} (prefect) already taken" in result.stderr
    assert not list(tmp_path.glob("pids/*.pid"))


def test_down_stops_exactly_what_up_started(stack: LocalStack) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pids = [int(p.read_text()) for p in (stack.home / "pids").glob("*.pid")]
    result = stack.down()
    assert result.returncode == 0 and "stopped:" in result.stdout
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert bystander.poll() is None  # not ours to stop
    bystander.send_signal(signal.SIGTERM)
    bystander.wait()
    assert not list((stack.home / "pids").glob("*.pid"))
