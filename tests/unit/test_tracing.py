"""Which exporter the standard OTEL_* settings choose, the settings refused with a reason, child spans, and the
MLflow trace writer's failure."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.trace import StatusCode

from llmops.config import ConfigError
from serving.tracing import MlflowTraces, Tracing, exporter_from_environment

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SERVICE_NAME": "tweets"},
        ENDPOINT | {"OTEL_SDK_DISABLED": "true"},
        ENDPOINT | {"OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_tracing_is_off_unless_an_exporter_is_named(env: dict[str, str]) -> None:
    assert exporter_from_environment(env) is None
    assert not Tracing(None).on


def test_an_endpoint_or_an_exporter_turns_it_on() -> None:
    assert isinstance(exporter_from_environment(ENDPOINT), OTLPSpanExporter)
    traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}
    assert isinstance(exporter_from_environment(traces), OTLPSpanExporter)
    assert isinstance(exporter_from_environment({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (ENDPOINT | {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
        (ENDPOINT | {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "http/protobuf"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'otlp' or 'console'"),
    ],
)
def test_settings_it_cannot_honour_are_refused_with_what_works(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        exporter_from_environment(env)


@pytest.mark.parametrize("sampled", [True, False])
def test_a_callers_sampling_decision_is_followed_and_its_trace_id_returned(sampled: bool) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter)
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    flags = "01" if sampled else "00"
    headers = [(b"traceparent", f"00-{trace_id}-{caller_span}-{flags}".encode())]
    span, token = tracing.start_request("POST", "/v1/predict", headers, "r1")
    returned = tracing.traceparent(span).decode().split("-")
    with tracing.span("auth"):
        tracing.record("batch", 1.0, 2.0)
    with pytest.raises(ValueError), tracing.span("guards"):
        raise ValueError("refused")
    tracing.end_request(span, token, "POST", "/v1/predict", 200)
    tracing.shutdown()
    assert returned[1] == trace_id and returned[2] != caller_span and returned[3] == flags
    spans = {s.name: s for s in exporter.get_finished_spans()}
    if not sampled:  # the caller decided: nothing recorded, not even the children
        assert spans == {}
        return
    assert set(spans) == {"POST /v1/predict", "auth", "batch", "guards"}
    request = spans["POST /v1/predict"]
    assert request.parent is not None and format(request.parent.span_id, "016x") == caller_span
    assert spans["auth"].parent.span_id == request.context.span_id  # type: ignore[union-attr]
    assert spans["batch"].parent.span_id == spans["auth"].context.span_id  # type: ignore[union-attr]
    assert format(request.context.span_id, "016x") == returned[2]
    assert spans["guards"].parent.span_id == request.context.span_id  # type: ignore[union-attr]
    # a block left by an exception is an error, as the SDK's own spans record it
    assert (
        spans["guards"].status.status_code == StatusCode.ERROR and spans["auth"].status.status_code == StatusCode.UNSET
    )
    assert [e.attributes["exception.message"] for e in spans["guards"].events] == ["refused"]  # type: ignore[index]
    assert (
        spans["auth"].resource is request.resource
        and spans["auth"].instrumentation_scope == request.instrumentation_scope
    )


def test_a_trace_writer_that_has_stopped_costs_the_service_a_warning_and_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow traces are written by a process of their own: if it dies, generations go untraced, said in the log."""
    from llmops.predlog import GenerationRow
    from serving.models import Source

    traces = MlflowTraces(1.0, f"sqlite:///{tmp_path / 'mlflow.db'}")
    traces.start()
    assert traces._writer is None  # none until there is a trace to write
    row = GenerationRow(
        request_id="r1", idx=0, ts=time.time(), model_name="m", model_version="1", route="champion",
        prompt="hi", messages="", completion="hello", prompt_tokens=1, completion_tokens=1, finish_reason="stop",
        ttft_ms=1.0, latency_ms=2.0, embedding=None, unk_share=0.0, key_name=None,
    )  # fmt: skip
    traces.offer(row, Source("0", "run", None))
    deadline = time.monotonic() + 30
    while traces._writer is None:
        assert time.monotonic() < deadline, "the first trace started no writer"
        time.sleep(0.05)
    traces._writer.kill()
    traces._writer.wait()
    with caplog.at_level(logging.WARNING, logger="serving.tracing"):
        traces.offer(row, Source("0", "run", None))
        traces.stop()
    assert "the MLflow trace writer has stopped" in caplog.text
