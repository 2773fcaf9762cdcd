"""What one monitoring pass found, typed: the pass, the task parts and the records read these fields, and
`to_json` writes them as `summary.json` (and as the monitor flow's result) in the shape they always had.

Only the report's per-signal figures stay a mapping (`Drift.signals`): they are Evidently's numbers per
signal, shown as they are, and each task has its own signals (`monitoring.report`, `monitoring.generation`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from monitoring.decision import RetrainDecision


@dataclass(frozen=True)
class SampleFacts:
    """A window over `monitor.sample_rows` is compared through a uniform sample of it: its size and power."""

    rows: int
    """Rows in the sample (drift, bias and the descriptors are measured on them)."""
    of: int
    """Rows in the window."""
    share_margin: float
    """95% margin of any share in the sample against the same share in the whole window (worst case, 0.5)."""
    detectable_share_change: float
    """The smallest change in a share, sample against reference, found with power 0.8 by a two-sided test at
    0.05 (around 0.5, where it is hardest to see)."""
    reference_rows: int


@dataclass(frozen=True)
class WindowFacts:
    spec: str
    """The window as `WindowSpec.describe` writes it."""
    rows: int
    labelled: int | None = None
    """The classifier's: rows with a feedback label (None: the task does not count them)."""
    first_ts: float | None = None
    last_ts: float | None = None
    sample: SampleFacts | None = None
    """A window over `monitor.sample_rows` is compared through a sample (None: every row)."""

    def to_json(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"spec": self.spec, "rows": self.rows}
        if self.labelled is not None:
            facts |= {"labelled": self.labelled, "first_ts": self.first_ts, "last_ts": self.last_ts}
        if self.sample is not None:
            facts["sample"] = asdict(self.sample)
        return facts


@dataclass(frozen=True)
class ReferenceFacts:
    uri: str | None
    rows: int


@dataclass(frozen=True)
class Drift:
    detected: bool
    reasons: list[str]
    """One line per drifted signal the decision counts (`monitor.drift_on`)."""
    signals: dict[str, Any]
    """Signal name -> Evidently's figures for it (score, method, threshold, drifted; or nested per descriptor)."""

    def score(self, name: str) -> float | None:
        signal = self.signals.get(name)
        return signal["score"] if isinstance(signal, dict) and "score" in signal else None

    def scores(self, group: str) -> dict[str, float]:
        """The scored members of a nested signal (`descriptors`, `generation`)."""
        members = self.signals.get(group) or {}
        return {name: s["score"] for name, s in members.items() if isinstance(s, dict) and "score" in s}

    @property
    def embedding_share(self) -> float | None:
        return (self.signals.get("embedding") or {}).get("share")


@dataclass(frozen=True)
class LabelQuality:
    """The classifier's quality on the window's feedback labels."""

    labelled: int
    accuracy: float
    macro_f1: float
    f1_per_class: dict[str, float]
    champion_test_macro_f1: float | None
    drop: float | None
    """Champion's test macro-F1 minus the window's (None: the champion recorded none)."""
    page: str | None = None
    """Why there is no quality page, when there is none."""

    def to_json(self) -> dict[str, Any]:
        facts = asdict(self)
        if self.page is None:
            del facts["page"]
        return facts


@dataclass(frozen=True)
class FeedbackQuality:
    """The generator's quality: the control-accuracy drop against the reference, ratings and corrections."""

    drop: float | None
    ratings: int
    mean_rating: float | None
    corrections: int


@dataclass(frozen=True)
class Shares:
    """A generator's answers in one frame (window or reference), as shares."""

    rows: int
    empty_share: float | None
    truncated_share: float | None
    repetition: float | None
    unk_share: float | None
    control_accuracy: float | None
    judged: int
    """Rows the control classifier judged."""


@dataclass(frozen=True)
class Generations:
    window: Shares
    reference: Shares
    control: str
    """Which control classifier judged, or why none did."""


@dataclass(frozen=True)
class Gap:
    value: float
    between: tuple[str, str]
    """(highest slice, lowest slice)"""
    label: str | None = None
    """For a rate gap: the label whose rate differs most."""
    ceiling: float | None = None

    @property
    def over(self) -> bool:
        return self.ceiling is not None and self.value > self.ceiling


@dataclass(frozen=True)
class Bias:
    slices: list[dict[str, Any]]
    """Per slice, the task's figures (rows, rates or control accuracy, whether it counts towards the gaps)."""
    rate_gap: Gap | None = None
    f1_gap: Gap | None = None
    control_gap: Gap | None = None
    notes: list[str] = field(default_factory=list)

    def gaps(self) -> dict[str, Gap]:
        found = {"rate_gap": self.rate_gap, "f1_gap": self.f1_gap, "control_gap": self.control_gap}
        return {name: gap for name, gap in found.items() if gap is not None}

    def to_json(self) -> dict[str, Any]:
        def gap(g: Gap | None) -> dict[str, Any] | None:
            return None if g is None else {**asdict(g), "over": g.over}

        gaps = {"rate_gap": self.rate_gap, "f1_gap": self.f1_gap, "control_gap": self.control_gap}
        return {"slices": self.slices, **{name: gap(g) for name, g in gaps.items()}, "notes": self.notes}


@dataclass(frozen=True)
class Flagged:
    """What the serving guards found in the window's texts (the prediction log's `flagged`)."""

    checked: int
    """Texts the guards checked (a model whose rules allow everything has none checked)."""
    flagged: int
    share: float
    kinds: dict[str, int]
    """Texts per kind found (`EMAIL_ADDRESS`: 12)."""


@dataclass(frozen=True)
class PassSummary:
    model: str
    champion_version: str
    window: WindowFacts
    task: str | None = None
    """None: the classifier's summary, which has always been without one."""
    reference: ReferenceFacts | None = None
    """None, with everything up to `bias`: the window was too small for a report."""
    drift: Drift | None = None
    generations: Generations | None = None
    quality: LabelQuality | FeedbackQuality | None = None
    bias: Bias | None = None
    guards: Flagged | None = None
    """None: no text in the window was checked."""
    created: str | None = None
    decision: RetrainDecision | None = None
    retraining: dict[str, Any] | None = field(default=None)
    """What the retraining request said, then what the launcher answered (its mode, run or deployment)."""

    @property
    def generative(self) -> bool:
        return self.task == "generation"

    def decided(self, created: str, decision: RetrainDecision) -> PassSummary:
        return replace(self, created=created, decision=decision)

    def to_json(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"model": self.model}
        if self.task is not None:
            facts["task"] = self.task
        facts |= {"champion_version": self.champion_version, "window": self.window.to_json()}
        if self.reference is not None:
            facts |= {"reference": asdict(self.reference), "drift": None if self.drift is None else asdict(self.drift)}
            if self.generations is not None:
                facts["generations"] = asdict(self.generations)
            facts["quality"] = _quality_json(self.quality)
            facts["bias"] = None if self.bias is None else self.bias.to_json()
        if self.guards is not None:
            facts["guards"] = asdict(self.guards)
        if self.created is not None:
            facts["created"] = self.created
        if self.decision is not None:
            d = self.decision
            facts["decision"] = {"verdict": d.verdict, "reason": d.reason, "triggers": list(d.triggers)}
        if self.retraining is not None:
            facts["retraining"] = self.retraining
        return plain(facts)


def _quality_json(quality: LabelQuality | FeedbackQuality | None) -> dict[str, Any] | None:
    if quality is None:
        return None
    return quality.to_json() if isinstance(quality, LabelQuality) else asdict(quality)


def plain(value: Any) -> Any:
    """numpy scalars and tuples to JSON types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
