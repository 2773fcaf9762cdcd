"""Text descriptors, and the monitor's configuration errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmops.config import ConfigError, load_config
from monitoring.window import describe


def test_descriptors_count_words_urls_mentions_and_unknown_tokens() -> None:
    texts = pd.Series(["@united lost my bag http", "plain words here", "@a @b www.x.com"])
    out = describe(texts, np.array([0.0, 0.0, 0.25]), url_token="http")
    assert out["words"].tolist() == [5, 3, 3]
    assert out["url_share"].tolist() == pytest.approx([1 / 5, 0.0, 1 / 3])
    assert out["mention_share"].tolist() == pytest.approx([1 / 5, 0.0, 2 / 3])
    assert out["has_unknown"].tolist() == ["no", "no", "yes"]
    assert out["length"].tolist() == [len(t) for t in texts]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["monitor.window_size=null"], "window_size, window_hours"),
        (["monitor.drift_on=[]"], "drift_on"),
        (["monitor.drift_on=[vibes]"], "monitor.drift_on"),
        (["monitor.retrain.drift_windows=4", "monitor.retrain.of_last=3"], "drift_windows"),
        (["monitor.bias.slices=[{name: x}]"], "exactly one of keywords, regex, column"),
        (["monitor.bias.slices=[{name: x, regex: '(unclosed'}]"], "invalid regex"),
        (["monitor.bias.min_slice_row=3"], "unknown key"),
    ],
)
def test_monitor_config_errors_are_named(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)


def test_a_sample_of_a_stream_is_uniform_exact_in_size_and_never_holds_more() -> None:
    from monitoring.window import UniformSample

    rows, k = 1000, 100
    stream = pd.DataFrame({"ts": np.arange(rows, dtype=float), "request_id": "r", "idx": np.arange(rows)})
    picked = np.zeros(rows)
    for seed in range(200):
        sample = UniformSample(k, seed)
        for start in range(0, rows, 37):  # chunks that do not divide the sample
            sample.add(stream.iloc[start : start + 37])
            assert sample._kept is not None and len(sample._kept) <= k
        frame = sample.frame(list(stream.columns))
        assert len(frame) == k and frame["idx"].is_unique and frame["ts"].is_monotonic_increasing
        assert list(frame.columns) == list(stream.columns) and sample.seen == rows
        picked[frame["idx"].to_numpy()] += 1
    # Every row is equally likely (k / rows = 0.1 a draw): the early, middle and late rows alike.
    thirds = [part.mean() / 200 for part in np.array_split(picked, 3)]
    assert thirds == pytest.approx([0.1, 0.1, 0.1], abs=0.01)


def test_a_sample_of_nothing_has_the_columns() -> None:
    from monitoring.window import UniformSample

    assert list(UniformSample(5).frame(["ts", "text"]).columns) == ["ts", "text"]
