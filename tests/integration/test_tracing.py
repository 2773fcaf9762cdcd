"""Request traces against a real receiver: the service exports OpenTelemetry spans over OTLP/HTTP, configured by
the standard OTEL_* variables, to a real `mlflow server` (its `/v1/traces`, an OTLP receiver), and writes MLflow
traces of its generations to the experiment that trained the served version.

One store under a real MLflow server: `traced-sentiment` (a classifier whose rule blocks personal data, so its
requests are checked by the guards) and `traced-generator`, both `champion`. A stored key with limits is used,
so every request is authenticated and counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.gateway import GatewayStore
from tests.http_service import in_process, mlflow_server
from tests.tiny_registry import register_pair

CLASSIFIER, GENERATOR = "traced-sentiment", "traced-generator"
pytestmark = pytest.mark.anyio

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real MLflow server over a store holding the two champions: its URL, and the store's URI."""
    root = tmp_path_factory.mktemp("tracing")
    uri = register_pair(root, CLASSIFIER, GENERATOR, seed=5)
    with mlflow_server(uri, root) as url:
        yield url, uri


def spans_of(client: MlflowClient, trace_id: str, timeout: float = 30) -> list[Any]:
    """The spans the receiver holds of OpenTelemetry trace `trace_id` (waiting for the exporter's batches)."""
    deadline = time.time() + timeout
    while True:
        try:
            trace = client.get_trace(f"tr-{trace_id}")
            if trace is not None and len(trace.data.spans) > 1:
                return trace.data.spans
        except Exception:
            if time.time() > deadline:
                raise
        assert time.time() < deadline, f"trace {trace_id} never reached the receiver"
        time.sleep(0.3)


async def test_spans_reach_a_real_otlp_receiver_under_the_callers_parent_and_generations_reach_mlflow_traces(
    receiver: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, uri = receiver
    client = MlflowClient(tracking_uri=url)
    spans_experiment = client.create_experiment("serving-spans")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{url}/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-mlflow-experiment-id={spans_experiment}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tweets-serving")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    store = tmp_path / "gateway.db"
    secret, _ = GatewayStore(str(store)).create("ops-team", rpm=1000)
    cfg = LlmopsConfig(
        registry=RegistryConfig(model_name=CLASSIFIER),
        serve=ServeConfig(
            models=[CLASSIFIER, GENERATOR],
            model_cache=str(tmp_path / "served"),
            prediction_log=str(tmp_path / "predictions.db"),
            gateway_store=str(store),
            guards={"models": {CLASSIFIER: {"prompts": "block"}}},
            mlflow_traces=1.0,
        ),
    )
    headers = {"Authorization": f"Bearer {secret}", "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    async with in_process(cfg, uri) as (http, _):
        scored = await http.post("/v1/predict", json={"texts": ["what a day"]}, headers=headers)
        assert scored.status_code == 200, scored.text
        version, trace_id, span_id, flags = scored.headers["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01") and span_id != CALLER_SPAN

        generated = await http.post(
            "/v1/completions",
            json={"model": GENERATOR, "prompt": "reply to jo@example.com", "max_tokens": 6, "temperature": 0},
            headers={"Authorization": f"Bearer {secret}"},  # no traceparent: the service starts a trace
        )
        assert generated.status_code == 200, generated.text
        generation_trace = generated.headers["traceparent"].split("-")[1]
        assert generation_trace != CALLER_TRACE
        request_id = generated.headers["x-request-id"]
        probed = await http.get("/readyz", headers=headers)
        assert probed.status_code == 200 and "traceparent" not in probed.headers  # probes are not traced
        answer = generated.json()["choices"][0]["text"]

    # the classification: the caller's span is the parent of the request's, which is the parent of the rest
    spans = spans_of(client, CALLER_TRACE)
    by_name = {span.name: span for span in spans}
    request = by_name["POST /v1/predict"]
    assert request.parent_id == CALLER_SPAN and request.span_id == span_id
    assert request.attributes["http.response.status_code"] == 200
    assert {"auth", "limits", "guards", "batch", "log"} <= set(by_name), sorted(by_name)
    for name in ("auth", "limits", "guards", "batch", "log"):
        child = by_name[name]
        assert child.parent_id == span_id, name
        assert request.start_time_ns <= child.start_time_ns <= child.end_time_ns <= request.end_time_ns, name
    assert by_name["batch"].attributes["llmops.batch.texts"] == 1
    assert by_name["limits"].attributes["llmops.key"] == "ops-team"

    # the generation: queue, then the prompt's pass, then decoding, in order, under the request's span
    spans = spans_of(client, generation_trace)
    by_name = {span.name: span for span in spans}
    request = by_name["POST /v1/completions"]
    assert request.parent_id is None
    queue, prefill, decode = by_name["queue"], by_name["prefill"], by_name["decode"]
    assert queue.parent_id == prefill.parent_id == decode.parent_id == by_name["log"].parent_id == request.span_id
    assert queue.end_time_ns <= prefill.start_time_ns < prefill.end_time_ns <= decode.start_time_ns
    assert decode.end_time_ns <= request.end_time_ns
    assert prefill.attributes["llmops.prompt_tokens"] > 0 and decode.attributes["llmops.completion_tokens"] == 6

    # MLflow tracing: the generation is in the experiment that trained the generator, redacted as the log is
    version = client.get_model_version_by_alias(GENERATOR, "champion")
    experiment = client.get_run(version.run_id).info.experiment_id
    deadline = time.time() + 30
    while not (found := client.search_traces([experiment], filter_string=f"tag.`llmops.request_id` = '{request_id}'")):
        assert time.time() < deadline, "the generation never reached MLflow's traces"
        time.sleep(0.3)
    (trace,) = found
    root = trace.data.spans[0]
    assert root.inputs == {"model": GENERATOR, "prompt": "reply to <EMAIL_ADDRESS>"}  # never the address itself
    assert root.outputs["choices"] == [{"index": 0, "text": answer, "finish_reason": "length"}]
    assert root.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == 6
    assert trace.info.tags["otel.trace_id"] == generation_trace
    assert trace.info.trace_metadata["mlflow.trace.user"] == "ops-team"
    assert trace.info.trace_metadata["mlflow.sourceRun"] == version.run_id
    assert trace.info.execution_duration > 0
