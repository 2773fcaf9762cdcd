"""Prometheus metrics of the service, on a registry of its own (one per app, so tests can build several).

HTTP request counts and latency histograms are counted by `serving.app.HttpMetrics` under the names
prometheus-fastapi-instrumentator gives them (which still serves /metrics); the model-specific ones are declared
here. With several workers, `llmops serve` sets PROMETHEUS_MULTIPROC_DIR, and /metrics adds up every worker's
values (gauges as declared).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HTTP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "http_requests", "Requests by route, method and status", ["handler", "method", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "http_request_duration_seconds", "Request to last byte of the answer, by route and method",
            ["handler", "method"], buckets=HTTP_SECONDS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram("llmops_batch_size", "Texts per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("llmops_inference_seconds", "Time of one forward pass", registry=r)
        self.queue_depth = Gauge(
            "llmops_queue_depth", "Texts waiting for the model", registry=r, multiprocess_mode="livesum"
        )
        self.model_info = Gauge(
            "llmops_model_info",
            "The version each alias serves (value 1)",
            ["model", "alias", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter("llmops_model_reloads", "Versions loaded and swapped in", ["model", "alias"], registry=r)
        self.reload_failures = Counter(
            "llmops_model_reload_failures",
            "Versions that failed to load (the old one kept serving)",
            ["model", "alias"],
            registry=r,
        )
        self.reload_error = Gauge(
            "llmops_model_reload_error",
            "1 while the alias's current target failed to load",
            ["model", "alias"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.predictions = Counter(
            "llmops_predictions", "Texts scored, by which model answered and the label", ["route", "label"], registry=r
        )
        self.rejected = Counter("llmops_rejected_requests", "Requests refused before scoring", ["reason"], registry=r)
        self.key_requests = Counter(
            "llmops_key_requests", "Requests answered, by API key name and model", ["key", "model"], registry=r
        )
        self.key_tokens = Counter(
            "llmops_key_tokens", "Tokens by API key name, model and kind", ["key", "model", "kind"], registry=r
        )
        self.guard_texts = Counter(
            "llmops_guard_texts", "Texts checked for personal data and credentials", ["model", "direction"], registry=r
        )
        self.guard_flagged = Counter(
            "llmops_guard_flagged_texts", "Texts holding personal data or a credential", ["model", "direction"],
            registry=r,
        )  # fmt: skip
        self.guard_findings = Counter(
            "llmops_guard_findings", "Personal data and credentials found, by kind", ["model", "direction", "entity"],
            registry=r,
        )  # fmt: skip
        self.limited = Counter("llmops_limited_requests", "Requests over a key's limit", ["key", "limit"], registry=r)
        self.log_pending = Gauge(
            "llmops_prediction_log_pending", "Rows buffered, not yet written", registry=r, multiprocess_mode="livesum"
        )
        self.log_failures = Gauge(
            "llmops_prediction_log_write_failures",
            "Failed prediction-log flushes",
            registry=r,
            multiprocess_mode="livesum",
        )

        # generators, per model and version
        versioned = ["model", "version"]
        self.ttft = Histogram(
            "llmops_time_to_first_token_seconds", "Request to first token", versioned, buckets=SECONDS, registry=r
        )
        self.tpot = Histogram(
            "llmops_time_per_output_token_seconds",
            "Mean time between tokens after the first, per request",
            versioned,
            buckets=TOKEN_SECONDS,
            registry=r,
        )
        self.e2e = Histogram(
            "llmops_generation_seconds", "Request to last token", versioned, buckets=SECONDS, registry=r
        )
        self.prompt_tokens = Counter(
            "llmops_prompt_tokens", "Prompt tokens of answered requests", versioned, registry=r
        )
        self.generated_tokens = Counter("llmops_generated_tokens", "Tokens generated", versioned, registry=r)
        self.generations = Counter(
            "llmops_generations", "Generations that ended, by why", [*versioned, "finish_reason"], registry=r
        )
        self.running = Gauge(
            "llmops_running_sequences",
            "Sequences decoding now",
            versioned,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.waiting = Gauge(
            "llmops_waiting_sequences",
            "Sequences waiting for a decoding slot",
            versioned,
            registry=r,
            multiprocess_mode="livesum",
        )

    def set_model(self, model: str, alias: str, version: str) -> None:
        """Exactly one version per alias in `llmops_model_info`."""
        for labels in list(self.model_info._metrics):  # the only way prometheus_client lists a metric's children
            if labels[0] == model and labels[1] == alias:
                self.model_info.remove(*labels)
        self.model_info.labels(model, alias, version).set(1)


class Children:
    """A labelled metric's children kept by their label values: prometheus_client's `labels` checks the values and
    looks the child up under a lock on every call, on the request path. At most `limit` are kept (where a client
    chooses a label's value, as an HTTP method, the cache stays bounded)."""

    def __init__(self, metric: Any, limit: int = 10_000):
        self.metric = metric
        self.limit = limit
        self._kept: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._kept.get(values)
        if child is None:
            if len(self._kept) >= self.limit:
                self._kept.clear()
            child = self._kept[values] = self.metric.labels(*values)
        return child
