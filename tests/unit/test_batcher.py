"""The micro-batcher groups requests only while the model is busy: a request that finds it idle runs at once."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from llmops.classification.candidate import Forward
from serving.batcher import MicroBatcher
from serving.metrics import ServingMetrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class GatedModel:
    """A classifier whose forward pass holds until released, recording each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.classifier = self

    def forward(self, texts: list[str], batch_size: int, embeddings: bool) -> Forward:
        self.batches.append(list(texts))
        self.gate.wait(timeout=30)
        n = len(texts)
        return Forward(np.full((n, 2), 0.5), None, np.zeros(n))


def batcher(max_wait_ms: float) -> MicroBatcher:
    return MicroBatcher(ServingMetrics(), enabled=True, max_batch_size=32, max_wait_ms=max_wait_ms, max_queue=1024)


async def test_a_request_that_finds_the_model_idle_does_not_wait_for_company() -> None:
    model = GatedModel()
    model.gate.set()
    b = batcher(max_wait_ms=60_000)  # were it waited out, this test would take a minute
    b.start()
    try:
        out = await asyncio.wait_for(b.predict(model, ["alone"]), 10)
    finally:
        await b.stop()
    assert out.probs.shape == (1, 2) and model.batches == [["alone"]]


async def test_requests_arriving_while_the_model_is_busy_share_the_next_forward_pass() -> None:
    model = GatedModel()
    b = batcher(max_wait_ms=60_000)
    b.start()
    try:
        first = asyncio.create_task(b.predict(model, ["first"]))
        while not model.batches:  # the first request is in the forward pass
            await asyncio.sleep(0.01)
        others = [asyncio.create_task(b.predict(model, [f"t{i}"])) for i in range(5)]
        await asyncio.sleep(0.1)  # they arrive while the model is busy
        model.gate.set()  # the model frees: the batch that formed goes at once, not after max_wait_ms
        await asyncio.wait_for(asyncio.gather(first, *others), 10)
    finally:
        await b.stop()
    assert model.batches == [["first"], [f"t{i}" for i in range(5)]]
