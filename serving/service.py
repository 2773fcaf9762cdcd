"""The service's state, shared by every protocol: the followed models, the classifier's batcher, the
generators' engines and the prediction log.

Routes get it through `ServiceDep` (serving/deps.py). Every classification ends in
:meth:`Service.score`; every generation in `serving.generate.generate`, and once its engine finishes it, in
:meth:`Service.record_generation` (metrics and the prediction-log row).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from llmops.classification.candidate import Forward
from llmops.config import LlmopsConfig
from llmops.generation.candidate import Prompt
from llmops.metrics.text import unknown_share
from llmops.predlog import (
    FeedbackRow,
    GenerationFeedbackRow,
    GenerationRow,
    PredictionLogWriter,
    PredictionRow,
    encode_embedding,
    open_store,
    probabilities_json,
)
from llmops.registry import CHALLENGER
from serving.auth import CALLER, Caller, Gate
from serving.batcher import MicroBatcher, QueueFull
from serving.batches import BatchRunner, BatchStore
from serving.engine import GenerationEngine, Sequence
from serving.errors import ApiError
from serving.guards import Guards
from serving.metrics import Children, ServingMetrics
from serving.models import LoadedModel, ModelWatcher
from serving.tracing import MlflowTraces, Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Origin:
    """Where a generation came from: what its prediction-log row and metrics need once it finishes."""

    request_id: str
    idx: int
    """The prompt's position in its request."""
    prompt: Prompt
    route: str
    model: LoadedModel
    caller: Caller | None = None
    """Who asked (None without keys): usage and limits are counted against it."""
    trace: Any = None
    """The request's span (tracing on): the parent of the engine's spans."""


@dataclass(frozen=True)
class Scored:
    model: LoadedModel
    outputs: Forward

    @property
    def probs(self) -> np.ndarray:
        """(n_texts, n_labels)"""
        return self.outputs.probs

    @cached_property
    def rows(self) -> list[list[float]]:
        """`probs` as Python floats, converted once for the route's answer and the log."""
        return self.outputs.probs.tolist()

    @cached_property
    def _labels(self) -> list[str]:
        labels = self.model.labels
        return [labels[row.index(max(row))] for row in self.rows]

    def labels(self) -> list[str]:
        return self._labels


