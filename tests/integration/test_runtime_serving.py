"""GGUF and OpenVINO champions served by the same service as torch ones (llama.cpp's batch API, OpenVINO's
stateful request under the engine): the OpenAI client streamed and not, Triton's generate, concurrent streams,
an alias switch while streaming, a corrupt model file that leaves the old version serving, the prediction log,
and `mlflow.pyfunc.load_model`. Every test runs once per runtime.

Versions of `tiny-generator` in each runtime's own registry: 1 and 2 are q8_0 GGUFs (or OpenVINO int8 models) of
two tiny random-init Llamas, 3 has its model file cut short. `tiny-sentiment` version 1 is a classifier beside
them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch

from llmops.config import LlmopsConfig, RegistryConfig, ServeConfig
from llmops.generation.candidate import GenerationParams
from llmops.generation.loading import load_generator
from llmops.gguf import GGUF_FILE, save_gguf
from llmops.openvino_ir import MODEL_FILE, save_openvino
from llmops.predlog import open_store
from tests.http_service import in_process, openai_client
from tests.integration.test_generation_serving import (
    CLASSIFIER,
    GENERATOR,
    complete,
    readiness_with_a_reason,
    serving,
    sse,
    switch_while_sending,
)
from tests.tiny_registry import (
    build_tiny_generator,
    register_adapter,
    register_generators,
    register_versions,
    set_alias,
)

pytestmark = pytest.mark.anyio
PROMPTS = [f"write tweet number {i} about coachella" for i in range(8)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


RUNTIMES = {"gguf-q8_0": ("llama.cpp", save_gguf, GGUF_FILE), "openvino-int8": ("OpenVINO", save_openvino, MODEL_FILE)}


def builder(kind: str) -> Callable[[Path, int], Path]:
    _, save, model_file = RUNTIMES[kind]

    def build(directory: Path, seed: int) -> Path:
        source = build_tiny_generator(directory.with_name(f"{directory.name}-torch"), seed)
        candidate = save(source, kind, directory)
        if seed == 3:  # cut short, as an interrupted upload would be
            (candidate / model_file).write_bytes((candidate / model_file).read_bytes()[:4096])
        return candidate

    return build


@pytest.fixture(scope="module", params=list(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, runtime: str) -> Path:
    return tmp_path_factory.mktemp(f"{runtime}-serving")


@pytest.fixture(scope="module")
def store(root: Path, runtime: str) -> str:
    uri = register_versions(root, CLASSIFIER, seeds=[1])
    register_generators(root, GENERATOR, seeds=[1, 2, 3], uri=uri, build=builder(runtime))
    set_alias(uri, CLASSIFIER, "champion", "1")
    set_alias(uri, GENERATOR, "champion", "1")
    return uri


@pytest.fixture(scope="module")
def in_process_answers(store: str, root: Path) -> list[str]:
    """Version 1's greedy answers run by the runtime in this process, without the service."""
    generator = load_generator(root / "generator-1")
    return [g.text for g in generator.generate(PROMPTS, GenerationParams(max_new_tokens=10, temperature=0.0))]


async def test_the_openai_client_gets_the_runtime_s_answers_streamed_and_not(
    store: str, in_process_answers: list[str], tmp_path: Path
) -> None:
    async with serving(store, tmp_path) as (client, app):
        openai = openai_client(app)
        whole = await openai.completions.create(model=GENERATOR, prompt=PROMPTS[0], max_tokens=10, temperature=0)
        stream = await openai.completions.create(
            model=GENERATOR, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True
        )
        pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        chat = await openai.chat.completions.create(
            model=GENERATOR, messages=[{"role": "user", "content": "classify: great crew"}], max_tokens=4
        )
        triton = await client.post(
            f"/v2/models/{GENERATOR}/generate", json={"text_input": PROMPTS[1], "parameters": {"max_tokens": 10}}
        )
        metrics = (await client.get("/metrics")).text
    assert whole.choices[0].text == in_process_answers[0] and whole.system_fingerprint == f"llmops-{GENERATOR}-v1"
    assert "".join(pieces) == whole.choices[0].text and whole.usage.completion_tokens <= 10
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 4
    assert triton.status_code == 200 and triton.json()["text_output"] == in_process_answers[1]
    assert f'llmops_generated_tokens_total{{model="{GENERATOR}",version="1"}}' in metrics
    logged = open_store(tmp_path / "predictions.db").read_generations()
    assert len(logged) == 4 and set(logged["completion"]) >= {in_process_answers[0], in_process_answers[1]}
    assert all(len(e) == 64 * 2 for e in logged["embedding"])  # the runtime's prompt embeddings, logged as torch's


