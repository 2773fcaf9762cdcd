"""The promotion decision: a pure function of numbers and a declared policy.

No I/O here. `release.py` reads the registry, calls `decide_promotion`, and
carries out what it says. Every task reports its candidates the same way (a
:class:`CandidateReport`: named metrics), so one policy shape gates classifiers
and generators alike; a task only says which metric is its speed and its latency.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmops.config import GateConfig

LOWER_IS_BETTER = frozenset(
    {
        "perplexity",
        "repetition_rate",
        "empty_share",
        "truncated_share",
        "off_label_share",
        "latency_p50_ms",
        "latency_p95_ms",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "size_mb",
        "peak_memory_mb",
        "params_total",
        "params_non_embedding",
    }
)
"""Metrics where less is better; every other metric is better when higher."""

_LABELS = {
    "macro_f1": "macro-F1",
    "empty_share": "empty share",
    "off_label_share": "off-label share",
    "truncated_share": "truncated share",
    "repetition_rate": "repetition (seq-rep-3)",
}


def _label(metric: str) -> str:
    return _LABELS.get(metric, metric)


@dataclass(frozen=True)
class CandidateReport:
    """What the gates and the registry need to know about one evaluated candidate, for any task."""

    kind: str
    path: str
    metrics: dict[str, float]
    """Every measured number by name (`macro_f1`, `perplexity`, `throughput_per_s`, ...); absent when not measured."""
    task: str = "sequence-classification"
    per_class_f1: dict[str, float] = field(default_factory=dict)
    slice_macro_f1: dict[str, float] = field(default_factory=dict)
    slice_rows: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the evaluation could not measure, and why."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """Generators: a few test prompts with the candidate's answers (`prompt`, `answer`, `finish_reason`)."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CandidateReport:
        return cls(**json.loads(Path(path).read_text()))

    def __getitem__(self, metric: str) -> float:
        return self.metrics[metric]

    def flat_metrics(self) -> dict[str, float]:
        """Every number for MLflow: metrics, parameter counts, per-class and per-slice F1."""
        flat = {**self.metrics, **{k: float(v) for k, v in self.params.items()}}
        flat.update({f"f1_{label}": v for label, v in self.per_class_f1.items()})
        flat.update({f"slice_f1_{name}": v for name, v in self.slice_macro_f1.items()})
        return flat


@dataclass(frozen=True)
class Scoring:
    """How a task's candidates are compared: which metric is speed (the fastest passing one is selected) and
    which is the latency that `gates.max_latency_p95_ms` bounds."""

    speed: str
    latency_p50: str
    latency_p95: str


@dataclass(frozen=True)
class ChampionState:
    """The champion as this flow saw it when it started evaluating, and as it is now."""

    version_at_start: str | None
    version_now: str | None
    quality: float | None = None
    """The start-time champion's `gates.metric` on this flow's test set."""
    candidate_key: str | None = None
    """Content key of the start-time champion (equal to a candidate's: the same model)."""


@dataclass(frozen=True)
class Verdict:
    kind: str
    passed: bool
    reasons: list[str]
    notes: list[str] = field(default_factory=list)
    """Gates that could not be applied (their metric was not measured), and why."""


@dataclass(frozen=True)
class Decision:
    selected: str | None
    """Kind of the candidate chosen: the fastest that passed every gate; None when none passed."""
    promote: bool
    reason: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    best_rejected: str | None = None
    """When none passed: the best on `gates.metric`, registered as rejected so its reasons can be inspected."""

    @property
    def registered(self) -> str | None:
        """The candidate the registry records: the selected one, else the best rejected one."""
        return self.selected or self.best_rejected


def slice_gap(report: CandidateReport, min_rows: int) -> float:
    """Largest macro-F1 difference between slices with at least `min_rows` test rows."""
    scores = [f1 for name, f1 in report.slice_macro_f1.items() if report.slice_rows.get(name, 0) >= min_rows]
    return max(scores) - min(scores) if len(scores) >= 2 else 0.0


def better(metric: str, a: float, b: float) -> bool:
    """Whether `a` is strictly better than `b` on `metric`."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def retention(metric: str, candidate: float, teacher: float) -> float:
    """How much of the teacher's quality the candidate keeps: 1.0 is as good, below 1.0 worse."""
    if metric in LOWER_IS_BETTER:
        return teacher / candidate if candidate > 0 else 1.0
    return candidate / teacher if teacher > 0 else 1.0


def answer_ceilings(policy: GateConfig) -> dict[str, tuple[str, float]]:
    """The answers' ceilings that are on: metric -> (its config key, ceiling)."""
    if policy.answers is None:
        return {}
    return {
        metric: (f"gates.answers.max_{metric}", bound)
        for metric, bound in (
            ("empty_share", policy.answers.max_empty_share),
            ("off_label_share", policy.answers.max_off_label_share),
            ("truncated_share", policy.answers.max_truncated_share),
            ("repetition_rate", policy.answers.max_repetition_rate),
        )
        if bound is not None
    }


