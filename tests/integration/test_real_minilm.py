"""The real all-MiniLM-L6-v2 (packaged, no download) through the whole flow on a few hundred tweets."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from flows.lifecycle import lifecycle
from tests.conftest import REPO, STUDENT_AND_INT8

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_real_minilm_lifecycle(workdir: Path) -> None:
    result = lifecycle(
        str(REPO / "configs" / "quickstart.yaml"),
        [
            "data.sample=400",
            "train.epochs=1",
            "distill.epochs=1",
            "distill.transfer_rows=200",  # the quickstart's 10,000 would make this the slowest test
            STUDENT_AND_INT8,
            "gates.min_macro_f1=0.0",
            "gates.min_retention=0.0",
            "gates.max_slice_gap=null",
            "eval.latency_samples=10",
            "eval.throughput_max_rows=64",
        ],
    )
    assert result["promoted"] and result["version"] == "1"
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("tweet-sentiment", "champion")
    assert version.tags["llmops.candidate"] in {"teacher", "student", "int8"}
    out = mlflow.pyfunc.load_model("models:/tweet-sentiment@champion").predict(["@united lost my luggage again"])
    assert out.loc[0, "label"] in {"negative", "neutral", "positive"}
