"""The real `llmops serve` process on a free loopback port, serving a classifier and a generator, driven over
HTTP by standard clients: httpx, MLflow's own scoring-server client, Triton's Open Inference Protocol client
and the official `openai` client."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from llmops.predlog import open_store
from tests.http_service import serve_process
from tests.tiny_registry import LABELS, register_generators, register_versions, set_alias

NAME = "tiny-process"
GENERATOR = "tiny-process-generator"


@pytest.fixture
def server(workdir: Path) -> Iterator[tuple[str, int, subprocess.Popen]]:
    store = register_versions(workdir / "registry", NAME, seeds=[7])
    register_generators(workdir / "registry", GENERATOR, seeds=[7], uri=store)
    set_alias(store, NAME, "champion", "1")
    set_alias(store, GENERATOR, "champion", "1")
    config = workdir / "serve.yaml"
    # Two workers: each loads the models and batches on its own; /metrics adds them up.
    serve = {"flush_interval_s": 60, "workers": 2, "threads": 1, "models": [NAME, GENERATOR]}
    config.write_text(yaml.safe_dump({"registry": {"model_name": NAME}, "serve": serve}))
    base, port, proc = serve_process(workdir, config, store)
    yield base, port, proc
    if proc.poll() is None:
        proc.kill()


def test_the_real_server_answers_standard_clients_and_flushes_on_sigterm(
    server: tuple[str, int, subprocess.Popen], workdir: Path
) -> None:
    import tritonclient.http as triton
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    base, port, proc = server
    ours = httpx.post(f"{base}/v1/predict", json={"texts": ["great flight", "awful delay"]}, timeout=30)
    assert ours.status_code == 200 and ours.json()["model"]["version"] == "1"

    mlflow_client = ScoringServerClient("127.0.0.1", port)
    mlflow_client.wait_server_ready(timeout=10)
    frame = mlflow_client.invoke(pd.DataFrame({"text": ["great flight", "awful delay"]})).get_predictions()
    assert list(frame["label"]) == [p["label"] for p in ours.json()["predictions"]]

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_model_ready(NAME)
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array(["great flight", "awful delay"], dtype=object), binary_data=True)
    result = client.infer(NAME, [text], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, len(LABELS))
    expected = [[p["probabilities"][label] for label in LABELS] for p in ours.json()["predictions"]]
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    import openai

    llm = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in llm.models.list().data} == {NAME, GENERATOR}
    done = llm.completions.create(model=GENERATOR, prompt="write a tweet", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens <= 5 and done.system_fingerprint == f"llmops-{GENERATOR}-v1"
    streamed = llm.chat.completions.create(
        model=GENERATOR, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason in {"stop", "length"}

    metrics = httpx.get(f"{base}/metrics").text
    assert f'llmops_model_info{{alias="champion",model="{NAME}",version="1"}} 1.0' in metrics
    assert 'http_requests_total{handler="/v1/predict",method="POST",status="200"} 1.0' in metrics
    assert 'http_requests_total{handler="/invocations",method="POST",status="200"} 1.0' in metrics

    proc.send_signal(signal.SIGTERM)  # graceful: the prediction log is flushed long before its 60 s interval
    output, _ = proc.communicate(timeout=60)
    assert output.count("Application shutdown complete") == 2  # both workers; uvicorn then re-raises SIGTERM
    assert output.count('"POST /v1/predict HTTP/1.1" 200') == 1  # the access log, batched, written by the end
    assert output.count('"POST /invocations HTTP/1.1" 200') == 1
    logged = open_store(workdir / "predictions.db").read_predictions()
    assert len(logged) == 6  # 2 texts through each of the three protocols
    assert len(open_store(workdir / "predictions.db").read_generations()) == 2