class Service:
    def __init__(self, cfg: LlmopsConfig, tracking_uri: str):
        self.cfg = cfg.serve
        self.model_name = cfg.registry.model_name
        """The classifier routes' model when it is served (else the first served classifier)."""
        self.metrics = ServingMetrics()
        self._predicted = Children(self.metrics.predictions)
        self.tracing = Tracing.from_environment()
        self.gate = Gate(self.cfg, self.metrics)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        cache = Path(self.cfg.model_cache)

        def watcher(name: str, alias: str) -> ModelWatcher:
            return ModelWatcher(
                client,
                tracking_uri,
                name,
                alias,
                cache,
                self.metrics,
                self.cfg.poll_interval_s,
                self.cfg.retry_failed_after_s,
                self._engine,
                lambda name: self.models.get(name),
            )

        self.models = {name: watcher(name, self.cfg.alias) for name in cfg.served_models}
        """Every served model's watcher, by registered name."""
        shadowing = self.cfg.shadow or self.cfg.canary_share > 0
        self.challenger = watcher(self.model_name, CHALLENGER) if shadowing else None
        self.batcher = MicroBatcher(
            self.metrics,
            enabled=self.cfg.batching,
            max_batch_size=self.cfg.max_batch_size,
            max_wait_ms=self.cfg.max_wait_ms,
            max_queue=self.cfg.max_queue,
            embeddings=self.cfg.log_embeddings,
            tracing=self.tracing,
        )
        self.guards = Guards(self.cfg.guards, self.metrics)
        scrub = self.guards.scrub if self.guards.needed else None
        self.log = PredictionLogWriter(open_store(self.cfg.prediction_log), self.cfg.flush_interval_s, scrub=scrub)
        self.mlflow_traces = MlflowTraces(self.cfg.mlflow_traces, tracking_uri, scrub)
        self.batches = BatchStore(self.cfg.batches.dir)
        """OpenAI's Batch API: uploaded files and batches (`serving.batches`), run by `batch_runner`."""
        self.batch_runner = BatchRunner(self.batches, self.cfg.batches.concurrency, self.cfg.batches.max_requests)
        self._watchers: list[asyncio.Task[None]] = []
        self._shadows: set[asyncio.Task[None]] = set()

    def _engine(self, generator: Any, name: str, version: str) -> GenerationEngine:
        """The torch runtime's backend: continuous batching over a `Generator` (its model and KV cache)."""

        def on_step(running: int, waiting: int) -> None:
            self.metrics.running.labels(name, version).set(running)
            self.metrics.waiting.labels(name, version).set(waiting)

        return GenerationEngine(
            generator,
            max_running=self.cfg.max_running,
            max_waiting=self.cfg.max_waiting,
            continuous=self.cfg.continuous_batching,
            embeddings=self.cfg.log_embeddings,
            max_positions=self.cfg.max_prompt_tokens + self.cfg.max_new_tokens,
            on_finish=self.record_generation,
            on_step=on_step,
        )

    def record_generation(self, sequence: Sequence) -> None:
        """Metrics and the prediction-log row of a finished generation (called on the engine's thread)."""
        origin: Origin = sequence.context
        model, prompt = origin.model, origin.prompt
        if isinstance(prompt, str):
            text, messages = prompt, ""
        else:
            users = [m["content"] for m in prompt if m["role"] == "user"]
            text, messages = (users[-1] if users else prompt[-1]["content"]), json.dumps(list(prompt))
        finished = sequence.finished_at or time.perf_counter()
        first = sequence.first_token_at or finished
        embedding = sequence.embedding
        tracing = self.tracing
        if tracing.on:
            admitted = sequence.admitted_at or sequence.submitted
            tracing.record("queue", sequence.submitted, admitted, origin.trace)
            prompt_tokens, answer_tokens = len(sequence.prompt_ids), sequence.generated
            tracing.record("prefill", admitted, first, origin.trace, {"llmops.prompt_tokens": prompt_tokens})
            tracing.record("decode", first, finished, origin.trace, {"llmops.completion_tokens": answer_tokens})
        row = GenerationRow(
            request_id=origin.request_id,
            idx=origin.idx,
            ts=time.time(),
            model_name=model.name,
            model_version=model.version,
            route=origin.route,
            prompt=text,
            messages=messages,
            completion=sequence.text,
            prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=sequence.generated,
            finish_reason=sequence.finish_reason or "unknown",
            ttft_ms=(first - sequence.submitted) * 1000,
            latency_ms=(finished - sequence.submitted) * 1000,
            embedding=None if embedding is None else encode_embedding(embedding),
            unk_share=_prompt_unknown_share(model, sequence.prompt_ids),
            key_name=origin.caller.name if origin.caller else None,
        )
        logging_at = time.perf_counter()
        self.log.append_generation(row)
        tracing.record("log", logging_at, time.perf_counter(), origin.trace)
        self.mlflow_traces.offer(row, model.source, origin.trace)
        _observe(self.metrics, sequence, model)
        self.gate.record(origin.caller, model.name, len(sequence.prompt_ids), sequence.generated)

    @property
    def champion(self) -> ModelWatcher:
        """The classifier the classifier routes use: `registry.model_name` when served, else the first served
        model that is a classifier (or, before anything loaded, the first served model)."""
        if self.model_name in self.models:
            return self.models[self.model_name]
        loaded = [w for w in self.models.values() if w.current is not None and not w.current.generates]
        return loaded[0] if loaded else next(iter(self.models.values()))

    async def start(self) -> None:
        await asyncio.to_thread(self.batches.fail_orphans)  # batches this host ran when a worker stopped
        self.guards.start()
        self.mlflow_traces.start()
        self.log.start()
        self.gate.start()
        self.batcher.start()
        watchers = [*self.models.values(), *([self.challenger] if self.challenger else [])]
        self._watchers = [asyncio.create_task(w.run()) for w in watchers]
        # Take no connection before the first load attempts are over (at most `startup_wait_s`): the workers of
        # one server share its port, so a worker still loading would answer 503 to requests a loaded one can serve.
        try:
            checked = [w.checked.wait() for w in self.models.values()]
            guards = asyncio.to_thread(self.guards.wait)  # the first request must not pay for their import
            await asyncio.wait_for(asyncio.gather(*checked, guards), self.cfg.startup_wait_s)
        except TimeoutError:
            log.warning("no model loaded after %.0f s; serving starts and reports not ready", self.cfg.startup_wait_s)

    async def stop(self) -> None:
        """Stop polling, finish shadow scoring and generations, then write every buffered prediction."""
        await self.batch_runner.stop()  # before the models: a batch's requests in flight end first
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, *self._shadows, return_exceptions=True)
        await self.batcher.stop()
        for watcher in self.models.values():
            if watcher.current is not None and watcher.current.backend is not None:
                await asyncio.to_thread(watcher.current.backend.stop)
        self.log.close()
        await asyncio.to_thread(self.gate.stop)
        await asyncio.to_thread(self.mlflow_traces.stop)
        await asyncio.to_thread(self.tracing.shutdown)

    @property
    def ready(self) -> bool:
        """At least one model serves, and every served model the registry has is loaded."""
        watchers = self.models.values()
        return any(w.current for w in watchers) and all(w.current is not None or w.absent for w in watchers)

    def loaded(self, watcher: ModelWatcher, field: str | None = None) -> LoadedModel:
        """The version `watcher` serves now; a 404 when the registry has none (`require_registered`), or a 503
        with Retry-After while one is loading; a 403 when the caller's key may not use it."""
        caller = CALLER.get()
        if caller is not None and not caller.may_use(watcher.name):
            raise ApiError(
                403, f"key '{caller.name}' may not use model '{watcher.name}'", type="forbidden", field=field
            )
        self.require_registered(watcher, field)
        if watcher.current is None:
            raise ApiError(
                503,
                f"no version of '{watcher.name}' loaded yet: {watcher.status}",
                type="not_ready",
                headers={"Retry-After": str(max(1, round(self.cfg.poll_interval_s)))},
            )
        return watcher.current

    @staticmethod
    def require_registered(watcher: ModelWatcher, field: str | None = None) -> None:
        """A 404 naming how to register a served model the registry has no version of: not a 503, which a client
        would retry forever (`field`: the request field that named the model)."""
        if watcher.current is None and watcher.absent:
            raise ApiError(
                404,
                f"model '{watcher.name}' is in serve.models, but the registry has no '{watcher.alias}' version of "
                f"it: register one with `llmops run` (registry.model_name: {watcher.name}; `make run-llm` registers "
                "tweet-generator), or leave it out of serve.models",
                type="not_registered",
                field=field,
            )

    def require_model(self) -> LoadedModel:
        """The classifier routes' model, loaded, or a 503 (not loaded yet) or 404 (the service has generators
        alone: a classifier route has nothing to answer for, as OpenAI answers a model its route does not serve)."""
        model = self.loaded(self.champion)
        if model.generates:
            raise ApiError(
                404,
                f"no classifier is served here ('{model.name}' is a {model.task} model): use /v1/completions or "
                "/v1/chat/completions",
                type="wrong_model_kind",
            )
        return model

    def _route(self) -> tuple[LoadedModel, str]:
        champion = self.require_model()
        challenger = self.challenger.current if self.challenger else None
        if (
            challenger is not None
            and challenger.version != champion.version
            and self.cfg.canary_share > 0
            and random.random() < self.cfg.canary_share
        ):
            return challenger, "canary"
        return champion, "champion"

    async def score(self, texts: list[str], request_id: str) -> Scored:
        """Score texts with the champion (or the canary), log them, and start shadow scoring if on."""
        model, route = self._route()
        if self.guards.blocks(model.name):
            with self.tracing.span("guards"):
                await self.guards.prompts_checked(model.name, texts)
        start = time.perf_counter()
        try:
            outputs = await self.batcher.predict(model, texts)
        except QueueFull as error:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, f"server busy: {error}", type="overloaded", headers={"Retry-After": "1"}) from None
        scored = Scored(model, outputs)
        with self.tracing.span("log"):
            self._record(request_id, texts, scored, route, (time.perf_counter() - start) * 1000)
        self.gate.record(CALLER.get(), model.name)
        if self.cfg.shadow:
            shadow = self.challenger.current if self.challenger else None
            if shadow is not None and shadow.version != model.version:
                task = asyncio.create_task(self._shadow(shadow, texts, request_id))
                self._shadows.add(task)  # a reference, so the task is not collected mid-flight
                task.add_done_callback(self._shadows.discard)
        return scored

    async def _shadow(self, model: LoadedModel, texts: list[str], request_id: str) -> None:
        start = time.perf_counter()
        try:
            outputs = await self.batcher.predict(model, texts)
        except QueueFull:
            self.metrics.rejected.labels("shadow_skipped").inc()  # shadow traffic never displaces real traffic
            return
        self._record(request_id, texts, Scored(model, outputs), "shadow", (time.perf_counter() - start) * 1000)

    def _record(self, request_id: str, texts: list[str], scored: Scored, route: str, latency_ms: float) -> None:
        now = time.time()
        caller = CALLER.get()
        key_name = caller.name if caller else None
        labels = scored.labels()
        model = scored.model
        outputs = scored.outputs
        embeddings = [None] * len(texts) if outputs.embeddings is None else map(encode_embedding, outputs.embeddings)
        unknown = outputs.unknown_share.tolist()
        rows = [
            PredictionRow(
                request_id=request_id,
                idx=i,
                ts=now,
                text=text,
                label=label,
                score=max(row),
                probabilities=probabilities_json(model.labels, row),
                model_name=model.name,
                model_version=model.version,
                route=route,
                latency_ms=latency_ms,
                embedding=embedding,
                unk_share=unk,
                key_name=key_name,
            )
            for i, (text, label, row, embedding, unk) in enumerate(
                zip(texts, labels, scored.rows, embeddings, unknown, strict=True)
            )
        ]
        self.log.append(rows)
        for label in labels:
            self._predicted(route, label).inc()
        # Sampled here rather than computed at scrape time: multi-process metrics cannot call back into a worker.
        self.metrics.log_pending.set(self.log.pending)
        self.metrics.log_failures.set(self.log.write_failures)

    async def generation_feedback(
        self, request_id: str, index: int, rating: float | None, correction: str | None
    ) -> None:
        size = await asyncio.to_thread(self.log.generation_request_size, request_id)
        _check_logged(size, request_id, index, "generation", "prompt(s)")  # the answer asked about exists
        self.log.append_generation_feedback(GenerationFeedbackRow(request_id, index, rating, correction, time.time()))

    async def feedback(self, request_id: str, index: int, label: str) -> None:
        labels = self.require_model().labels
        if label not in labels:
            raise ApiError(422, f"label: '{label}' is not one of {labels}", type="invalid_field", field="label")
        size = await asyncio.to_thread(self.log.request_size, request_id)
        _check_logged(size, request_id, index, "prediction", "text(s)")  # the prediction asked about exists
        self.log.append_feedback(FeedbackRow(request_id, index, label, time.time()))