def _answers(report: CandidateReport, policy: GateConfig) -> list[str]:
    """Failures on the answers' ceilings; one the evaluation did not measure is not applied (the report's notes
    say why it was not measured)."""
    failures = []
    for metric, (key, bound) in answer_ceilings(policy).items():
        value = report.metrics.get(metric)
        if value is not None and value > bound:
            failures.append(f"{_label(metric)} {value:.4f} > ceiling {bound:.4f} ({key})")
    return failures


def _bounds(report: CandidateReport, teacher: CandidateReport, policy: GateConfig) -> tuple[list[str], list[str]]:
    """Floors, ceilings and ratios to the teacher on named metrics: (failures, notes on unmeasured metrics)."""
    failures: list[str] = _answers(report, policy)
    notes: list[str] = []
    checks: list[tuple[str, str, float]] = [(m, "min", v) for m, v in policy.min.items()]
    checks += [(m, "max", v) for m, v in policy.max.items()]
    checks += [(m, "min_ratio", v) for m, v in policy.min_ratio_to_teacher.items()]
    checks += [(m, "max_ratio", v) for m, v in policy.max_ratio_to_teacher.items()]
    if policy.min_macro_f1 is not None:
        checks.insert(0, ("macro_f1", "min", policy.min_macro_f1))
    for metric, kind, bound in checks:
        value, base = report.metrics.get(metric), teacher.metrics.get(metric)
        if value is None or (kind.endswith("ratio") and not base):
            notes.append(f"{metric} not measured: its gate was not applied")
            continue
        if kind == "min" and value < bound:
            failures.append(f"{_label(metric)} {value:.4f} < floor {bound:.4f}")
        elif kind == "max" and value > bound:
            failures.append(f"{_label(metric)} {value:.4f} > ceiling {bound:.4f}")
        elif kind == "min_ratio" and base and value / base < bound:
            failures.append(f"{_label(metric)} {value / base:.4f} x teacher < {bound:.4f}")
        elif kind == "max_ratio" and base and value / base > bound:
            failures.append(f"{_label(metric)} {value / base:.4f} x teacher > {bound:.4f}")
    return failures, notes


def check_gates(
    report: CandidateReport,
    teacher: CandidateReport,
    champion_quality: float | None,
    policy: GateConfig,
    min_slice_rows: int,
    scoring: Scoring,
) -> Verdict:
    """Every gate the candidate fails, with the numbers that failed it."""
    failures, notes = _bounds(report, teacher, policy)
    metric = policy.metric
    value, teacher_value = report.metrics.get(metric), teacher.metrics.get(metric)
    if value is None or teacher_value is None:
        failures.append(f"{_label(metric)} (gates.metric) was not measured")
    else:
        kept = retention(metric, value, teacher_value)
        if kept < policy.min_retention:
            failures.append(f"retention {kept:.4f} of teacher on {_label(metric)} < {policy.min_retention:.4f}")
        margin = policy.max_drop_vs_champion
        if champion_quality is not None and metric in LOWER_IS_BETTER and value > champion_quality + margin:
            failures.append(f"{_label(metric)} {value:.4f} > champion {champion_quality:.4f} + {margin:.4f}")
        elif champion_quality is not None and metric not in LOWER_IS_BETTER and value < champion_quality - margin:
            failures.append(f"{_label(metric)} {value:.4f} < champion {champion_quality:.4f} - {margin:.4f}")
    latency = report.metrics.get(scoring.latency_p95)
    if policy.max_latency_p95_ms is not None and latency is not None and latency > policy.max_latency_p95_ms:
        failures.append(f"p95 latency {latency:.1f} ms > {policy.max_latency_p95_ms:.1f} ms")
    size = report.metrics.get("size_mb")
    if policy.max_size_mb is not None and size is not None and size > policy.max_size_mb:
        failures.append(f"size {size:.1f} MB > {policy.max_size_mb:.1f} MB")
    gap = slice_gap(report, min_slice_rows)
    if policy.max_slice_gap is not None and gap > policy.max_slice_gap:
        failures.append(f"slice gap {gap:.4f} > {policy.max_slice_gap:.4f}")
    if report.kind == "teacher" and not policy.allow_teacher:
        failures.append("the teacher is not allowed as champion (gates.allow_teacher: false)")
    return Verdict(report.kind, not failures, failures, notes)


def _quality_key(metric: str) -> Callable[[CandidateReport], float]:
    """A sort key under which max() finds the best quality on `metric`."""

    def key(report: CandidateReport) -> float:
        value = report.metrics.get(metric)
        if value is None:
            return float("-inf")
        return -value if metric in LOWER_IS_BETTER else value

    return key


