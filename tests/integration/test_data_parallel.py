"""Fine-tuning data-parallel under `accelerate launch` (`train.processes`), inside the lifecycle flow.

There is no GPU here, so the processes are CPU processes over gloo; on a GPU machine the same
launcher (`--multi_gpu`, torchrun underneath) starts one process per GPU over NCCL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

import flows.lifecycle as lifecycle_flow
from llmops.candidate_folder import HISTORY_FILE, CandidateMeta
from llmops.classification import data
from llmops.classification.train import fine_tune
from llmops.config import ConfigError, load_config
from llmops.launcher import TrainLaunchError, run_fine_tune
from tests.conftest import STUDENT_ONLY, TINY_CONFIG

pytestmark = pytest.mark.usefixtures("prefect_server")
one_gpu = pytest.mark.skipif(
    torch.cuda.device_count() == 1, reason="two processes need two GPUs where there is a GPU (NCCL)"
)


@one_gpu
def test_lifecycle_fine_tunes_in_two_processes_and_promotes(workdir: Path) -> None:
    result = lifecycle_flow.lifecycle(str(TINY_CONFIG), ["train.processes=2", STUDENT_ONLY])
    assert result["promoted"] and result["version"] == "1"
    teacher = Path(result["candidates"]["teacher"])
    assert CandidateMeta.load(teacher).recipe["processes"] == 2
    # Each step takes batch_size rows in each of the 2 processes: an epoch is half the steps of one process.
    (train_split,) = (workdir / "artifacts" / "data").glob("*/train.parquet")
    rows = pq.read_metadata(train_split).num_rows
    history = json.loads((teacher.parent / HISTORY_FILE).read_text())
    assert max(entry["step"] for entry in history) == math.ceil(rows / (2 * 32))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}", registry_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tweet-sentiment", "champion").version) == "1"


@one_gpu
def test_a_failed_launch_names_the_command_and_shows_its_output(workdir: Path) -> None:
    cfg = load_config(TINY_CONFIG, ["train.processes=2", "train.launch_args=[--no_such_flag]"])
    data_dir = data.prepare_data(cfg.data, workdir / "data").directory
    with pytest.raises(TrainLaunchError) as failed:
        run_fine_tune(fine_tune, cfg.model, cfg.train, cfg.task, data_dir, workdir / "teacher")
    message = str(failed.value)
    assert "accelerate.commands.launch --multi_gpu --num_processes 2" in message
    assert "unrecognized arguments: --no_such_flag" in message
    assert not (workdir / "teacher" / "model").exists()


def test_more_processes_than_gpus_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # no GPU here: pretend there are two
    cfg = load_config(TINY_CONFIG, ["train.processes=4"])
    with pytest.raises(ConfigError, match=r"train.processes=4 but this machine has 2 GPU\(s\)"):
        run_fine_tune(fine_tune, cfg.model, cfg.train, cfg.task, tmp_path / "data", tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()


@one_gpu
def test_a_generator_fine_tunes_in_two_processes(workdir: Path) -> None:
    from llmops.generation.data import prepare_data as prepare_generative_data
    from llmops.generation.train import fine_tune as fine_tune_generator

    cfg = load_config(TINY_CONFIG.with_name("llm-tiny.yaml"), ["train.processes=2"])
    prepared = prepare_generative_data(cfg.data, workdir / "data")
    model_dir = run_fine_tune(
        fine_tune_generator, cfg.model, cfg.train, cfg.task, prepared.directory, workdir / "teacher"
    )
    meta = CandidateMeta.load(model_dir)
    assert meta.task == "causal-lm" and meta.recipe["processes"] == 2
    rows = pq.read_metadata(prepared.split_path("train")).num_rows
    history = json.loads((model_dir.parent / HISTORY_FILE).read_text())
    assert max(entry["step"] for entry in history) == math.ceil(rows / (2 * cfg.train.batch_size))
