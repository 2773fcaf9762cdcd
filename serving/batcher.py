"""Dynamic micro-batching with a bounded queue.

Requests are grouped, up to `max_batch_size` texts, into one tokenizer call and one forward pass,
but only while the model is busy: a request that finds the model idle runs at once (the policy of
Triton's and TorchServe's dynamic batchers), so batching costs a lone request nothing. While a batch
runs, the next one fills, for at most `max_wait_ms`, then waits behind it. Inference runs on one
worker thread, off the event loop. A request only joins a batch of
the same model version, so a swap never mixes versions in a forward pass. When the
texts waiting would exceed `max_queue`, the request is refused (503) instead of queued:
memory stays bounded however fast clients send.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmops.classification.candidate import Forward
from serving.metrics import ServingMetrics
from serving.models import LoadedModel
from serving.tracing import Tracing


class QueueFull(RuntimeError):
    """More texts are waiting than `max_queue` allows."""


@dataclass
class _Job:
    model: LoadedModel
    texts: list[str]
    future: asyncio.Future[Forward]
    queued_at: float = field(default_factory=time.perf_counter)
    ran: tuple[float, float, int] | None = None
    """When its batch's forward pass started and ended, and the batch's size in texts (for its spans)."""


class MicroBatcher:
    def __init__(
        self,
        metrics: ServingMetrics,
        *,
        enabled: bool,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        embeddings: bool = False,
        tracing: Tracing | None = None,
    ):
        self.metrics = metrics
        self.tracing = tracing or Tracing(None)
        self.enabled = enabled
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.embeddings = embeddings
        # One inference thread: torch parallelises inside a forward pass; two passes at once only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._jobs: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._waiting = 0
        """Texts accepted and not yet answered (queued or in the forward pass)."""
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._alone = 0
        """Requests running alone: they found the model idle and nothing queued."""
        self._forming = False
        """A batch is waiting for company while the model is busy (it goes once the model is idle)."""

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._in_flight, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    async def predict(self, model: LoadedModel, texts: list[str]) -> Forward:
        """Probabilities (and embeddings) of `texts`. Raises QueueFull when the queue has no room."""
        if self._waiting + len(texts) > self.max_queue and self._waiting > 0:
            raise QueueFull(f"{self._waiting} texts are waiting (serve.max_queue={self.max_queue})")
        self._waiting += len(texts)
        self.metrics.queue_depth.set(self._waiting)
        try:
            if not self.enabled:
                return await self._infer(model, texts, alone=True)
            if self._idle() and not self._jobs and len(texts) <= self.max_batch_size:
                return await self._infer_alone(model, texts)
            future: asyncio.Future[Forward] = asyncio.get_running_loop().create_future()
            job = _Job(model, texts, future)
            self._jobs.append(job)
            self._arrived.set()
            out = await future
            if self.tracing.on and job.ran is not None:
                started, ended, size = job.ran
                self.tracing.record("queue", job.queued_at, started)
                self.tracing.record("batch", started, ended, attributes={"llmops.batch.texts": size})
            return out
        finally:
            self._waiting -= len(texts)
            self.metrics.queue_depth.set(self._waiting)

    def _idle(self) -> bool:
        return not self._in_flight and not self._alone

    async def _infer_alone(self, model: LoadedModel, texts: list[str]) -> Forward:
        """The model is idle and nobody waits: straight to it, without the batcher's hops (what batching off
        does); requests that arrive meanwhile queue and go together once it is done."""
        self._alone += 1
        try:
            return await self._infer(model, texts, alone=True)
        finally:
            self._alone -= 1
            if self._jobs or self._forming:  # else nobody waits: waking the batcher would only cost the loop a turn
                self._arrived.set()

    async def _infer(self, model: LoadedModel, texts: list[str], alone: bool = False) -> Forward:
        self.metrics.batch_size.observe(len(texts))
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        forward = model.classifier.forward
        out = await loop.run_in_executor(self._executor, forward, texts, len(texts), self.embeddings)
        end = time.perf_counter()
        self.metrics.inference_seconds.observe(end - start)
        if alone:  # the pass is this request's own: its span (a batch's are written by each of its requests)
            self.tracing.record("batch", start, end, attributes={"llmops.batch.texts": len(texts)})
        return out

    async def _next_batch(self) -> list[_Job]:
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        first = self._jobs.popleft()
        batch, size = [first], len(first.texts)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        self._forming = True
        try:
            while size < self.max_batch_size:
                if self._jobs:
                    nxt = self._jobs[0]
                    if nxt.model is not first.model or size + len(nxt.texts) > self.max_batch_size:
                        break
                    batch.append(self._jobs.popleft())
                    size += len(nxt.texts)
                    continue
                if self._idle():  # the model is idle: waiting for company would only add latency
                    break
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
        finally:
            self._forming = False
        return batch

    async def _run(self) -> None:
        # Two batches in flight: one in the forward pass, the next formed and waiting behind it, so the
        # inference thread goes straight on to it instead of idling while the event loop answers the last one.
        slots = asyncio.Semaphore(2)
        while True:
            await slots.acquire()
            batch = await self._next_batch()
            live = [job for job in batch if not job.future.done()]  # clients that hung up are skipped
            if not live:
                slots.release()
                continue
            task = asyncio.create_task(self._complete(live))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            task.add_done_callback(lambda _: slots.release())
            task.add_done_callback(lambda _: self._arrived.set())  # a batch forming now may go at once

    async def _complete(self, jobs: list[_Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        started = time.perf_counter()
        try:
            outputs = await self._infer(jobs[0].model, texts)
        except Exception as error:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        ran = (started, time.perf_counter(), len(texts))
        start = 0
        for job in jobs:
            job.ran = ran
            if not job.future.done():
                job.future.set_result(outputs.rows(slice(start, start + len(job.texts))))
            start += len(job.texts)
