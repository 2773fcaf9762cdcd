"""The service's state: the followed model(s), the batcher and the prediction log.

Routes get it through `PredictorDep` (serving/deps.py); every inference protocol
ends in :meth:`Predictor.score`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from llmops.candidate import Forward
from llmops.config import LlmopsConfig
from llmops.predlog import (
    FeedbackRow,
    PredictionLogWriter,
    PredictionRow,
    encode_embedding,
    open_store,
    probabilities_json,
)
from llmops.registry import CHALLENGER
from serving.batcher import MicroBatcher, QueueFull
from serving.errors import ApiError
from serving.metrics import ServingMetrics
from serving.models import LoadedModel, ModelWatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    model: LoadedModel
    outputs: Forward

    @property
    def probs(self) -> np.ndarray:
        """(n_texts, n_labels)"""
        return self.outputs.probs

    def labels(self) -> list[str]:
        return [self.model.labels[i] for i in self.probs.argmax(axis=1)]


class Predictor:
    def __init__(self, cfg: LlmopsConfig, tracking_uri: str):
        self.cfg = cfg.serve
        self.model_name = cfg.registry.model_name
        self.metrics = ServingMetrics()
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        cache = Path(self.cfg.model_cache)

        def watcher(alias: str) -> ModelWatcher:
            return ModelWatcher(
                client,
                tracking_uri,
                self.model_name,
                alias,
                cache,
                self.metrics,
                self.cfg.poll_interval_s,
                self.cfg.retry_failed_after_s,
            )

        self.champion = watcher(self.cfg.alias)
        self.challenger = watcher(CHALLENGER) if self.cfg.shadow or self.cfg.canary_share > 0 else None
        self.batcher = MicroBatcher(
            self.metrics,
            enabled=self.cfg.batching,
            max_batch_size=self.cfg.max_batch_size,
            max_wait_ms=self.cfg.max_wait_ms,
            max_queue=self.cfg.max_queue,
            embeddings=self.cfg.log_embeddings,
        )
        self.log = PredictionLogWriter(open_store(self.cfg.prediction_log), self.cfg.flush_interval_s)
        self._watchers: list[asyncio.Task[None]] = []
        self._shadows: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.log.start()
        self.batcher.start()
        self._watchers = [asyncio.create_task(w.run()) for w in (self.champion, self.challenger) if w is not None]
        # Take no connection before the first load attempt is over (at most `startup_wait_s`): the workers of
        # one server share its port, so a worker still loading would answer 503 to requests a loaded one can serve.
        try:
            await asyncio.wait_for(self.champion.checked.wait(), self.cfg.startup_wait_s)
        except TimeoutError:
            log.warning("no model loaded after %.0f s; serving starts and reports not ready", self.cfg.startup_wait_s)

    async def stop(self) -> None:
        """Stop polling, finish shadow scoring, then write every buffered prediction."""
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, *self._shadows, return_exceptions=True)
        await self.batcher.stop()
        self.log.close()

    @property
    def ready(self) -> bool:
        return self.champion.current is not None

    def require_model(self) -> LoadedModel:
        model = self.champion.current
        if model is None:
            raise ApiError(
                503,
                f"no model loaded yet: {self.champion.status}",
                type="not_ready",
                headers={"Retry-After": str(max(1, round(self.cfg.poll_interval_s)))},
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
        start = time.perf_counter()
        try:
            outputs = await self.batcher.predict(model, texts)
        except QueueFull as error:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, f"server busy: {error}", type="overloaded", headers={"Retry-After": "1"}) from None
        scored = Scored(model, outputs)
        self._record(request_id, texts, scored, route, (time.perf_counter() - start) * 1000)
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
                score=float(row.max()),
                probabilities=probabilities_json(model.labels, row),
                model_name=model.name,
                model_version=model.version,
                route=route,
                latency_ms=latency_ms,
                embedding=embedding,
                unk_share=unk,
            )
            for i, (text, label, row, embedding, unk) in enumerate(
                zip(texts, labels, scored.probs, embeddings, unknown, strict=True)
            )
        ]
        self.log.append(rows)
        for label in labels:
            self.metrics.predictions.labels(route, label).inc()
        # Sampled here rather than computed at scrape time: multi-process metrics cannot call back into a worker.
        self.metrics.log_pending.set(self.log.pending)
        self.metrics.log_failures.set(self.log.write_failures)

    async def feedback(self, request_id: str, index: int, label: str) -> None:
        labels = self.require_model().labels
        if label not in labels:
            raise ApiError(422, f"label: '{label}' is not one of {labels}", type="invalid_field", field="label")
        size = await asyncio.to_thread(self.log.request_size, request_id)
        if size == 0:
            raise ApiError(
                404, f"request_id: no prediction with id '{request_id}'", type="not_found", field="request_id"
            )
        if index >= size:
            raise ApiError(422, f"index: request {request_id} had {size} text(s)", type="invalid_field", field="index")
        self.log.append_feedback(FeedbackRow(request_id, index, label, time.time()))
