"""The typed pass summary writes summary.json (and the monitor flow's result) in the shape users read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from monitoring.decision import RetrainDecision
from monitoring.monitor import MonitorOutcome, verdict_lines
from monitoring.summary import (
    Bias,
    Drift,
    FeedbackQuality,
    Gap,
    Generations,
    LabelQuality,
    PassSummary,
    ReferenceFacts,
    Shares,
    WindowFacts,
)

HOLD = RetrainDecision("hold", "no drift in the window")


def test_a_window_too_small_for_a_report_has_no_report_keys() -> None:
    small = PassSummary("m", "3", WindowFacts("last 1h", 12)).decided("2026-11-30T10:00:00", HOLD)
    facts = small.to_json()
    assert list(facts) == ["model", "champion_version", "window", "created", "decision"]
    assert facts["window"] == {"spec": "last 1h", "rows": 12}
    assert facts["decision"] == {"verdict": "hold", "reason": "no drift in the window", "triggers": []}
    lines = verdict_lines(MonitorOutcome(Path("/r"), small, HOLD, "run"))
    assert "drift: not computed" in lines and "12 predictions" in lines and "decision: HOLD" in lines


def test_the_classifier_summary_is_plain_json_with_its_gaps_judged() -> None:
    summary = PassSummary(
        "tweet-sentiment",
        "2",
        WindowFacts("last 1d", 300, labelled=np.int64(120), first_ts=1.0, last_ts=2.0),
        reference=ReferenceFacts("runs:/x/reference", 500),
        drift=Drift(True, ["text: drifted"], {"text": {"score": np.float32(0.5), "drifted": True}}),
        quality=LabelQuality(120, 0.8, 0.7, {"negative": 0.9}, 0.75, 0.05),
        bias=Bias([{"name": "topic=apple", "rows": 40}], f1_gap=Gap(0.3, ("topic=a", "topic=b"), ceiling=0.2)),
    ).decided("2026-11-30T10:00:00", RetrainDecision("retrain", "drift twice", ("drift",)))
    facts = json.loads(json.dumps(summary.to_json()))  # numpy numbers and tuples written as JSON
    assert "task" not in facts and facts["window"]["labelled"] == 120
    assert facts["drift"]["signals"]["text"]["score"] == 0.5 and "page" not in facts["quality"]
    assert facts["bias"]["f1_gap"] == {
        "value": 0.3, "between": ["topic=a", "topic=b"], "label": None, "ceiling": 0.2, "over": True
    }  # fmt: skip
    lines = verdict_lines(MonitorOutcome(Path("/r"), summary, summary.decision or HOLD, "run"))
    assert "drift: YES (text: drifted)" in lines and "quality: macro-F1 0.700 on 120 feedback labels" in lines
    assert "bias: macro-F1 gap 0.300 (topic=a vs topic=b) OVER ceiling" in lines


def test_the_generator_summary_names_its_task_and_shares() -> None:
    shares = Shares(300, 0.0, 0.1, 0.02, 0.0, 0.8, 250)
    summary = PassSummary(
        "tweet-writer",
        "1",
        WindowFacts("last 1d", 300),
        task="generation",
        reference=ReferenceFacts(None, 300),
        drift=Drift(False, [], {}),
        generations=Generations(shares, shares, "control judged by tweet-sentiment version 1"),
        quality=FeedbackQuality(0.0, 4, 4.5, 1),
        bias=Bias([], control_gap=Gap(0.1, ("topic=a", "topic=b"))),
    )
    facts = summary.to_json()
    assert facts["task"] == "generation" and facts["generations"]["window"]["judged"] == 250
    assert facts["bias"]["control_gap"]["over"] is False and facts["quality"]["mean_rating"] == 4.5
    lines = verdict_lines(MonitorOutcome(Path("/r"), summary, HOLD, "run"))
    assert "300 generations" in lines and "control accuracy 0.800 (reference 0.800)" in lines
    assert "feedback: 4 ratings (mean 4.500), 1 corrections" in lines
    assert "bias: control accuracy gap 0.100 (topic=a vs topic=b)" in lines
