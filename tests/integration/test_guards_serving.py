"""Personal data and credentials in served traffic: redacted in the prediction log (SQLite and Parquet: no raw
value anywhere on disk), refused where a model blocks them (400 naming the kind, never the value), counted in
Prometheus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from llmops.config import GuardRule, GuardsConfig, LlmopsConfig, RegistryConfig, ServeConfig
from llmops.predlog import GenerationRow, open_store
from serving.guards import Guards
from serving.metrics import ServingMetrics
from tests.http_service import in_process
from tests.tiny_registry import register_pair

CLASSIFIER, GENERATOR = "pii-classifier", "pii-generator"
EMAIL, CARD, PHONE, IBAN, KEY = (
    "jane.doe@example.com",
    "4111 1111 1111 1111",
    "+44 7400 123456",
    "DE89 3704 0044 0532 0130 00",
    "AKIAIOSFODNN7EXAMPLE",
)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("guards-registry")
    return register_pair(root, CLASSIFIER, GENERATOR, seed=4)


def config(log: Path, guards: GuardsConfig | None = None) -> LlmopsConfig:
    serve = ServeConfig(
        models=[CLASSIFIER, GENERATOR],
        prediction_log=str(log),
        flush_interval_s=0.2,
        max_new_tokens=4,
        default_max_tokens=4,
        guards=guards or GuardsConfig(),
    )
    return LlmopsConfig(registry=RegistryConfig(model_name=CLASSIFIER), serve=serve)


def _on_disk(path: Path) -> bytes:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    files += list(path.parent.glob(path.name + "-*"))  # SQLite's WAL and shared memory
    return b"".join(f.read_bytes() for f in files)


async def metrics_once_written(client: Any) -> str:
    """/metrics once the log writer has checked the rows (it counts findings as it redacts, every 0.2 s)."""
    for _ in range(200):
        metrics = (await client.get("/metrics")).text
        checked = [f'llmops_guard_texts_total{{direction="prompts",model="{m}"}}' for m in (CLASSIFIER, GENERATOR)]
        if all(line in metrics for line in checked):  # the classifier's texts and the generator's
            return metrics
        await asyncio.sleep(0.1)
    return metrics


@pytest.mark.parametrize("log_name", ["predictions.db", "predictions"])
async def test_the_prediction_log_holds_no_raw_value_on_disk(registry: str, workdir: Path, log_name: str) -> None:
    log = workdir / log_name
    async with in_process(config(log), registry) as (client, _):
        predict = await client.post("/v1/predict", json={"texts": [f"refund to {CARD} or mail {EMAIL}"]})
        complete = await client.post(
            "/v1/completions", json={"model": GENERATOR, "prompt": f"my number is {PHONE}", "max_tokens": 3}
        )
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": GENERATOR, "messages": [{"role": "user", "content": f"wire to {IBAN}, key {KEY}"}],
                  "max_tokens": 3},
        )  # fmt: skip
        metrics = await metrics_once_written(client)
    assert [r.status_code for r in (predict, complete, chat)] == [200, 200, 200]
    raw = _on_disk(log)
    # parts of the values too; none a hex request id could hold by chance ("4111" alone once did)
    for value in (EMAIL, CARD, PHONE, IBAN, KEY, "7400 123456", "0532 0130", "4111 1111", "4111111111111111"):
        assert value.encode() not in raw, value
    store = open_store(log)
    assert store.read_predictions()["text"].tolist() == ["refund to <CREDIT_CARD> or mail <EMAIL_ADDRESS>"]
    prompts = sorted(store.read_generations()["prompt"])
    assert prompts == ["my number is <PHONE_NUMBER>", "wire to <IBAN_CODE>, key <CREDENTIAL>"]
    assert "<IBAN_CODE>" in store.read_generations()["messages"].str.cat()
    # what was found is kept as kinds, for monitoring's flag share
    assert store.read_predictions()["flagged"].tolist() == ["CREDIT_CARD,EMAIL_ADDRESS"]
    assert sorted(store.read_generations()["flagged"]) == ["CREDENTIAL,IBAN_CODE", "PHONE_NUMBER"]
    flagged = f'llmops_guard_flagged_texts_total{{direction="prompts",model="{CLASSIFIER}"}} 1.0'
    assert flagged in metrics
    assert (
        f'llmops_guard_findings_total{{direction="prompts",entity="CREDIT_CARD",model="{CLASSIFIER}"}} 1.0' in metrics
    )


async def test_a_model_that_blocks_refuses_the_prompt_naming_the_kind_not_the_value(
    registry: str, workdir: Path
) -> None:
    guards = GuardsConfig(models={GENERATOR: GuardRule(prompts="block")})
    async with in_process(config(workdir / "predictions.db", guards), registry) as (client, _):
        blocked = await client.post(
            "/v1/completions", json={"model": GENERATOR, "prompt": f"email {EMAIL} my card {CARD}", "max_tokens": 2}
        )
        clean = await client.post("/v1/completions", json={"model": GENERATOR, "prompt": "hello", "max_tokens": 2})
        # a long prompt is checked on a thread, a short one on the event loop (INLINE_CHARS): refused alike
        long = await client.post(
            "/v1/completions", json={"model": GENERATOR, "prompt": "hello " * 250 + EMAIL, "max_tokens": 2}
        )
        classified = await client.post("/v1/predict", json={"texts": [f"mail {EMAIL}"]})  # redacted, not refused
    assert (blocked.status_code, blocked.json()["type"]) == (400, "sensitive_data")
    assert "CREDIT_CARD, EMAIL_ADDRESS" in blocked.json()["error"]
    assert (long.status_code, long.json()["type"]) == (400, "sensitive_data") and EMAIL not in long.text
    # not even part of the card ("4111" alone is in one request id of about 2,000: the body carries the id)
    assert EMAIL not in blocked.text and "4111 1111" not in blocked.text and "4111111111111111" not in blocked.text
    assert clean.status_code == 200 and classified.status_code == 200
    logged = open_store(workdir / "predictions.db").read_generations()
    assert logged["prompt"].tolist() == ["hello"]  # the refused one was never run nor logged


def test_answers_and_chat_turns_are_redacted_by_their_own_rule() -> None:
    rules = GuardsConfig(answers="allow", models={"strict": GuardRule(answers="redact")})
    guards = Guards(rules, ServingMetrics())
    guards.start()
    row: dict[str, Any] = dict(
        request_id="r", idx=0, ts=0.0, model_name="lenient", model_version="1", route="openai",
        prompt=f"mail {EMAIL}", messages='[{"role": "assistant", "content": "call ' + PHONE + '"}]',
        completion=f"sure: {EMAIL}", prompt_tokens=1, completion_tokens=1, finish_reason="stop", ttft_ms=1.0,
        latency_ms=1.0,
    )  # fmt: skip
    lenient = guards.scrub(GenerationRow(**row))
    strict = guards.scrub(GenerationRow(**(row | {"model_name": "strict"})))
    assert lenient.prompt == "mail <EMAIL_ADDRESS>" and lenient.completion == f"sure: {EMAIL}"
    assert PHONE in lenient.messages  # an assistant turn is an answer: allowed for this model
    assert strict.completion == "sure: <EMAIL_ADDRESS>" and PHONE not in strict.messages
    assert lenient.flagged == "EMAIL_ADDRESS" and strict.flagged == "EMAIL_ADDRESS,PHONE_NUMBER"
    unchecked = Guards(GuardsConfig(prompts="allow", answers="allow"), ServingMetrics())
    assert unchecked.scrub(GenerationRow(**row)).flagged is None  # not checked: not counted as clean


async def test_a_model_that_blocks_answers_keeps_them_from_the_caller_and_logs_them_redacted(
    registry: str, workdir: Path
) -> None:
    guards = GuardsConfig(models={GENERATOR: GuardRule(answers="block")})
    cfg = config(workdir / "predictions.db", guards)
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"max_new_tokens": 64})})
    contact = {"type": "object", "properties": {"contact": {"const": EMAIL}}, "required": ["contact"],
               "additionalProperties": False}  # fmt: skip
    schema = {"type": "json_schema", "json_schema": {"name": "contact", "schema": contact}}
    asked = {"model": GENERATOR, "messages": [{"role": "user", "content": "who do I write to?"}], "max_tokens": 64,
             "response_format": schema}  # fmt: skip
    async with in_process(cfg, registry) as (client, _):
        whole = await client.post("/v1/chat/completions", json=asked)
        streamed = await client.post("/v1/chat/completions", json=asked | {"stream": True})
        clean = await client.post(
            "/v1/chat/completions",
            json={"model": GENERATOR, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        )
    assert (whole.status_code, whole.json()["type"]) == (400, "sensitive_data")
    assert "EMAIL_ADDRESS" in whole.json()["error"] and EMAIL not in whole.text
    assert streamed.status_code == 200 and '"type": "sensitive_data"' in streamed.text  # an error event
    assert EMAIL not in streamed.text and "example.com" not in streamed.text  # held back: not a piece of it sent
    chunks = [json.loads(line[6:]) for line in clean.text.splitlines() if line.startswith("data: {")]
    pieces = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert clean.status_code == 200 and len(pieces) == 1  # a clean answer comes whole, once checked
    logged = open_store(workdir / "predictions.db").read_generations()
    blocked = logged[logged["flagged"] == "EMAIL_ADDRESS"]
    assert len(blocked) == 2 and all("<EMAIL_ADDRESS>" in c for c in blocked["completion"])  # logged, redacted
