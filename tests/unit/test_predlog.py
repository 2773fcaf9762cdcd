"""The prediction log: both stores round-trip, windows select the latest rows, nothing buffered is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from llmops.predlog import FeedbackRow, PredictionLogWriter, PredictionRow, open_store, probabilities_json


def row(request_id: str, ts: float, idx: int = 0, label: str = "positive") -> PredictionRow:
    probs = probabilities_json(["negative", "positive"], [0.25, 0.75])
    return PredictionRow(request_id, idx, ts, f"text {request_id}", label, 0.75, probs, "m", "3", "champion", 4.2)


@pytest.fixture(params=["predictions.db", "predictions"], ids=["sqlite", "parquet"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return tmp_path / request.param


def test_rows_round_trip_and_windows_take_the_latest(location: Path) -> None:
    store = open_store(location)
    store.write([row("a", 1.0), row("b", 2.0), row("b", 2.0, idx=1)], [FeedbackRow("a", 0, "negative", 5.0)])
    store.write([row("c", 3.0)], [])
    everything = store.read_predictions()
    assert everything["request_id"].tolist() == ["a", "b", "b", "c"]
    assert json.loads(everything["probabilities"][0]) == {"negative": 0.25, "positive": 0.75}
    assert store.read_predictions(last_n=2)["request_id"].tolist() == ["b", "c"]
    assert store.read_predictions(since=2.0)["request_id"].tolist() == ["b", "b", "c"]
    assert store.read_feedback()[["request_id", "label"]].values.tolist() == [["a", "negative"]]
    assert (store.request_size("b"), store.request_size("a"), store.request_size("zzz")) == (2, 1, 0)


def test_an_empty_log_reads_as_an_empty_window(location: Path) -> None:
    store = open_store(location)
    assert store.read_predictions().empty and store.read_feedback().empty


def test_the_writer_flushes_everything_on_close(location: Path) -> None:
    writer = PredictionLogWriter(open_store(location), flush_interval_s=3600).start()
    writer.append([row(f"r{i}", float(i)) for i in range(100)])
    writer.append_feedback(FeedbackRow("r1", 0, "negative", 200.0))
    assert writer.request_size("r5") == 1  # still buffered, already answerable for feedback
    assert open_store(location).read_predictions().empty
    writer.close()
    assert len(open_store(location).read_predictions()) == 100
    assert len(open_store(location).read_feedback()) == 1


def test_a_failed_write_keeps_the_rows_for_the_next_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "log.db")
    writer = PredictionLogWriter(store, flush_interval_s=3600)
    writer.append([row("a", 1.0)])
    real_write = store.write

    def disk_full(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "write", disk_full)
    writer.flush()
    assert writer.write_failures == 1 and writer.pending == 1
    monkeypatch.setattr(store, "write", real_write)
    writer.flush()
    assert writer.pending == 0 and store.read_predictions()["request_id"].tolist() == ["a"]


def test_embeddings_and_unknown_shares_round_trip(location: Path) -> None:
    import numpy as np

    from llmops.predlog import decode_embeddings, encode_embedding

    vectors = np.array([[0.5, -1.25, 3.0], [0.0, 2.0, -0.5]], dtype=np.float32)
    store = open_store(location)
    rows = [
        PredictionRow("a", i, 1.0, "t", "positive", 0.7, "{}", "m", "3", "champion", 1.0, encode_embedding(v), 0.1)
        for i, v in enumerate(vectors)
    ]
    store.write(rows, [])
    window = store.read_predictions(route="champion", model_version="3")
    assert np.allclose(decode_embeddings(window["embedding"]), vectors)
    assert window["unk_share"].tolist() == pytest.approx([0.1, 0.1])
    assert store.read_predictions(model_version="4").empty and store.read_predictions(route="shadow").empty


def test_a_log_from_before_embeddings_gains_the_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE predictions (request_id TEXT, idx INTEGER, ts REAL, text TEXT, label TEXT, score REAL,"
            " probabilities TEXT, model_name TEXT, model_version TEXT, route TEXT, latency_ms REAL)"
        )
        db.execute("INSERT INTO predictions VALUES ('old', 0, 1.0, 't', 'x', 0.5, '{}', 'm', '1', 'champion', 1.0)")
    store = open_store(path)
    store.write([row("new", 2.0)], [])
    frame = store.read_predictions()
    assert frame["request_id"].tolist() == ["old", "new"] and frame["embedding"].isna().all()


@pytest.mark.parametrize("last_n", [None, 7, 40])
def test_a_window_is_read_in_bounded_chunks_with_the_rows_a_whole_read_gives(location: Path, last_n: int) -> None:
    store = open_store(location)
    for flush in range(5):  # several files for the Parquet log; instants shared across them (ties at the cutoff)
        store.write([row(f"r{flush}-{i}", float(i % 6), idx=flush) for i in range(6)], [])
    store.write([PredictionRow("s", 0, 9.0, "t", "x", 0.5, "{}", "m", "3", "shadow", 1.0)], [])
    chunks = list(store.scan("predictions", last_n, None, 4, route="champion"))
    assert all(len(chunk) <= 4 for chunk in chunks)
    scanned = pd.concat(chunks).sort_values(["ts", "request_id", "idx"]).reset_index(drop=True)
    whole = store.read_predictions(last_n, route="champion")
    assert scanned[["request_id", "idx", "ts"]].equals(whole[["request_id", "idx", "ts"]])
    assert len(whole) == min(last_n or 30, 30)  # the shadow row is not the champion's
    # The last n are the newest, ties broken by request and position as the database breaks them.
    every = store.read_predictions(route="champion")
    assert whole["request_id"].tolist() == every["request_id"].tolist()[-len(whole) :]


def test_a_window_of_an_unknown_table_or_column_is_refused(location: Path) -> None:
    store = open_store(location)
    with pytest.raises(ValueError, match="no window of 'feedback'"):
        next(store.scan("feedback"))
    with pytest.raises(ValueError, match="colour"):
        next(store.scan("predictions", colour="red"))
