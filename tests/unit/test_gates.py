import dataclasses

import pytest

from llmops.classification.evaluate import SCORING
from llmops.config import GateConfig
from llmops.gates import CandidateReport, ChampionState, decide_promotion, slice_gap
from llmops.generation.evaluate import SCORING as GENERATION_SCORING

POLICY = GateConfig(min_macro_f1=0.6, min_retention=0.97, max_drop_vs_champion=0.005)
NO_CHAMPION = ChampionState(None, None)


def report(
    kind: str,
    f1: float,
    throughput: float,
    *,
    p95: float = 10.0,
    size: float = 20.0,
    slices: dict[str, float] | None = None,
) -> CandidateReport:
    slices = slices or {"a": f1, "b": f1}
    return CandidateReport(
        kind=kind,
        path=f"/x/{kind}",
        metrics={
            "macro_f1": f1,
            "accuracy": f1,
            "latency_p50_ms": p95 / 2,
            "latency_p95_ms": p95,
            "throughput_per_s": throughput,
            "size_mb": size,
        },
        slice_macro_f1=slices,
        slice_rows=dict.fromkeys(slices, 100),
    )


def decide(candidates, champion=NO_CHAMPION, policy=POLICY, **kwargs):
    return decide_promotion(candidates, champion, policy, 30, SCORING, **kwargs)


CANDIDATES = [report("teacher", 0.80, 80), report("student", 0.79, 150), report("int8", 0.785, 380)]


def test_accepts_the_fastest_candidate_that_passes() -> None:
    decision = decide(CANDIDATES)
    assert decision.selected == "int8" and decision.promote
    assert all(v.passed for v in decision.verdicts.values())


def test_retention_rejects_and_the_next_fastest_is_chosen() -> None:
    candidates = [*CANDIDATES[:2], report("int8", 0.70, 380)]
    decision = decide(candidates)
    assert decision.selected == "student" and decision.promote
    assert decision.verdicts["int8"].reasons == ["retention 0.8750 of teacher on macro-F1 < 0.9700"]


def test_rejects_all_below_the_floor_and_keeps_the_champion() -> None:
    decision = decide(CANDIDATES, ChampionState("3", "3", 0.7), GateConfig(min_macro_f1=0.9))
    assert not decision.promote
    assert decision.selected is None and decision.best_rejected == "teacher"  # registered with its reasons
    assert decision.registered == "teacher"
    assert "no candidate passed" in decision.reason
    assert "macro-F1 0.7850 < floor 0.9000" in decision.verdicts["int8"].reasons


def test_non_inferiority_against_the_champion() -> None:
    decision = decide(CANDIDATES, ChampionState("3", "3", quality=0.795))
    assert decision.selected == "student"
    assert decision.verdicts["int8"].reasons == ["macro-F1 0.7850 < champion 0.7950 - 0.0050"]


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (GateConfig(max_latency_p95_ms=5.0), "p95 latency 10.0 ms > 5.0 ms"),
        (GateConfig(max_size_mb=10.0), "size 20.0 MB > 10.0 MB"),
    ],
)
def test_budgets(policy: GateConfig, reason: str) -> None:
    decision = decide(CANDIDATES, policy=policy)
    assert not decision.promote and reason in decision.verdicts["int8"].reasons


def test_slice_gap_gate_ignores_small_slices() -> None:
    r = report("int8", 0.8, 100, slices={"a": 0.9, "b": 0.5, "tiny": 0.0})
    r = dataclasses.replace(r, slice_rows={"a": 100, "b": 100, "tiny": 3})
    assert slice_gap(r, min_rows=30) == pytest.approx(0.4)
    decision = decide([report("teacher", 0.8, 50), r], policy=GateConfig(max_slice_gap=0.3))
    assert decision.verdicts["int8"].reasons == ["slice gap 0.4000 > 0.3000"]


def test_champion_moved_refuses_to_promote() -> None:
    decision = decide(CANDIDATES, ChampionState("3", "4", 0.7))
    assert not decision.promote and decision.selected == "int8"
    assert "moved from version 3 to 4" in decision.reason


def test_same_model_as_champion_is_not_promoted_again() -> None:
    champion = ChampionState("3", "3", 0.785, candidate_key="k-int8")
    decision = decide(CANDIDATES, champion, candidate_keys={"int8": "k-int8"})
    assert not decision.promote and "already the champion" in decision.reason


def test_teacher_can_be_excluded() -> None:
    decision = decide([report("teacher", 0.8, 80)], policy=GateConfig(allow_teacher=False))
    assert not decision.promote


def test_teacher_is_required() -> None:
    with pytest.raises(ValueError, match="teacher"):
        decide(CANDIDATES[1:])


# --- generators: the same policy on other metrics ---------------------------------------------------------


def generator(kind: str, perplexity: float, tokens_per_s: float, **more: float) -> CandidateReport:
    metrics = {"perplexity": perplexity, "decode_tokens_per_s": tokens_per_s, "ttft_p50_ms": 5.0, "ttft_p95_ms": 9.0}
    return CandidateReport(kind, f"/x/{kind}", metrics | more, task="causal-lm")


GENERATOR_POLICY = GateConfig(metric="perplexity", min_macro_f1=None, min_retention=0.8, max_drop_vs_champion=0.5)


def decide_generators(candidates, champion=NO_CHAMPION, policy=GENERATOR_POLICY):
    return decide_promotion(candidates, champion, policy, 30, GENERATION_SCORING)


