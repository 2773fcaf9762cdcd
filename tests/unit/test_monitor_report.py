"""Pieces of the monitoring report that need no model: the text-drift sample and what it can detect."""

import pandas as pd
import pytest

from monitoring.report import _text_sample, detectable_auc


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