async def test_concurrent_streams_keep_their_own_text(
    store: str, in_process_answers: list[str], tmp_path: Path
) -> None:
    async with serving(store, tmp_path, max_running=4) as (client, _):

        async def streamed(prompt: str) -> str:
            async with client.stream("POST", "/v1/completions", json=complete(prompt, 10, stream=True)) as response:
                events = [e for e in await sse(response) if e != "[DONE]"]
            return "".join(c["text"] for e in events for c in e["choices"])

        together = await asyncio.gather(*(streamed(p) for p in PROMPTS))
    assert together == in_process_answers  # 8 sequences through 4 slots: joining and leaving, no cross-talk


async def test_logprobs_with_echo_are_the_runtime_s_own_scores(store: str, root: Path, tmp_path: Path) -> None:
    """Prompt and written tokens' logprobs, four requests in one running batch, against the runtime's own
    teacher-forced scoring of prompt and answer in this process."""
    generator = load_generator(root / "generator-1")
    body = {"max_tokens": 6, "min_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    async with serving(store, tmp_path, max_running=4) as (client, _):
        answers = await asyncio.gather(
            *(client.post("/v1/completions", json=complete(prompt, 6) | body) for prompt in PROMPTS[:4])
        )
    for prompt, answer in zip(PROMPTS[:4], answers, strict=True):
        logprobs = answer.json()["choices"][0]["logprobs"]
        prompt_ids = generator.encode(prompt, truncate=False)
        (written,) = generator.generate_ids([prompt_ids], GenerationParams(max_new_tokens=6, min_new_tokens=6)).ids
        ids = prompt_ids + written
        scored = torch.log_softmax(generator.running_batch(1).score(ids).float(), dim=-1)
        expected = [None, *(float(scored[t - 1, ids[t]]) for t in range(1, len(ids)))]
        assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == len(ids)
        # the prompt is scored as in-process; written tokens come from decoding steps (other batch shapes)
        assert logprobs["token_logprobs"][1 : len(prompt_ids)] == pytest.approx(expected[1 : len(prompt_ids)], abs=1e-4)
        assert logprobs["token_logprobs"][len(prompt_ids) :] == pytest.approx(expected[len(prompt_ids) :], abs=2e-3)


async def test_an_alias_switch_while_streaming_loses_nothing_and_a_corrupt_model_leaves_the_old_one(
    store: str, runtime: str, tmp_path: Path
) -> None:
    set_alias(store, GENERATOR, "champion", "1")
    async with serving(store, tmp_path) as (client, _):

        async def one(i: int) -> tuple[int, str]:
            async with client.stream("POST", "/v1/completions", json=complete(f"tweet {i}", 12, stream=True)) as r:
                events = [e for e in await sse(r) if e != "[DONE]"]
            return r.status_code, events[-1]["system_fingerprint"] if events else ""

        results, later = await switch_while_sending(store, one, in_flight=6, tries=60)
        set_alias(store, GENERATOR, "champion", "3")
        ready = await readiness_with_a_reason(client)
        still = await client.post("/v1/completions", json=complete("still here?", 4))
    set_alias(store, GENERATOR, "champion", "1")
    assert all(status == 200 for status, _ in results) and later[-1][1] == f"llmops-{GENERATOR}-v2"
    assert (
        ready["reason"].startswith(f"{GENERATOR}: version 3 failed to load") and RUNTIMES[runtime][0] in ready["reason"]
    )
    assert still.status_code == 200 and still.json()["system_fingerprint"] == f"llmops-{GENERATOR}-v2"


async def test_a_lora_adapter_over_this_runtime_is_refused_saying_why(
    store: str, root: Path, runtime: str, tmp_path: Path
) -> None:
    """Adapters run over a torch base: one registered over this runtime's version is refused at load, the base
    serves on."""
    register_adapter(store, "tiny-adapter", root / "generator-1-torch", GENERATOR, "1", root / "adapter", seed=1)
    set_alias(store, "tiny-adapter", "champion", "1")
    serve = ServeConfig(
        models=[GENERATOR, "tiny-adapter"], poll_interval_s=0.1, model_cache=str(tmp_path / "served"),
        prediction_log=str(tmp_path / "predictions.db"),
    )  # fmt: skip
    cfg = LlmopsConfig(registry=RegistryConfig(model_name=GENERATOR), serve=serve)
    async with in_process(cfg, store, ready=False) as (client, _):
        models = {m["name"]: m for m in (await client.get("/readyz")).json()["models"]}
        assert models["tiny-adapter"]["version"] is None
        assert f"is a {runtime} candidate, whose runtime runs no LoRA adapters" in models["tiny-adapter"]["reason"]
        assert (await client.post("/v1/completions", json=complete("hi", 2))).status_code == 200


def test_a_registered_runtime_model_loads_through_mlflow_pyfunc(store: str, in_process_answers: list[str]) -> None:
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/{GENERATOR}@champion")
    answered = model.predict(PROMPTS[:2], params={"max_new_tokens": 10, "temperature": 0.0})
    assert list(answered["text"]) == in_process_answers[:2]
