"""Pieces of the monitoring report that need no model: the text-drift sample and what it can detect."""

import numpy as np
import pandas as pd
import pytest

from monitoring.report import _text_sample, detectable_auc, detectable_share_change


def test_text_drift_learns_from_a_seeded_sample_of_each_side() -> None:
    frame = pd.DataFrame({"text": [f"tweet {i}" for i in range(50)], "confidence": 0.5})
    again = frame.copy()
    assert _text_sample(frame, 20) == 20 and _text_sample(again, 20) == 20
    assert frame["text"].notna().sum() == 20 and frame["confidence"].notna().all()  # other columns keep every row
    assert frame["text"].equals(again["text"])  # the same rows on every pass
    whole = pd.DataFrame({"text": ["a", "b"]})
    assert _text_sample(whole, 20) == 2 and _text_sample(whole, None) == 2 and whole["text"].notna().all()


def test_the_detectable_auc_shrinks_towards_chance_with_more_rows() -> None:
    assert detectable_auc(1000, 1000) == pytest.approx(0.5212, abs=1e-4)  # 0.5 + 1.645 x 0.01291
    assert detectable_auc(300, 1000) > detectable_auc(1000, 1000) > detectable_auc(5000, 5000) > 0.5
    assert detectable_auc(0, 1000) == 1.0


def test_the_detectable_share_change_is_the_two_proportion_power_figure() -> None:
    # Cohen's h for n = 5,000 a side, two-sided 0.05 at power 0.8: (1.96 + 0.8416) * sqrt(2 / 5000).
    h = (1.959964 + 0.841621) * np.sqrt(2 / 5000)
    expected = np.sin(np.pi / 4 + h / 2) ** 2 - 0.5
    assert detectable_share_change(5000, 5000) == pytest.approx(expected, rel=1e-3)
    # A larger window sample helps little once the reference is the smaller side.
    assert detectable_share_change(5000, 50_000) < detectable_share_change(5000, 5000)
    assert detectable_share_change(5000, 50_000) > detectable_share_change(50_000, 50_000)
