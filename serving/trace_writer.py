"""The MLflow trace writer: a process of its own (`serving.tracing.MlflowTraces` starts it), which reads pickled
generations from its standard input and writes each as a trace in the store named on its command line, at a
lower priority than the service, until its input ends."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("llmops.mlflow_traces")

NICE = 10
"""How much lower than the service the writer runs (`os.nice`): the service's threads come first on the cores."""


def main(tracking_uri: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.nice(NICE)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    while True:
        try:
            fields, (experiment_id, run_id, model_id), tags = pickle.load(sys.stdin.buffer)
        except EOFError:
            break
        try:
            write_trace(SimpleNamespace(**fields), experiment_id, run_id, model_id, tags)
        except Exception:
            log.exception("could not write an MLflow trace of request %s", fields.get("request_id", "?"))
    mlflow.flush_trace_async_logging()


def write_trace(row: Any, experiment_id: str, run_id: str, model_id: str | None, tags: dict[str, str]) -> None:
    """One generation as a trace of one LLM span, with the times the service measured."""
    import mlflow
    from mlflow.entities import SpanType
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

    end_ns = int(row.ts * 1e9)
    start_ns = end_ns - int(row.latency_ms * 1e6)
    metadata = {TraceMetadataKey.TRACE_USER: row.key_name or "none"}
    metadata[TraceMetadataKey.SOURCE_RUN] = run_id
    if model_id:
        metadata[TraceMetadataKey.MODEL_ID] = model_id  # listed on the logged model's page too
    # OpenAI's request and answer shapes, which the Traces view renders (a chat as its turns)
    choice: dict[str, Any] = {"index": 0, "text": row.completion, "finish_reason": row.finish_reason}
    inputs: dict[str, Any] = {"model": row.model_name, "prompt": row.prompt}
    if row.messages:
        inputs = {"model": row.model_name, "messages": json.loads(row.messages)}
        choice = {"index": 0, "message": {"role": "assistant", "content": row.completion},
                  "finish_reason": row.finish_reason}  # fmt: skip
    span = mlflow.start_span_no_context(
        f"{row.route} {row.model_name}",
        span_type=SpanType.LLM,
        inputs=inputs,
        attributes={
            "model": row.model_name,
            "model_version": row.model_version,
            "ttft_ms": round(row.ttft_ms, 3),
            "finish_reason": row.finish_reason,
            "request_id": row.request_id,
        },
        tags={"llmops.request_id": row.request_id, **tags},
        metadata=metadata,
        experiment_id=experiment_id,
        start_time_ns=start_ns,
    )
    span.set_attribute(
        SpanAttributeKey.CHAT_USAGE,
        {
            "input_tokens": row.prompt_tokens,
            "output_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
        },
    )
    span.end(outputs={"model": row.model_name, "choices": [choice]}, end_time_ns=end_ns)


if __name__ == "__main__":
    main(sys.argv[1])
