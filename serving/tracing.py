"""Request traces: OpenTelemetry spans for every request, and MLflow traces for a share of the generations.

OpenTelemetry is on when the standard settings name an exporter: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP over HTTP with protobuf: a collector's port 4318, or an MLflow server's
`/v1/traces`), or `OTEL_TRACES_EXPORTER=otlp|console`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
turn it off. The SDK reads the rest of the standard settings itself: `OTEL_SERVICE_NAME` (default
`llmops-serving`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, `_COMPRESSION`,
`OTEL_TRACES_SAMPLER` and `_ARG`, `OTEL_BSP_*`. Off, a request pays for nothing but one attribute read.

Each request is a SERVER span named after its route (`POST /v1/predict`), the child of the caller's W3C
`traceparent` when one is sent; the response's `traceparent` names it. Its children, where the request has them:
`auth` (the key), `limits` (the key's limits), `guards` (prompts a model refuses with personal data), `queue`
(waiting for the model), `batch` (a classifier's forward pass, with the batch's size), `prefill` and `decode`
(a generator's: its prompt, then its answer token by token), `log` (the prediction-log row). The engine's spans
are written when the sequence ends, with the times it recorded, from the engine's thread: no request waits for
them.

The children are written as finished spans (`ReadableSpan`, what the SDK's own spans hand the span processor when
they end), built once their times are known, not as live SDK spans: a child cost the event loop 17 us through
the SDK's tracer (sampler, limits, locks, start and end hooks) and costs 3 us so (measured); they are leaves,
children of a sampled request, so the SDK's sampler would have kept them all.

MLflow traces (`serve.mlflow_traces`, a share of the generations) go to the experiment of the run that trained
the served version, so its Traces view (the GenAI page) shows served requests: the prompt and the answer
(redacted as the prediction log is), tokens, time to first token and latency, the model version and the key's
name. They are written by a process of their own, at a lower priority (`MlflowTraces`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import llmops
from llmops.config import ConfigError

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN = contextlib.nullcontext()
_PARENT: ContextVar[SpanContext | None] = ContextVar("llmops_span", default=None)
"""The span a child starts under: the request's (`start_request`), or the child's around whose block it is; its
children are written where it is sampled. None outside a traced request."""
_ROOT = otel_context.Context()
"""A request without a `traceparent` starts a trace of its own."""
_UNSET = Status(StatusCode.UNSET)
RequestToken = Token[SpanContext | None]
"""What `end_request` needs to restore the context `start_request` set."""


def exporter_from_environment(env: Mapping[str, str]) -> SpanExporter | None:
    """The exporter the OTEL_* settings ask for, or None (tracing off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen == "none" or (not chosen and not endpoint):
        return None
    if chosen == "console":
        return ConsoleSpanExporter()
    if chosen not in ("", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER={chosen!r}: llmops exports traces with 'otlp' or 'console'")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol not in ("", "http/protobuf"):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: llmops sends OTLP over HTTP with protobuf "
            "(http/protobuf: a collector's port 4318); gRPC is not installed"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout and compression from the OTEL_* settings


class Tracing:
    """The service's OpenTelemetry tracer (`on` False: every call here is a no-op)."""

    def __init__(self, exporter: SpanExporter | None):
        self.on = exporter is not None
        self._provider: TracerProvider | None = None
        self._processor: BatchSpanProcessor | None = None
        self._resource: Resource | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        self._scope = InstrumentationScope("llmops.serving", llmops.__version__)
        self._ids = RandomIdGenerator()
        # perf_counter readings (what the batcher and the engine record) to the epoch nanoseconds spans take
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()
        if exporter is not None:
            resource = Resource.create({"service.version": llmops.__version__})
            if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
                resource = resource.merge(Resource({SERVICE_NAME: "llmops-serving"}))
            self._resource = resource
            self._provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
            self._processor = BatchSpanProcessor(exporter)
            self._provider.add_span_processor(self._processor)
            self._tracer = self._provider.get_tracer(self._scope.name, self._scope.version)

    @classmethod
    def from_environment(cls) -> Tracing:
        return cls(exporter_from_environment(os.environ))

    def shutdown(self) -> None:
        """Export what is buffered, then stop."""
        if self._provider is not None:
            self._provider.shutdown()

    # --- the request's span --------------------------------------------------------------------------------

    def start_request(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], request_id: str
    ) -> tuple[Span, RequestToken]:
        """The request's SERVER span, the parent of `span` and `record` until `end_request` (its own parent: the
        caller's `traceparent`)."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}
        parent = _PROPAGATOR.extract(carrier) if carrier else _ROOT
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path, "llmops.request_id": request_id},
        )
        return span, _PARENT.set(span.get_span_context())

    @staticmethod
    def traceparent(span: Span) -> bytes:
        """The W3C `traceparent` naming `span` (what the propagator writes, without building a context for it)."""
        context = span.get_span_context()
        if not context.is_valid:
            return b""
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()

    @staticmethod
    def end_request(span: Span, token: RequestToken, method: str, route: str | None, status: int | None) -> None:
        _PARENT.reset(token)
        if not span.is_recording():  # not sampled: nothing to name or end
            return
        if route is not None:
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    # --- its children --------------------------------------------------------------------------------------

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span around a block (nothing when tracing is off, or the request is not sampled).
        An exception leaving the block marks it as an error, as the SDK's spans do."""
        parent = _PARENT.get()
        if parent is None or not parent.trace_flags.sampled:
            return _NO_SPAN
        return _Child(self, name, parent, attributes or None)

    def current(self) -> SpanContext | None:
        """The current span, to parent spans written later on another thread (None when off)."""
        return _PARENT.get()

    def record(
        self,
        name: str,
        start: float,
        end: float,
        parent: SpanContext | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """A span already over, from two `time.perf_counter()` readings (the child of `parent`, else of the
        current span; nothing where that one is not sampled)."""
        if parent is None:
            parent = _PARENT.get()
        if parent is not None and parent.trace_flags.sampled:
            self._write(name, self._child_of(parent), parent, self._ns(start), self._ns(end), attributes)

    def _child_of(self, parent: SpanContext) -> SpanContext:
        return SpanContext(parent.trace_id, self._ids.generate_span_id(), False, parent.trace_flags, parent.trace_state)

    def _write(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any] | None,
        status: Status = _UNSET,
        events: Sequence[Event] = (),
    ) -> None:
        if self._processor is None:
            return
        self._processor.on_end(
            ReadableSpan(
                name,
                context,
                parent,
                self._resource,
                attributes,
                events,
                status=status,
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=self._scope,
            )
        )

    def _ns(self, perf_s: float) -> int:
        return int(perf_s * 1e9) + self._epoch_offset_ns


class _Child:
    """`Tracing.span`'s block: the parent of spans started inside it, written when it ends."""

    __slots__ = ("_attributes", "_context", "_name", "_parent", "_start", "_token", "_tracing")

    def __init__(self, tracing: Tracing, name: str, parent: SpanContext, attributes: dict[str, Any] | None):
        self._tracing, self._name, self._parent, self._attributes = tracing, name, parent, attributes

    def __enter__(self) -> None:
        self._context = self._tracing._child_of(self._parent)
        self._token = _PARENT.set(self._context)
        self._start = time.time_ns()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        end = time.time_ns()
        _PARENT.reset(self._token)
        status: Status = _UNSET
        events: tuple[Event, ...] = ()
        if kind is not None:  # what the SDK's spans record of an exception leaving them
            status = Status(StatusCode.ERROR, f"{kind.__name__}: {error}")
            events = (Event("exception", {"exception.type": kind.__name__, "exception.message": str(error)}, end),)
        tracing = self._tracing
        tracing._write(self._name, self._context, self._parent, self._start, end, self._attributes, status, events)


class MlflowTraces:
    """A share of the generations as MLflow traces (`serve.mlflow_traces`), written by a process of their own.

    MLflow's store takes 20-35 ms of CPU a trace, most of it Python (about 45 SQL statements through SQLAlchemy);
    written from a thread of the service it held the GIL the engine's thread needs between tokens (a 135M GGUF
    model served 3-4% fewer tokens/s with one generation in ten traced, measured). The writer process
    (`serving.trace_writer`) holds no lock of the service's and runs at a lower priority: the service's threads
    come first on the cores. A thread of the service scrubs each row as the prediction log is, then hands it
    over."""

    def __init__(self, share: float, tracking_uri: str, scrub: Any = None, max_pending: int = 1000):
        self.share = share
        self.tracking_uri = tracking_uri
        self.scrub = scrub
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._warned = -math.inf
        self._thread: threading.Thread | None = None
        self._writer: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.share > 0:
            self._thread = threading.Thread(target=self._run, name="mlflow-traces", daemon=True)
            self._thread.start()

    def _start_writer(self) -> subprocess.Popen[bytes]:
        """The writer process, started with the first trace (a service that traces nothing starts none)."""
        # MLflow would send its traces to the OTEL_* endpoint instead of its store once one is set: these stay in
        # MLflow (set MLFLOW_ENABLE_OTLP_EXPORTER=true to send them there too)
        env = {"MLFLOW_ENABLE_OTLP_EXPORTER": "false"} | os.environ
        # a process that imports what a trace needs and no more (a spawned `multiprocessing` child would import the
        # service's main module first: 560 MB resident against about 250)
        self._writer = subprocess.Popen(
            [sys.executable, "-m", "serving.trace_writer", self.tracking_uri],
            stdin=subprocess.PIPE,
            env=env | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        return self._writer

    def offer(self, row: Any, source: Any, parent: SpanContext | None = None) -> None:
        """Trace this generation (its prediction-log row; `source`: the version's `serving.models.Source`) with
        probability `share`; dropped when the writer is `max_pending` behind, so a slow store never holds the
        engine back. `parent`: the request's OpenTelemetry span, whose trace id the MLflow trace is tagged
        with."""
        if self._thread is None or source is None or random.random() >= self.share:
            return
        tags = {}
        if parent is not None:
            tags["otel.trace_id"] = format(parent.trace_id, "032x")
        try:
            self._queue.put_nowait((row, source, tags))
        except queue.Full:
            self._warn(
                f"MLflow traces are {self._queue.maxsize} behind: generations are not traced until they catch up"
            )

    def stop(self) -> None:
        """Write what was handed over, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
        if self._writer is not None and self._writer.stdin is not None:
            with contextlib.suppress(OSError):
                self._writer.stdin.close()  # the writer's end of input: it writes what it holds and exits
            try:
                self._writer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._writer.kill()

    def _warn(self, message: str) -> None:
        """Said once a minute at most."""
        if time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning(message)

    def _run(self) -> None:
        writer: subprocess.Popen[bytes] | None = None
        while (item := self._queue.get()) is not None:
            row, source, tags = item
            if writer is None:
                writer = self._start_writer()
            pipe = writer.stdin
            assert pipe is not None
            if writer.poll() is not None:  # its error is in the service's log: nothing is queued behind it
                self._warn(f"the MLflow trace writer has stopped (exit code {writer.returncode}): not traced")
                continue
            try:
                if self.scrub is not None:
                    row = self.scrub(row)
                fields = {k: v for k, v in dataclasses.asdict(row).items() if k != "embedding"}
                pickle.dump((fields, (source.experiment_id, source.run_id, source.model_id), tags), pipe)
                pipe.flush()
            except Exception:
                log.exception("could not hand over an MLflow trace of request %s", getattr(row, "request_id", "?"))
