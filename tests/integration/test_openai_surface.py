"""What LLM tools expect of an OpenAI-compatible server, against the served tiny Llama (ASGI transport, real
lifespan, real MLflow registry): log-probabilities of written and echoed prompt tokens equal to the model's own
teacher-forced scoring, streamed as whole, `n` choices, token-id prompts, and the tokenizer routes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import numpy as np
import pydantic
import pytest
import torch
from openai import LengthFinishReasonError

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.generation.candidate import GenerationParams, Generator
from tests.http_service import in_process, openai_client
from tests.tiny_registry import build_tiny_generator, register_generators, set_alias

GENERATOR = "tiny-llama"
PROMPT = "write a tweet about the flight"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openai-surface")


@pytest.fixture(scope="module")
def store(root: Path) -> str:
    uri = register_generators(root, GENERATOR, seeds=[5])
    set_alias(uri, GENERATOR, "champion", "1")
    return uri


@pytest.fixture(scope="module")
def generator(root: Path, store: str) -> Generator:
    """The registered version's folder loaded in this process: what the service serves."""
    return Generator(root / "generator-5")


@asynccontextmanager
async def serving(store: str, tmp_path: Path, **serve: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = {
        "models": [GENERATOR],
        "poll_interval_s": 0.1,
        "model_cache": str(tmp_path / "served"),
        "prediction_log": str(tmp_path / "predictions.db"),
    } | serve
    cfg = LlmopsConfig(registry=RegistryConfig(model_name=GENERATOR), serve=ServeConfig(**settings))
    async with in_process(cfg, store) as served:
        yield served


def teacher_forced(generator: Generator, ids: list[int]) -> np.ndarray:
    """log-softmax of the model's logits at every position of `ids`, in-process: what scoring computes."""
    with torch.inference_mode():
        logits = generator.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def greedy_ids(generator: Generator, prompt_ids: list[int], tokens: int) -> list[int]:
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    (written,) = generator.generate_ids([prompt_ids], params).ids
    return written


async def test_echoed_and_written_logprobs_are_the_models_own(store: str, generator: Generator, tmp_path: Path) -> None:
    async with serving(store, tmp_path) as (client, _):
        prompt_ids = generator.encode(PROMPT, truncate=False)
        body = {"model": GENERATOR, "prompt": PROMPT, "max_tokens": 5, "min_tokens": 5, "temperature": 0}
        answer = (await client.post("/v1/completions", json=body | {"logprobs": 3, "echo": True})).json()
        plain = (await client.post("/v1/completions", json=body)).json()
    (choice,) = answer["choices"]
    written = greedy_ids(generator, prompt_ids, 5)
    ids = prompt_ids + written
    expected = teacher_forced(generator, ids)
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT + plain["choices"][0]["text"]  # echo: the prompt, then the same answer
    assert len(logprobs["tokens"]) == len(ids) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"])
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position in range(1, len(ids)):  # position t's token given the tokens before it
        value, top = logprobs["token_logprobs"][position], logprobs["top_logprobs"][position]
        assert math.isclose(value, expected[position - 1, ids[position]], abs_tol=1e-4), position
        best = np.sort(expected[position - 1])[::-1][:3]
        assert len(top) in {3, 4}  # the 3 most likely and the chosen one, if it is not among them
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best, abs=1e-4)
    for position in range(len(prompt_ids), len(ids)):  # greedy: each written token is the most likely one
        assert logprobs["token_logprobs"][position] == max(logprobs["top_logprobs"][position].values())
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert answer["usage"]["completion_tokens"] == 5 and answer["usage"]["prompt_tokens"] == len(prompt_ids)


