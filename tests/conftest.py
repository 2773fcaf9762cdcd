"""Shared fixtures. Every test runs offline, in its own working directory, on a real MLflow store."""

from __future__ import annotations

import os

# Before anything imports transformers, MLflow or Prefect.
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from monitoring.monitor import RetrainRequest

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# Lifecycle runs whose subject is not the candidates build fewer (docs/testing.md, "Which candidates a test builds")
STUDENT_ONLY = "quantize.candidates=[fp32]"
STUDENT_AND_INT8 = "quantize.candidates=[fp32, int8]"


def pytest_configure(config: pytest.Config) -> None:
    # Prefect binds its console log handler to the sys.stderr of the moment it first sets logging up. Set up now,
    # that is pytest's stream: set up inside a test's CliRunner, the handler would keep that runner's stream, closed
    # once the runner is done, and every later in-process `llmops run` would fail writing to it.
    from prefect.logging.configuration import setup_logging

    setup_logging()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session: it takes seconds to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


MLFLOW_PROCESS_STATE = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
"""What MLflow writes into os.environ when a store or experiment is set, for subprocesses to inherit."""


@pytest.fixture(autouse=True, scope="module")
def mlflow_state_stays_in_its_module() -> Iterator[None]:
    """A module's tests may point MLflow at their store and build on it; the next module starts from none of it,
    whichever modules ran before it in this process (pytest-xdist gives each worker its own share of them)."""
    saved = {var: os.environ.get(var) for var in MLFLOW_PROCESS_STATE}
    yield
    import mlflow
    from mlflow.tracking import fluent

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None is MLflow's own "unset"
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    fluent._active_experiment_id = None
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@pytest.fixture(scope="module")
def home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One working directory for a test module's tests that build on each other (a lifecycle run, its store)."""
    directory = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        yield directory


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory: mlflow.db, mlartifacts/ and artifacts/ land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Recorder:
    """A monitor's retraining launcher that only records what it was asked to start."""

    def __init__(self) -> None:
        self.requests: list[RetrainRequest] = []

    def __call__(self, request: RetrainRequest) -> dict:
        self.requests.append(request)
        return {"mode": "recorded"}
