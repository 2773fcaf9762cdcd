"""Bias by slice on a constructed window whose rates and F1 are known by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from llmops.config import BiasConfig, SliceRule
from monitoring.bias import slice_bias, slice_masks

LABELS = ["negative", "neutral", "positive"]


def window() -> pd.DataFrame:
    # airline: 40 rows, 30 predicted negative (rate 0.75), all predictions right.
    # apple:   40 rows, 10 predicted negative (rate 0.25); the 20 true-neutral rows are predicted positive.
    # claritin: 5 rows (below the minimum: listed, not gated).
    airline = pd.DataFrame({"prediction": ["negative"] * 30 + ["positive"] * 10})
    airline["feedback_label"] = airline["prediction"]
    apple = pd.DataFrame(
        {
            "prediction": ["negative"] * 10 + ["positive"] * 30,
            "feedback_label": ["negative"] * 10 + ["positive"] * 10 + ["neutral"] * 20,
        }
    )
    claritin = pd.DataFrame({"prediction": ["neutral"] * 5, "feedback_label": ["negative"] * 5})
    frame = pd.concat(
        [airline.assign(topic="airline"), apple.assign(topic="apple"), claritin.assign(topic="claritin")],
        ignore_index=True,
    )
    frame["text"] = [f"@United late again {i}" if t == "airline" else f"tweet {i}" for i, t in enumerate(frame.topic)]
    return frame


def test_gaps_match_the_hand_computed_rates_and_f1() -> None:
    frame = window()
    masks = slice_masks(frame, BiasConfig(), topics={})
    result = slice_bias(frame, masks, LABELS, min_rows=30, min_labelled=30, max_rate_gap=0.4, max_f1_gap=0.5)

    by_name = {s.name: s for s in result.slices}
    assert by_name["topic=airline"].rates == {"negative": 0.75, "neutral": 0.0, "positive": 0.25}
    assert by_name["topic=apple"].rates == {"negative": 0.25, "neutral": 0.0, "positive": 0.75}
    assert not by_name["topic=claritin"].gated and by_name["topic=claritin"].macro_f1 is None
    # Rates: negative (and positive) differ by 0.75 - 0.25 = 0.5 between airline and apple: over the 0.4 ceiling.
    assert result.rate_gap is not None
    assert result.rate_gap.value == pytest.approx(0.5) and result.rate_gap.over
    assert result.rate_gap.between == ("topic=airline", "topic=apple") and result.rate_gap.label == "negative"
    # Macro-F1 over the three labels: airline 2/3 (neutral absent: 0), apple (1 + 0 + 0.5) / 3 = 0.5.
    assert by_name["topic=airline"].macro_f1 == pytest.approx(2 / 3)
    assert by_name["topic=apple"].macro_f1 == pytest.approx(0.5)
    assert result.f1_gap is not None and result.f1_gap.value == pytest.approx(2 / 3 - 0.5, abs=1e-6)
    assert not result.f1_gap.over


def test_declared_slices_by_keyword_regex_and_column() -> None:
    frame = window()
    cfg = BiasConfig(
        by_topic=False,
        slices=[
            SliceRule(name="united", keywords=["united"]),
            SliceRule(name="numbered", regex=r"tweet \d+$"),
            SliceRule(name="label", column="feedback_label"),
        ],
    )
    masks = slice_masks(frame, cfg, topics={})
    assert int(masks["united"].sum()) == 40 and int(masks["numbered"].sum()) == 45
    assert {k for k in masks if k.startswith("label=")} == {"label=negative", "label=neutral", "label=positive"}


def test_fewer_than_two_large_slices_have_no_gap() -> None:
    frame = window()
    masks = slice_masks(frame, BiasConfig(), topics={})
    result = slice_bias(frame, masks, LABELS, min_rows=100, min_labelled=30)
    assert result.rate_gap is None and result.f1_gap is None and result.notes


def test_an_unknown_slice_column_is_named() -> None:
    cfg = BiasConfig(by_topic=False, slices=[SliceRule(name="region", column="region")])
    with pytest.raises(KeyError, match="column 'region'"):
        slice_masks(window(), cfg, topics={})