def _observe(metrics: ServingMetrics, sequence: Sequence, model: LoadedModel) -> None:
    labels = (model.name, model.version)
    finished = sequence.finished_at or time.perf_counter()
    first = sequence.first_token_at or finished
    metrics.ttft.labels(*labels).observe(first - sequence.submitted)
    metrics.e2e.labels(*labels).observe(finished - sequence.submitted)
    if sequence.generated > 1:
        metrics.tpot.labels(*labels).observe((finished - first) / (sequence.generated - 1))
    metrics.prompt_tokens.labels(*labels).inc(len(sequence.prompt_ids))
    metrics.generated_tokens.labels(*labels).inc(sequence.generated)
    metrics.generations.labels(*labels, sequence.finish_reason or "unknown").inc()


def _prompt_unknown_share(model: LoadedModel, prompt_ids: list[int]) -> float | None:
    """None where it means nothing: a tokenizer without an unknown token, or no prompt tokens."""
    unk = model.generation.runtime.tokenizer.unk_token_id
    return None if unk is None or not prompt_ids else unknown_share(prompt_ids, unk)


def _check_logged(size: int, request_id: str, index: int, what: str, items: str) -> None:
    """404 unless request `request_id` was logged with more than `index` items (`size` of them)."""
    if size == 0:
        raise ApiError(404, f"request_id: no {what} with id '{request_id}'", type="not_found", field="request_id")
    if index >= size:
        raise ApiError(404, f"index: request {request_id} had {size} {items}", type="not_found", field="index")
