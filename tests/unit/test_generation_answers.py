"""No empty answers and no answer that starts mid-word, at any temperature: the decoding loop, transformers'
`generate()` for seq2seq models, the serving engine, and what evaluation counts.

The eager ender (`tests.tiny_registry.build_eager_ender`) would answer every prompt with nothing: its first
choice is always the end token, its next a WordPiece continuation piece. Random tiny Llama and T5 models speak
the packaged vocabulary, a fifth of which is continuation pieces: unconstrained, they often start with one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmops.config import GateConfig, GenerationEvalConfig
from llmops.gates import CandidateReport, check_gates
from llmops.generation.candidate import GenerationParams, Generator
from llmops.generation.evaluate import SCORING, evaluate_quality
from serving.engine import GenerationEngine
from tests.tiny_registry import build_eager_ender, build_tiny_generator

PROMPTS = [
    "classify the sentiment of this tweet: lost my bag again",
    "write a positive tweet about coachella",
    "hi",
]
TEMPERATURES = st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.5, 2.0])
TOP_P = st.sampled_from([0.1, 0.5, 0.95, 1.0])


@pytest.fixture(scope="module")
def eager(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    return Generator(build_eager_ender(tmp_path_factory.mktemp("eager") / "model"))


@pytest.fixture(scope="module")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> list[Generator]:
    root = tmp_path_factory.mktemp("random")
    return [Generator(build_tiny_generator(root / task, seed=5, task=task)) for task in ("causal-lm", "seq2seq-lm")]


@settings(max_examples=30, deadline=None)
@given(temperature=TEMPERATURES, top_p=TOP_P, seed=st.integers(0, 2**31))
def test_a_model_that_would_answer_nothing_still_answers(
    eager: Generator, temperature: float, top_p: float, seed: int
) -> None:
    params = GenerationParams(max_new_tokens=6, temperature=temperature, top_p=top_p, seed=seed)
    decoded = eager.generate_ids([eager.encode(p) for p in PROMPTS], params)
    for ids in decoded.ids:
        assert ids[0] != eager.eos_id and ids[0] not in eager.barred.not_first
    assert all(decoded.chose_end_first)  # what evaluation counts: it wanted to say nothing
    answers = eager.generate(PROMPTS, params)
    assert all(a.text and a.chose_end_first for a in answers)


def test_an_empty_answer_only_when_the_caller_asks_for_one(eager: Generator) -> None:
    allowed = eager.generate(PROMPTS, GenerationParams(max_new_tokens=6, min_new_tokens=0))
    assert [(a.text, a.completion_tokens, a.finish_reason) for a in allowed] == [("", 1, "stop")] * len(PROMPTS)


@settings(max_examples=20, deadline=None)
@given(temperature=TEMPERATURES, seed=st.integers(0, 2**31))
def test_no_answer_starts_with_a_continuation_piece(
    random_models: list[Generator], temperature: float, seed: int
) -> None:
    for generator in random_models:  # our decoding loop (Llama) and transformers' generate() (T5)
        params = GenerationParams(max_new_tokens=3, temperature=temperature, top_p=1.0, seed=seed)
        decoded = generator.generate_ids([generator.encode(p) for p in PROMPTS * 4], params)
        first = [ids[0] for ids in decoded.ids]
        assert not set(first) & set(generator.barred.not_first), generator.task
        assert not set(first) & {*generator.barred.never, generator.eos_id}, generator.task


def test_the_serving_engine_follows_the_same_rules(eager: Generator) -> None:
    engine = GenerationEngine(eager, max_running=4, max_waiting=8)

    async def answer(params: GenerationParams) -> tuple[str, list[int], bool]:
        sequence = engine.submit(eager.encode(PROMPTS[0]), params, asyncio.get_running_loop())
        text = ""
        while (event := await sequence.events.get()).finish_reason is None:
            text += event.text
        return text + event.text, sequence.written, sequence.chose_end_first

    try:
        for temperature in (0.0, 0.8, 1.5):
            params = GenerationParams(max_new_tokens=6, temperature=temperature, seed=3)
            text, written, wanted_to_end = asyncio.run(answer(params))
            assert text and written[0] not in eager.barred.not_first and wanted_to_end
        empty, _, _ = asyncio.run(answer(GenerationParams(max_new_tokens=6, min_new_tokens=0)))
    finally:
        engine.stop()
    assert empty == ""


def split_rows(pairs: int) -> pd.DataFrame:
    """`pairs` classify and write rows, as a test split holds them."""
    return pd.DataFrame(
        {
            "prompt": PROMPTS[:2] * pairs,
            "messages": [""] * 2 * pairs,
            "completion": ["negative", "what a show"] * pairs,
            "instruction": ["classify", "write"] * pairs,
            "target": ["negative", "positive"] * pairs,
            "topic": ["airline", "coachella"] * pairs,
        }
    )


def test_evaluation_counts_what_the_model_would_have_left_empty_and_the_gate_refuses_it(eager: Generator) -> None:
    cfg = GenerationEvalConfig(perplexity_rows=4, samples=4, max_new_tokens=6, control_model=None)
    metrics, details, _ = evaluate_quality(eager, split_rows(4), cfg, control=None)
    assert metrics["empty_share"] == 1.0  # every answer has text, and every one is only there by the rule
    assert all(sample["answer"] for sample in details["samples"])
    report = CandidateReport("student", "x", metrics, task="causal-lm")
    policy = GateConfig(metric="perplexity", min_macro_f1=None, min_retention=0.0, answers={})
    verdict = check_gates(report, report, None, policy, 30, SCORING)
    assert "empty share 1.0000 > ceiling 0.0200 (gates.answers.max_empty_share)" in verdict.reasons


def test_a_model_that_answers_shows_no_empty_share(random_models: list[Generator], tmp_path: Path) -> None:
    cfg = GenerationEvalConfig(perplexity_rows=4, samples=2, max_new_tokens=4, control_model=None)
    metrics, _, _ = evaluate_quality(random_models[0], split_rows(2), cfg, control=None)
    assert metrics["empty_share"] == 0.0 and metrics["off_label_share"] == 1.0  # random words: no label
