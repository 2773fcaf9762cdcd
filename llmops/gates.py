"""The promotion decision: a pure function of numbers and a declared policy.

No I/O here. `registry.py` reads the registry, calls `decide_promotion`, and
carries out what it says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmops.config import GateConfig
from llmops.evaluate import CandidateReport


@dataclass(frozen=True)
class ChampionState:
    """The champion as this flow saw it when it started evaluating, and as it is now."""

    version_at_start: str | None
    version_now: str | None
    macro_f1: float | None = None
    """The start-time champion's macro-F1 on this flow's test set."""
    candidate_key: str | None = None
    """Content key of the start-time champion (equal to a candidate's: the same model)."""


@dataclass(frozen=True)
class Verdict:
    kind: str
    passed: bool
    reasons: list[str]


@dataclass(frozen=True)
class Decision:
    selected: str | None
    """Kind of the candidate to register (the fastest that passed, else the best-scoring)."""
    promote: bool
    reason: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)


def slice_gap(report: CandidateReport, min_rows: int) -> float:
    """Largest macro-F1 difference between slices with at least `min_rows` test rows."""
    scores = [f1 for name, f1 in report.slice_macro_f1.items() if report.slice_rows.get(name, 0) >= min_rows]
    return max(scores) - min(scores) if len(scores) >= 2 else 0.0


def check_gates(
    report: CandidateReport, teacher_f1: float, champion_f1: float | None, policy: GateConfig, min_slice_rows: int
) -> Verdict:
    """Every gate the candidate fails, with the numbers that failed it."""
    failures = []
    if report.macro_f1 < policy.min_macro_f1:
        failures.append(f"macro-F1 {report.macro_f1:.4f} < floor {policy.min_macro_f1:.4f}")
    retention = report.macro_f1 / teacher_f1 if teacher_f1 > 0 else 1.0
    if retention < policy.min_retention:
        failures.append(f"retention {retention:.4f} of teacher < {policy.min_retention:.4f}")
    if champion_f1 is not None and report.macro_f1 < champion_f1 - policy.max_drop_vs_champion:
        failures.append(
            f"macro-F1 {report.macro_f1:.4f} < champion {champion_f1:.4f} - {policy.max_drop_vs_champion:.4f}"
        )
    if policy.max_latency_p95_ms is not None and report.latency_p95_ms > policy.max_latency_p95_ms:
        failures.append(f"p95 latency {report.latency_p95_ms:.1f} ms > {policy.max_latency_p95_ms:.1f} ms")
    if policy.max_size_mb is not None and report.size_mb > policy.max_size_mb:
        failures.append(f"size {report.size_mb:.1f} MB > {policy.max_size_mb:.1f} MB")
    gap = slice_gap(report, min_slice_rows)
    if policy.max_slice_gap is not None and gap > policy.max_slice_gap:
        failures.append(f"slice gap {gap:.4f} > {policy.max_slice_gap:.4f}")
    if report.kind == "teacher" and not policy.allow_teacher:
        failures.append("the teacher is not allowed as champion (gates.allow_teacher: false)")
    return Verdict(report.kind, not failures, failures)


def decide_promotion(
    candidates: list[CandidateReport],
    champion: ChampionState,
    policy: GateConfig,
    min_slice_rows: int,
    candidate_keys: dict[str, str] | None = None,
) -> Decision:
    """Choose the fastest candidate that passes every gate, and say whether to promote it.

    `candidates` must include the teacher (retention is measured against it).
    Fastest means the highest throughput at the evaluation batch size.
    """
    teacher = next((c for c in candidates if c.kind == "teacher"), None)
    if teacher is None:
        raise ValueError("decide_promotion needs the teacher's report among the candidates")
    verdicts = {c.kind: check_gates(c, teacher.macro_f1, champion.macro_f1, policy, min_slice_rows) for c in candidates}
    passing = [c for c in candidates if verdicts[c.kind].passed]
    if not passing:
        best = max(candidates, key=lambda c: c.macro_f1)
        return Decision(best.kind, False, "no candidate passed every gate; the champion is unchanged", verdicts)
    chosen = max(passing, key=lambda c: (c.throughput_per_s, -c.latency_p50_ms))
    if champion.version_at_start != champion.version_now:
        return Decision(
            chosen.kind,
            False,
            f"the champion moved from version {champion.version_at_start} to {champion.version_now} while this "
            "flow evaluated against the former; not overwriting it: "
            "run the flow again to gate against the new champion",
            verdicts,
        )
    if champion.candidate_key is not None and (candidate_keys or {}).get(chosen.kind) == champion.candidate_key:
        return Decision(
            chosen.kind, False, f"{chosen.kind} is already the champion (version {champion.version_now})", verdicts
        )
    return Decision(chosen.kind, True, f"{chosen.kind} passed every gate and is the fastest that did", verdicts)
