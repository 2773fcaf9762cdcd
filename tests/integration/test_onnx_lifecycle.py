"""An ONNX Runtime candidate through the tiny lifecycle, against a real MLflow store and Prefect server: built,
evaluated, gated, registered, loaded through pyfunc, served with its embeddings logged; an ONNX version whose
file is corrupt or missing fails its load while the old version keeps serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import flows.lifecycle as lifecycle_flow
from llmops import registry
from llmops.ort import ONNX_FILE
from llmops.predlog import decode_embeddings, open_store
from tests.conftest import TINY_CONFIG
from tests.integration.test_serving import serving, wait_until
from tests.tiny_registry import LABELS, set_alias

NAME = "tweet-sentiment"
pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def result(home: Path, prefect_server: None) -> dict:
    # Not the teacher, so the ONNX candidate is chosen however fast the teacher measures beside other work.
    return lifecycle_flow.lifecycle(str(TINY_CONFIG), ["quantize.candidates=[onnx-int8]", "gates.allow_teacher=false"])


def test_the_onnx_candidate_is_built_evaluated_and_registered_with_its_recipe(result: dict, home: Path) -> None:
    assert result["promoted"] and result["selected"] == "onnx-int8"  # the one candidate allowed
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    version = client.get_model_version(NAME, result["version"])
    assert version.tags["llmops.candidate"] == "onnx-int8"
    run = client.get_run(version.run_id)
    params = run.data.params
    assert params["recipe.quantization.format"] == "onnx" and params["recipe.quantization.onnxruntime"]
    assert params["recipe.quantization.opset"] == "17" and params["recipe.quantization.mode"] in {"dynamic", "static"}
    assert params["int8_search.max_loss"] == "0.005"  # the accuracy-aware search, on the candidate's run
    assert {"macro_f1", "throughput_per_s", "size_mb"} <= set(run.data.metrics)


def test_pyfunc_loads_the_onnx_champion(result: dict, home: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(["the flight was great", "lost my bag"])
    assert list(out.columns) == ["label", "score", "prob_negative", "prob_neutral", "prob_positive"]
    assert set(out["label"]) <= set(LABELS)


def _register_broken(home: Path, champion_dir: Path, how: str) -> str:
    """A copy of the champion's ONNX candidate with its model file corrupt or missing, registered as a version."""
    broken = shutil.copytree(champion_dir, home / f"broken-{how}")
    if how == "corrupt":
        (broken / ONNX_FILE).write_bytes((broken / ONNX_FILE).read_bytes()[:1000])
    else:
        (broken / ONNX_FILE).unlink()
    with mlflow.start_run(run_name=f"broken-{how}"):
        uri = registry.log_candidate_model(broken, LABELS, ["an example tweet"])
        return registry.register(NAME, uri, {"candidate": "onnx-int8"})


@pytest.mark.anyio
async def test_the_onnx_champion_serves_logs_embeddings_and_survives_a_broken_version(result: dict, home: Path) -> None:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    champion_dir = registry.download_candidate(NAME, result["version"], home / "champion", uri)
    corrupt, missing = _register_broken(home, champion_dir, "corrupt"), _register_broken(home, champion_dir, "missing")
    reasons = []
    async with serving(uri, model_name=NAME, prediction_log="predictions.db", flush_interval_s=3600) as client:
        answer = await client.post("/v1/predict", json={"texts": ["the flight was great", "lost my bag again"]})
        for version in (corrupt, missing):
            set_alias(uri, NAME, "champion", version)

            async def failed(version: str = version) -> bool:
                return f"version {version} failed to load" in ((await client.get("/readyz")).json()["reason"] or "")

            await wait_until(failed)
            reasons.append((await client.get("/readyz")).json()["reason"])
            still = await client.post("/v1/predict", json={"texts": ["still here?"]})
            assert still.status_code == 200 and still.json()["model"]["version"] == result["version"]
    assert answer.status_code == 200 and answer.json()["model"]["version"] == result["version"]
    assert "OnnxLoadError" in reasons[0] and "model.onnx cannot be loaded" in reasons[0]
    assert "model.onnx is missing" in reasons[1]
    logged = open_store(home / "predictions.db").read_predictions()
    embeddings = decode_embeddings(logged["embedding"])
    assert len(logged) == 4 and embeddings is not None and embeddings.shape == (4, 64)  # the tiny config's hidden