async def test_streamed_logprobs_are_the_whole_answers(store: str, tmp_path: Path) -> None:
    body = {"model": GENERATOR, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": True}
    async with serving(store, tmp_path) as (client, _):
        whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
        async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
            chunks = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: {")]
    pieces = [chunk["choices"][0] for chunk in chunks]
    assert "".join(p["text"] for p in pieces) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in pieces if p["logprobs"] for v in p["logprobs"][key]] == whole["logprobs"][key]


async def test_chat_logprobs_through_the_openai_client(store: str, tmp_path: Path) -> None:
    async with serving(store, tmp_path) as (_, app):
        client = openai_client(app)
        asked: dict[str, Any] = {"model": GENERATOR, "max_tokens": 4, "temperature": 0, "logprobs": True}
        asked |= {"messages": [{"role": "user", "content": "hello there"}], "top_logprobs": 3}
        chat = await client.chat.completions.create(**asked)
        streamed = await client.chat.completions.create(**asked, stream=True)
        streamed_entries = [
            e async for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
    (choice,) = chat.choices
    entries = choice.logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    assert [(e.token, e.logprob) for e in streamed_entries] == [(e.token, e.logprob) for e in entries]


async def test_n_choices_each_with_its_index_and_seed(store: str, tmp_path: Path) -> None:
    sampled = {"model": GENERATOR, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 3}
    async with serving(store, tmp_path) as (client, app):
        first = (await client.post("/v1/completions", json=sampled | {"prompt": PROMPT})).json()
        again = (await client.post("/v1/completions", json=sampled | {"prompt": PROMPT})).json()
        alone = (await client.post("/v1/completions", json=sampled | {"prompt": PROMPT, "n": 1, "seed": 12})).json()
        greedy = {"model": GENERATOR, "max_tokens": 6, "temperature": 0, "n": 2}
        two_prompts = (await client.post("/v1/completions", json=greedy | {"prompt": [PROMPT, "good morning"]})).json()
        single = (await client.post("/v1/completions", json=greedy | {"prompt": "good morning", "n": 1})).json()
        chat = await openai_client(app).chat.completions.create(
            model=GENERATOR, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2, seed=3
        )
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert [c["text"] for c in again["choices"]] == texts  # seeded: the same choices again
    assert alone["choices"][0]["text"] == texts[1]  # choice i samples with seed + i
    assert [c["index"] for c in two_prompts["choices"]] == [0, 1, 2, 3]  # prompt by prompt, n each
    assert two_prompts["choices"][2]["text"] == two_prompts["choices"][3]["text"] == single["choices"][0]["text"]
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens <= 8


async def test_a_token_id_prompt_is_read_as_given(store: str, generator: Generator, tmp_path: Path) -> None:
    ids = generator.encode(PROMPT, truncate=False)
    async with serving(store, tmp_path) as (client, _):
        body = {"model": GENERATOR, "max_tokens": 6, "temperature": 0}
        by_text = (await client.post("/v1/completions", json=body | {"prompt": PROMPT})).json()
        by_ids = (await client.post("/v1/completions", json=body | {"prompt": ids})).json()
        batch = (await client.post("/v1/completions", json=body | {"prompt": [ids, ids[:3]]})).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert batch["choices"][0]["text"] == by_text["choices"][0]["text"] and len(batch["choices"]) == 2


BAD_CHAT = {
    "echo": ({"echo": True}, "echo"),
    "top-without-logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "too-many-top": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "too-many-choices": ({"n": 9}, "n"),
}


async def test_the_tokenizer_routes_answer_as_vllms(store: str, generator: Generator, tmp_path: Path) -> None:
    tokenizer = generator.tokenizer
    own = list(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    chat = [{"role": "user", "content": "hi there"}]
    async with serving(store, tmp_path) as (client, _):
        read = (await client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True})).json()
        plain = await client.post("/tokenize", json={"model": GENERATOR, "prompt": PROMPT, "add_special_tokens": False})
        chatted = (await client.post("/tokenize", json={"messages": chat})).json()
        back = (await client.post("/detokenize", json={"tokens": own})).json()
        info = (await client.get("/tokenizer_info")).json()
        both = await client.post("/tokenize", json={"prompt": PROMPT, "messages": chat})
        outside = await client.post("/detokenize", json={"tokens": [1, 10**7]})
        unknown = await client.post("/tokenize", json={"model": "nope", "prompt": PROMPT})
    assert read["tokens"] == generator.encode(PROMPT, truncate=False) and read["count"] == len(read["tokens"])
    assert read["max_model_len"] == generator.context_length and len(read["token_strs"]) == read["count"]
    assert plain.json()["tokens"] == own
    assert chatted["tokens"] == generator.encode(chat, truncate=False)
    assert back["prompt"] == tokenizer.decode(own)
    assert info["eos_token"] == tokenizer.eos_token and info["tokenizer_class"]
    assert both.status_code == 422
    assert outside.status_code == 422 and outside.json()["field"] == "tokens[1]"
    assert unknown.status_code == 404


async def test_a_seq2seq_model_refuses_logprobs_and_structured_output_and_answers_without(tmp_path: Path) -> None:
    t5 = "tiny-t5"
    build = lambda d, seed: build_tiny_generator(d, seed, "seq2seq-lm")  # noqa: E731
    uri = register_generators(tmp_path / "registry", t5, seeds=[1], build=build)
    set_alias(uri, t5, "champion", "1")
    body = {"model": t5, "prompt": PROMPT, "max_tokens": 3}
    async with serving(uri, tmp_path, models=[t5]) as (client, _):
        refused = await client.post("/v1/completions", json=body | {"logprobs": 1})
        answered = await client.post("/v1/completions", json=body)
        structured = await client.post("/v1/completions", json=body | {"response_format": {"type": "json_object"}})
    assert refused.status_code == 422 and refused.json()["field"] == "logprobs"
    assert "seq2seq-lm" in refused.json()["error"] and answered.status_code == 200
    assert structured.status_code == 422 and structured.json()["field"] == "response_format"


TWEET = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["negative", "neutral", "positive"]},
        "topic": {"type": "string", "maxLength": 12},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["sentiment", "topic", "stars", "tags"],
    "additionalProperties": False,
}


