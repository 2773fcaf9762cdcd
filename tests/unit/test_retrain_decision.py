"""The retraining policy, case by case: minimum window, K of M hysteresis, cooldown, daily cap, lone triggers."""

from __future__ import annotations

import pytest

from llmops.config import RetrainPolicy
from monitoring.decision import PastDecision, WindowResult, decide_retraining

H = 3600.0
POLICY = RetrainPolicy(
    min_window=100,
    drift_windows=2,
    of_last=3,
    cooldown_hours=6,
    max_per_day=2,
    max_quality_drop=0.05,
    max_bias_gap=0.3,
    max_flagged_share=0.1,
    max_flagged_rise=0.05,
)
NOW = 1_000 * H


def window(
    drift: bool = False,
    rows: int = 500,
    quality_drop: float | None = None,
    bias_gap: float | None = None,
    flagged: float | None = None,
):
    return WindowResult(
        at=NOW, rows=rows, drift=drift, quality_drop=quality_drop, bias_gap=bias_gap, flagged_share=flagged
    )


def past(hours_ago: float, drift: bool | None, retrain: bool = False, flagged: float | None = None) -> PastDecision:
    return PastDecision(at=NOW - hours_ago * H, drift=drift, retrain=retrain, flagged_share=flagged)


CASES = [
    # (name, window, history, verdict, reason fragment)
    ("too few rows", window(drift=True, rows=99), [past(1, True)], "no-verdict", "99 predictions"),
    ("no drift", window(), [past(1, False), past(2, False)], "hold", "drift in 0 of the last 3"),
    ("one noisy window", window(drift=True), [past(1, False), past(2, False)], "hold", "drift in 1 of the last 3"),
    ("drift holds 2 of 3", window(drift=True), [past(1, False), past(2, True)], "retrain", "drift in 2 of the last 3"),
    ("a clean window after drifted ones", window(), [past(1, True), past(2, True)], "hold", "drift in 2 of the last 3"),
    ("old drift has aged out", window(drift=True), [past(1, False), past(2, False), past(3, True)], "hold", "1 of"),
    ("small windows do not count", window(drift=True), [past(1, None), past(2, True)], "retrain", "2 of the last 2"),
    ("cooldown", window(drift=True), [past(1, True), past(2, True, retrain=True)], "hold", "cooldown"),
    ("after cooldown", window(drift=True), [past(1, True), past(7, True, retrain=True)], "retrain", "drift"),
    (
        "daily cap",
        window(drift=True),
        [past(1, True), past(7, True, retrain=True), past(14, True, retrain=True)],
        "hold",
        "daily cap",
    ),
    ("quality drop alone", window(quality_drop=0.08), [], "retrain", "macro-F1 dropped 0.080"),
    ("small quality drop", window(quality_drop=0.02), [], "hold", "no trigger"),
    ("bias gap alone", window(bias_gap=0.4), [], "retrain", "slice gap 0.400"),
    ("quality drop in cooldown", window(quality_drop=0.2), [past(1, False, retrain=True)], "hold", "cooldown"),
    ("personal data over its ceiling", window(flagged=0.12), [], "retrain", "personal data in 12.0% of the texts"),
    ("personal data under its ceiling", window(flagged=0.04), [], "hold", "no trigger"),
    (
        "personal data rising",
        window(flagged=0.09),
        [past(1, False, flagged=0.01), past(2, False, flagged=0.03)],
        "retrain",
        "rose to 9.0% of the texts from 2.0% in the last 2 windows",
    ),
    (
        "personal data steady",
        window(flagged=0.09),
        [past(1, False, flagged=0.08), past(2, False, flagged=0.07)],
        "hold",
        "no trigger",
    ),
    ("no text checked", window(), [past(1, False, flagged=0.0)], "hold", "no trigger"),
]


@pytest.mark.parametrize(("win", "history", "verdict", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_policy_table(win: WindowResult, history: list[PastDecision], verdict: str, fragment: str) -> None:
    decision = decide_retraining(win, history, POLICY)
    assert decision.verdict == verdict
    assert fragment in decision.reason
    assert decision.retrain == (verdict == "retrain")


def test_triggers_are_kept_when_held() -> None:
    decision = decide_retraining(window(drift=True), [past(1, True), past(2, True, retrain=True)], POLICY)
    assert decision.verdict == "hold" and decision.triggers == ("drift in 3 of the last 3 windows (needs 2)",)


def test_k_larger_than_m_is_refused() -> None:
    from llmops.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="drift_windows must not exceed"):
        load_config(None, ["monitor.retrain.drift_windows=4", "monitor.retrain.of_last=3"])
