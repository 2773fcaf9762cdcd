"""Which exporter the standard OTEL_* settings choose, and the settings refused with a reason."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from llmops.config import ConfigError
from serving.tracing import Tracing, exporter_from_environment

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
