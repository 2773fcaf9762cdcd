"""The decode rate evaluation ranks candidates by stays a rate a machine can have, when timings stall."""

from __future__ import annotations

import pytest

from llmops.config import GenerationEvalConfig
from llmops.generation import evaluate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedGenerator:
    """Takes `prefill` seconds for the first token and `step` for each next one; the first-token calls listed
    in `stalled` take `stall` seconds instead (the machine was busy then)."""

    def __init__(self, clock: Clock, prefill: float, step: float, stalled: set[int], stall: float) -> None:
        self.clock, self.prefill, self.step, self.stalled, self.stall = clock, prefill, step, stalled, stall
        self.first_calls = 0

    def encode(self, prompt: str) -> list[int]:
        return [1, 2, 3]

    def generate_ids(self, encoded: list[list[int]], params) -> None:  # type: ignore[no-untyped-def]
        if params.max_new_tokens == 1:
            self.clock.now += self.stall if self.first_calls in self.stalled else self.prefill
            self.first_calls += 1
        else:
            self.clock.now += self.prefill + (params.max_new_tokens - 1) * self.step


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(evaluate.time, "perf_counter", fake)
    return fake


CFG = GenerationEvalConfig(speed_prompts=8, speed_new_tokens=32, speed_batch_size=4)


def test_decode_rate_is_the_rate_of_the_steps_after_the_first(clock: Clock) -> None:
    generator = TimedGenerator(clock, prefill=0.010, step=0.002, stalled=set(), stall=0.0)
    speed = evaluate.measure_speed(generator, ["a prompt"] * 8, CFG)  # type: ignore[arg-type]
    assert speed["decode_tokens_per_s"] == pytest.approx(500.0)
    assert speed["ttft_p50_ms"] == pytest.approx(10.0)


def test_stalled_first_token_timings_do_not_make_a_candidate_infinitely_fast(clock: Clock) -> None:
    # First-token timings stalled for longer than a whole generation: per prompt, the difference goes negative
    # and a rate over it (clamped) to billions of tokens a second. Three of eight: the medians see through it.
    generator = TimedGenerator(clock, prefill=0.010, step=0.002, stalled={0, 3, 5}, stall=0.5)
    speed = evaluate.measure_speed(generator, ["a prompt"] * 8, CFG)  # type: ignore[arg-type]
    assert speed["decode_tokens_per_s"] == pytest.approx(500.0)
    # Half of them (the median of per-prompt rates was then billions): nothing is left to divide by, and the
    # whole generation's rate stands in.
    generator = TimedGenerator(clock, prefill=0.010, step=0.002, stalled={0, 2, 4, 6}, stall=0.5)
    speed = evaluate.measure_speed(generator, ["a prompt"] * 8, CFG)  # type: ignore[arg-type]
    assert speed["decode_tokens_per_s"] == pytest.approx(32 / 0.072)
