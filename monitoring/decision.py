"""The retraining decision: a pure function of this window's results, past decisions and the policy.

No I/O here: the monitor flow computes the window's results, calls
:func:`decide_retraining`, records the decision (including "no") and acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmops.config import RetrainPolicy

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class WindowResult:
    at: float
    """Unix time of the window's end."""
    rows: int
    drift: bool
    quality_drop: float | None = None
    """Champion test macro-F1 minus the window's macro-F1 on feedback labels (None: no labels)."""
    bias_gap: float | None = None
    """Largest gap between slices (None: not computable)."""
    flagged_share: float | None = None
    """Share of the window's checked texts the guards found personal data or credentials in (None: none checked)."""


@dataclass(frozen=True)
class PastDecision:
    at: float
    drift: bool | None
    """None for a window that got no verdict (too small): it does not count towards K of M."""
    retrain: bool
    flagged_share: float | None = None


@dataclass(frozen=True)
class RetrainDecision:
    verdict: Literal["no-verdict", "hold", "retrain"]
    reason: str
    triggers: tuple[str, ...] = ()

    @property
    def retrain(self) -> bool:
        return self.verdict == "retrain"


def _triggers(window: WindowResult, history: list[PastDecision], policy: RetrainPolicy) -> tuple[list[str], str]:
    judged = [h.drift for h in sorted(history, key=lambda h: h.at) if h.drift is not None]
    recent = [*judged[-(policy.of_last - 1) :], window.drift] if policy.of_last > 1 else [window.drift]
    drifted = sum(recent)
    drift_note = f"drift in {drifted} of the last {len(recent)} windows (needs {policy.drift_windows})"
    if not window.drift and drifted:
        drift_note = f"no drift in this window ({drift_note})"
    triggers = []
    if window.drift and drifted >= policy.drift_windows:  # a clean window never triggers on past drift
        triggers.append(drift_note)
    drop, max_drop = window.quality_drop, policy.max_quality_drop
    if drop is not None and max_drop is not None and drop > max_drop:
        triggers.append(f"macro-F1 dropped {drop:.3f} (ceiling {max_drop})")
    gap, max_gap = window.bias_gap, policy.max_bias_gap
    if gap is not None and max_gap is not None and gap > max_gap:
        triggers.append(f"slice gap {gap:.3f} (ceiling {max_gap})")
    triggers += _flagged_triggers(window, history, policy)
    return triggers, drift_note


def _flagged_triggers(window: WindowResult, history: list[PastDecision], policy: RetrainPolicy) -> list[str]:
    share = window.flagged_share
    if share is None:
        return []
    found = []
    if policy.max_flagged_share is not None and share > policy.max_flagged_share:
        found.append(f"personal data in {share:.1%} of the texts (ceiling {policy.max_flagged_share:.1%})")
    earlier = [h.flagged_share for h in sorted(history, key=lambda h: h.at) if h.flagged_share is not None]
    earlier = earlier[-policy.of_last :]
    if policy.max_flagged_rise is not None and earlier:
        before = sum(earlier) / len(earlier)
        if share - before > policy.max_flagged_rise:
            found.append(
                f"personal data rose to {share:.1%} of the texts from {before:.1%} in the last {len(earlier)}"
                f" windows (rise ceiling {policy.max_flagged_rise:.1%})"
            )
    return found


def decide_retraining(window: WindowResult, history: list[PastDecision], policy: RetrainPolicy) -> RetrainDecision:
    """Retrain, hold, or no verdict, with the reason. `history` holds earlier decisions, any order."""
    if window.rows < policy.min_window:
        return RetrainDecision("no-verdict", f"{window.rows} predictions in the window; needs {policy.min_window}")
    triggers, drift_note = _triggers(window, history, policy)
    if not triggers:
        return RetrainDecision("hold", f"no trigger: {drift_note}")
    retrainings = sorted(h.at for h in history if h.retrain)
    if retrainings and window.at - retrainings[-1] < policy.cooldown_hours * 3600:
        hours = (window.at - retrainings[-1]) / 3600
        reason = f"cooldown: last retraining {hours:.1f} h ago (cooldown {policy.cooldown_hours} h)"
        return RetrainDecision("hold", reason, tuple(triggers))
    today = [t for t in retrainings if window.at - t < DAY_S]
    if len(today) >= policy.max_per_day:
        reason = f"daily cap: {len(today)} retrainings in the last 24 h (max {policy.max_per_day})"
        return RetrainDecision("hold", reason, tuple(triggers))
    return RetrainDecision("retrain", "; ".join(triggers), tuple(triggers))
