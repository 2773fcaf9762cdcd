"""LoRA adapters of one base, trained by the lifecycle, registered as their own models and served over one copy of
the base (ASGI transport, real lifespan, real MLflow registry, a real Prefect server for the flow runs): rows of
two adapters share the running batch and each writes what it writes alone, an adapter's alias moves without
restarting the base or cutting a stream, and an adapter that does not fit the served base is refused, saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml
from mlflow import MlflowClient

import flows.lifecycle as lifecycle_flow
from llmops import registry
from llmops.config import ConfigError, LlmopsConfig, RegistryConfig, ServeConfig
from llmops.generation.adapters import resolve_base
from llmops.ports import free_port
from tests.conftest import REPO
from tests.http_service import in_process, openai_client, wait_until_ready
from tests.tiny_registry import register_adapter, register_generators, set_alias

BASE = "tiny-base"
FORMAL, CASUAL, STRAY = "tweet-formal", "tweet-casual", "tweet-stray"
PROMPTS = ["write a tweet about the flight", "classify the sentiment of this tweet: lost my bag", "hi"]
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def store(home: Path) -> str:
    """Base versions 1 and 2 (seeds 5, 6), version 1 champion; two adapters of version 1 trained by the lifecycle."""
    uri = register_generators(home, BASE, seeds=[5, 6], uri=f"sqlite:///{home / 'mlflow.db'}")
    set_alias(uri, BASE, "champion", "1")
    for name, overrides in [
        (FORMAL, ["train.learning_rate=0.02", "train.seed=1"]),
        (CASUAL, ["train.learning_rate=0.02", "train.seed=2", "train.lora.target_modules=[q_proj, o_proj]"]),
    ]:
        result = lifecycle_flow.lifecycle(
            str(REPO / "configs" / "llm-tiny.yaml"),
            [
                f"train.lora={{adapter_of: {BASE}, r: 8}}",
                f"registry.model_name={name}",
                "data.sample=100",
                "train.epochs=2",
                *overrides,
            ],
        )
        assert result["promoted"] and result["candidates"] == {"teacher": result["candidates"]["teacher"]}
    return uri


def adapter_of_base(home: Path, uri: str, name: str, base_version: str, seed: int) -> str:
    """A new version of `name`: an adapter with random factors over base version `base_version`."""
    base_dir = home / f"generator-{4 + int(base_version)}"
    return register_adapter(uri, name, base_dir, BASE, base_version, home / f"{name}-{seed}", seed)


@asynccontextmanager
async def serving(
    uri: str, tmp_path: Path, models: list[str], ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    serve = ServeConfig(
        models=models,
        poll_interval_s=0.1,
        model_cache=str(tmp_path / "served"),
        prediction_log=str(tmp_path / "predictions.db"),
    )
    async with in_process(LlmopsConfig(registry=RegistryConfig(model_name=BASE), serve=serve), uri, ready) as served:
        yield served


async def complete(client: httpx.AsyncClient, model: str, prompt: str, tokens: int = 12, **extra: Any) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": 0} | extra
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


async def test_adapters_are_registered_and_listed_with_their_base(store: str, tmp_path: Path) -> None:
    version = MlflowClient(tracking_uri=store).get_model_version(FORMAL, "1")
    assert version.tags["llmops.adapter_of"] == f"{BASE}/1"
    async with serving(store, tmp_path, [BASE, FORMAL, CASUAL]) as (client, app):
        models = {m.id: m for m in (await openai_client(app).models.list()).data}
        assert set(models) == {BASE, FORMAL, CASUAL}
        assert models[FORMAL].parent == f"{BASE}/1" and models[FORMAL].root == f"{FORMAL}/1"
        assert models[BASE].parent is None
        ready = (await client.get("/readyz")).json()
        assert {m["name"]: m["adapter_of"] for m in ready["models"]} == {
            BASE: None,
            FORMAL: f"{BASE}/1",
            CASUAL: f"{BASE}/1",
        }
        missing = await client.post("/v1/completions", json={"model": "tweet-nope", "prompt": "hi"})
        assert missing.status_code == 404 and missing.json()["field"] == "model"


async def test_two_adapters_in_one_batch_each_write_what_they_write_alone(store: str, tmp_path: Path) -> None:
    async with serving(store, tmp_path, [BASE, FORMAL, CASUAL]) as (client, _):
        asks = [(model, prompt) for prompt in PROMPTS for model in (BASE, FORMAL, CASUAL)]
        alone = [await complete(client, model, prompt) for model, prompt in asks]
        together = await asyncio.gather(*(complete(client, model, prompt) for model, prompt in asks))
    for one, batched in zip(alone, together, strict=True):
        assert batched["text"] == one["text"]
        assert batched["logprobs"]["token_logprobs"] == pytest.approx(one["logprobs"]["token_logprobs"], abs=1e-4)
    first = {
        model: choice["logprobs"]["token_logprobs"][0]
        for (model, prompt), choice in zip(asks, alone, strict=True)
        if prompt == PROMPTS[0]
    }
    assert len({round(value, 3) for value in first.values()}) == 3, f"the adapters change nothing: {first}"


def test_the_real_server_batches_two_adapters_for_the_openai_client(store: str, home: Path, tmp_path: Path) -> None:
    """`llmops serve` as a process on a loopback port, the official client over HTTP: answers for the base and
    both adapters sent at once are the ones each gets alone."""
    config = tmp_path / "serve.yaml"
    serve = {"models": [BASE, FORMAL, CASUAL], "model_cache": str(tmp_path / "served"), "threads": 1}
    config.write_text(yaml.safe_dump({"registry": {"model_name": BASE}, "serve": serve}))
    port = free_port()
    cli = [sys.executable, "-c", "from cli.main import main; main()", "serve", "--config", str(config)]
    proc = subprocess.Popen(
        [*cli, "--port", str(port)], cwd=tmp_path, env=os.environ | {"MLFLOW_TRACKING_URI": store},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, lambda: None if proc.poll() is None else (proc.stdout.read() if proc.stdout else "exit"))
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert {m.id: m.parent for m in client.models.list().data}[CASUAL] == f"{BASE}/1"
        asks = [(model, prompt) for prompt in PROMPTS for model in (BASE, FORMAL, CASUAL)]

        def answer(ask: tuple[str, str]) -> tuple[str, list[float]]:
            choice = client.completions.create(
                model=ask[0], prompt=ask[1], max_tokens=12, temperature=0, logprobs=0
            ).choices[0]
            return choice.text, list(choice.logprobs.token_logprobs)

        alone = [answer(ask) for ask in asks]
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(answer, asks))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for (text, logprobs), (batched_text, batched_logprobs) in zip(alone, together, strict=True):
        assert batched_text == text and batched_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert len({tuple(np.round(lp[:3], 3)) for (model, prompt), (_, lp) in zip(asks, alone, strict=True)
                if prompt == PROMPTS[0]}) == 3  # fmt: skip


async def test_an_adapters_alias_moves_without_cutting_a_stream(store: str, home: Path, tmp_path: Path) -> None:
    version = adapter_of_base(home, store, FORMAL, "1", seed=11)
    async with serving(store, tmp_path, [BASE, FORMAL]) as (client, app):
        before = await complete(client, FORMAL, PROMPTS[0])
        whole = await complete(client, FORMAL, PROMPTS[0], tokens=60, min_tokens=60)
        stream = await openai_client(app).completions.create(
            model=FORMAL, prompt=PROMPTS[0], max_tokens=60, temperature=0, stream=True, extra_body={"min_tokens": 60}
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if len(text) > 5 and finish is None:
                set_alias(store, FORMAL, "champion", version)
        assert finish == "length" and text == whole["text"]  # the version it began with wrote all of it
        for _ in range(100):
            ready = {m["name"]: m for m in (await client.get("/readyz")).json()["models"]}
            if ready[FORMAL]["version"] == version:
                break
            await asyncio.sleep(0.1)
        assert ready[FORMAL]["version"] == version and ready[BASE]["version"] == "1"
        after = await complete(client, FORMAL, PROMPTS[0])
        assert after["logprobs"]["token_logprobs"] != pytest.approx(before["logprobs"]["token_logprobs"], abs=1e-3)
        set_alias(store, FORMAL, "champion", "1")


async def test_an_adapter_of_another_base_version_is_refused(store: str, home: Path, tmp_path: Path) -> None:
    adapter_of_base(home, store, STRAY, "2", seed=12)
    set_alias(store, STRAY, "champion", "1")
    async with serving(store, tmp_path, [BASE, STRAY, FORMAL], ready=False) as (client, _):
        ready = {m["name"]: m for m in (await client.get("/readyz")).json()["models"]}
        assert ready[STRAY]["version"] is None
        assert f"is a LoRA adapter of '{BASE}' version 2" in ready[STRAY]["reason"]
        assert f"this service serves version 1 of '{BASE}'" in ready[STRAY]["reason"]
        refused = await client.post("/v1/completions", json={"model": STRAY, "prompt": "hi"})
        assert refused.status_code == 503 and "trained on" in refused.json()["error"]
        assert (await complete(client, FORMAL, "hi"))["text"] is not None  # the others serve on
    async with serving(store, tmp_path, [FORMAL], ready=False) as (client, _):
        ready = {m["name"]: m for m in (await client.get("/readyz")).json()["models"]}
        assert f"add '{BASE}' to serve.models" in ready[FORMAL]["reason"]


def test_the_adapter_candidate_evaluates_with_its_base(store: str, home: Path) -> None:
    """The registered adapter loads on its own (base from its recipe) and writes what the served rows write."""
    client = MlflowClient(tracking_uri=store)
    folder = registry.download_candidate(FORMAL, "1", home / "formal-download", tracking_uri=store)
    assert json.loads((folder / "candidate.json").read_text())["recipe"]["adapter_of"] == {
        "model": BASE,
        "version": "1",
    }
    assert (folder / "adapter_model.safetensors").stat().st_size < 200_000  # the adapter alone, not the base
    assert client.get_model_version(FORMAL, "1").tags["llmops.candidate"] == "teacher"


def test_a_base_that_is_missing_or_cannot_be_trained_over_is_refused_before_training(store: str, home: Path) -> None:
    with pytest.raises(ConfigError, match=f"the registry .* has no model version '{BASE}/9'"):
        resolve_base(f"{BASE}/9", store, home / "bases")
    with pytest.raises(ConfigError, match=f"'{FORMAL}' version 1 is an adapter itself"):
        resolve_base(FORMAL, store, home / "bases")
    ref, folder = resolve_base(f"{BASE}@champion", store, home / "bases")
    assert (ref.model, ref.version) == (BASE, "1") and (folder / "model.safetensors").is_file()
