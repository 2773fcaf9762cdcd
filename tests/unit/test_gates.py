import pytest

from llmops.config import GateConfig
from llmops.evaluate import CandidateReport
from llmops.gates import ChampionState, decide_promotion, slice_gap

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
        macro_f1=f1,
        accuracy=f1,
        per_class_f1={},
        slice_macro_f1=slices,
        slice_rows=dict.fromkeys(slices, 100),
        latency_p50_ms=p95 / 2,
        latency_p95_ms=p95,
        throughput_per_s=throughput,
        size_mb=size,
    )


CANDIDATES = [report("teacher", 0.80, 80), report("student", 0.79, 150), report("int8", 0.785, 380)]


def test_accepts_the_fastest_candidate_that_passes() -> None:
    decision = decide_promotion(CANDIDATES, NO_CHAMPION, POLICY, min_slice_rows=30)
    assert decision.selected == "int8" and decision.promote
    assert all(v.passed for v in decision.verdicts.values())


def test_retention_rejects_and_the_next_fastest_is_chosen() -> None:
    candidates = [*CANDIDATES[:2], report("int8", 0.70, 380)]
    decision = decide_promotion(candidates, NO_CHAMPION, POLICY, min_slice_rows=30)
    assert decision.selected == "student" and decision.promote
    assert decision.verdicts["int8"].reasons == ["retention 0.8750 of teacher < 0.9700"]


def test_rejects_all_below_the_floor_and_keeps_the_champion() -> None:
    policy = GateConfig(min_macro_f1=0.9)
    decision = decide_promotion(CANDIDATES, ChampionState("3", "3", 0.7), policy, min_slice_rows=30)
    assert not decision.promote
    assert decision.selected == "teacher"  # the best-scoring is registered with its reasons
    assert "no candidate passed" in decision.reason
    assert "macro-F1 0.7850 < floor 0.9000" in decision.verdicts["int8"].reasons


def test_non_inferiority_against_the_champion() -> None:
    champion = ChampionState("3", "3", macro_f1=0.795)
    decision = decide_promotion(CANDIDATES, champion, POLICY, min_slice_rows=30)
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
    decision = decide_promotion(CANDIDATES, NO_CHAMPION, policy, min_slice_rows=30)
    assert not decision.promote and reason in decision.verdicts["int8"].reasons


def test_slice_gap_gate_ignores_small_slices() -> None:
    r = report("int8", 0.8, 100, slices={"a": 0.9, "b": 0.5, "tiny": 0.0})
    r = CandidateReport(**{**r.__dict__, "slice_rows": {"a": 100, "b": 100, "tiny": 3}})
    assert slice_gap(r, min_rows=30) == pytest.approx(0.4)
    decision = decide_promotion([report("teacher", 0.8, 50), r], NO_CHAMPION, GateConfig(max_slice_gap=0.3), 30)
    assert decision.verdicts["int8"].reasons == ["slice gap 0.4000 > 0.3000"]


def test_champion_moved_refuses_to_promote() -> None:
    decision = decide_promotion(CANDIDATES, ChampionState("3", "4", 0.7), POLICY, min_slice_rows=30)
    assert not decision.promote and decision.selected == "int8"
    assert "moved from version 3 to 4" in decision.reason


def test_same_model_as_champion_is_not_promoted_again() -> None:
    champion = ChampionState("3", "3", 0.785, candidate_key="k-int8")
    decision = decide_promotion(CANDIDATES, champion, POLICY, 30, candidate_keys={"int8": "k-int8"})
    assert not decision.promote and "already the champion" in decision.reason


def test_teacher_can_be_excluded() -> None:
    decision = decide_promotion([report("teacher", 0.8, 80)], NO_CHAMPION, GateConfig(allow_teacher=False), 30)
    assert not decision.promote


def test_teacher_is_required() -> None:
    with pytest.raises(ValueError, match="teacher"):
        decide_promotion(CANDIDATES[1:], NO_CHAMPION, POLICY, 30)