def test_lower_perplexity_is_better_for_retention_and_the_fastest_passing_wins() -> None:
    candidates = [generator("teacher", 20.0, 100), generator("student", 24.0, 180), generator("int8", 26.0, 600)]
    decision = decide_generators(candidates)
    # int8: 20 / 26 = 0.769 of the teacher's quality < 0.8; the student keeps 20 / 24 = 0.833
    assert decision.verdicts["int8"].reasons == ["retention 0.7692 of teacher on perplexity < 0.8000"]
    assert decision.selected == "student" and decision.promote


def test_non_inferiority_on_a_lower_is_better_metric() -> None:
    candidates = [generator("teacher", 20.0, 100), generator("student", 21.0, 180)]
    decision = decide_generators(candidates, ChampionState("1", "1", quality=20.2))
    assert decision.verdicts["student"].reasons == ["perplexity 21.0000 > champion 20.2000 + 0.5000"]
    assert decision.selected == "teacher" and decision.promote


def test_ratios_to_the_teacher_floors_and_ceilings_on_named_metrics() -> None:
    policy = GENERATOR_POLICY.model_copy(
        update={
            "min_ratio_to_teacher": {"control_accuracy": 0.95},
            "max_ratio_to_teacher": {"perplexity": 1.1},
            "min": {"distinct_2": 0.3},
            "max": {"repetition_rate": 0.2},
        }
    )
    teacher = generator("teacher", 20.0, 100, control_accuracy=0.8, distinct_2=0.5, repetition_rate=0.1)
    student = generator("student", 23.0, 180, control_accuracy=0.7, distinct_2=0.2, repetition_rate=0.3)
    reasons = decide_generators([teacher, student], policy=policy).verdicts["student"].reasons
    assert reasons == [
        "distinct_2 0.2000 < floor 0.3000",
        "repetition (seq-rep-3) 0.3000 > ceiling 0.2000",
        "control_accuracy 0.8750 x teacher < 0.9500",
        "perplexity 1.1500 x teacher > 1.1000",
    ]


def test_a_gate_on_an_unmeasured_metric_is_noted_not_failed() -> None:
    policy = GENERATOR_POLICY.model_copy(update={"min_ratio_to_teacher": {"control_accuracy": 0.95}})
    decision = decide_generators([generator("teacher", 20.0, 100), generator("student", 21.0, 180)], policy=policy)
    verdict = decision.verdicts["student"]
    assert verdict.passed and verdict.notes == ["control_accuracy not measured: its gate was not applied"]


def test_the_gated_metric_itself_must_be_measured() -> None:
    policy = GENERATOR_POLICY.model_copy(update={"metric": "macro_f1"})
    decision = decide_generators([generator("teacher", 20.0, 100), generator("student", 21.0, 180)], policy=policy)
    assert not decision.promote
    assert decision.verdicts["student"].reasons == ["macro-F1 (gates.metric) was not measured"]


def test_the_closing_table_marks_no_winner_when_none_passes_and_says_why() -> None:
    from llmops.report import model_card, summary_table

    rejected = decide(CANDIDATES, policy=GateConfig(min_macro_f1=0.9))
    table = summary_table(CANDIDATES, rejected)
    rows, note = table.split("\n\n")
    assert " *" not in rows and rows.count("fail: macro-F1") == 3
    assert note == (
        "No candidate is marked *: none passed every gate (the gates column says why). The best on the quality "
        "metric, teacher, is registered as rejected for inspection."
    )
    card = model_card("m", "2", CANDIDATES, rejected, "abc", {"train": 1}, "task: x")
    assert "It did **not** pass the gates" in card
    passed = summary_table(CANDIDATES, decide(CANDIDATES))
    assert "| int8 *" in passed and "No candidate is marked" not in passed


def test_a_gate_this_run_cannot_measure_is_refused_with_the_overrides_that_fix_it() -> None:
    from llmops.gates import gate_plan, refusal

    policy = GateConfig(
        metric="macro_f1",
        min_macro_f1=0.5,
        min_ratio_to_teacher={"control_accuracy": 0.95, "distinct_2": 0.9},
        max_ratio_to_teacher={"perplexity": 1.25},
        answers={},
    )
    why_not = {"macro_f1": "no classify rows", "off_label_share": "no classify rows", "control_accuracy": "no judge"}
    message = refusal(policy, why_not, fallback_metric="perplexity")
    assert message is not None
    assert "gates.metric gates macro-F1, which this run cannot measure: no classify rows" in message
    assert "gates.min_ratio_to_teacher.control_accuracy gates control_accuracy" in message
    assert message.splitlines()[-2] == (
        "Fix: --set 'gates.metric=perplexity' --set 'gates.min_macro_f1=null' "
        "--set 'gates.min_ratio_to_teacher={distinct_2: 0.9}'"
    )
    waiting = policy.model_copy(update={"metric": "perplexity", "min_macro_f1": None, "when_measured": []})
    assert "control_accuracy" in (refusal(waiting, why_not, "perplexity") or "")
    measured_later = waiting.model_copy(update={"when_measured": ["control_accuracy"]})
    assert refusal(measured_later, why_not, "perplexity") is None
    plan = gate_plan(measured_later, why_not)
    assert plan[0] == "gates: quality compared on perplexity (gates.metric)"
    assert "off-label share" not in plan[1] and "empty share <= 0.02" in plan[1]
    assert plan[2] == (
        "gates not applied, this run cannot measure: control_accuracy (no judge); off-label share (no classify rows)"
    )
