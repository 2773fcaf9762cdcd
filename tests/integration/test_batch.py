"""Batch inference (`llmops batch-predict`): a registered classifier and generator score CSV, JSONL and Parquet
files block by block, in-process and on a real two-host Ray cluster that loses a node midway. A real MLflow
registry of tiny models; the cluster's worker node is a network namespace of its own (tests/ray_cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cli.main import app
from llmops.batch import BatchError, BatchJob, run_batch
from tests.conftest import TINY_CONFIG
from tests.ray_cluster import node_logs, ray_cluster
from tests.tiny_registry import TINY_LLAMA, register_generators, register_versions, set_alias

CLASSIFIER, GENERATOR = "tiny-sentiment", "tiny-generator"
runner = CliRunner()


def short_context_generator(directory: Path, seed: int) -> Path:
    """A tiny Llama of 96 positions: a long prompt leaves no room for an answer."""
    import torch

    from llmops.candidate_folder import CandidateMeta, save_hf_candidate
    from llmops.config import ModelConfig
    from llmops.generation.modeling import load_base_model, load_tokenizer

    cfg = ModelConfig(random_init=TINY_LLAMA | {"max_position_embeddings": 96}, max_length=64)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(seed)
    meta = CandidateMeta("student", [], max_length=64, task="causal-lm")
    return save_hf_candidate(load_base_model(cfg, "causal-lm", tokenizer), tokenizer, meta, directory)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("batch")
    uri = register_versions(root, CLASSIFIER, seeds=[1, 2])
    register_generators(root, GENERATOR, seeds=[1], uri=uri, build=short_context_generator)
    set_alias(uri, CLASSIFIER, "champion", "1")
    set_alias(uri, GENERATOR, "champion", "1")
    return uri


def tweets(n: int) -> pd.DataFrame:
    words = ["the", "flight", "was", "great", "lost", "my", "bag", "again", "delayed", "crew", "awful", "thanks"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 17)) for i in range(n)]
    return pd.DataFrame({"id": [f"t{i}" for i in range(n)], "text": texts})


def read(output: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(output / "predictions"), pd.read_parquet(output / "rejects")


def test_a_classifier_scores_a_csv_and_refuses_what_it_cannot_score(store: str, tmp_path: Path) -> None:
    frame = tweets(1000)
    frame.loc[3, "text"], frame.loc[4, "text"], frame.loc[5, "text"] = "", "\u001d", "x" * 2100
    frame.to_csv(tmp_path / "in.csv", index=False)
    job = BatchJob(
        f"models:/{CLASSIFIER}@champion", tmp_path / "in.csv", tmp_path / "out", keep=("id",), block_rows=300
    )

    summary = run_batch(job, store, progress=False)

    predictions, rejects = read(tmp_path / "out")
    assert (summary.blocks, summary.rows, summary.scored, summary.rejected) == (4, 1000, 997, 3)
    assert sorted(rejects.row_id) == [3, 4, 5]
    assert rejects.set_index("row_id").reason.to_dict() == {
        3: "empty text",
        4: "empty text",
        5: "too long: 2100 characters, at most 2000 (--max-chars)",
    }
    assert sorted([*predictions.row_id, *rejects.row_id]) == list(range(1000))  # every row once, in one file
    assert (predictions.id == "t" + predictions.row_id.astype(str)).all()  # kept columns stay with their row
    assert set(predictions.model_version) == {"1"}
    assert set(predictions.input_fingerprint) == {summary.fingerprint}
    assert set(predictions.label) <= {"negative", "neutral", "positive"}
    assert ((predictions.score > 0.33) & (predictions.score <= 1)).all()
    # the same texts through the registered model give the same labels
    import mlflow

    source = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_download_uri(CLASSIFIER, "1")
    sample = predictions.head(20)
    texts = frame.loc[sample.row_id, "text"].tolist()
    expected = mlflow.pyfunc.load_model(source).predict(texts)  # not through the process-wide registry
    assert list(expected.label) == list(sample.label)


def test_an_interrupted_job_resumes_and_a_promotion_meanwhile_changes_nothing(store: str, tmp_path: Path) -> None:
    tweets(900).to_parquet(tmp_path / "in.parquet")
    job = BatchJob(f"models:/{CLASSIFIER}@champion", tmp_path / "in.parquet", tmp_path / "out", block_rows=200)
    first = run_batch(job, store, progress=False)
    parts = sorted((tmp_path / "out" / "predictions").glob("part-*.parquet"))
    assert len(parts) == 5
    # a job killed after three blocks: the last two have no files
    for part in parts[3:]:
        part.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts[:3]}
    set_alias(store, CLASSIFIER, "champion", "2")  # promoted meanwhile: the job stays on the version it began with
    try:
        again = run_batch(job, store, progress=False)
    except BatchError as error:
        assert "another job's output" in str(error) and "version" in str(error)
    else:
        raise AssertionError("a job resumed under another version mixed two models in one output")
    pinned = BatchJob(f"models:/{CLASSIFIER}/1", job.input, job.output, block_rows=200)
    again = run_batch(pinned, store, progress=False)
    set_alias(store, CLASSIFIER, "champion", "1")

    assert (again.resumed_blocks, again.rows, again.scored) == (3, 900, 900)
    assert {p.name: p.stat().st_mtime_ns for p in parts[:3]} == kept  # finished blocks are not scored again
    predictions, _ = read(tmp_path / "out")
    assert sorted(predictions.row_id) == list(range(900))
    assert first.fingerprint == again.fingerprint


def test_a_generator_answers_jsonl_prompts_and_chats_and_refuses_a_prompt_without_room(
    store: str, tmp_path: Path
) -> None:
    rows = [
        {"prompt": "write a positive tweet about coachella"},
        {"prompt": "classify the sentiment of this tweet: lost my bag again"},
        {"prompt": "word " * 200},  # past the model's 96 positions
        {"prompt": "   "},
    ]
    chats = [
        {"messages": [{"role": "user", "content": "write a positive tweet about coachella"}]},
        {"messages": [{"role": "user", "content": "word " * 200}]},
        {"messages": "not a chat"},
    ]
    with (tmp_path / "chats.jsonl").open("w") as out:
        out.writelines(json.dumps(c) + "\n" for c in chats)
    with (tmp_path / "in.jsonl").open("w") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    result = runner.invoke(
        app,
        [
            "batch-predict",
            "--model",
            f"models:/{GENERATOR}@champion",
            "-i",
            str(tmp_path / "in.jsonl"),
            "-o",
            str(tmp_path / "out"),
            "--max-new-tokens",
            "6",
            "--config",
            str(TINY_CONFIG),
            "--set",
            f"registry.tracking_uri={store}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 rows scored, 2 rejected" in result.output
    predictions, rejects = read(tmp_path / "out")
    assert list(predictions.row_id) == [0, 1]
    assert (predictions.completion_tokens >= 1).all() and (predictions.completion_tokens <= 6).all()
    assert all(isinstance(t, str) and t for t in predictions.text)  # never empty: the end token cannot come first
    assert set(predictions.finish_reason) <= {"stop", "length"}
    reasons = rejects.set_index("row_id").reason
    assert reasons[2].startswith("too long:") and "96 positions" in reasons[2]
    assert reasons[3] == "empty text"

    chatted = run_batch(
        BatchJob(f"models:/{GENERATOR}/1", tmp_path / "chats.jsonl", tmp_path / "chats", max_new_tokens=4),
        store,
        progress=False,
    )
    answers, refused = read(tmp_path / "chats")
    assert (chatted.scored, chatted.rejected) == (1, 2) and list(answers.row_id) == [0]
    why = refused.set_index("row_id").reason
    assert "96 positions" in why[1] and why[2].startswith("not a chat")


def test_what_cannot_run_is_named_before_anything_is_written(store: str, tmp_path: Path) -> None:
    tweets(10).to_csv(tmp_path / "in.csv", index=False)
    pd.DataFrame({"text": []}).to_csv(tmp_path / "empty.csv", index=False)
    (tmp_path / "in.txt").write_text("hello\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")

    def fails(*args: str) -> str:
        result = runner.invoke(
            app,
            [
                "batch-predict",
                "-i",
                str(tmp_path / "in.csv"),
                "-o",
                str(tmp_path / "out"),
                "--config",
                str(TINY_CONFIG),
                "--set",
                f"registry.tracking_uri={store}",
                "--model",
                f"models:/{CLASSIFIER}@champion",
                *args,
            ],
        )
        assert result.exit_code == 2, result.output
        return result.output

    assert "no column 'body' (it has id, text)" in fails("--column", "body")
    assert "unknown format '.txt'" in fails("-i", str(tmp_path / "in.txt"))
    assert "no rows to score" in fails("-i", str(tmp_path / "empty.csv"))
    assert "no such file" in fails("-i", str(tmp_path / "missing.csv"))
    assert "exists and is not a batch output folder" in fails("-o", str(other))
    assert "not in the registry" in fails("--model", f"models:/{CLASSIFIER}@nobody")
    assert "give models:/NAME@ALIAS or models:/NAME/VERSION" in fails("--model", "tiny-sentiment")
    assert "--keep nope: not in" in fails("--keep", "nope")
    assert not (tmp_path / "out").exists()
    assert (other / "notes.md").read_text() == "mine" and len(list(other.iterdir())) == 1


def _parts_by_node(output: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for part in sorted((output / "predictions").glob("part-*.parquet")):
        try:
            node = pq.read_schema(part).metadata[b"llmops.node"].decode()
        except OSError:  # being renamed into place
            continue
        found.setdefault(node, []).append(part.name)
    return found


@pytest.mark.slow
def test_on_a_two_host_ray_cluster_a_node_lost_midway_loses_and_doubles_nothing(store: str, tmp_path: Path) -> None:
    tweets(48_000).to_csv(tmp_path / "in.csv", index=False)  # long enough for both nodes to load the model
    output = tmp_path / "out"
    with ray_cluster(workers=1, cpus=1) as cluster:
        worker = cluster.workers[0]
        job = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("llmops")),
                "batch-predict",
                "--model",
                f"models:/{CLASSIFIER}/1",
                "-i",
                str(tmp_path / "in.csv"),
                "-o",
                str(output),
                "--block-rows",
                "300",
                "--workers",
                "2",
                "--config",
                str(TINY_CONFIG),
                "--set",
                f"registry.tracking_uri={store}",
            ],
            env=cluster.env | {"HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # the worker node dies once it has written blocks and while most are still to do
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and worker.address not in _parts_by_node(output):
            assert job.poll() is None, job.communicate()[0][-3000:]
            time.sleep(0.2)
        assert worker.address in _parts_by_node(output), node_logs(cluster)
        done_before = sum(len(v) for v in _parts_by_node(output).values())
        worker.kill()
        out, _ = job.communicate(timeout=300)

    assert job.returncode == 0, out[-3000:]
    assert done_before < 150, "the node died after the job was over: nothing was tested"
    by_node = _parts_by_node(output)
    assert set(by_node) == {cluster.head.address, worker.address}, by_node  # both hosts scored blocks
    predictions = pd.read_parquet(output / "predictions")
    assert len(predictions) == 48_000 and predictions.row_id.is_unique  # nothing lost, nothing twice
    assert sorted(predictions.row_id) == list(range(48_000))
    assert pd.read_parquet(output / "rejects").empty
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 48_000 and manifest["blocks"] == 160
    assert cluster.hosts == "namespaces" or os.geteuid() != 0  # as root on Linux, hosts of their own