def decide_promotion(
    candidates: list[CandidateReport],
    champion: ChampionState,
    policy: GateConfig,
    min_slice_rows: int,
    scoring: Scoring,
    candidate_keys: dict[str, str] | None = None,
) -> Decision:
    """Choose the fastest candidate that passes every gate, and say whether to promote it.

    `candidates` must include the teacher (retention is measured against it).
    Fastest means the highest value of the task's speed metric.
    """
    teacher = next((c for c in candidates if c.kind == "teacher"), None)
    if teacher is None:
        raise ValueError("decide_promotion needs the teacher's report among the candidates")
    verdicts = {c.kind: check_gates(c, teacher, champion.quality, policy, min_slice_rows, scoring) for c in candidates}
    passing = [c for c in candidates if verdicts[c.kind].passed]
    if not passing:
        best = max(candidates, key=_quality_key(policy.metric))
        reason = "no candidate passed every gate (each candidate's reasons say why); the champion is unchanged"
        return Decision(None, False, reason, verdicts, best_rejected=best.kind)
    chosen = max(passing, key=lambda c: (c.metrics.get(scoring.speed, 0.0), -c.metrics.get(scoring.latency_p50, 0.0)))
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


# --- before any stage runs: can this run measure what its gates name? -------------------------------------

GATE_SECTIONS = ("min", "max", "min_ratio_to_teacher", "max_ratio_to_teacher")


def gated_metrics(policy: GateConfig) -> dict[str, str]:
    """The metric each gate names, by the config key that sets it (the answers' ceilings apply where measured and
    are not listed)."""
    keys = {"gates.metric": policy.metric}
    if policy.min_macro_f1 is not None:
        keys["gates.min_macro_f1"] = "macro_f1"
    for section in GATE_SECTIONS:
        keys |= {f"gates.{section}.{metric}": metric for metric in getattr(policy, section)}
    return keys


def _why_not(metric: str, why_not: dict[str, str]) -> str | None:
    if metric in why_not:
        return why_not[metric]
    return why_not.get("macro_f1") if metric.startswith(("f1_", "slice_f1_")) else None  # per class, per slice


def unmeasurable_gates(policy: GateConfig, why_not: dict[str, str]) -> dict[str, str]:
    """Config keys whose gate names a metric this run cannot measure, with why; `why_not` maps a metric to the
    reason it cannot be measured. Metrics in `gates.when_measured` are exempt: their gates wait until they are."""
    refused = {}
    for key, metric in gated_metrics(policy).items():
        reason = _why_not(metric, why_not)
        if reason is not None and metric not in policy.when_measured:
            refused[key] = f"{key} gates {_label(metric)}, which this run cannot measure: {reason}"
    return refused


def fixing_overrides(policy: GateConfig, keys: list[str], fallback_metric: str) -> list[str]:
    """`--set` items that remove the gates at `keys` (`gates.metric` moves to `fallback_metric`)."""
    fixes = []
    if "gates.metric" in keys:
        fixes.append(f"gates.metric={fallback_metric}")
    if "gates.min_macro_f1" in keys:
        fixes.append("gates.min_macro_f1=null")
    for section in GATE_SECTIONS:
        dropped = {k.rsplit(".", 1)[1] for k in keys if k.startswith(f"gates.{section}.")}
        if dropped:
            kept = ", ".join(f"{m}: {v}" for m, v in getattr(policy, section).items() if m not in dropped)
            fixes.append(f"gates.{section}={{{kept}}}")
    return fixes


def refusal(policy: GateConfig, why_not: dict[str, str], fallback_metric: str) -> str | None:
    """The error for gates this run cannot apply, naming the overrides that fix it; None when all can be."""
    refused = unmeasurable_gates(policy, why_not)
    if not refused:
        return None
    fixes = " ".join(f"--set '{item}'" for item in fixing_overrides(policy, list(refused), fallback_metric))
    metrics = sorted({gated_metrics(policy)[k] for k in refused})
    return (
        "\n".join(["gates this run cannot apply (nothing was trained):", *[f"  {line}" for line in refused.values()]])
        + f"\nFix: {fixes}\n(or gate {', '.join(metrics)} only where measured: gates.when_measured)"
    )


def gate_plan(policy: GateConfig, why_not: dict[str, str]) -> list[str]:
    """What the gates will compare, in the words a user reads before training starts."""
    lines = [f"gates: quality compared on {_label(policy.metric)} (gates.metric)"]
    ceilings = answer_ceilings(policy)
    applied = [f"{_label(m)} <= {bound:g}" for m, (_, bound) in ceilings.items() if m not in why_not]
    if applied:
        lines.append("gates: answers must keep " + ", ".join(applied) + " (gates.answers)")
    waiting = [f"{_label(m)} ({why_not[m]})" for m in policy.when_measured if m in why_not]
    waiting += [f"{_label(m)} ({why_not[m]})" for m in ceilings if m in why_not]
    if waiting:
        lines.append("gates not applied, this run cannot measure: " + "; ".join(waiting))
    return lines