def structured(schema: dict[str, Any] = TWEET) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "tweet", "schema": schema}}


async def test_every_structured_answer_validates_beside_free_ones_in_one_batch(store: str, tmp_path: Path) -> None:
    """A random-init model: the constraint alone must make each answer valid. Sampled, seeded, 12 constrained
    and 4 free sequences in the running batch together."""
    chat = [{"role": "user", "content": "rate this tweet"}]
    async with serving(store, tmp_path, max_running=16) as (client, _):

        async def ask(seed: int, constrained: bool) -> dict[str, Any]:
            body = {"model": GENERATOR, "messages": chat, "max_tokens": 96, "temperature": 1.0, "seed": seed}
            body |= {"response_format": structured()} if constrained else {}
            return (await client.post("/v1/chat/completions", json=body)).json()

        answers = await asyncio.gather(*(ask(seed, seed % 4 != 0) for seed in range(16)))
    for seed, answer in enumerate(answers):
        assert "choices" in answer, answer
        (choice,) = answer["choices"]
        if seed % 4 == 0:
            continue  # a free answer: noise
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), TWEET)
    assert len({a["choices"][0]["message"]["content"] for a in answers}) > 8  # sampled, not one answer repeated


async def test_the_openai_client_parses_into_a_pydantic_model(store: str, tmp_path: Path) -> None:
    class Rating(pydantic.BaseModel):
        sentiment: Literal["negative", "neutral", "positive"]
        stars: int = pydantic.Field(ge=1, le=5)

    chat = [{"role": "user", "content": "rate this tweet"}]
    async with serving(store, tmp_path) as (client, app):
        openai = openai_client(app)
        parsed = await openai.chat.completions.parse(
            model=GENERATOR, messages=chat, response_format=Rating, max_tokens=40, temperature=0
        )
        with pytest.raises(LengthFinishReasonError):  # cut by max_tokens: the client is told
            await openai.chat.completions.parse(model=GENERATOR, messages=chat, response_format=Rating, max_tokens=2)
        body = {"model": GENERATOR, "messages": chat, "max_tokens": 40, "temperature": 0}
        whole = (await client.post("/v1/chat/completions", json=body | {"response_format": structured()})).json()
        async with client.stream(
            "POST", "/v1/chat/completions", json=body | {"response_format": structured(), "stream": True}
        ) as response:
            chunks = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: {")]
        completion = await client.post(
            "/v1/completions",
            json={"model": GENERATOR, "prompt": PROMPT, "max_tokens": 40, "response_format": {"type": "json_object"}},
        )
    assert isinstance(parsed.choices[0].message.parsed, Rating)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    (choice,) = completion.json()["choices"]
    assert choice["text"].startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)


BAD_FORMATS = {
    "not-json-schema": ({"response_format": structured({"type": "nope"})}, "response_format.json_schema.schema"),
    "uncompilable": (
        {"response_format": structured({"$ref": "#/$defs/missing"})},
        "response_format.json_schema.schema",
    ),
    "with-stop": ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    "unknown-type": ({"response_format": {"type": "yaml"}}, "response_format"),
}


@pytest.mark.parametrize("case", [*BAD_CHAT, *BAD_FORMATS])
async def test_bad_chat_combinations_are_422_naming_the_field(case: str, store: str, tmp_path: Path) -> None:
    extra, field = (BAD_CHAT | BAD_FORMATS)[case]
    body = {"model": GENERATOR, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | extra
    async with serving(store, tmp_path) as (client, _):
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith(field), response.text
