"""Continuous batching: many sequences at once write what each would write alone, short ones do not wait for long
ones, and a sequence whose reader is gone leaves the batch."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from llmops.generation.candidate import GenerationParams, Generator
from serving.engine import EngineFull, Event, GenerationEngine, Sequence
from tests.tiny_registry import build_tiny_generator

PROMPTS = [
    "write a positive tweet about coachella",
    "classify the sentiment of this tweet: lost my bag",
    "hi",
    "write a negative tweet about an airline that lost my luggage twice",
]


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    return Generator(build_tiny_generator(tmp_path_factory.mktemp("engine") / "tiny", seed=3))


async def read(sequence: Sequence) -> tuple[str, Event]:
    text = ""
    while True:
        event = await sequence.events.get()
        text += event.text
        if event.finish_reason is not None:
            return text, event


def all_at_once(
    engine: GenerationEngine, prompts: list[str], params: list[GenerationParams]
) -> list[tuple[str, Event]]:
    """Every prompt submitted at once; each sequence's text and last event, in order. The engine is stopped."""

    async def everything() -> list[tuple[str, Event]]:
        loop = asyncio.get_running_loop()
        sequences = [engine.submit(engine.generator.encode(p), q, loop) for p, q in zip(prompts, params, strict=True)]
        return await asyncio.gather(*map(read, sequences))

    try:
        return asyncio.run(everything())
    finally:
        engine.stop()


def test_concurrent_sequences_write_what_each_writes_alone(generator: Generator) -> None:
    lengths = [3, 12, 7, 20, 1, 9, 15, 5]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(lengths))]
    alone = [
        generator.generate([p], GenerationParams(max_new_tokens=n))[0] for p, n in zip(prompts, lengths, strict=True)
    ]
    engine = GenerationEngine(generator, max_running=4, max_waiting=16)
    results = all_at_once(engine, prompts, [GenerationParams(max_new_tokens=n) for n in lengths])
    for (text, last), expected in zip(results, alone, strict=True):
        assert text == expected.text  # no cross-talk: the streamed pieces add up to the sequence's own answer
        assert last.completion_tokens == expected.completion_tokens
        assert last.finish_reason == expected.finish_reason


def test_a_short_request_does_not_wait_for_a_long_one(generator: Generator) -> None:
    engine = GenerationEngine(generator, max_running=4, max_waiting=16)
    order: list[str] = []

    async def both() -> None:
        loop = asyncio.get_running_loop()
        long = engine.submit(
            generator.encode(PROMPTS[0]), GenerationParams(max_new_tokens=200, min_new_tokens=200), loop
        )
        await long.events.get()  # the long one is running
        short = engine.submit(generator.encode(PROMPTS[1]), GenerationParams(max_new_tokens=2, min_new_tokens=2), loop)

        async def done(name: str, sequence: Sequence) -> None:
            await read(sequence)
            order.append(name)

        await asyncio.gather(done("long", long), done("short", short))

    try:
        asyncio.run(both())
    finally:
        engine.stop()
    assert order == ["short", "long"]


def test_a_cancelled_sequence_frees_its_slot(generator: Generator) -> None:
    engine = GenerationEngine(generator, max_running=1, max_waiting=4)

    async def scenario() -> tuple[str, Event]:
        loop = asyncio.get_running_loop()
        endless = engine.submit(
            generator.encode(PROMPTS[0]), GenerationParams(max_new_tokens=10_000, min_new_tokens=10_000), loop
        )
        await endless.events.get()
        waiting = engine.submit(generator.encode(PROMPTS[1]), GenerationParams(max_new_tokens=3), loop)
        endless.cancelled = True  # the client went away
        return await asyncio.wait_for(read(waiting), timeout=30)

    try:
        _, last = asyncio.run(scenario())
    finally:
        engine.stop()
    assert last.finish_reason in {"stop", "length"} and engine.running == 0


