"""OpenVINO candidates: a tiny trained Llama (and GPT-2, Qwen2) exported to OpenVINO's IR by llmops' own exporter,
its weights compressed by NNCF to int8 and int4, and run in-process by OpenVINO with the same prompts, token ids
and decoding rules as torch; its running batch (the cache kept in OpenVINO's request state) lets sequences join
and leave as the serving engine needs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmops.generation.candidate import GenerationParams, Generator
from llmops.generation.evaluate import agreement
from llmops.generation.loading import load_generator
from llmops.generation.openvino import OpenVinoGenerator
from llmops.openvino_ir import MODEL_FILE, save_openvino
from tests.integration.trained_decoders import GPT2, QWEN2, trained

PROMPTS = [
    "write a positive tweet about coachella",
    "classify the sentiment of this tweet: lost my bag again at the airport, third time this year",
    "write a negative tweet about united airlines",
]


@pytest.fixture(scope="module")
def int8(llama: tuple[Path, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_openvino(llama[0], "openvino-int8", tmp_path_factory.mktemp("ov") / "int8")


def test_an_int8_candidate_records_its_recipe_and_loads_on_openvino(int8: Path) -> None:
    meta = json.loads((int8 / "candidate.json").read_text())
    assert meta["kind"] == "openvino-int8" and meta["task"] == "causal-lm"
    recipe = meta["recipe"]["quantization"]
    assert (
        recipe["runtime"] == "openvino" and recipe["weights"] == "int8_asym" and recipe["openvino"] and recipe["nncf"]
    )
    assert (int8 / MODEL_FILE).is_file() and (int8 / "openvino_model.bin").stat().st_size > 0
    assert not list(int8.glob("*.safetensors"))
    assert isinstance(load_generator(int8), OpenVinoGenerator)


def test_int8_agrees_with_its_fp32_source_and_int4_stays_close(
    llama: tuple[Path, object], int8: Path, held_out: tuple[list, list[str]], tmp_path: Path
) -> None:
    prompts, completions = held_out
    fp32 = Generator(llama[0])
    int8_agreement = agreement(fp32, load_generator(int8), prompts, completions)
    int4 = load_generator(save_openvino(llama[0], "openvino-int4", tmp_path / "int4"))
    int4_agreement = agreement(fp32, int4, prompts, completions)
    assert int8_agreement["positions"] > 100
    assert int8_agreement["top1_agreement"] >= 0.99 and int8_agreement["mean_kl"] < 0.01, int8_agreement
    assert int4_agreement["top1_agreement"] >= 0.8, int4_agreement
    assert int4_agreement["mean_kl"] > int8_agreement["mean_kl"]  # fewer bits, further from the source
    nll, tokens = fp32.completion_nll(prompts, completions)
    int8_nll, int8_tokens = load_generator(int8).completion_nll(prompts, completions)
    assert int8_tokens == tokens and math.exp(int8_nll / tokens) == pytest.approx(math.exp(nll / tokens), rel=0.02)
    assert json.loads((tmp_path / "int4" / "candidate.json").read_text())["recipe"]["quantization"]["weights"] == (
        "int4_sym"
    )


def test_greedy_answers_and_prompt_embeddings_are_the_torch_model_s(llama: tuple[Path, object], int8: Path) -> None:
    runtime, source = load_generator(int8), Generator(llama[0])
    params = GenerationParams(max_new_tokens=12)
    answers = [g.text for g in runtime.generate(PROMPTS, params)]  # three lengths, left-padded in one batch
    assert answers == [g.text for g in source.generate(PROMPTS, params)] and all(answers)
    ours, theirs = runtime.prompt_embeddings(PROMPTS), source.prompt_embeddings(PROMPTS)
    assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=0.05 * float(np.abs(theirs).max()))


def test_sequences_join_and_leave_the_running_batch_without_cross_talk(int8: Path) -> None:
    runtime = load_generator(int8)
    encoded = [runtime.encode(p) for p in PROMPTS]

    def alone(ids: list[int], steps: int) -> list[torch.Tensor]:
        batch = runtime.running_batch(1)
        logits, _ = batch.admit([ids])
        seen = [logits[0]]
        for _ in range(steps):
            logits = batch.step([int(logits[0].argmax())])
            seen.append(logits[0])
        return seen

    first, second = alone(encoded[0], 6), alone(encoded[1], 3)
    batch = runtime.running_batch(4)
    logits, _ = batch.admit([encoded[0]])
    rows = [[logits[0]], []]
    for _ in range(3):  # the first sequence runs alone for three steps, then the second joins it
        logits = batch.step([int(logits[0].argmax())])
        rows[0].append(logits[0])
    joined, _ = batch.admit([encoded[1]])
    rows[1].append(joined[0])
    for _ in range(3):
        logits = batch.step([int(rows[0][-1].argmax()), int(rows[1][-1].argmax())])
        rows[0].append(logits[0])
        rows[1].append(logits[1])
    batch.keep([1])  # the first leaves; the second goes on alone
    assert len(rows[1]) == 4 and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(rows[0], first, strict=True))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(rows[1], second, strict=True))
    after = batch.step([int(rows[1][-1].argmax())])
    assert torch.allclose(after[0], alone(encoded[1], 4)[-1], atol=1e-4)


@pytest.mark.parametrize("architecture", [GPT2, QWEN2], ids=["gpt2", "qwen2"])
def test_gpt2_and_qwen2_export_too(architecture: str, tmp_path: Path) -> None:
    teacher, _ = trained(tmp_path, architecture, "train.epochs=1", "data.sample=100")
    params = GenerationParams(max_new_tokens=6)
    runtime = load_generator(save_openvino(teacher, "openvino-int8", tmp_path / "int8"))
    ours = runtime.generate(PROMPTS, params)
    assert [g.text for g in ours] == [g.text for g in Generator(teacher).generate(PROMPTS, params)]
    assert all(g.completion_tokens >= 1 for g in ours)
