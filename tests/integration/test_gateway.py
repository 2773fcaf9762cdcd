"""The gateway in front of the models: named keys with scopes, limits counted across worker processes,
revocation without a restart, and usage by key and model, through the service over HTTP and `llmops keys`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app as cli
from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.gateway import GatewayStore
from llmops.predlog import open_store
from tests.http_service import in_process, serve_process
from tests.tiny_registry import register_pair

CLASSIFIER, GENERATOR = "gw-classifier", "gw-generator"
ENV_KEY = "an-environment-key-123"
IN_WORKDIR = [
    "--config",
    str(Path(__file__).parents[2] / "configs/quickstart.yaml"),
    "--set",
    "serve.gateway_store=gateway.db",
]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("gateway-registry")
    return register_pair(root, CLASSIFIER, GENERATOR, seed=3)


def serve_config(gateway: Path, **serve: Any) -> LlmopsConfig:
    settings = {
        "models": [CLASSIFIER, GENERATOR],
        "gateway_store": str(gateway),
        "key_refresh_s": 0.3,
        "flush_interval_s": 60,
        "max_new_tokens": 8,
        "default_max_tokens": 8,
    } | serve
    return LlmopsConfig(registry=RegistryConfig(model_name=CLASSIFIER), serve=ServeConfig(**settings))


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


PREDICT = {"texts": ["the crew was lovely"]}


def completion(max_tokens: int = 4) -> dict[str, Any]:
    return {"model": GENERATOR, "prompt": "write a tweet", "max_tokens": max_tokens, "temperature": 0}


async def test_a_key_calls_only_its_route_groups_and_uses_only_its_models(
    registry: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOPS_API_KEYS", ENV_KEY)
    gateway = GatewayStore(workdir / "gateway.db")
    writer, _ = gateway.create("writer-app", models=[GENERATOR])
    labeller, _ = gateway.create("labeller", groups=["feedback"])
    dashboard, _ = gateway.create("dashboard", groups=["monitoring"])
    async with in_process(serve_config(workdir / "gateway.db"), registry) as (client, _):
        as_env = await client.post("/v1/predict", json=PREDICT, headers=bearer(ENV_KEY))
        request_id = as_env.json()["request_id"]
        answers = {
            "writer generates": await client.post("/v1/completions", json=completion(), headers=bearer(writer)),
            "writer classifies": await client.post("/v1/predict", json=PREDICT, headers=bearer(writer)),
            "writer on the classifier's v2": await client.get(f"/v2/models/{CLASSIFIER}", headers=bearer(writer)),
            "labeller infers": await client.post("/v1/predict", json=PREDICT, headers=bearer(labeller)),
            "labeller labels": await client.post(
                "/v1/feedback", json={"request_id": request_id, "label": "positive"}, headers=bearer(labeller)
            ),
            "dashboard reads": await client.get("/v1/model", headers=bearer(dashboard)),
            "dashboard infers": await client.post("/v1/predict", json=PREDICT, headers=bearer(dashboard)),
            "no key": await client.post("/v1/predict", json=PREDICT),
            "unknown key": await client.post("/v1/predict", json=PREDICT, headers=bearer("llmops-not-a-key")),
            "X-API-Key": await client.post("/v1/completions", json=completion(), headers={"X-API-Key": writer}),
        }
        doc = (await client.get("/openapi.json")).json()
    statuses = {what: answer.status_code for what, answer in answers.items()}
    assert as_env.status_code == 200  # the environment's keys keep working, unscoped
    assert statuses == {
        "writer generates": 200,
        "writer classifies": 403,
        "writer on the classifier's v2": 403,
        "labeller infers": 403,
        "labeller labels": 202,
        "dashboard reads": 200,
        "dashboard infers": 403,
        "no key": 401,
        "unknown key": 401,
        "X-API-Key": 200,
    }
    assert answers["writer classifies"].json()["error"] == f"key 'writer-app' may not use model '{CLASSIFIER}'"
    assert answers["labeller infers"].json()["error"] == "key 'labeller' may not call inference routes"
    assert (
        "security" in doc["paths"]["/v1/predict"]["post"] and "403" in doc["paths"]["/v1/predict"]["post"]["responses"]
    )


async def test_a_revoked_key_is_refused_within_seconds_without_a_restart(registry: str, workdir: Path) -> None:
    secret, _ = GatewayStore(workdir / "gateway.db").create("contractor")
    async with in_process(serve_config(workdir / "gateway.db"), registry) as (client, _):
        before = await client.post("/v1/predict", json=PREDICT, headers=bearer(secret))
        revoked = CliRunner().invoke(cli, ["keys", "revoke", "contractor", *IN_WORKDIR])
        start = time.monotonic()
        while (after := await client.post("/v1/predict", json=PREDICT, headers=bearer(secret))).status_code == 200:
            assert time.monotonic() - start < 5, "the revoked key still works after 5 s"
            await asyncio.sleep(0.05)
    assert before.status_code == 200
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert after.status_code == 401
    assert time.monotonic() - start < 3  # serve.key_refresh_s (0.3 s here), and a loaded machine's slack


async def test_usage_is_what_was_sent_by_key_and_model(registry: str, workdir: Path) -> None:
    secret, _ = GatewayStore(workdir / "gateway.db").create("analytics")
    async with in_process(serve_config(workdir / "gateway.db"), registry) as (client, _):
        generated = [
            (await client.post("/v1/completions", json=completion(n), headers=bearer(secret))).json()["usage"]
            for n in (2, 3, 5)
        ]
        for _ in range(2):
            assert (await client.post("/v1/predict", json=PREDICT, headers=bearer(secret))).status_code == 200
        metrics = (await client.get("/metrics")).text
    prompt = sum(u["prompt_tokens"] for u in generated)
    written = sum(u["completion_tokens"] for u in generated)
    rows = {r["model"]: r for r in GatewayStore(workdir / "gateway.db").usage()}  # written by the time it stopped
    assert (rows[GENERATOR]["requests"], rows[GENERATOR]["prompt_tokens"]) == (3, prompt)
    assert rows[GENERATOR]["completion_tokens"] == written
    assert (rows[CLASSIFIER]["requests"], rows[CLASSIFIER]["prompt_tokens"]) == (2, 0)
    line = f'llmops_key_tokens_total{{key="analytics",kind="completion",model="{GENERATOR}"}} {float(written)}'
    assert line in metrics
    assert f'llmops_key_requests_total{{key="analytics",model="{CLASSIFIER}"}} 2.0' in metrics
    log = open_store(workdir / "predictions.db")  # the name of the key beside each answer, never the key
    assert set(log.read_predictions()["key_name"]) == {"analytics"} == set(log.read_generations()["key_name"])
    assert secret.encode() not in (workdir / "predictions.db").read_bytes()
    printed = CliRunner().invoke(cli, ["usage", *IN_WORKDIR]).output
    table = {tuple(line.split()[1:3]): line.split()[3:] for line in printed.splitlines()[1:]}
    assert table[("analytics", GENERATOR)] == ["3", str(prompt), str(written)], printed
    assert table[("analytics", CLASSIFIER)] == ["2", "0", "0"], printed


# --- limits, counted across two worker processes -------------------------------------------------------------


@pytest.fixture
def limited(workdir: Path) -> dict[str, str]:
    """Keys with limits, made before the service starts (a service that finds a store asks for keys)."""
    gateway = GatewayStore(workdir / "gateway.db")
    return {
        "requests_per_minute": gateway.create("bursty", rpm=4)[0],
        "tokens_per_minute": gateway.create("wordy", tpm=12)[0],
        "token_budget": gateway.create("frugal", budget=12, period="month")[0],
    }


@pytest.fixture
def two_workers(registry: str, workdir: Path, limited: dict[str, str]) -> Iterator[str]:
    """`llmops serve` with two worker processes sharing the gateway store in the working folder."""
    config = workdir / "serve.yaml"
    serve = {
        "workers": 2,
        "threads": 1,
        "models": [CLASSIFIER, GENERATOR],
        "flush_interval_s": 60,
        "max_new_tokens": 8,
        "default_max_tokens": 8,
    }
    config.write_text(yaml.safe_dump({"registry": {"model_name": CLASSIFIER}, "serve": serve}))
    base, _, proc = serve_process(workdir, config, registry)
    yield base
    proc.terminate()
    proc.wait(timeout=60)


def _not_near_a_minute_boundary() -> None:
    """Windows are calendar minutes: start where the next one is more than 15 s away."""
    left = 60 - time.time() % 60
    if left < 15:
        time.sleep(left + 0.5)


def test_limits_hold_across_two_workers_with_retry_after_and_the_limit_named(
    two_workers: str, limited: dict[str, str]
) -> None:
    base = two_workers
    _not_near_a_minute_boundary()
    # A new connection per request, so the two workers both take some.
    bursts = [
        httpx.post(f"{base}/v1/predict", json=PREDICT, headers=bearer(limited["requests_per_minute"]), timeout=30)
        for _ in range(7)
    ]
    assert [r.status_code for r in bursts] == [200] * 4 + [429] * 3
    refused = bursts[-1]
    assert refused.json()["type"] == "rate_limited:requests_per_minute"
    assert "4 requests per minute" in refused.json()["error"]
    assert 1 <= int(refused.headers["retry-after"]) <= 61

    for limit in ("tokens_per_minute", "token_budget"):
        key = bearer(limited[limit])
        first = httpx.post(f"{base}/v1/completions", json=completion(8), headers=key, timeout=60)
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 12
        deadline = time.monotonic() + 5  # the usage reaches the store within a fraction of a second
        while (then := httpx.post(f"{base}/v1/completions", json=completion(8), headers=key, timeout=60)).is_success:
            assert time.monotonic() < deadline, f"{limit} not enforced"
            time.sleep(0.1)
        assert then.status_code == 429 and then.json()["type"] == f"rate_limited:{limit}"
    assert int(then.headers["retry-after"]) > 60  # the month's budget: until the month ends
