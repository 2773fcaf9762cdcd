"""Bias by slice: predicted-label rates and, with feedback labels, macro-F1 per slice, and the largest gaps.

Pure functions over a window frame with `text`, `prediction` and optionally
`feedback_label` columns; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from llmops.config import BiasConfig, SliceRule
from llmops.corpus import tag_topic
from monitoring.summary import Bias, Gap


@dataclass(frozen=True)
class SliceStats:
    name: str
    rows: int
    labelled: int
    rates: dict[str, float]
    """Share of the slice's rows predicted as each label."""
    macro_f1: float | None
    """On the slice's feedback-labelled rows (None: fewer than the minimum)."""
    gated: bool
    """Large enough to count towards the gaps."""


@dataclass(frozen=True)
class BiasResult:
    slices: list[SliceStats]
    rate_gap: Gap | None
    f1_gap: Gap | None
    notes: list[str] = field(default_factory=list)

    def facts(self) -> Bias:
        return Bias([asdict(s) for s in self.slices], rate_gap=self.rate_gap, f1_gap=self.f1_gap, notes=self.notes)


def slice_masks(frame: pd.DataFrame, cfg: BiasConfig, topics: dict[str, list[str]]) -> dict[str, pd.Series]:
    """Slice name -> boolean mask over the frame's rows. Slices may overlap (keyword and regex rules)."""
    masks: dict[str, pd.Series] = {}
    if cfg.by_topic:
        topic = frame["topic"] if "topic" in frame else tag_topic(frame["text"], topics)
        for name in sorted(topic.unique()):
            masks[f"topic={name}"] = topic == name
    for rule in cfg.slices:
        masks.update(_rule_masks(frame, rule))
    return masks


def _rule_masks(frame: pd.DataFrame, rule: SliceRule) -> dict[str, pd.Series]:
    if rule.keywords is not None:
        pattern = r"\b(?:" + "|".join(re.escape(k) for k in rule.keywords) + r")\b"
        return {rule.name: frame["text"].str.contains(pattern, case=False, regex=True)}
    if rule.regex is not None:
        return {rule.name: frame["text"].str.contains(rule.regex, case=False, regex=True)}
    column = str(rule.column)
    if column not in frame:
        raise KeyError(f"monitor.bias.slices '{rule.name}': column '{column}' is not in the window {list(frame)}")
    values = frame[column]
    return {f"{rule.name}={value}": values == value for value in sorted(values.dropna().unique(), key=str)}


def slice_bias(
    frame: pd.DataFrame,
    masks: dict[str, pd.Series],
    labels: list[str],
    min_rows: int,
    min_labelled: int,
    max_rate_gap: float | None = None,
    max_f1_gap: float | None = None,
) -> BiasResult:
    """Per-slice rates and macro-F1, and the largest gaps among slices with at least `min_rows` rows."""
    has_feedback = "feedback_label" in frame
    stats = []
    for name, mask in masks.items():
        part = frame[mask.to_numpy()]
        rates = part["prediction"].value_counts(normalize=True).reindex(labels, fill_value=0.0)
        labelled = part[part["feedback_label"].notna()] if has_feedback else part.iloc[0:0]
        f1 = None
        if len(labelled) >= min_labelled:
            f1 = float(
                f1_score(
                    labelled["feedback_label"], labelled["prediction"], labels=labels, average="macro", zero_division=0
                )
            )
        rates_dict = {label: round(float(r), 6) for label, r in rates.items()}
        stats.append(SliceStats(name, len(part), len(labelled), rates_dict, f1, len(part) >= min_rows))
    gated = [s for s in stats if s.gated]
    notes = [] if len(gated) >= 2 else [f"{len(gated)} slice(s) with at least {min_rows} rows: no gap to measure"]
    return BiasResult(stats, _rate_gap(gated, labels, max_rate_gap), _f1_gap(gated, max_f1_gap), notes)


def _rate_gap(gated: list[SliceStats], labels: list[str], ceiling: float | None) -> Gap | None:
    if len(gated) < 2:
        return None
    rates = np.array([[s.rates[label] for label in labels] for s in gated])
    spread = rates.max(axis=0) - rates.min(axis=0)
    worst = int(spread.argmax())
    high, low = gated[int(rates[:, worst].argmax())].name, gated[int(rates[:, worst].argmin())].name
    return Gap(round(float(spread[worst]), 6), (high, low), labels[worst], ceiling)


def _f1_gap(gated: list[SliceStats], ceiling: float | None) -> Gap | None:
    scored = [s for s in gated if s.macro_f1 is not None]
    if len(scored) < 2:
        return None
    high = max(scored, key=lambda s: s.macro_f1 or 0.0)
    low = min(scored, key=lambda s: s.macro_f1 or 0.0)
    return Gap(round((high.macro_f1 or 0.0) - (low.macro_f1 or 0.0), 6), (high.name, low.name), None, ceiling)