def test_a_full_queue_refuses_at_once(generator: Generator) -> None:
    engine = GenerationEngine(generator, max_running=1, max_waiting=1)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        busy = engine.submit(
            generator.encode(PROMPTS[0]), GenerationParams(max_new_tokens=500, min_new_tokens=500), loop
        )
        await busy.events.get()
        engine.submit(generator.encode(PROMPTS[1]), GenerationParams(max_new_tokens=3), loop)
        with pytest.raises(EngineFull):
            engine.submit(generator.encode(PROMPTS[2]), GenerationParams(max_new_tokens=3), loop)
        busy.cancelled = True

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


def test_a_seed_gives_the_same_sample_whatever_runs_beside_it(generator: Generator) -> None:
    engine = GenerationEngine(generator, max_running=4, max_waiting=16)
    seeded = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)

    async def run(neighbours: int) -> str:
        loop = asyncio.get_running_loop()
        others = [
            engine.submit(generator.encode(PROMPTS[2]), GenerationParams(max_new_tokens=8, temperature=1.0), loop)
            for _ in range(neighbours)
        ]
        mine = engine.submit(generator.encode(PROMPTS[0]), seeded, loop)
        results = await asyncio.gather(read(mine), *map(read, others))
        return results[0][0]

    try:
        assert asyncio.run(run(0)) == asyncio.run(run(3))
    finally:
        engine.stop()


def test_stop_strings_end_the_text_before_them(generator: Generator) -> None:
    whole = generator.generate([PROMPTS[0]], GenerationParams(max_new_tokens=20, min_new_tokens=20))[0].text
    words = whole.split()
    assert len(words) > 3
    stop = words[2]
    engine = GenerationEngine(generator, max_running=2, max_waiting=4)

    async def scenario() -> tuple[str, Event]:
        loop = asyncio.get_running_loop()
        params = GenerationParams(max_new_tokens=20, min_new_tokens=20, stop=(stop,))
        return await read(engine.submit(generator.encode(PROMPTS[0]), params, loop))

    try:
        text, last = asyncio.run(scenario())
    finally:
        engine.stop()
    assert last.finish_reason == "stop" and stop not in text and whole.startswith(text)


def test_min_tokens_holds_the_end_token_back(tmp_path: Path) -> None:
    generator = Generator(build_tiny_generator(tmp_path / "tiny", seed=3))
    prompt = generator.encode(PROMPTS[0])
    first = generator.generate([PROMPTS[0]], GenerationParams(max_new_tokens=1))[0]
    generator.eos_id = generator.tokenizer.convert_tokens_to_ids(generator.tokenizer.tokenize(first.text)[0])
    generator.barred = dataclasses.replace(generator.barred, eos_id=generator.eos_id)
    engine = GenerationEngine(generator, max_running=2, max_waiting=2)  # its greedy first token is now the end

    async def answer(params: GenerationParams) -> tuple[Event, Sequence]:
        sequence = engine.submit(prompt, params, asyncio.get_running_loop())
        return (await read(sequence))[1], sequence

    try:
        ended, _ = asyncio.run(answer(GenerationParams(max_new_tokens=8, min_new_tokens=0)))  # asked for: may be empty
        kept, sequence = asyncio.run(answer(GenerationParams(max_new_tokens=8)))  # the default: never empty
        held, _ = asyncio.run(answer(GenerationParams(max_new_tokens=8, min_new_tokens=8)))
    finally:
        engine.stop()
    assert (ended.completion_tokens, ended.finish_reason) == (1, "stop")
    assert kept.completion_tokens > 1 and sequence.text and sequence.chose_end_first
    assert (held.completion_tokens, held.finish_reason) == (8, "length")


def test_a_seq2seq_model_answers_one_sequence_at_a_time(tmp_path: Path) -> None:
    generator = Generator(build_tiny_generator(tmp_path / "t5", seed=4, task="seq2seq-lm"))
    params = GenerationParams(max_new_tokens=6)
    alone = [generator.generate([p], params)[0] for p in PROMPTS[:3]]
    engine = GenerationEngine(generator, max_running=4, max_waiting=8)
    assert engine.max_running == 1  # encoder-decoder caches are not merged: no continuous batching
    results = all_at_once(engine, PROMPTS[:3], [params] * 3)
    for (text, last), expected in zip(results, alone, strict=True):
        assert (text, last.completion_tokens, last.finish_reason) == (
            expected.text,
            expected.completion_tokens,
            expected.finish_reason,
        )
